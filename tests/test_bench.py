"""The optimizer-step benchmark (benchmarks/bench.py): its quick mode and its errors.

Moved from tests/test_fastpath.py with the benchmark, which left the library package.
"""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402  (benchmarks/bench.py)


def test_bench_quick_smoke(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--quick",
            "--variants",
            "torch_adamw,adamw,paper",
            "--out-md",
            str(tmp_path / "b.md"),
            "--out-json",
            str(tmp_path / "b.json"),
        ]
    )
    res = bench.run_bench(args, log=lambda s: None)
    (model,) = res["models"]
    assert model["arch"] == "qwen3" and model["size"] == "micro"
    v = model["variants"]
    assert set(v) == {"torch_adamw", "adamw", "paper"}
    assert v["torch_adamw"]["vs_torch_adamw"] == 1.0
    assert v["torch_adamw"]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)
    assert v["paper"]["state_bytes_per_param"] < 8.0
    assert v["paper"]["flops"]["mm32"] > 0 and v["paper"]["roofline_s"] > 0
    assert res["machine"]["mm32"] > 0 and res["machine"]["copy_bw"] > 0
    md = (tmp_path / "b.md").read_text()
    assert "Command:" in md and "| qwen3 |" in md
    assert (tmp_path / "b.json").exists()


def _bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        bench.run_bench(_bench_args("--quick", "--device", "cuda"), log=lambda s: None)
    with pytest.raises(ValueError, match="--device mps: cpu or cuda"):
        bench.run_bench(_bench_args("--quick", "--device", "mps"), log=lambda s: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_quick_on_cuda(tmp_path):

    res = bench.run_bench(
        _bench_args(
            "--quick",
            "--device",
            "cuda",
            "--variants",
            "torch_adamw,torch_muon,paper",
            "--out-json",
            str(tmp_path / "b.json"),
        ),
        log=lambda s: None,
    )
    m = res["machine"]
    assert m["device"] != "cpu" and m["mm16"] > 0 and m["mm_polar"] == m["mm16"]
    v = res["models"][0]["variants"]
    assert v["paper"]["median_s"] > 0 and v["torch_muon"]["median_s"] > 0


# ----------------------------------------------------------------------------------------
# the DDC step benchmark and the peers benchmark: smoke runs of their command lines
# ----------------------------------------------------------------------------------------
import json  # noqa: E402

import bench_ddc  # noqa: E402  (benchmarks/bench_ddc.py)
import peers  # noqa: E402  (benchmarks/peers.py)


def test_bench_ddc_smoke(tmp_path):
    """One tiny model, two interleaved rounds: every variant timed, the DDC ratios to their
    bases computed from the medians, the report written."""
    variants = "torch_adamw,torch_adamw_fused,ddc_adam,muon,ddc_muon"
    argv = ["--sizes", "tiny", "--archs", "qwen3", "--repeats", "2", "--variants", variants, "--out", str(tmp_path)]
    assert bench_ddc.main(argv) in (0, None)
    res = json.loads((tmp_path / "bench.json").read_text())
    (model,) = res["models"]
    v = model["variants"]
    assert set(v) == set(variants.split(","))
    med = {k: x["median_s"] for k, x in v.items()}
    assert v["ddc_adam"]["ratio_to_base"] == pytest.approx(med["ddc_adam"] / med["torch_adamw"])
    assert v["ddc_adam"]["ratio_to_fused"] == pytest.approx(med["ddc_adam"] / med["torch_adamw_fused"])
    assert v["ddc_muon"]["ratio_to_base"] == pytest.approx(med["ddc_muon"] / med["muon"])
    assert "| qwen3/tiny |" in (tmp_path / "bench.md").read_text()


def test_bench_ddc_timing_sets_and_bad_variant(capsys):
    """Each family is interleaved on its own (every requested variant in exactly one set, the
    base beside its DDC lift), or all together; an unknown variant is refused by name."""
    family = bench_ddc.timing_sets(list(bench_ddc.VARIANTS), "family")
    assert sorted(v for s in family for v in s) == sorted(bench_ddc.VARIANTS)
    assert ["torch_adamw", "torch_adamw_fused", "ddc_adam"] in family and ["muon", "ddc_muon"] in family
    assert bench_ddc.timing_sets(["ddc_adam", "muon"], "family") == [["ddc_adam"], ["muon"]]
    assert bench_ddc.timing_sets(["ddc_adam", "muon"], "all") == [["ddc_adam", "muon"]]
    with pytest.raises(SystemExit):
        bench_ddc.main(["--variants", "torch_adamw,ddc_adamw"])
    assert "--variants: unknown ddc_adamw" in capsys.readouterr().err


def test_peers_smoke(tmp_path):
    """The peers benchmark on the micro Qwen3 with the variants that need no peer package: the
    same map in float32 (equiopt's `muon` and the textbook loop) agrees on the first step to
    float32 rounding, and the report is written."""
    out = tmp_path / "peers"
    argv = ["--models", "qwen3/micro", "--threads", "1", "--rounds", "2", "--budget", "1", "--no-install"]
    peers.main(argv + ["--variants", "equiopt_muon,textbook_fp32", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    (run,) = res["runs"]
    assert {"equiopt_muon", "textbook_fp32"} <= set(run["variants"])
    assert run["variants"]["textbook_fp32"]["first_step_vs_muon"] < 1e-4
    assert "qwen3/micro" in out.with_suffix(".md").read_text()


def test_peers_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        peers.main(["--models", "micro", "--no-install"])
    assert "--models: unknown model 'micro'" in capsys.readouterr().err


import row_blocks  # noqa: E402  (benchmarks/row_blocks.py)


def test_row_blocks_smoke(tmp_path):
    """benchmarks/row_blocks.py writes one row per thread count, shape and order, and the
    row-block sum it times is the column sum (float64 oracle, float32 summation bound)."""
    before = torch.get_num_threads()
    try:
        out = tmp_path / "rb.md"
        assert row_blocks.main(["--threads", "1", "2", "--rounds", "2", "--out", str(out)]) == 0
        rows = [line for line in out.read_text().splitlines() if line.startswith(("| 1 |", "| 2 |"))]
        assert len(rows) == 2 * len(row_blocks.SHAPES) * 2
        t = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            err = (row_blocks.row_block_sum(t).double() - t.double().sum(0)).abs()
            assert (err <= 4096 * torch.finfo(torch.float32).eps * t.double().abs().sum(0)).all()
    finally:
        torch.set_num_threads(before)

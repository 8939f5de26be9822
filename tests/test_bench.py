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

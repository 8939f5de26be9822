"""equiopt under torch.distributed: 2 processes, gloo on CPU, launched with torchrun.

Every multi-process run has a wall-clock timeout (the process group is killed and the test
fails, never hangs) and gloo collectives time out on their own (EQUIOPT_DIST_TIMEOUT).
Three launches serve all tests (tests/dist_worker.py): ``maps`` (every layout x every map
on DTensor shards with synthetic gradients, communication volumes, gradless parameters,
NaN on one rank's shard), ``train`` (DDP and FSDP2 training of a plain GPT for each preset
and of tiny HF Qwen3 / OLMoE, plus a distributed checkpoint mid-run) and ``resume`` (a fresh
launch that loads the checkpoint and continues).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import equiopt
from equiopt import distributed as D
from equiopt import sharding as S

HERE = Path(__file__).resolve().parent
SRC = Path(equiopt.__file__).resolve().parent.parent
WORKER = HERE / "dist_worker.py"
LAUNCH_TIMEOUT = float(os.environ.get("EQUIOPT_DIST_LAUNCH_TIMEOUT", 240))
TOL = 1e-6

import dist_worker as W  # noqa: E402
from launch import torchrun  # noqa: E402

dist_only = pytest.mark.dist


def launch(cmd: str, out: Path, nproc: int = 2) -> None:
    """torchrun --standalone --nproc_per_node=NPROC dist_worker.py CMD OUT, with a timeout."""
    torchrun(nproc, [str(WORKER), cmd, str(out)], timeout=LAUNCH_TIMEOUT, label=cmd, pythonpath=(str(HERE),))
    if not (out / f"done-{cmd}").exists():
        pytest.fail(f"{cmd}: torchrun finished without writing done-{cmd}")


# Own temporary directories, not tmp_path_factory: on a machine where other pytest sessions
# run at the same time, pytest's rotation of /tmp/pytest-of-<user> may delete a basetemp
# that is still in use.
@pytest.fixture(scope="module")
def maps_dir():
    out = Path(tempfile.mkdtemp(prefix="equiopt-dist-maps-"))
    launch("maps", out)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def train_dir():
    out = Path(tempfile.mkdtemp(prefix="equiopt-dist-train-"))
    launch("train", out)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def resumed_dir(train_dir):
    launch("resume", train_dir)  # a new torchrun: fresh processes, fresh model and optimizer
    return train_dir


_REFS: dict = {}


def reference(preset: str, halves: bool = True, arch: str = "plain") -> dict:
    """W.reference_run, computed once per test session (DDP and FSDP2 share it)."""
    key = (preset, halves, arch)
    if key not in _REFS:
        _REFS[key] = W.reference_run(preset, halves=halves, arch=arch)
    return _REFS[key]


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    worst = max(a, key=lambda n: (a[n] - b[n]).abs().max().item())
    return (a[worst] - b[worst]).abs().max().item(), worst


# =========================================================================================
# no processes: shard geometry and owner assignment
# =========================================================================================
@pytest.mark.parametrize("rows,world", [(33, 2), (1, 2), (2, 2), (7, 3), (10, 4), (0, 2), (5, 8)])
def test_shard_bounds_are_torch_chunk(rows, world):
    geo = S._Shard(None, world, 0, rows)
    chunks = torch.arange(rows).chunk(world) if rows else ()
    sizes = [c.numel() for c in chunks] + [0] * (world - len(chunks))
    assert [geo.size(k) for k in range(world)] == sizes
    assert sum(sizes) == rows


def test_owner_assignment_balances_and_is_deterministic():
    costs = [8, 8, 1, 1, 1, 1, 4, 4]
    owners = D.assign_owners(costs, 2)
    assert owners == D.assign_owners(list(costs), 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert loads == [14, 14]
    assert set(D.assign_owners([1.0] * 5, 8)) == {0, 1, 2, 3, 4}  # no rank gets two while one idles


@pytest.mark.parametrize(
    "shape,layout,aligned",
    [
        ((32, 16), equiopt.Layout(heads=4), True),  # 16 | 16 rows: 2 heads each
        ((24, 16), equiopt.Layout(heads=3), False),  # 12 rows cut head 1
        ((16, 24), equiopt.Layout(heads=3, head_axis="in"), False),
        ((22, 16), equiopt.Layout(fused=2), True),  # gate | up
        ((22, 16), equiopt.Layout(fused=2, interleaved=True), False),
        ((3, 10, 7), equiopt.Layout(stacked=True), True),
        ((1, 16), equiopt.Layout(), True),  # rank 1 empty
        ((33, 16), equiopt.Layout(), False),
    ],
)
def test_alignment(shape, layout, aligned):
    assert S._aligned(layout, shape, S._Shard(None, 2, 0, shape[0])) is aligned


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_single_process_helpers_are_noops(tmp_path):
    if "WORLD_SIZE" not in os.environ:
        assert D.init_from_env(device="cpu") == D.DistInfo()
    assert D.is_rank0() and D.mean_over_ranks(2.5) == 2.5
    model = torch.nn.Linear(4, 3)
    assert D.wrap_model(model, "none") is model
    opt = D.build(model, "paper")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    D.save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 1})
    w = model.weight.detach().clone()
    model2 = torch.nn.Linear(4, 3)
    opt2 = D.build(model2, "paper")
    extra, _ = D.load_checkpoint(tmp_path / "ck", model2, opt2)
    assert extra == {"step": 1} and torch.equal(model2.weight, w)
    assert torch.equal(opt2.state[model2.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])
    # a second save replaces the first atomically (written aside, then swapped in)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    D.save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and D.has_checkpoint(tmp_path / "ck")
    extra, _ = D.load_checkpoint(tmp_path / "ck", model2, opt2)
    assert extra == {"step": 2} and torch.equal(model2.weight, model.weight)


# =========================================================================================
# maps on DTensor shards (synthetic gradients)
# =========================================================================================
@dist_only
@pytest.mark.parametrize("spec", list(W.MAP_SPECS))
def test_every_layout_matches_single_process(maps_dir, spec):
    res = torch.load(maps_dir / "maps.pt")
    ref = W.map_reference(spec)
    got = res["params"][spec]
    for name, _, _ in W.LAYOUT_CASES:
        d = (got[name] - ref[name]).abs().max().item()
        assert d <= TOL, f"{spec} on {name} ({res['paths'][spec][name]} path): max |diff| {d:.2e}"
    moved = max((ref[n] - W.case_tensors(i, s)).abs().max().item() for i, (n, s, _) in enumerate(W.LAYOUT_CASES))
    assert moved > 1e-3


@dist_only
def test_paths_chosen(maps_dir):
    paths = torch.load(maps_dir / "maps.pt")["paths"]
    for spec, table in paths.items():
        for name in ("stacked_odd", "stacked_T_fused_il", "stacked_one", "row_vector", "heads_out_aligned"):
            assert table[name] == "local", (spec, name)
    assert paths["row_norm"]["plain_uneven"] == "reduce"
    assert paths["centered_row_norm"]["fused2_interleaved"] == "reduce"
    assert paths["right_spectral"]["plain_uneven"] == "gram"
    for spec in ("polar_express", "hybrid", "left_spectral", "scaled_polar"):
        assert paths[spec]["plain_uneven"] == "gather"
        assert paths[spec]["heads_out_cut"] == "gather"


@dist_only
@pytest.mark.parametrize("case", W.COMM_CASES, ids=[c[0] for c in W.COMM_CASES])
def test_communication_volume(maps_dir, case):
    name, _, _, _, expected = case
    per_rank = torch.load(maps_dir / "comm.pt")[name]
    assert per_rank == [expected, expected], per_rank


@dist_only
def test_gradless_params_untouched_and_nan_skipped_on_every_rank(maps_dir):
    r = torch.load(maps_dir / "none_skip.pt")
    assert r["a_unchanged"] and r["b_unchanged"]
    assert r["c_diff"] <= TOL and r["d_diff"] <= TOL
    assert r["skips_all"] == [1, 1]  # NaN on rank 1's shard only: both ranks skipped it


@dist_only
def test_grad_norm_and_clipping_over_shards(maps_dir):
    r = torch.load(maps_dir / "none_skip.pt")
    got, want = r["grad_norm"]
    assert got == pytest.approx(want, rel=1e-12)
    before, after, target = r["clipped_norm"]
    assert before == pytest.approx(want, rel=1e-12) and after == pytest.approx(target, rel=1e-6)


@dist_only
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_on_dtensor_shards(maps_dir, foreach):
    assert torch.load(maps_dir / "none_skip.pt")[f"adamw_foreach_{foreach}_diff"] <= TOL


@pytest.mark.parametrize("case", W.COMM_CASES, ids=[c[0] for c in W.COMM_CASES])
def test_estimate_comm_matches_hand_count(case):
    name, shape, layout, spec, expected = case
    p = torch.nn.Parameter(torch.empty(shape, device="meta"))
    opt = equiopt.EquiOptimizer([{**spec, "params": [p]}], layouts={p: layout})
    est = D.estimate_comm(opt, 2)
    got = sum(v[0] for k, v in est["by_path"].items() if k != "finite_check")
    assert got == sum(expected.values())
    assert est["by_path"]["finite_check"] == [4, 4]


# =========================================================================================
# DDP and FSDP2 training vs one process
# =========================================================================================
@dist_only
@pytest.mark.parametrize("mode", W.MODES)
@pytest.mark.parametrize("preset", W.PRESETS)
def test_training_matches_single_process(train_dir, mode, preset):
    got = torch.load(train_dir / f"train_{mode}_{preset}.pt")["params"]
    ref = reference(preset)
    d, where = max_diff(got, ref)
    assert d <= TOL, f"{mode}/{preset}: {where} differs by {d:.2e}"
    init = dict(W.make_model().named_parameters())
    assert torch.equal(got["unused.weight"], init["unused.weight"])  # gradient None on every rank
    moved = max((ref[n] - init[n]).abs().max().item() for n in ref)
    assert moved > 1e-2
    # against a whole-batch backward: equal up to the gradient's summation order (see reference_run)
    d_full, where = max_diff(got, reference(preset, halves=False))
    assert d_full <= 1e-5, f"{mode}/{preset}: {where} differs from the whole-batch run by {d_full:.2e}"


@dist_only
@pytest.mark.parametrize("preset", ["muon", "paper"])
def test_ddp_spread_spectral_matches_single_process(train_dir, preset):
    spread = torch.load(train_dir / f"train_ddp-spread_{preset}.pt")
    plain = torch.load(train_dir / f"train_ddp_{preset}.pt")
    d, where = max_diff(spread["params"], reference(preset))
    assert d <= TOL, f"ddp-spread/{preset}: {where} differs by {d:.2e}"
    assert spread["comm"].get("all_to_all", 0) > 0 and "all_to_all" not in plain["comm"]


@dist_only
@pytest.mark.parametrize("mode", W.MODES)
@pytest.mark.parametrize("arch", W.HF_ARCHS)
def test_hf_models_match_single_process(train_dir, mode, arch):
    res = torch.load(train_dir / f"train_{mode}_paper_{arch}.pt")
    ref = reference("paper", arch=arch)
    d, where = max_diff(res["params"], ref)
    assert d <= TOL, f"{mode}/{arch}: {where} differs by {d:.2e}"
    if mode == "fsdp2":
        paths = res["paths"]
        assert paths["model.embed_tokens.weight"] == "reduce"  # row-norm rows: local statistics
        assert paths["model.layers.0.self_attn.q_proj.weight"] == "gather"  # head 1 straddles ranks
        if arch == "olmoe":
            assert paths["model.layers.0.mlp.experts.gate_up_proj"] == "local"
            assert paths["model.layers.0.mlp.gate.weight"] == "reduce"
            assert "all_reduce" in res["comm"]


@dist_only
@pytest.mark.parametrize("mode", W.MODES)
def test_checkpoint_resume_identical(resumed_dir, mode):
    a = torch.load(resumed_dir / f"continued_{mode}.pt")
    b = torch.load(resumed_dir / f"resumed_{mode}.pt")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{mode}: {n} differs after resume by {(a[n] - b[n]).abs().max():.2e}"


@dist_only
@pytest.mark.skipif(os.environ.get("EQUIOPT_DIST_WIDE") != "1", reason="set EQUIOPT_DIST_WIDE=1 (3 and 4 processes)")
@pytest.mark.parametrize("nproc", [3, 4])
def test_more_ranks_and_hsdp(nproc):
    """3 ranks (a [2, d] matrix leaves rank 2 empty inside a gather) and 4 ranks, 1-D and HSDP
    (2 replicas x 2 shards): every layout x every map equals the single-process run. Opt-in:
    4 processes on 2 cores take ~30 s."""
    out = Path(tempfile.mkdtemp(prefix="equiopt-dist-wide-"))
    try:
        launch("wide", out, nproc=nproc)
        res = torch.load(out / f"wide-{nproc}.pt")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert len(res) == len(W.MAP_SPECS) * (2 if nproc == 4 else 1)
    for key, d in res.items():
        assert d <= TOL, f"{key}: max |diff| {d:.2e}"

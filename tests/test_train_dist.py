"""The harness under torchrun: ``equiopt train --dist ddp|fsdp2`` on 2 processes (gloo, CPU).

Each multi-process run is a real ``torchrun --standalone --nproc_per_node=2 -m equiopt train``
with a wall-clock timeout (the process group is killed and the test fails, never hangs);
gloo collectives time out on their own (EQUIOPT_DIST_TIMEOUT). Own temporary directories
(see tests/test_distributed.py for why not tmp_path_factory). Four launches serve all tests:
DDP, FSDP2, and an FSDP2 run stopped after 2 of 4 steps (``--stop-after``, what a kill after
the step-2 checkpoint leaves) then resumed by a fresh torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import synthetic_text

import equiopt
from equiopt.train import loop as L

from launch import torchrun

SRC = Path(equiopt.__file__).resolve().parent.parent
LAUNCH_TIMEOUT = float(os.environ.get("EQUIOPT_DIST_LAUNCH_TIMEOUT", 150))
TIMING = ("tokens_per_s", "opt_step_s")
TOL = 1e-5
MODEL = "hidden_size=32,intermediate_size=48,num_layers=2,num_heads=2,num_kv_heads=1,head_dim=16"


def _args(root: Path, out: str, *extra: str) -> list[str]:
    return [
        "train",
        "--arch",
        "qwen3",
        "--model",
        MODEL,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--eval-tokens",
        "256",
        "--ckpt-every",
        "2",
        "--warmup",
        "1",
        "--grad-clip",
        "1.0",
        "--data",
        str(root / "text"),
        "--vocab-size",
        "320",
        "--cache",
        str(root / "cache"),
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(root / out),
        *extra,
    ]


def launch(root: Path, out: str, *extra: str) -> str:
    """torchrun --standalone --nproc_per_node=2 -m equiopt train ..., with a timeout; the log."""
    return torchrun(2, ["-m", "equiopt", *_args(root, out, *extra)], timeout=LAUNCH_TIMEOUT, label=str(out))


@pytest.fixture(scope="module")
def root():
    """Corpus, tokenizer cache and the single-process reference run (in this process)."""
    d = Path(tempfile.mkdtemp(prefix="equiopt-train-dist-"))
    (d / "text").mkdir()
    (d / "text" / "a.txt").write_text(synthetic_text(0, 1500))
    (d / "text" / "b.txt").write_text(synthetic_text(1, 1500))
    from equiopt.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(_args(d, "single")) == 0  # also fills the cache the torchrun ranks read
    finally:
        torch.set_num_threads(threads)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(root):
    """Launch the torchrun runs once; name -> torchrun log."""
    logs = {}
    for mode in ("ddp", "fsdp2"):
        logs[mode] = launch(root, mode, "--dist", mode)
    logs["stopped"] = launch(root, "resumed", "--dist", "fsdp2", "--stop-after", "2")
    logs["resumed"] = launch(root, "resumed", "--dist", "fsdp2", "--resume")
    return logs


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.dist
@pytest.mark.slow
def test_matches_single_process(root, runs, mode):
    one, many = L.read_metrics(root / "single"), L.read_metrics(root / mode)
    assert [r["step"] for r in many] == [r["step"] for r in one] == [2, 4]
    for a, b in zip(one, many):
        assert abs(a["val_loss"] - b["val_loss"]) < TOL, (a["step"], a["val_loss"], b["val_loss"])
        assert abs(a["train_loss"] - b["train_loss"]) < TOL
        assert abs(a["grad_norm_mean"] - b["grad_norm_mean"]) < 1e-4 * a["grad_norm_mean"]
        assert a["tokens"] == b["tokens"] == a["step"] * 4 * 32
        assert a["lr_factor"] == b["lr_factor"]
    f1 = json.loads((root / "single" / "final.json").read_text())
    fn = json.loads((root / mode / "final.json").read_text())
    assert fn["status"] == "done" and abs(f1["val_loss"] - fn["val_loss"]) < TOL


@pytest.mark.parametrize("optimizer", ["ddc_adam", "ddc_muon"])
@pytest.mark.dist
@pytest.mark.slow
def test_ddc_under_fsdp2_matches_single_process(root, optimizer):
    """DDC under ``--dist fsdp2``: gauges planned and probed on an unsharded replica, mapped onto
    the DTensor parameters; the same losses as one process on the whole batch."""
    from equiopt.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(_args(root, f"{optimizer}_single", "--optimizer", optimizer)) == 0
    finally:
        torch.set_num_threads(threads)
    launch(root, f"{optimizer}_fsdp2", "--dist", "fsdp2", "--optimizer", optimizer)
    one = L.read_metrics(root / f"{optimizer}_single")
    many = L.read_metrics(root / f"{optimizer}_fsdp2")
    assert [r["step"] for r in many] == [r["step"] for r in one] == [2, 4]
    for a, b in zip(one, many):
        assert abs(a["val_loss"] - b["val_loss"]) < TOL, (a["step"], a["val_loss"], b["val_loss"])
        assert abs(a["train_loss"] - b["train_loss"]) < TOL


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp2_killed_and_resumed_continues_identically(root, runs):
    assert "stopped at step 2" in runs["stopped"] and "resumed" in runs["resumed"]
    assert _strip(L.read_metrics(root / "resumed")) == _strip(L.read_metrics(root / "fsdp2"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.dist
@pytest.mark.slow
def test_rank0_writes_the_run_files(root, runs, mode):
    out = root / mode
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "config.json", "env.json", "plan.txt", "metrics.jsonl", "final.json", "checkpoint", "tb"]
    )
    assert (out / ".lock").read_text() == ""  # rank 0 held it; released
    assert (out / "checkpoint" / ".metadata").exists()
    assert {p.name for p in (out / "checkpoint").glob("*.pt")} == {"extra.pt", "rank0.pt", "rank1.pt"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one writer
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 2 and env["dist"] == mode and env["backend"] == "gloo"
    assert json.loads((out / "config.json").read_text())["dist"] == mode
    assert runs[mode].count("final val loss") == 1  # rank 0 reports


def test_dist_needs_torchrun_and_a_known_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        L.train(L.TrainConfig(dist="ddp", out=str(tmp_path / "r")), progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="dist mode"):
        L.TrainConfig(dist="fsdp").validate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--dist"):
        L.train(L.TrainConfig(out=str(tmp_path / "r")), progress=False, log=lambda m: None)
    assert not (tmp_path / "r").exists()

"""Reliability of the training harness (issue #12): one run per directory, no silent
clobbering, config-checked resume, I/O faults, token-id checks, option validation, signals."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import equiopt
from equiopt import cli
from equiopt.train import config as C
from equiopt.train import data as D
from equiopt.train import loop as L
from equiopt.train import rundir as R

SRC = Path(equiopt.__file__).resolve().parent.parent
TINY = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
MODEL = ",".join(f"{k}={v}" for k, v in TINY.items())
TIMING = ("tokens_per_s", "opt_step_s")

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(corpus, out, **kw):
    base = dict(
        steps=6,
        batch_size=4,
        seq_len=32,
        eval_every=2,
        eval_tokens=256,
        ckpt_every=3,
        warmup=2,
        model=dict(TINY),
        data=corpus[0],
        out=str(out),
    )
    base.update(kw)
    return L.TrainConfig(**base)


def _train(cfg, corpus, **kw):
    return L.train(cfg, progress=False, log=kw.pop("log", lambda m: None), prepared=corpus[1], **kw)


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def _cli_args(corpus, out, *extra):
    data = corpus[0]
    return [
        "train",
        "--model",
        MODEL,
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-tokens",
        "256",
        "--warmup",
        "2",
        "--data",
        data.source,
        "--vocab-size",
        "320",
        "--cache",
        data.cache,
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def _spawn(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "equiopt", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for(pred, timeout=60.0, proc=None):
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early (rc {proc.returncode}): {proc.communicate()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- 1. lock


@pytest.mark.slow
def test_second_process_on_a_running_directory_is_refused_then_sigterm_checkpoints(corpus, tmp_path):
    """Items 1 and 7: a live run holds --out; a second process is refused with the holder's
    pid; SIGTERM makes the first write a checkpoint at its current step and exit 143."""
    out = tmp_path / "run"
    first = _spawn(_cli_args(corpus, out, "--steps", "100000", "--eval-every", "5", "--ckpt-every", "0"))
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, proc=first)
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] and holder["started"]
        second = _spawn(_cli_args(corpus, out, "--steps", "4", "--overwrite"))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert "in use by another run" in err and f"pid {first.pid}" in err, err
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopped" in err and "--resume" in err
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert step >= 5 and f"at step {step} " in err
    assert (out / ".lock").read_text() == ""  # released, no holder recorded
    assert not list(out.glob("*.tmp"))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(
        json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday", "command": "equiopt train"})
    )
    (out / "checkpoint.pt.x1.tmp").write_bytes(b"half")  # left by the dead process
    logs = []
    with R.RunDir(out).lock(log=logs.append):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
        # held: a second holder is refused
        with pytest.raises(R.RunLocked, match=f"pid {os.getpid()}"), R.RunDir(out).lock(log=logs.append):
            pass
    assert any("stale lock of pid 999999 on elsewhere" in m for m in logs)
    assert not (out / "checkpoint.pt.x1.tmp").exists()
    with R.RunDir(out).lock(log=logs.append):  # released: a later run takes it without complaint
        pass


# ----------------------------------------------------------------------------- 2. no silent restart


def test_resume_without_checkpoint_never_clobbers_a_finished_run(corpus, tmp_path):
    cfg = dataclasses.replace(_cfg(corpus, tmp_path / "run"), keep_checkpoint=False)
    _train(cfg, corpus)
    out = Path(cfg.out)
    assert not (out / "checkpoint.pt").exists()
    before = _snapshot(out)
    with pytest.raises(R.RunDirError, match=r"holds a done run \(step 6\) and no checkpoint.*new --out"):
        _train(cfg, corpus, resume=True)
    assert _snapshot(out) == before
    # the same through the command line: exit 2, one line naming the way out
    with pytest.raises(SystemExit) as e:
        cli.main(_cli_args(corpus, out, "--steps", "6", "--resume"))
    assert e.value.code == 2
    assert _snapshot(out) == before


def test_resume_without_checkpoint_never_clobbers_another_run(corpus, tmp_path, capsys):
    cfg = _cfg(corpus, tmp_path / "run", ckpt_every=0)
    _train(cfg, corpus, stop_after=3)  # killed before its first checkpoint: records, no checkpoint
    out = Path(cfg.out)
    before = _snapshot(out)
    with pytest.raises(R.RunDirError, match=r"holds another run \(lr_scale differ"):
        _train(dataclasses.replace(cfg, lr_scale=2.0), corpus, resume=True)
    assert _snapshot(out) == before
    logs = []  # the same run, stopped before any checkpoint: starts again, and says so
    _train(cfg, corpus, resume=True, log=logs.append)
    assert any("before its first checkpoint" in m for m in logs)


# ----------------------------------------------------------------------------- 3. config in the checkpoint


def test_checkpoint_records_config_and_commit_and_resume_checks_them(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", steps=8)
    _train(cfg, corpus, stop_after=4)
    state = torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=False)
    assert state["config"] == cfg.to_dict() and state["git_revision"] == L.git_revision()
    # config.json says otherwise: the checkpoint is what counts
    (Path(cfg.out) / "config.json").write_text(json.dumps({**cfg.to_dict(), "grad_clip": 5.0}))
    for change, msg in (
        (dict(lr_scale=2.0), r"lr_scale: 1.0 in the checkpoint, 2.0 now"),
        (dict(seed=3, grad_clip=1.0), r"grad_clip: 0.0 in the checkpoint, 1.0 now; seed: 0"),
        (dict(data=dataclasses.replace(cfg.data, val_fraction=0.1)), r"data.val_fraction: 0.05"),
    ):
        with pytest.raises(ValueError, match=msg):
            _train(dataclasses.replace(cfg, **change), corpus, resume=True)
    longer = dataclasses.replace(cfg, steps=10)  # the step count may change
    final = _train(longer, corpus, resume=True)
    assert final["step"] == 10 and [r["step"] for r in L.read_metrics(cfg.out)] == [2, 4, 6, 8, 10]
    assert json.loads((Path(cfg.out) / "config.json").read_text())["steps"] == 10
    with pytest.raises(ValueError, match="past --steps 6"):
        _train(dataclasses.replace(cfg, steps=6), corpus, resume=True)


# ----------------------------------------------------------------------------- 4. I/O faults


@pytest.mark.parametrize("fault", ["oserror", "torch"])
def test_disk_full_during_checkpoint_keeps_the_previous_one(corpus, tmp_path, monkeypatch, fault):
    cfg = _cfg(corpus, tmp_path / "run", steps=6, ckpt_every=3)
    real, calls = torch.save, {"n": 0}

    def save(obj, f):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(obj, f)
        Path(f).write_bytes(b"PK\x03\x04 partial")
        if fault == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
            "file data/3: file write failed"
        )

    monkeypatch.setattr(R.torch, "save", save)
    cause = "no space left on device" if fault == "oserror" else ".*file write failed; .*MiB free"
    with pytest.raises(R.RunDirError, match=rf"checkpoint.pt: could not write the checkpoint: {cause}.*unchanged"):
        _train(cfg, corpus)
    out = Path(cfg.out)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    assert not list(out.glob("*.tmp"))
    assert [r["step"] for r in L.read_metrics(out)] == [2, 4, 6]  # the records are intact
    monkeypatch.setattr(R.torch, "save", real)
    final = _train(cfg, corpus, resume=True)  # space again: resume from step 3 and finish
    assert final["status"] == "done"


def test_disk_full_during_a_metrics_append_leaves_whole_records(tmp_path, monkeypatch):
    run = R.RunDir(tmp_path)
    run.start_metrics()
    run.append_metrics({"step": 1})

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def truncate(self, n):
            return self.f.truncate(n)

        def write(self, b):
            self.f.write(b[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.f.flush()

    # the file goes to rundir's own `with open(...)`, which closes it (through Full.__exit__)
    monkeypatch.setattr(R, "open", lambda p, mode: Full(open(p, mode)), raising=False)  # noqa: SIM115
    with pytest.raises(R.RunDirError, match=r"metrics.jsonl: could not append a metrics record: no space left"):
        run.append_metrics({"step": 2})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_unwritable_out_is_a_clear_error(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro" / "run"
    out.parent.mkdir()
    if os.geteuid() != 0:
        out.parent.chmod(0o500)
    else:  # root ignores permissions: simulate them
        real = os.open

        def denied(path, *a, **k):
            if str(path).startswith(str(out)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "open", denied)
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(_cli_args(corpus, out, "--steps", "2"))
    finally:
        out.parent.chmod(0o700)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "permission denied" in err and "writable --out" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoint_is_refused_and_left_in_place(corpus, tmp_path, damage):
    cfg = _cfg(corpus, tmp_path / "run")
    _train(cfg, corpus, stop_after=4)
    out = Path(cfg.out)
    ck = out / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint\n" * 9}[damage])
    before = _snapshot(out)
    with pytest.raises(R.RunDirError, match=rf"{ck}: the checkpoint is (empty|unreadable).*--overwrite"):
        _train(cfg, corpus, resume=True)
    assert _snapshot(out) == before


def test_partial_last_metrics_line_is_dropped_with_a_warning_on_resume(corpus, tmp_path):
    ref = _cfg(corpus, tmp_path / "ref")
    _train(ref, corpus)
    cfg = _cfg(corpus, tmp_path / "run")
    _train(cfg, corpus, stop_after=5)  # checkpoint at 3, records at 2 and 4
    m = Path(cfg.out) / "metrics.jsonl"
    with open(m, "a") as f:
        f.write('{"step": 6, "train_lo')  # killed mid-write
    with pytest.warns(R.MetricsWarning, match="metrics.jsonl: ignoring a partial last line"):
        assert [r["step"] for r in L.read_metrics(cfg.out)] == [2, 4]
    logs = []
    _train(cfg, corpus, resume=True, log=logs.append)
    assert any("partial last line" in x and "dropping it" in x for x in logs)
    assert _strip(L.read_metrics(cfg.out)) == _strip(L.read_metrics(ref.out))
    m.write_text('{"step": 2}\n{"step": 4, "tr\n{"step": 6}\n')  # damage inside the file: an error
    with pytest.raises(R.RunDirError, match=r"metrics.jsonl, line 2: not a JSON record"):
        L.read_metrics(cfg.out)


# ----------------------------------------------------------------------------- 5. token ids


def test_bin_token_ids_beyond_the_vocabulary_are_an_error(tmp_path):
    ids = np.arange(5000, dtype=np.uint16) % 500
    (tmp_path / "train.bin").write_bytes(ids.tobytes())
    (tmp_path / "val.bin").write_bytes(ids[:1000].tobytes())
    with pytest.raises(D.DataError, match=r"train.bin: token id 499 is out of range for the vocabulary size 400"):
        D.prepare(D.DataConfig(source=str(tmp_path), vocab_size=400, cache=str(tmp_path / "c")))
    assert D.prepare(D.DataConfig(source=str(tmp_path), vocab_size=0, cache=str(tmp_path / "c"))).vocab_size == 500
    assert D.prepare(D.DataConfig(source=str(tmp_path), vocab_size=500, cache=str(tmp_path / "c"))).vocab_size == 500


# ----------------------------------------------------------------------------- 6. option validation


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "--grad-clip", "nan"], "grad_clip (--grad-clip) must be a finite number >= 0"),
        (["train", "--grad-clip", "inf"], "grad_clip (--grad-clip) must be a finite number >= 0"),
        (["train", "--grad-clip", "-1"], "grad_clip (--grad-clip) must be a finite number >= 0"),
        (["train", "--vocab-size", "0"], "vocab_size (--vocab-size) 0: a byte-level BPE"),
        (["train", "--vocab-size", "100"], "needs at least 300 entries"),
        (["train", "--lr-scale", "nan"], "lr_scale (--lr-scale) must be a positive number"),
        (["train", "--role-lr", "embedding=inf"], "must be a positive number"),
        (["train", "--resume", "--overwrite"], "contradict"),
        (["compare", "--archs", ""], "archs (--archs) names no architecture"),
        (["compare", "--optimizers", ","], "optimizers (--optimizers) names no optimizer"),
        (["sweep", "--archs", ""], "archs (--archs) names no architecture"),
        (["sweep", "--lr-scales", "1,nan"], "lr_scales (--lr-scales) must be positive"),
    ],
)
def test_bad_values_are_rejected_naming_the_option(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_api_users_get_the_same_validation():
    with pytest.raises(ValueError, match=r"grad_clip \(--grad-clip\)"):
        C.TrainConfig(grad_clip=float("nan"))
    with pytest.raises(ValueError, match=r"vocab_size \(--vocab-size\) 0"):
        D.DataConfig(vocab_size=0)
    with pytest.raises(ValueError, match="names no architecture"):
        C.CompareOptions(archs=[])
    assert D.DataConfig(source="shards/train.bin", vocab_size=0).vocab_size == 0  # 0 = max id + 1 for .bin


# ----------------------------------------------------------------------------- 7. signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_the_current_step_and_resume_is_exact(corpus, tmp_path, monkeypatch, sig):
    ref = _cfg(corpus, tmp_path / "ref", steps=8, ckpt_every=0)
    _train(ref, corpus)
    cfg = _cfg(corpus, tmp_path / "run", steps=8, ckpt_every=0)
    real = L.Trainer.train_step

    def step(self, s):
        real(self, s)
        if s == 4:  # arrives during step 5 (index 4): that step completes, then the checkpoint
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(L.Trainer, "train_step", step)
    with pytest.raises(L.TrainingInterrupted, match=rf"{signal.Signals(sig).name}: stopped .* at step 5 of 8") as e:
        _train(cfg, corpus)
    assert e.value.step == 5 and e.value.signum == sig
    assert signal.getsignal(sig) is not None and signal.getsignal(sig) != e.value  # handler restored
    assert torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=False)["step"] == 5
    monkeypatch.setattr(L.Trainer, "train_step", real)
    _train(cfg, corpus, resume=True)
    assert _strip(L.read_metrics(cfg.out)) == _strip(L.read_metrics(ref.out))
    a = torch.load(Path(ref.out) / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_to_the_cli_then_resume_ends_bit_identical(corpus, tmp_path):
    """A real `equiopt train` process gets SIGTERM mid-run at whatever step it is; the resumed
    run ends with the metrics and weights of an uninterrupted one."""
    args = ("--steps", "120", "--eval-every", "4", "--ckpt-every", "0")
    assert cli.main(_cli_args(corpus, tmp_path / "ref", *args)) == 0
    out = tmp_path / "run"
    proc = _spawn(_cli_args(corpus, out, *args))
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, proc=proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 4 <= step < 120
    assert cli.main(_cli_args(corpus, out, *args, "--resume")) == 0
    assert _strip(L.read_metrics(out)) == _strip(L.read_metrics(tmp_path / "ref"))
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

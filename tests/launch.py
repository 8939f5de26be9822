"""Run ``python -m torch.distributed.run --standalone`` with a wall-clock timeout: the
process group is killed and the test fails instead of hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import equiopt

SRC = Path(equiopt.__file__).resolve().parent.parent


def torchrun(nproc: int, args: list[str], *, timeout: float, label: str, pythonpath: tuple[str, ...] = ()) -> str:
    """torchrun --standalone --nproc_per_node=NPROC ARGS; returns the combined output.
    One OpenMP thread per process and a gloo timeout (EQUIOPT_DIST_TIMEOUT) unless set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *pythonpath, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("EQUIOPT_DIST_TIMEOUT", "90")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        log, _ = proc.communicate()
        pytest.fail(f"{label}: no result after {timeout:.0f}s (hang?); output tail:\n{log[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{label}: torchrun exited with {proc.returncode}; output tail:\n{log[-6000:]}")
    return log

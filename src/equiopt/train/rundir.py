"""The run directory: every file a training run reads or writes, in one place.

A run directory (``--out``) holds one run::

    .lock           exclusive lock (fcntl.flock) of the run that uses the directory now, with its
                    holder's pid, host, start time and command (emptied when the run exits)
    config.json     the resolved configuration (every default filled in)
    env.json        git revision, package versions, threads, platform
    plan.txt        the optimizer plan (role, map, lr, weight decay per parameter)
    metrics.jsonl   one JSON record per evaluation (and one "diverged" record if it diverged)
    checkpoint.pt   model, optimizer, scheduler, sampler, RNG and metric-window state, the
                    full config and the git revision (multi-process runs: ``checkpoint/``,
                    a torch.distributed.checkpoint directory)
    final.json      status ("done" | "diverged") and the last evaluation
    tb/             TensorBoard event files: every scalar of every metrics.jsonl record (loss, lr per
                    role, logit and routing metrics), tag = its path in the record ("logits/max_abs")

Every file but ``metrics.jsonl`` is written to a temporary ``NAME.*.tmp`` next to it and
renamed over it (atomic); a failed write removes its temporary file and leaves the previous
version intact, and temporaries left by killed processes are removed when a run takes the
lock. Metric records are appended one whole line at a time; a failed append is truncated
away. I/O failures raise :class:`RunDirError` naming the file and the cause (disk full,
permission denied, ...). A partial last line of ``metrics.jsonl`` (a write cut short by a
kill) is ignored with a warning when read and dropped when the run resumes; a damaged line
anywhere else is an error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .metrics import scalars

LOCK = ".lock"
CONFIG, ENV, PLAN, METRICS, FINAL, CKPT = (
    "config.json",
    "env.json",
    "plan.txt",
    "metrics.jsonl",
    "final.json",
    "checkpoint.pt",
)
DIST_CKPT = "checkpoint"  # multi-process runs: a torch.distributed.checkpoint directory
RUN_FILES = (CONFIG, ENV, PLAN, METRICS, CKPT, FINAL, LOCK)
TB_DIR = "tb"  # TensorBoard event files
RUN_DIRS = (DIST_CKPT, DIST_CKPT + ".old", TB_DIR)
CKPT_KEYS = ("step", "model", "optimizer", "rng", "config")
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and restored: files get the permissions open() would give them


class RunDirError(OSError):
    """A run directory cannot be used as asked: an I/O failure (the message names the file and
    the cause) or a state that would lose a record (the message says how to proceed)."""


class RunLocked(RunDirError):
    """Another live process holds the run directory's lock."""


class MetricsWarning(UserWarning):
    """metrics.jsonl ends in a partial line (a write cut short); it is ignored."""


_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def describe(e: BaseException, path: Path | None = None) -> str:
    """A short cause for an I/O failure (torch's writer reports a full disk as a RuntimeError)."""
    if isinstance(e, OSError) and e.errno is not None:
        return _CAUSES.get(e.errno, e.strerror or str(e))
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if path is not None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(path.parent if not path.is_dir() else path).free
            text += f"; {free / 2**20:.0f} MiB free on that file system"
    return text


def io_error(path: Path, action: str, e: BaseException, after: str = "") -> RunDirError:
    return RunDirError(f"{path}: could not {action}: {describe(e, path)}{after}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], object], what: str) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``; on any failure ``tmp`` is removed,
    ``path`` is unchanged and OSError / torch's RuntimeError become :class:`RunDirError`."""
    done = False
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files
        os.close(fd)
        write(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        done = True
    except (OSError, RuntimeError) as e:
        keep = " (the previous version is unchanged)" if path.exists() else ""
        raise io_error(path, f"write {what}", e, keep) from e
    finally:
        if not done and tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_text(path: Path, text: str, what: str = "the file") -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")), what)


def write_json(path: Path, obj: Any, what: str = "the record") -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", what)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (a failed write leaves the previous one intact)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp), "the checkpoint")


def read_metrics(run_dir: str | os.PathLike, on_partial: Callable[[str], None] | None = None) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``. A partial last line (no newline, not JSON) is
    skipped with a :class:`MetricsWarning` (or ``on_partial(message)``); a damaged line
    elsewhere raises :class:`RunDirError`."""
    p = Path(run_dir) / METRICS
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise io_error(p, "read the metrics", e) from e
    *lines, tail = data.split(b"\n")
    recs = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except ValueError as e:
                raise RunDirError(
                    f"{p}, line {i}: not a JSON record ({e}); the file is damaged: repair or remove that line"
                ) from e
    if tail.strip():
        try:
            recs.append(json.loads(tail))
        except ValueError:
            msg = (
                f"{p}: ignoring a partial last line ({len(tail)} bytes, no newline): a write cut short "
                "by a kill or a full disk"
            )
            (on_partial or (lambda m: warnings.warn(m, MetricsWarning, stacklevel=3)))(msg)
    return recs


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
    }


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process" if not raw.strip() else raw.strip()[:200]


class EventLog:
    """TensorBoard event files of one run (``torch.utils.tensorboard.SummaryWriter`` on ``OUT/tb``):
    each metrics record's numbers as scalars at its step (see :func:`metrics.scalars`)."""

    def __init__(self, path: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (train extra)

        self.path = path
        # purge_step: on resume, TensorBoard drops the events a previous invocation logged at or
        # after the checkpoint's step (the same records metrics.jsonl loses when it is trimmed)
        self.writer = SummaryWriter(log_dir=str(path), purge_step=purge_step)

    def write(self, rec: dict) -> None:
        step = int(rec["step"])
        try:
            for tag, value in scalars(rec).items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as e:
            raise io_error(self.path, "write the TensorBoard events", e) from e

    def close(self) -> None:
        self.writer.close()


class RunDir:
    """One run directory: the lock, the records, the checkpoint."""

    def __init__(self, path: str | os.PathLike, dist: bool = False):
        self.path = Path(path)
        self.dist = dist
        self.ckpt = self.path / (DIST_CKPT if dist else CKPT)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self, log: Callable[[str], None] = print) -> Iterator[None]:
        """Hold the directory's exclusive lock while the block runs (creates the directory).
        A second process is refused with :class:`RunLocked` naming the holder. The kernel
        drops a flock when its process dies, so the record of a dead holder is stale and is
        taken over (logged). Stale temporary files are removed once the lock is held."""
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"--out {self.path} is a file, not a directory")
        p = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise io_error(p, "create the run directory's lock file", e, "; choose a writable --out") from e
        try:
            self._acquire(fd, p, log)
        except BaseException:
            os.close(fd)
            raise
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder: the next run finds no stale record
            os.close(fd)  # releases the flock

    def _acquire(self, fd: int, p: Path, log: Callable[[str], None]) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise RunLocked(
                f"{self.path} is in use by another run ({holder}); wait for it to end or choose another --out"
            ) from None
        stale = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if stale.strip():
            log(f"[run] {self.path}: taking over the stale lock of {_holder_text(stale)} (that process is gone)")
        data = (json.dumps(_holder()) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as e:
            raise io_error(p, "write the lock holder", e, "; choose a writable --out") from e
        self.remove_stale_tmp(log)

    def remove_stale_tmp(self, log: Callable[[str], None] = print) -> None:
        """Remove ``NAME.*.tmp`` files of the run's records (left by killed or failed writes)."""
        for t in self.path.glob("*.tmp"):
            if any(t.name.startswith(n + ".") for n in RUN_FILES):
                t.unlink(missing_ok=True)
                log(f"[run] removed {t.name} (a temporary file of an interrupted write)")

    # ------------------------------------------------------------------ state

    def has_checkpoint(self) -> bool:
        if self.dist:
            return (self.ckpt / ".metadata").exists() or (self.ckpt / "extra.pt").exists()
        return self.ckpt.exists()

    def holds_records(self) -> list[str]:
        """The run records present (config.json, metrics.jsonl with records, final.json)."""
        have = [n for n in (CONFIG, FINAL) if (self.path / n).exists()]
        m = self.path / METRICS
        if m.exists() and m.stat().st_size:
            have.append(METRICS)
        return have

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RunDirError(f"{p}: unreadable ({describe(e)}); repair or remove it") from e

    def check_foreign(self) -> None:
        foreign = [
            p.name for p in self.path.iterdir() if p.name not in RUN_FILES + RUN_DIRS and not p.name.endswith(".tmp")
        ]
        if foreign:
            raise FileExistsError(
                f"--out {self.path} holds files that are not an equiopt run ({foreign[:3]}); choose another directory"
            )

    def clear(self) -> None:
        """``--overwrite``: remove the run's records and checkpoints (not the lock)."""
        for name in RUN_FILES:
            if name != LOCK:
                (self.path / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)

    def remove_checkpoint(self) -> None:
        if self.ckpt.is_dir():
            shutil.rmtree(self.ckpt)
        else:
            self.ckpt.unlink(missing_ok=True)

    # ------------------------------------------------------------------ records

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj, f"the {name} record")

    def write_text(self, name: str, text: str) -> None:
        write_text(self.path / name, text, f"the {name} record")

    def start_metrics(self) -> None:
        self.write_text(METRICS, "")

    def append_metrics(self, rec: dict) -> None:
        """Append one record as one line; a failed append is truncated away."""
        p = self.path / METRICS
        line = (json.dumps(rec) + "\n").encode()
        try:
            with open(p, "ab") as f:  # (tests replace rundir.open to simulate a full disk)
                pos = f.seek(0, os.SEEK_END)
                try:
                    f.write(line)
                    f.flush()
                except OSError:
                    f.truncate(pos)
                    raise
        except OSError as e:
            raise io_error(p, "append a metrics record", e, " (the records before it are intact)") from e

    def read_metrics(self, log: Callable[[str], None] | None = None) -> list[dict]:
        return read_metrics(self.path, on_partial=log)

    def event_log(self, start: int, log: Callable[[str], None]) -> EventLog | None:
        """The run's TensorBoard log (None, logged once, when tensorboard is not installed)."""
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            log(
                "[run] tensorboard is not installed (pip install 'equiopt[train]'): no event files; "
                "metrics.jsonl has every record"
            )
            return None
        return EventLog(self.path / TB_DIR, purge_step=start)

    def trim_metrics(self, step: int, log: Callable[[str], None]) -> None:
        """Keep the records up to ``step`` (those after a checkpoint are recomputed on resume);
        a partial last line is dropped (logged); final.json goes (the run is not final)."""
        kept = [
            r
            for r in self.read_metrics(log=lambda m: log(f"[run] {m}; dropping it"))
            if r.get("step", 0) <= step and "event" not in r
        ]
        self.write_text(METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        (self.path / FINAL).unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, state: dict) -> None:
        save_checkpoint(self.ckpt, state)

    def load_checkpoint(self, map_location: str | None = None) -> dict:
        """The single-process checkpoint; an empty, truncated or foreign file is a
        :class:`RunDirError` that names it and leaves everything in place."""
        p = self.ckpt
        advice = (
            ". The run's records are untouched; start the run over with --overwrite (or a new --out), "
            "or restore the file"
        )
        try:
            size = p.stat().st_size
        except OSError as e:
            raise io_error(p, "read the checkpoint", e) from e
        if size == 0:
            raise RunDirError(f"{p}: the checkpoint is empty (0 bytes; a write cut short?){advice}")
        try:
            state = torch.load(p, weights_only=False, map_location=map_location)
        except (
            RuntimeError,
            EOFError,
            ValueError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            AttributeError,
            ImportError,
            IndexError,
            KeyError,
        ) as e:
            raise RunDirError(
                f"{p}: the checkpoint is unreadable, truncated or not a checkpoint "
                f"({type(e).__name__}: {describe(e)}){advice}"
            ) from e
        except OSError as e:
            raise io_error(p, "read the checkpoint", e) from e
        missing = [k for k in CKPT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise RunDirError(f"{p}: not an equiopt checkpoint (missing {missing}){advice}")
        return state

    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint on disk (None: none, or unreadable)."""
        p = self.ckpt / "extra.pt" if self.dist else self.ckpt
        if not p.exists():
            return None
        try:
            return int(torch.load(p, weights_only=False, map_location="cpu")["step"])
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, KeyError, TypeError, OSError):
            return None

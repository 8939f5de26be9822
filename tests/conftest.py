"""Fixtures shared by the test modules (pytest loads this file itself)."""

import random

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and small float64 matmuls run as fast on one thread, and one thread does
    not spin when the 2 CPU cores are shared. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_text(seed: int, n: int) -> str:
    """``n`` lines of 4-12 words from a small vocabulary (a corpus for harness tests)."""
    rng = random.Random(seed)
    words = (
        "the king and queen of a land far away did speak to all their men at night "
        "while wind and rain fell on every field and hill"
    ).split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``(DataConfig, Prepared)`` of two synthetic text files (BPE vocabulary 320), prepared
    once per module. Modules with other needs define their own ``corpus``."""
    from equiopt.train import data as D  # the harness's extra deps only for the modules using it

    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text(synthetic_text(0, 1500))
    (root / "b.txt").write_text(synthetic_text(1, 1500))
    data = D.DataConfig(source=str(root), vocab_size=320, cache=str(tmp_path_factory.mktemp("cache")))
    return data, D.prepare(data, log=lambda m: None)

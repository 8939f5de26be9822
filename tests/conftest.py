"""Fixtures shared by the test modules (pytest loads this file itself)."""

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

"""Shared test set-up: the flat scripts at the repository root are importable from tests/,
and in-process tests run on one thread (the tensors are small: on a busy 2-core machine
intra-op threads turn 1 s into 20 s)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

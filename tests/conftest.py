"""Shared test set-up: the flat scripts at the repository root are importable from tests/,
and in-process tests run on one thread (the tensors are small: on a busy 2-core machine
intra-op threads turn 1 s into 20 s). Data the repository does not ship lies in ../shared
beside the clone: a test without it is skipped with the reason, or fails under CI=true; the
skips and their reasons are summed up in one line at the end, also under -q."""
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def require_shared(*paths, what):
    """Skip the calling test (or fixture) when one of paths, under ../shared, is absent; under CI=true
    fail instead: CI always has ../shared beside the clone, so there its absence is a broken set-up."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        why = (f"../shared/{Path(missing[0]).relative_to(SHARED)} not found: CI has it beside the clone; "
               f"locally, {what}")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


def pytest_terminal_summary(terminalreporter):
    """One line: how many tests were skipped and why (-q prints only "N skipped", never the reasons)."""
    reasons = Counter(str(r.longrepr[2]).removeprefix("Skipped: ") for r in terminalreporter.stats.get("skipped", [])
                      if isinstance(r.longrepr, tuple))
    if reasons:
        terminalreporter.write_line(f"{sum(reasons.values())} skipped: "
                                    + "; ".join(f"{n} x {why}" for why, n in reasons.items()))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

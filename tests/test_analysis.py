"""Tests of analysis.py: Kendall's tau (Eq. 13) against scipy and a plain loop, the
behaviour-target pairs of Sec. 4.3 against a loop, tau = 1 for a rotated, rescaled table
of another dimension, and `analysis.py --kendall A B` on two checkpoints against scipy."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis import behaviour_target_pairs, embedding_kendall_tau, kendall_tau
from dataset import atomic_save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from synthetic import make_dataset  # noqa: E402


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_kendall_tau_equals_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for seed in range(3):
        a = torch.randn(300, generator=gen(seed))
        b = a + torch.randn(300, generator=gen(seed + 10))  # correlated, no ties
        assert kendall_tau(a, b, chunk=37) == pytest.approx(scipy_stats.kendalltau(a, b).statistic, abs=1e-12)
        a, b = a.round(), b.round()  # many ties in each and in both
        assert kendall_tau(a, b, chunk=37) == pytest.approx(scipy_stats.kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_tau_is_eq13_by_loop():
    a = torch.randint(0, 4, (40,), generator=gen(1)).double()
    b = torch.randint(0, 4, (40,), generator=gen(2)).double()
    conc = disc = untied_a = untied_b = 0
    for j in range(40):
        for k in range(j + 1, 40):
            s = (a[j] - a[k]).sign() * (b[j] - b[k]).sign()
            conc, disc = conc + int(s > 0), disc + int(s < 0)
            untied_a, untied_b = untied_a + int(a[j] != a[k]), untied_b + int(b[j] != b[k])
    assert kendall_tau(a, b, chunk=7) == pytest.approx((conc - disc) / math.sqrt(untied_a * untied_b), abs=1e-12)
    assert kendall_tau(a, a) == pytest.approx(1.0) and kendall_tau(a, -a) == pytest.approx(-1.0)


def test_behaviour_target_pairs_match_a_loop():
    seqs = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]])  # width L+3 = 8
    behaviour, target = behaviour_target_pairs(seqs)
    expected = [(row[s], row[t]) for row in seqs.tolist() for s in range(6) for t in range(s + 1, 6) if row[s] and row[t]]
    assert list(zip(behaviour.tolist(), target.tolist())) == expected  # training part only: items 1..l-2


def test_embedding_kendall_tau_across_dimensions():
    seqs = torch.randint(1, 31, (50, 23), generator=gen(3))
    bucket = torch.randint(1, 4, (31,), generator=gen(4))
    e = torch.randn(31, 8, generator=gen(5))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(6), dtype=torch.float64))
    wider = 3 * torch.cat([e.double(), torch.zeros(31, 8, dtype=torch.float64)], 1) @ q.T  # (31, 16): same order of distances
    same = embedding_kendall_tau(e, wider, seqs, bucket, 3)
    assert all(t == pytest.approx(1.0, abs=1e-9) for t in same.values())
    noise = embedding_kendall_tau(e, torch.randn(31, 5, generator=gen(7)), seqs, bucket, 3)
    assert all(abs(t) < 0.3 for t in noise.values())


def test_kendall_cli_on_two_checkpoints_gives_the_known_tau(tmp_path):
    """analysis.py --kendall A B on two different tables (a phase-1 and a phase-2 checkpoint's
    default ID tables, written by hand): every bucket's printed tau is scipy's Kendall tau-b of
    the two tables' distances over that bucket's behaviour-target pairs, listed by a loop; and
    A against 'text' (A is the text table rotated and rescaled) prints 1 in every bucket, never NaN."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n_items, n_buckets = 25, 3
    data = make_dataset("kt", 30, n_items, 300, d_text=6, n_buckets=n_buckets)
    atomic_save(data, tmp_path / "kt" / "dataset.pt")
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(8)))
    e_a = 2 * data["text_emb"] @ q  # (N+1, 6): the text table's distances, doubled
    e_b = e_a[:, :4] + 0.5 * torch.randn(n_items + 1, 4, generator=gen(9))  # another table, partly agreeing
    paths = {}
    for phase, key, table in ((1, "items.h_c.weight", e_a), (2, "items.id.h_c.weight", e_b)):
        paths[phase] = tmp_path / f"phase{phase}.pt"
        atomic_save({"phase": phase, "model_args": {}, "state": {key: table}, "fingerprint": data["fingerprint"],
                     "dataset": "kt", "args": {"data": str(tmp_path / "kt")}}, paths[phase])

    def cli(a, b):
        r = subprocess.run([sys.executable, "analysis.py", "--kendall", str(a), str(b), "--max-pairs", "100000"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        head, taus = r.stdout.strip().splitlines()[-2:]
        assert head.split()[1:] == [str(b) for b in range(1, n_buckets + 1)] and taus.startswith("tau ")
        return [float(t) for t in taus.split()[1:]]

    pairs = {b: [] for b in range(1, n_buckets + 1)}  # Sec. 4.3's pairs, behaviour before target, training part
    for row in data["seqs"][:, :-2].tolist():
        for s in range(len(row)):
            for t in range(s + 1, len(row)):
                if row[s] and row[t]:
                    pairs[int(data["item_bucket"][row[t]])].append((row[s], row[t]))
    expected = []
    for b, bt in pairs.items():
        assert len(bt) > 50
        d_a = [float((e_a[i].double() - e_a[j].double()).norm()) for i, j in bt]
        d_b = [float((e_b[i].double() - e_b[j].double()).norm()) for i, j in bt]
        expected.append(scipy_stats.kendalltau(d_a, d_b).statistic)
    assert all(0.2 < t < 0.95 for t in expected), expected  # neither 1 nor 0: a table against another
    assert cli(paths[1], paths[2]) == pytest.approx(expected, abs=6e-4)  # printed to 3 decimals
    assert cli(paths[1], "text") == [1.0] * n_buckets  # the dataset is the one phase1.pt's args name

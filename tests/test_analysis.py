"""Tests of analysis.py: Kendall's tau (Eq. 13) against scipy and a plain loop, the
behaviour-target pairs of Sec. 4.3 against a loop, and tau = 1 for a rotated, rescaled table
of another dimension."""
import math

import pytest
import torch

from analysis import behaviour_target_pairs, embedding_kendall_tau, kendall_tau


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

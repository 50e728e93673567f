"""Tests of evaluate.py: full-ranking HR@k / nDCG@k against plain python loops on random
scores, the splits of Appendix A on a hand-written sequence, chunked evaluation with a fake
model, the warm / median / cold groups, the seeds table, and Kendall's tau (Eq. 13) against
scipy and a loop, and top-k recommendation."""
import json
import math
import os
import statistics
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from evaluate import (behaviour_target_pairs, bucket_groups, comparison_table, embedding_kendall_tau,  # noqa: E402
                      evaluate, history_before_target, hr_ndcg, kendall_tau, recommend, split_sequences,
                      summarise, target_ranks)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- Plain-loop references ---------------------------------------------------------------


def loop_rank(scores, target, history):
    """0-based rank of `target` in one row of scores over items 1..N: items of the history
    and the padding id 0 are left out, the target always stays; ties rank above it."""
    hidden = set(history) | {0}
    s_t = scores[target]
    return sum(1 for j in range(len(scores)) if j != target and j not in hidden and scores[j] >= s_t)


def loop_metrics(rank, k):
    return (1.0, 1.0 / math.log2(rank + 2)) if rank < k else (0.0, 0.0)


def random_case(U, N, H, seed, ties):
    g = gen(seed)
    if ties:  # few distinct values: many ties with the target
        scores = torch.randint(0, 4, (U, N + 1), generator=g).float()
    else:
        scores = torch.randn(U, N + 1, generator=g)
    target = torch.randint(1, N + 1, (U,), generator=g)
    history = torch.randint(1, N + 1, (U, H), generator=g)
    history[torch.rand(U, H, generator=g) < 0.3] = 0  # padding inside the history
    inside = torch.rand(U, generator=g) < 0.4  # the target is also an earlier item of the user
    history[inside, 0] = target[inside]
    return scores, target, history


# --- target_ranks and hr_ndcg ------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_ranks_and_metrics_match_loop(seed, ties):
    U, N, H, k = 50, 40, 12, 10
    scores, target, history = random_case(U, N, H, seed, ties)
    ranks = target_ranks(scores, target, history)
    hit, ndcg = hr_ndcg(ranks, k)
    for u in range(U):
        r = loop_rank(scores[u].tolist(), int(target[u]), history[u].tolist())
        assert int(ranks[u]) == r
        h_ref, n_ref = loop_metrics(r, k)
        assert math.isclose(float(hit[u]), h_ref) and math.isclose(float(ndcg[u]), n_ref, rel_tol=1e-6)


def test_target_in_history_stays_ranked():
    scores = torch.tensor([[9.0, 5.0, 4.0, 3.0, 2.0]])  # item 0 (padding) scores highest
    target, history = torch.tensor([3]), torch.tensor([[0, 3, 1]])  # target 3 was seen earlier
    # items 1 (history) and 0 (padding) are masked, 3 is kept: only item 2 is above it
    assert target_ranks(scores, target, history).tolist() == [1]


def test_ties_count_against_target():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]])
    assert target_ranks(scores, torch.tensor([2]), torch.zeros(1, 3, dtype=torch.long)).tolist() == [2]
    scores = torch.zeros(1, 6)  # everything ties: the target comes last of the 5 real items
    assert target_ranks(scores, torch.tensor([1]), torch.tensor([[0]])).tolist() == [4]


def test_padding_never_counts():
    scores = torch.full((2, 4), -1.0)
    scores[:, 0] = 100.0  # padding column scores best; history without any 0
    ranks = target_ranks(scores, torch.tensor([1, 2]), torch.tensor([[3], [3]]))
    assert ranks.tolist() == [1, 1]  # only the other real item (tie) is counted


def test_ndcg_of_known_ranks():
    ranks = torch.tensor([0, 1, 3, 9, 10, 57])
    hit, ndcg = hr_ndcg(ranks, 10)
    assert hit.tolist() == [1, 1, 1, 1, 0, 0]
    expected = torch.tensor([1.0, 1 / math.log2(3), 1 / math.log2(5), 1 / math.log2(11), 0.0, 0.0])
    assert torch.allclose(ndcg, expected)
    assert hr_ndcg(torch.tensor([3]), 3)[1].item() == 0.0  # rank >= k gives 0


# --- Appendix A splits on a hand-written left-padded sequence ----------------------------


def test_split_sequences_hand_example():
    L = 20
    short = [0] * 16 + [11, 12, 13, 14, 15, 16, 17]  # l = 7 items, i_1 = 11 .. i_7 = 17
    full = list(range(101, 124))  # l = 23 items, i_1 = 101 .. i_23 = 123
    seqs = torch.tensor([short, full])
    assert seqs.shape == (2, L + 3)

    x, y = split_sequences(seqs, "train")
    assert x.shape == y.shape == (2, L)
    assert x[0].tolist() == [0] * 16 + [11, 12, 13, 14] and y[0].tolist() == [0] * 15 + [11, 12, 13, 14, 15]
    assert x[1].tolist() == list(range(101, 121)) and y[1].tolist() == list(range(102, 122))
    # training never predicts the validation item i_{l-1} or the test item i_l
    assert 16 not in y[0].tolist() and 17 not in y[0].tolist() and y[1].max() == 121

    x, y = split_sequences(seqs, "valid")  # target i_{l-1}, the L items before it
    assert x[0].tolist() == [0] * 15 + [11, 12, 13, 14, 15] and y.tolist() == [16, 122]
    assert x[1].tolist() == list(range(102, 122))

    x, y = split_sequences(seqs, "test")  # target i_l, the L items before it
    assert x[0].tolist() == [0] * 14 + [11, 12, 13, 14, 15, 16] and y.tolist() == [17, 123]
    assert x[1].tolist() == list(range(103, 123))  # i_1, i_2 fall out of the window L = 20

    h = history_before_target(seqs, "valid")
    assert h[0].tolist() == [0] * 16 + [11, 12, 13, 14, 15] and h[1].tolist() == list(range(101, 122))
    h = history_before_target(seqs, "test")  # every earlier item, also those outside the window
    assert h[0].tolist() == [0] * 16 + [11, 12, 13, 14, 15, 16] and h[1].tolist() == list(range(101, 123))


# --- evaluate() in user chunks against a loop --------------------------------------------


class FixedScores(nn.Module):
    """full_scores looks each input row up in `inputs` and returns that user's row of a fixed
    score matrix, so chunking cannot change what a user gets."""

    def __init__(self, inputs, scores):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.inputs, self.scores, self.chunks = inputs, scores, []

    def full_scores(self, seq):
        assert not self.training
        self.chunks.append(len(seq))
        user = (seq[:, None, :] == self.inputs[None]).all(-1).float().argmax(1)  # (b,)
        return self.scores[user]


def fake_dataset(U, N, n_buckets, seed):
    g = gen(seed)
    lengths = torch.randint(5, 24, (U,), generator=g)
    seqs = torch.randint(1, N + 1, (U, 23), generator=g)
    seqs[torch.arange(23)[None, :] < (23 - lengths)[:, None]] = 0  # left padding
    item_bucket = torch.randint(1, n_buckets + 1, (N + 1,), generator=g)
    item_bucket[0] = 0
    return {"seqs": seqs, "item_bucket": item_bucket, "n_buckets": n_buckets, "n_items": N, "name": "fake"}


def loop_summary(data, scores, split, k):
    inputs, targets = split_sequences(data["seqs"], split)
    history = history_before_target(data["seqs"], split)
    per_user = []
    for u in range(len(inputs)):
        r = loop_rank(scores[u].tolist(), int(targets[u]), history[u].tolist())
        per_user.append((int(data["item_bucket"][targets[u]]), *loop_metrics(r, k)))
    return per_user


def mean_of(rows, k):
    n = len(rows)
    hr = 100 * sum(r[1] for r in rows) / n if n else float("nan")
    nd = 100 * sum(r[2] for r in rows) / n if n else float("nan")
    return {"users": n, f"HR@{k}": hr, f"nDCG@{k}": nd}


def assert_same(m, ref, k):
    assert m["users"] == ref["users"]
    for key in (f"HR@{k}", f"nDCG@{k}"):
        if math.isnan(ref[key]):
            assert math.isnan(m[key])
        else:
            assert math.isclose(m[key], ref[key], rel_tol=1e-5, abs_tol=1e-4)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_chunked_matches_loop(split):
    U, N, B, k = 37, 30, 10, 10
    data = fake_dataset(U, N, B, seed=1)
    inputs, _ = split_sequences(data["seqs"], split)
    assert len(torch.unique(inputs, dim=0)) == U  # rows identify users
    scores = torch.randint(0, 6, (U, N + 1), generator=gen(2)).float()  # ties included
    model = FixedScores(inputs, scores)
    model.train()
    m = evaluate(model, data, split, k, batch_size=8)  # 8 does not divide 37
    assert model.chunks == [8, 8, 8, 8, 5] and model.training  # chunked, mode restored
    same = evaluate(model, data, split, k, batch_size=1000)
    assert json.dumps(same, sort_keys=True) == json.dumps(m, sort_keys=True)  # chunking changes nothing (NaN too)

    rows = loop_summary(data, scores, split, k)
    assert_same(m, mean_of(rows, k), k)
    for b in range(1, B + 1):
        assert_same(m["buckets"][b], mean_of([r for r in rows if r[0] == b], k), k)
    for g, bs in {"warm": (1, 2, 3), "median": (4, 5, 6, 7), "cold": (8, 9, 10)}.items():
        assert_same(m["groups"][g], mean_of([r for r in rows if r[0] in bs], k), k)
    # buckets and groups each partition the users
    assert sum(m["buckets"][b]["users"] for b in range(1, B + 1)) == U
    assert sum(m["groups"][g]["users"] for g in ("warm", "median", "cold")) == U


def test_bucket_groups_ten():
    groups = bucket_groups(10)
    assert [list(groups[g]) for g in ("warm", "median", "cold")] == [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


@pytest.mark.parametrize("n_buckets", range(1, 13))
def test_bucket_groups_partition(n_buckets):
    groups = bucket_groups(n_buckets)
    flat = [b for g in ("warm", "median", "cold") for b in groups[g]]
    assert flat == list(range(1, n_buckets + 1))  # disjoint, ordered warm -> cold, complete
    bucket = torch.randint(1, n_buckets + 1, (50,), generator=gen(n_buckets))
    hit = (torch.rand(50, generator=gen(0)) < 0.5).float()
    out = summarise(hit, hit, bucket, n_buckets, 10)
    assert out["users"] == 50
    assert sum(out["groups"][g]["users"] for g in groups) == 50
    assert sum(out["buckets"][b]["users"] for b in range(1, n_buckets + 1)) == 50


# --- comparison_table: mean ± std over seeds and the relative improvement ----------------


def metrics_json(path, hr, ndcg, cold_hr):
    groups = {g: {"users": 1, "HR@10": hr, "nDCG@10": ndcg} for g in ("warm", "median")}
    groups["cold"] = {"users": 1, "HR@10": cold_hr, "nDCG@10": 0.0}
    path.write_text(json.dumps({"test": {"users": 3, "HR@10": hr, "nDCG@10": ndcg, "groups": groups}}))
    return str(path)


def table_cells(table):
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_comparison_table(tmp_path):
    base = [metrics_json(tmp_path / "s0.json", 10.0, 4.0, 2.0), metrics_json(tmp_path / "s1.json", 14.0, 6.0, 4.0)]
    pad = [metrics_json(tmp_path / "p0.json", 15.0, 5.0, 3.0), metrics_json(tmp_path / "p1.json", 15.0, 7.0, 6.0),
           metrics_json(tmp_path / "p2.json", 15.0, 6.0, 6.0)]
    table = comparison_table({"SASRec": base, "PAD": pad})
    assert "SASRec (n=2)" in table.splitlines()[0] and "PAD (n=3)" in table.splitlines()[0]
    rows = table_cells(table)
    assert set(rows) == {(g, m) for g in ("overall", "warm", "median", "cold") for m in ("HR@10", "nDCG@10")}

    def cell(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    assert rows[("overall", "HR@10")] == [cell([10, 14]), cell([15, 15, 15]), "+25.0%"]
    assert rows[("overall", "nDCG@10")] == [cell([4, 6]), cell([5, 7, 6]), "+20.0%"]
    assert rows[("warm", "HR@10")] == rows[("overall", "HR@10")]
    assert rows[("cold", "HR@10")] == [cell([2, 4]), cell([3, 6, 6]), "+66.7%"]
    assert rows[("cold", "nDCG@10")][2] == "n/a"  # base mean 0: no relative improvement
    one = table_cells(comparison_table({"A": base[:1], "B": pad[:1]}))
    assert one[("overall", "HR@10")] == ["10.00 ± 0.00", "15.00 ± 0.00", "+50.0%"]  # one seed: std 0


# --- Eq. (13): Kendall's tau ---------------------------------------------------------------


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


# --- Serving: recommend ------------------------------------------------------------------


def test_recommend_is_topk_of_the_scores_without_history():
    N, L = 40, 5
    history = [3, 17, 8, 3, 25, 9, 11]  # longer than L, with a repeat
    scores = torch.randn(1, N + 1, generator=gen(8))
    window = torch.tensor([[8, 3, 25, 9, 11]])  # the last L items
    model = FixedScores(window, scores).eval()
    data = {"seqs": torch.zeros(1, L + 3, dtype=torch.long), "n_items": N,
            "raw_ids": [""] + [f"r{i}" for i in range(1, N + 1)], "titles": [""] + [f"t{i}" for i in range(1, N + 1)]}
    got = recommend(model, data, history, k=6)
    expected = sorted((i for i in range(1, N + 1) if i not in history), key=lambda i: -scores[0, i].item())[:6]
    assert [i for i, *_ in got] == expected
    assert got[0][1:3] == (f"r{expected[0]}", f"t{expected[0]}")
    assert got[0][3] == pytest.approx(scores[0, expected[0]].item())
    assert len(recommend(model, data, history, k=1000)) == N - len(set(history))  # never padding or history


# --- Serving from cached item tables -----------------------------------------------------


def tiny_model(kind, gate="freq", N=57, seed=0):
    """A small random phase-1/2 expert or phase-3 PAD over an fp16 1024-d text table, in eval
    mode, with weights scaled up so that the gate and every expert matter."""
    from models import build_model

    torch.manual_seed(seed)
    text = torch.randn(N + 1, 1024).half()
    text[0] = 0
    bucket = torch.randint(1, 11, (N + 1,), generator=gen(seed))
    bucket[0] = 0
    data = {"text_emb": text, "n_items": N, "n_buckets": 10, "item_bucket": bucket}
    cfg = {"backbone": "sasrec", "d": 16, "L": 6, "n_blocks": 1, "n_heads": 2, "dropout": 0.1}
    args = {"kind": "pad", "experts": list(kind), "gate": gate, **cfg} if isinstance(kind, tuple) else \
        {"kind": "expert", "expert": kind, **cfg}
    model = build_model(args, data)
    for w in model.parameters():
        nn.init.normal_(w, std=0.3)
    return model.eval()


@pytest.mark.parametrize("kind,gate", [("id", None), ("align", None), ("llm", None), (("id", "align", "llm"), "freq"),
                                       (("id", "align", "llm"), "bucket"), (("id", "align", "llm"), "none"),
                                       (("align", "llm"), "freq")])
def test_cached_tables_give_full_scores_bit_for_bit(kind, gate):
    from evaluate import item_tables, scores_from_tables

    model = tiny_model(kind, gate)
    seq = torch.randint(0, 58, (9, 6), generator=gen(3))
    seq[0, :4] = 0  # a left-padded window
    with torch.no_grad():
        want = model.full_scores(seq)  # (9, N+1)
        assert torch.equal(scores_from_tables(model, item_tables(model), seq), want)
        assert torch.equal(scores_from_tables(model, item_tables(model, chunk=10), seq), want)  # items in chunks
        lean = scores_from_tables(model, item_tables(model), seq, gate_per_bucket=True)  # serving's O(B x N) gate
        half = scores_from_tables(model, item_tables(model, torch.float16), seq, gate_per_bucket=True)
    assert torch.allclose(lean, want, rtol=1e-6, atol=1e-6)
    assert half.dtype == torch.float32 and torch.allclose(half, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    model.train()
    with pytest.raises(ValueError, match="eval"):
        item_tables(model)  # dropout would enter the tables


def test_top_items_and_recommend_with_cached_tables():
    from evaluate import item_tables, top_items

    model = tiny_model(("id", "align", "llm"))
    seq = torch.randint(1, 58, (4, 6), generator=gen(4))
    exclude = torch.cat([seq, torch.zeros(4, 2, dtype=torch.long)], 1)  # history with padding
    scores, items = top_items(model, item_tables(model), seq, exclude, 5)
    with torch.no_grad():
        full = model.full_scores(seq)
    for u in range(4):
        allowed = [i for i in range(1, 58) if i not in seq[u].tolist()]
        assert items[u].tolist() == sorted(allowed, key=lambda i: -full[u, i].item())[:5]
        assert torch.allclose(scores[u], full[u, items[u]], rtol=1e-6, atol=1e-6)
    data = {"seqs": torch.zeros(1, 9, dtype=torch.long), "n_items": 57,
            "raw_ids": [""] + [f"r{i}" for i in range(1, 58)], "titles": [""] + [f"t{i}" for i in range(1, 58)]}
    history = seq[0].tolist()
    assert recommend(model, data, history, 5, item_tables(model)) == recommend(model, data, history, 5)
    assert [i for i, *_ in recommend(model, data, history, 5)] == items[0].tolist()

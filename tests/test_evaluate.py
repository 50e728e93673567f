"""Tests of evaluate.py (and dataset.py's splits): full-ranking HR@k / nDCG@k against plain
python loops on random scores under both rules for repeated targets, the splits of Appendix A
on a hand-written sequence, chunked evaluation with a fake model, the warm / median / cold
groups, the seeds table, and the item tables evaluation caches (Eq. 11 from cached tables)."""
import json
import math
import os
import statistics
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dataset import bucket_groups, history_before_target, split_sequences  # noqa: E402
from evaluate import evaluate, hr_ndcg, metric_row, summarise, summary_table, target_ranks  # noqa: E402


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- Plain-loop references ---------------------------------------------------------------


def loop_rank(scores, target, history, keep_repeats=False):
    """0-based rank of `target` in one row of scores over items 1..N: items of the history
    and the padding id 0 are left out; ties rank above it. A target that is also a history
    item is left out with it (rank N+1, a miss) unless keep_repeats."""
    if target in history and not keep_repeats:
        return len(scores)
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


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_ranks_and_metrics_match_loop(seed, ties, keep):
    U, N, H, k = 50, 40, 12, 10
    scores, target, history = random_case(U, N, H, seed, ties)
    ranks = target_ranks(scores, target, history, keep)
    hit, ndcg = hr_ndcg(ranks, k)
    for u in range(U):
        r = loop_rank(scores[u].tolist(), int(target[u]), history[u].tolist(), keep)
        assert int(ranks[u]) == r
        h_ref, n_ref = loop_metrics(r, k)
        assert math.isclose(float(hit[u]), h_ref) and math.isclose(float(ndcg[u]), n_ref, rel_tol=1e-6)


def test_repeated_target_is_a_miss_unless_kept():
    scores = torch.tensor([[9.0, 5.0, 4.0, 3.0, 2.0]])  # item 0 (padding) scores highest
    target, history = torch.tensor([3]), torch.tensor([[0, 3, 1]])  # target 3 was seen earlier
    # the authors' rule: 3 is masked with the rest of the history, so it is never in any top k
    assert target_ranks(scores, target, history).tolist() == [5]
    assert hr_ndcg(target_ranks(scores, target, history), 4)[0].item() == 0.0
    # kept: items 1 (history) and 0 (padding) are masked, 3 is ranked: only item 2 is above it
    assert target_ranks(scores, target, history, keep_repeats=True).tolist() == [1]


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

    def item_tables(self):
        return []

    def full_scores(self, seq, tables, per_bucket=False):
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


def loop_summary(data, scores, split, k, keep):
    inputs, targets = split_sequences(data["seqs"], split)
    history = history_before_target(data["seqs"], split)
    per_user = []
    for u in range(len(inputs)):
        r = loop_rank(scores[u].tolist(), int(targets[u]), history[u].tolist(), keep)
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


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_chunked_matches_loop(split, keep):
    U, N, B, k = 37, 30, 10, 10
    data = fake_dataset(U, N, B, seed=1)
    inputs, _ = split_sequences(data["seqs"], split)
    assert len(torch.unique(inputs, dim=0)) == U  # rows identify users
    scores = torch.randint(0, 6, (U, N + 1), generator=gen(2)).float()  # ties included
    model = FixedScores(inputs, scores)
    model.train()
    m = evaluate(model, data, split, k, batch_size=8, keep_repeats=keep)  # 8 does not divide 37
    assert model.chunks == [8, 8, 8, 8, 5] and model.training  # chunked, mode restored
    same = evaluate(model, data, split, k, batch_size=1000, keep_repeats=keep)
    assert json.dumps(same, sort_keys=True) == json.dumps(m, sort_keys=True)  # chunking changes nothing (NaN too)

    rows = loop_summary(data, scores, split, k, keep)
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


# --- summary_table: mean ± std over seeds and the relative improvement ---------------------


def metrics_json(hr, ndcg, cold_hr):
    groups = {g: {"users": 1, "HR@10": hr, "nDCG@10": ndcg} for g in ("warm", "median")}
    groups["cold"] = {"users": 1, "HR@10": cold_hr, "nDCG@10": 0.0}
    return {"test": {"users": 3, "HR@10": hr, "nDCG@10": ndcg, "groups": groups}}


def table_cells(table):
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_summary_table():
    base = [metric_row(metrics_json(10.0, 4.0, 2.0)), metric_row(metrics_json(14.0, 6.0, 4.0))]
    pad = [metric_row(metrics_json(h, n, c)) for h, n, c in ((15.0, 5.0, 3.0), (15.0, 7.0, 6.0), (15.0, 6.0, 6.0))]
    table = summary_table({"SASRec": base, "PAD": pad}, ("HR@10", "nDCG@10", "cold HR@10", "cold nDCG@10"), base="SASRec")
    assert table.splitlines()[0] == "| method | seeds | HR@10 | nDCG@10 | cold HR@10 | cold nDCG@10 | Impr. nDCG@10 |"
    rows = table_cells(table)

    def cell(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    assert rows["SASRec"] == ["2", cell([10, 14]), cell([4, 6]), cell([2, 4]), "0.00 ± 0.00", "+0.0%"]
    assert rows["PAD"] == ["3", cell([15, 15, 15]), cell([5, 7, 6]), cell([3, 6, 6]), "0.00 ± 0.00", "+20.0%"]
    one = table_cells(summary_table({"A": base[:1], "B": pad[:1]}, base="A", star=("B", 0.01)))
    assert one["B"] == ["1", "15.00★", "5.00★", "3.00★", "+25.0%"]  # one seed: no spread printed
    zero = table_cells(summary_table({"A": [{**base[0], "nDCG@10": 0.0}], "B": pad[:1]}, base="A"))
    assert zero["B"][-1] == "n/a"  # base mean 0: no relative improvement


# --- The item tables evaluation computes once (Eq. 11 from cached tables) -------------------


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
def test_item_tables_chunked_give_full_scores_bit_for_bit(kind, gate):
    """Items through f_MLP in chunks (a 4096-d fp16 table is never copied whole to float32)
    give the same scores, bit for bit in float32; float16 tables and serving's per-bucket gate
    agree within their rounding."""
    model = tiny_model(kind, gate)
    seq = torch.randint(0, 58, (9, 6), generator=gen(3))
    seq[0, :4] = 0  # a left-padded window
    experts = list(model.experts.values()) if hasattr(model, "experts") else [model]
    with torch.no_grad():
        want = model.full_scores(seq)  # (9, N+1)
        chunked = [e.item_tables(chunk=10)[0] for e in experts]
        assert all(torch.equal(a, b) for a, b in zip(chunked, model.item_tables()))
        assert torch.equal(model.full_scores(seq, chunked), want)
        lean = model.full_scores(seq, per_bucket=True)  # serving's O(B x N) gate
        half = model.full_scores(seq, model.item_tables(torch.float16), per_bucket=True)
    assert torch.allclose(lean, want, rtol=1e-6, atol=1e-6)
    assert half.dtype == torch.float32 and torch.allclose(half, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_blend_is_the_weighted_sum_of_per_user_standardised_scores():
    """models.Blend (evaluate.py --blend): weight * z(A) + (1 - weight) * z(B), z over items
    1..N per user, by a loop; weight 1 ranks exactly as A."""
    from models import Blend, TextKNN

    torch.manual_seed(0)
    n, d = 12, 5
    a, b = TextKNN(torch.randn(n + 1, d), "last"), TextKNN(torch.randn(n + 1, d), "mean")
    seq = torch.randint(1, n + 1, (4, 6))
    got = Blend(a, b, 0.3).full_scores(seq)
    sa, sb = a.full_scores(seq), b.full_scores(seq)
    for u in range(len(seq)):
        za = [(sa[u, i] - sa[u, 1:].mean()) / sa[u, 1:].std() for i in range(1, n + 1)]
        zb = [(sb[u, i] - sb[u, 1:].mean()) / sb[u, 1:].std() for i in range(1, n + 1)]
        for i in range(n):
            assert abs(got[u, i + 1] - (0.3 * za[i] + 0.7 * zb[i])) < 1e-5
    assert torch.equal(Blend(a, b, 1.0).full_scores(seq)[:, 1:].argsort(1), sa[:, 1:].argsort(1))

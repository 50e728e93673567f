"""Tests of models.py (and pretrain.py's sampling and loss): causality of every backbone,
each expert's two scoring paths against each other, PAD's fused scores against a plain loop of
Eq. (11), the gates' probabilities, the frozen text table, overfitting a handful of sequences,
and the checkpoint checks."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from evaluate import target_ranks  # noqa: E402
from models import BACKBONES, Caser, EXPERTS, GATES, PAD, SASRec, build_model, make_expert, make_gate  # noqa: E402
from runs import model_from_checkpoint, read_checkpoint  # noqa: E402
from trainer import bce_loss, ce_loss, sample_negatives  # noqa: E402

N, L, D, D_TEXT, N_BUCKETS = 30, 8, 16, 12, 10


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cfg(backbone="sasrec", **kw):
    """An expert's configuration, complete as a checkpoint's model_args (runs.MODEL_ARGS)."""
    return {"backbone": backbone, "d": D, "L": L, "n_blocks": 2, "n_heads": 2, "dropout": 0.1, "block": "ours",
            "text_norm": "none", "text_layers": 4, "text_out": "gelu", "fuse_dropout": 0.0, **kw}


def text_table(seed=0, n=N):
    t = torch.randn(n + 1, D_TEXT, generator=gen(seed))
    t[0] = 0
    return t


def item_bucket(seed=0, n=N):
    b = torch.randint(1, N_BUCKETS + 1, (n + 1,), generator=gen(seed))
    b[0] = 0
    return b


def sequences(B=5, seed=0):
    """Left-padded sequences: one full row, partly padded rows, one with a single item."""
    g = gen(seed)
    seq = torch.randint(1, N + 1, (B, L), generator=g)
    pads = [0, 2, 5, L - 1, 3][:B]
    for row, p in enumerate(pads):
        seq[row, :p] = 0
    return seq


def expert(kind, backbone, seed=0):
    torch.manual_seed(seed)
    return make_expert(kind, N, text_table(), cfg(backbone)).eval()


def randomise(module, seed):
    """Gates start at zeros (uniform probabilities); random weights make the tests meaningful."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


# --- Sequence encoders: causality --------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_causal_later_items_never_change_earlier_outputs(backbone):
    model = expert("id", backbone)
    seq = sequences()
    with torch.no_grad():
        out = model(seq)  # (B, L, d)
        for t in range(L):
            changed = seq.clone()
            real = changed[:, t] != 0
            changed[real, t] = changed[real, t] % N + 1  # another real item at position t
            out2 = model(changed)
            assert torch.allclose(out2[:, :t], out[:, :t], atol=1e-6, rtol=0), f"position < {t} moved"
            assert (out2[real, t] - out[real, t]).abs().amax() > 1e-4  # position t does see item t


@pytest.mark.parametrize("backbone", BACKBONES)
def test_all_padding_prefixes_are_finite(backbone):
    model = expert("id", backbone)
    seq = torch.zeros(3, L, dtype=torch.long)
    seq[1, -1] = 4  # a single item after L-1 paddings
    seq[2, -2:] = torch.tensor([7, 9])  # row 0 is padding only
    with torch.no_grad():
        out = model(seq)
        scores = model.full_scores(seq)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert (out[seq == 0] == 0).all()  # padding positions carry no state


def test_caser_equals_a_loop_over_windows():
    """Caser's all-windows-at-once convolutions against the paper's per-window formula:
    for the L_w items ending at t, o_v = sum_r w_r e_r, o_h = max over starts of relu(conv_h)."""
    torch.manual_seed(0)
    B, Lw, d, n_v = 3, 6, 8, 4
    caser = Caser(d, Lw, n_v=n_v).eval()
    e = torch.randn(B, Lw, d)
    mask = torch.ones(B, Lw, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        out = caser(e, mask)
        x = torch.cat([torch.zeros(B, Lw - 1, d), e * mask.unsqueeze(-1)], dim=1)
        for b in range(B):
            for t in range(Lw):
                W = x[b, t:t + Lw]  # (L_w, d), the window ending at t
                o_v = [sum(caser.conv_v.weight[v, 0, r] * W[r] for r in range(Lw)) + caser.conv_v.bias[v] for v in range(n_v)]
                o_h = []
                for h, conv in enumerate(caser.conv_h, start=1):
                    starts = [(conv.weight * W[s:s + h].T).sum((1, 2)) + conv.bias for s in range(Lw - h + 1)]
                    o_h.append(torch.relu(torch.stack(starts)).amax(0))
                z = torch.relu(caser.fc(torch.cat(o_v + o_h))) * mask[b, t]
                assert torch.allclose(out[b, t], z, atol=1e-5), (b, t)


# --- One expert: bce_logits and full_scores are the same logit ---------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("kind", EXPERTS)
def test_expert_full_scores_equal_bce_logits(kind, backbone):
    model = expert(kind, backbone)
    seq = sequences()
    B = len(seq)
    pos, neg = torch.randint(1, N + 1, (2, B, L), generator=gen(1))
    with torch.no_grad():
        p, n = model.bce_logits(seq, pos, neg)
        scores = model.full_scores(seq)
        # item j as the positive (and the negative) at the last position, for every j
        seq_j = seq.repeat_interleave(N + 1, 0)  # (B*(N+1), L)
        item_j = torch.arange(N + 1).repeat(B)  # (B*(N+1),)
        pos_j = pos.repeat_interleave(N + 1, 0)
        pos_j[:, -1] = item_j
        p_j, n_j = model.bce_logits(seq_j, pos_j, pos_j)
    assert p.shape == n.shape == (B, L) and scores.shape == (B, N + 1)
    assert torch.allclose(p_j[:, -1].view(B, N + 1), scores, atol=1e-5)
    assert torch.allclose(n_j[:, -1].view(B, N + 1), scores, atol=1e-5)
    # and by hand: the state after the last item dotted with item j's representation
    with torch.no_grad():
        h = model(seq)[:, -1]  # (B, d)
        e = model.items(torch.arange(N + 1))  # (N+1, d)
    ref = torch.tensor([[float(torch.dot(h[b], e[j])) for j in range(N + 1)] for b in range(B)])
    assert torch.allclose(scores, ref, atol=1e-5)


# --- Gates and PAD: Eq. (11) against a loop ----------------------------------------------


def loop_gate(gate, kind, bucket, h):
    """g_k for one target item of bucket `bucket`, expert states h = K x (d,), from the gate's
    parameters: Eq. (11) written out per expert."""
    K = len(h)
    if kind == "freq":
        z = [float(gate.a.weight[bucket, k]) + float(torch.dot(gate.w[k][:len(h[k])], h[k])) for k in range(K)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]
    if kind == "bucket":
        s = [1 / (1 + math.exp(-float(gate.v.weight[bucket, k]))) for k in range(K)]
        return [v / sum(s) for v in s]
    z = [float(gate.v[k]) for k in range(K)]
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def loop_pad_scores(experts, gate, kind, bucket, seq, bias=None, log_temp=None, user_bias=None):
    """Phi(u, i) = t[b(i)] sum_k g_k(b(i), h_k) o_k(u, i) (+ beta[b(i)] with --bucket-bias;
    t = exp(tau), tau = log_temp, with --bucket-temp, else t = 1; + c[b(i)] + v[b(i)] . h_1(u)
    with --user-bias, user_bias = (v, c)) for every user u and item i, one at a time."""
    with torch.no_grad():
        h = [e(seq)[:, -1] for e in experts]  # K x (B, d)
        tables = [e.items(torch.arange(N + 1)) for e in experts]  # K x (N+1, d)
    out = torch.zeros(len(seq), N + 1)
    with torch.no_grad():
        for u in range(len(seq)):
            for i in range(N + 1):
                hu = [h_k[u] for h_k in h]
                g = loop_gate(gate, kind, int(bucket[i]), hu)
                t = 1.0 if log_temp is None else math.exp(float(log_temp[int(bucket[i])]))
                out[u, i] = t * sum(g[k] * float(torch.dot(hu[k], tables[k][i])) for k in range(len(experts)))
                out[u, i] += 0.0 if bias is None else float(bias[int(bucket[i])])
                if user_bias is not None:
                    v, c = user_bias
                    out[u, i] += float(torch.dot(v[int(bucket[i])], hu[0])) + float(c[int(bucket[i])])
    return out


def make_pad(names, gate_kind, seed=0, backbone="sasrec", bucket_bias=False, bucket_temp=False, logit_adjust=0,
             user_bias=False):
    experts = {k: expert(k, backbone, seed=seed + i) for i, k in enumerate(names)}
    widths = [D_TEXT if k == "text" else D for k in names]  # the text expert's state is d_text wide
    gate = randomise(make_gate(gate_kind, N_BUCKETS, widths if "text" in names else D, names), seed)
    freq = torch.randint(0, 50, (N + 1,), generator=gen(seed + 300))
    pad = PAD(experts, gate, item_bucket(), N_BUCKETS, bucket_bias, bucket_temp=bucket_temp, item_freq=freq,
              logit_adjust=logit_adjust, user_bias=widths[0] if user_bias else None).eval()
    user = (pad.user_bias.weight, pad.user_bias.bias) if user_bias else (None, None)
    with torch.no_grad():
        for w, s in ((pad.bias, 100), (pad.log_temp, 200), (user[0], 400), (user[1], 500)):
            if w is not None:
                w.normal_(generator=gen(seed + s))
    return pad


@pytest.mark.parametrize("gate_kind", GATES)
def test_gate_probabilities_positive_and_sum_to_one(gate_kind):
    K = 3
    gate = randomise(make_gate(gate_kind, N_BUCKETS, D, EXPERTS), 3)
    buckets = torch.arange(1, N_BUCKETS + 1).expand(4, -1)  # (4 users, every bucket)
    h = [torch.randn(4, 1, D, generator=gen(k)) for k in range(K)]
    with torch.no_grad():
        g = gate(buckets, h)  # (4, B, K)
    assert g.shape == (4, N_BUCKETS, K)
    assert (g > 0).all() and torch.allclose(g.sum(-1), torch.ones(4, N_BUCKETS))
    pad = make_pad(EXPERTS, gate_kind)
    with torch.no_grad():
        per_bucket = pad.gate_per_bucket(sequences())  # (B, K)
    assert per_bucket.shape == (N_BUCKETS, 3)
    assert (per_bucket > 0).all() and torch.allclose(per_bucket.sum(-1), torch.ones(N_BUCKETS))


@pytest.mark.parametrize("bucket_bias,bucket_temp,user_bias",
                         [(False, False, False), (True, False, False), (False, True, False), (True, True, False),
                          (False, False, True), (True, True, True)])
@pytest.mark.parametrize("gate_kind", GATES)
def test_pad_full_scores_equal_loop_of_eq11(gate_kind, bucket_bias, bucket_temp, user_bias):
    """Eq. (11) by loop (with --bucket-bias: + beta[b(i)]; with --bucket-temp: times exp(tau[b(i)]);
    with --user-bias: + c[b(i)] + v[b(i)] . h_1(u)), per item and per bucket."""
    pad = make_pad(EXPERTS, gate_kind, bucket_bias=bucket_bias, bucket_temp=bucket_temp, user_bias=user_bias)
    seq = sequences(B=3)
    with torch.no_grad():
        scores = pad.full_scores(seq)
        per_bucket = pad.full_scores(seq, per_bucket=True)
    user = (pad.user_bias.weight, pad.user_bias.bias) if user_bias else None
    ref = loop_pad_scores(list(pad.experts.values()), pad.gate, gate_kind, pad.bucket, seq, pad.bias, pad.log_temp, user)
    assert scores.shape == (3, N + 1)
    assert torch.allclose(scores, ref, atol=1e-5) and torch.allclose(per_bucket, ref, atol=1e-5)
    # bce_logits goes through fuse() at every position: at the last one it is the same logit
    pos = torch.randint(1, N + 1, (3, L), generator=gen(2))
    with torch.no_grad():
        p, n = pad.bce_logits(seq, pos, pos)
    assert torch.allclose(p[:, -1], scores.gather(1, pos[:, -1:]).squeeze(1), atol=1e-5)
    assert torch.allclose(p, n)


@pytest.mark.parametrize("gate_kind", GATES)
def test_mix_prob_is_the_log_of_the_gated_mixture_of_the_experts_distributions(gate_kind):
    """--mix prob: Phi(u, i) = log sum_k g_k(b(i), h_k) p_k(u, i), p_k(u, .) the softmax of
    exp(s_k) o_k(u, .) over the items 1..N, by loop in float64 (+ beta[b(i)]); per bucket, at every position
    (all_logits) and in the gate fit's fuse alike; BCE, which scores a few items, is refused."""
    pad = make_pad(EXPERTS, gate_kind, seed=3, bucket_bias=True)
    pad.mix, pad.log_sharpness = "prob", torch.nn.Parameter(torch.tensor([0.3, -0.5, 0.1]))
    seq = sequences(B=3)
    with torch.no_grad():
        scores, per_bucket = pad.full_scores(seq), pad.full_scores(seq, per_bucket=True)
        every = pad.all_logits(seq)  # (B, L, N+1)
        h = [e(seq)[:, -1] for e in pad.experts.values()]
        tables = [e.items(torch.arange(N + 1)) for e in pad.experts.values()]
    for u in range(len(seq)):
        o = [(tables[k][1:] @ h[k][u]).double() * math.exp(t) for k, t in enumerate((0.3, -0.5, 0.1))]  # K x (N,)
        p = [o_k.exp() / o_k.exp().sum() for o_k in o]
        for i in range(1, N + 1):
            with torch.no_grad():
                g = loop_gate(pad.gate, gate_kind, int(pad.bucket[i]), [h_k[u] for h_k in h])
            ref = math.log(sum(g[k] * float(p[k][i - 1]) for k in range(len(EXPERTS)))) + pad.bias.detach()[pad.bucket[i]].item()
            assert scores[u, i].item() == pytest.approx(ref, abs=1e-4)
    assert torch.allclose(per_bucket[:, 1:], scores[:, 1:], atol=1e-5)
    assert torch.allclose(every[:, -1, 1:], scores[:, 1:], atol=1e-5)
    assert (scores[:, 0] < -1e8).all()  # the padding item is out of every distribution
    with pytest.raises(ValueError, match="--loss ce"):
        pad.bce_logits(seq, seq, seq)


@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("dropped", EXPERTS)
def test_removing_an_expert_removes_its_contribution(dropped, gate_kind):
    """The same experts and gate parameters without expert j: every gate renormalises over the
    experts left, so Phi without j = (Phi - g_j o_j) / (1 - g_j) of the three-expert model."""
    pad = make_pad(EXPERTS, gate_kind, seed=5)
    j = EXPERTS.index(dropped)
    kept = [k for k in EXPERTS if k != dropped]
    gate = make_gate(gate_kind, N_BUCKETS, D, kept)
    with torch.no_grad():  # the kept experts' columns (rows of the freq gate's w) of the same parameters
        for name, w in gate.named_parameters():
            full = dict(pad.gate.named_parameters())[name]
            w.copy_(full[[EXPERTS.index(k) for k in kept]] if name == "w" else full[..., [EXPERTS.index(k) for k in kept]])
    less = PAD({k: pad.experts[k] for k in kept}, gate, pad.bucket, N_BUCKETS).eval()
    seq = sequences(B=3)
    with torch.no_grad():
        phi, phi_less = pad.full_scores(seq), less.full_scores(seq)
        h = [e(seq)[:, -1, None] for e in pad.experts.values()]
        g = pad.gate(pad.bucket.expand(len(seq), -1), h)[..., j]  # (B, N+1) g_j of every item
        o_j = pad.experts[dropped].full_scores(seq)
    assert not torch.allclose(phi_less, phi, atol=1e-3)
    assert torch.allclose(phi_less, (phi - g * o_j) / (1 - g), atol=1e-4)


def test_text_expert_scores_are_scaled_cosines_to_the_last_item():
    """--experts ...,text: o_text(u, i) = s * cos(h_text[last item of u], h_text[i]), by loop;
    padding scores 0; the scale s = exp(log_scale) is the expert's only parameter."""
    text = expert("text", "sasrec")
    assert [n for n, _ in text.named_parameters()] == ["encoder.log_scale"]
    with torch.no_grad():
        text.encoder.log_scale.fill_(math.log(3.0))
        seq = sequences(B=4)
        scores = text.full_scores(seq)
    table = text_table()
    for u in range(4):
        last = table[seq[u, -1]]
        for i in range(1, N + 1):
            cos = float(torch.dot(last, table[i]) / (last.norm() * table[i].norm()))
            assert float(scores[u, i]) == pytest.approx(3.0 * cos, abs=1e-5)
    assert torch.all(scores[:, 0] == 0)


@pytest.mark.parametrize("gate_kind", GATES)
def test_pad_with_the_text_expert_equals_loop_of_eq11(gate_kind):
    """The text expert under each gate: Eq. (11) by loop, with the freq gate's state term on
    the d_text-wide text state (w_k's first d_text entries)."""
    pad = make_pad(("id", "llm", "text"), gate_kind, seed=3)
    seq = sequences(B=3)
    with torch.no_grad():
        scores = pad.full_scores(seq)
    ref = loop_pad_scores(list(pad.experts.values()), pad.gate, gate_kind, pad.bucket, seq)
    assert torch.allclose(scores, ref, atol=1e-4)
    with torch.no_grad():  # full_scores and the CE logits of every item agree at the last position
        assert torch.allclose(pad.all_logits(seq)[:, -1], scores, atol=1e-4)


@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("kind", EXPERTS)
def test_single_expert_pad_equals_that_expert(kind, gate_kind):
    pad = make_pad((kind,), gate_kind, seed=7)
    seq = sequences()
    with torch.no_grad():
        assert torch.allclose(pad.full_scores(seq), pad.experts[kind].full_scores(seq), atol=1e-6)


def test_text_table_frozen_and_id_tables_learn():
    pad = make_pad(EXPERTS, "freq").train()
    text_tables = [m.h_text for m in pad.modules() if hasattr(m, "h_text")]
    assert len(text_tables) == 2  # the alignment expert's and the LLM expert's f_MLP
    before = [t.clone() for t in text_tables]
    assert not any("h_text" in key for key in pad.state_dict())  # never copied into checkpoints
    assert all(not t.requires_grad for t in text_tables)
    assert all(t is not p for t in text_tables for p in pad.parameters())
    seq = sequences()
    pos, neg = torch.randint(1, N + 1, (2, len(seq), L), generator=gen(3))
    opt = torch.optim.AdamW(pad.parameters(), lr=0.1, weight_decay=0.1)
    loss = bce_loss(*pad.bce_logits(seq, pos, neg), seq != 0)
    loss.backward()
    assert all(t.grad is None for t in text_tables)
    for table in (pad.experts["id"].items.h_c.weight, pad.experts["align"].items.id.h_c.weight):
        assert table.requires_grad and table.grad is not None and table.grad[1:].abs().sum() > 0
    assert pad.experts["llm"].items.mlp[0].weight.grad.abs().sum() > 0  # w' of Eq. (10) learns
    assert pad.gate.w.grad.abs().sum() > 0 and pad.gate.a.weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(t, b) for t, b in zip(text_tables, before))


# --- Training: sampling, loss, overfitting a handful of sequences ------------------------


def test_sample_negatives_avoid_history_and_are_seeded():
    U, H, n_items = 16, 10, 20
    history = torch.randint(1, n_items + 1, (U, H), generator=gen(0))
    history[torch.rand(U, H, generator=gen(1)) < 0.2] = 0
    history[0] = torch.arange(1, H + 1)  # half of the items seen: many draws are rejected
    history[1] = 0  # no history at all
    neg = sample_negatives(history, n_items, (U, 7), gen(42))
    assert neg.shape == (U, 7) and neg.min() >= 1 and neg.max() <= n_items
    for u in range(U):
        seen = set(history[u].tolist())
        assert not any(int(x) in seen for x in neg[u])
    assert torch.equal(neg, sample_negatives(history, n_items, (U, 7), gen(42)))
    assert not torch.equal(neg, sample_negatives(history, n_items, (U, 7), gen(43)))
    # a user who has seen every item but one always gets that one
    full = torch.arange(1, n_items + 1).view(1, -1).clone()
    full[0, 4] = 0  # item 5 unseen
    assert (sample_negatives(full, n_items, (1, 50), gen(0)) == 5).all()


def test_bce_loss_matches_formula():
    pos, neg = torch.randn(2, 3, 4, generator=gen(0))
    mask = torch.rand(3, 4, generator=gen(1)) < 0.6
    p, n = pos[mask].tolist(), neg[mask].tolist()
    ref = (-sum(math.log(1 / (1 + math.exp(-x))) for x in p) / len(p)
           - sum(math.log(1 - 1 / (1 + math.exp(-x))) for x in n) / len(n))
    assert math.isclose(float(bce_loss(pos, neg, mask)), ref, rel_tol=1e-5)


def test_ce_loss_matches_formula():
    logits = torch.randn(3, 4, 7, generator=gen(0))
    pos = torch.randint(1, 7, (3, 4), generator=gen(1))
    mask = torch.rand(3, 4, generator=gen(2)) < 0.6
    terms = [math.log(sum(math.exp(x) for x in logits[b, t, 1:].tolist())) - logits[b, t, pos[b, t]].item()
             for b in range(3) for t in range(4) if mask[b, t]]  # softmax over items 1..N, padding left out
    assert math.isclose(float(ce_loss(logits, pos, mask)), sum(terms) / len(terms), rel_tol=1e-5)


@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("kind", EXPERTS)
def test_all_logits_are_the_bce_logits_of_every_item(kind, gate_kind):
    """--loss ce scores every item at every position: the same logit as bce_logits gives an
    item as the positive, for one expert and for PAD (Eq. 11 at every position)."""
    seq = sequences(B=3)
    for model in (expert(kind, "sasrec").eval(), make_pad(EXPERTS, gate_kind),
                  make_pad(EXPERTS, gate_kind, bucket_bias=True, bucket_temp=True, user_bias=True)):
        with torch.no_grad():
            every = model.all_logits(seq)  # (3, L, N+1)
            for j in (1, 5, N):
                p, _ = model.bce_logits(seq, torch.full((3, L), j), torch.full((3, L), j))
                assert torch.allclose(every[..., j], p, atol=1e-5)
        assert every.shape == (3, L, N + 1)


def test_sasrec_overfits_a_handful_of_sequences():
    torch.manual_seed(0)
    n_items, U = 40, 8
    seqs = torch.stack([torch.randperm(n_items, generator=gen(u))[:L + 1] + 1 for u in range(U)])  # (U, L+1)
    seqs[1, :3] = 0  # some left padding
    train_in, train_pos = seqs[:, :-1], seqs[:, 1:]
    real = (train_in != 0) & (train_pos != 0)
    model = make_expert("id", n_items, text_table(n=n_items), {**cfg("sasrec"), "n_blocks": 1, "d": 32, "dropout": 0.0})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = gen(0)
    for _ in range(200):
        neg = sample_negatives(seqs, n_items, train_pos.shape, g)
        loss = bce_loss(*model.bce_logits(train_in, train_pos, neg), real)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    with torch.no_grad():
        ranks = target_ranks(model.full_scores(train_in), train_pos[:, -1], train_in)
    assert (ranks == 0).float().mean() >= 7 / 8, ranks.tolist()  # the next item ranked first of 40


# --- Checkpoints: self-describing, refused when from another dataset, phase, backbone -----


def dataset(name="a", fingerprint="aaaaaaaaaaaaaaaa"):
    return {"name": name, "fingerprint": fingerprint, "n_items": N, "text_emb": text_table(),
            "n_buckets": N_BUCKETS, "item_bucket": item_bucket()}


def checkpoint(model_args, data, phase=1):
    model = build_model(model_args, data)
    return {"phase": phase, "model_args": model_args, "state": model.state_dict(), "args": {"data": data["name"]},
            "dataset": data["name"], "n_items": data["n_items"], "fingerprint": data["fingerprint"],
            "metrics": {}}, model


@pytest.mark.parametrize("model_args", [
    {"kind": "expert", "expert": "id", **cfg("gru4rec")},
    {"kind": "expert", "expert": "align", **cfg("caser")},
    {"kind": "pad", "experts": ["id", "align", "llm"], "gate": "freq", "gate_init": "uniform", "bucket_bias": False,
     **cfg("sasrec")},
])
def test_checkpoint_round_trip(tmp_path, model_args):
    data = dataset()
    ckpt, model = checkpoint(model_args, data)
    path = tmp_path / "m.pt"
    torch.save(ckpt, path)
    loaded = read_checkpoint(path)
    rebuilt = model_from_checkpoint(loaded, data, path, phase=1, backbone=model_args["backbone"]).eval()
    seq = sequences()
    with torch.no_grad():
        assert torch.equal(rebuilt.full_scores(seq), model.eval().full_scores(seq))


def test_checkpoint_refusals(tmp_path):
    data = dataset()
    ckpt, _ = checkpoint({"kind": "expert", "expert": "id", **cfg("gru4rec")}, data, phase=1)
    path = str(tmp_path / "pretrain_gru4rec.pt")
    torch.save(ckpt, path)
    ckpt = read_checkpoint(path)

    with pytest.raises(SystemExit, match="pretrain_gru4rec.pt") as e:
        model_from_checkpoint(ckpt, dataset("b", "bbbbbbbbbbbbbbbb"), path)
    assert "'a'" in str(e.value) and "'b'" in str(e.value) and "fingerprint" in str(e.value)
    with pytest.raises(SystemExit, match=r"pretrain_gru4rec.pt is a phase-1 checkpoint.*phase-2") as e:
        model_from_checkpoint(ckpt, data, path, phase=2)
    with pytest.raises(SystemExit, match=r"pretrain_gru4rec.pt uses backbone 'gru4rec', not 'sasrec'"):
        model_from_checkpoint(ckpt, data, path, phase=1, backbone="sasrec")
    model_from_checkpoint(ckpt, data, path, phase=1, backbone="gru4rec")  # the matching one loads
    # `like`: another encoder configuration is refused; so is model_args that lack a key (an older checkpoint)
    from runs import check_checkpoint

    with pytest.raises(SystemExit, match="d=16.*d=8"):
        check_checkpoint(ckpt, data, path, like={**ckpt["model_args"], "d": 8})
    with pytest.raises(SystemExit, match="block=ours.*block=authors"):
        check_checkpoint(ckpt, data, path, like={**ckpt["model_args"], "block": "authors"})
    older = {**ckpt, "model_args": {k: v for k, v in ckpt["model_args"].items() if k not in ("block", "text_out")}}
    for refused in (lambda: check_checkpoint(older, data, path, like=ckpt["model_args"]),
                    lambda: model_from_checkpoint(older, data, path)):
        with pytest.raises(SystemExit, match=r"pretrain_gru4rec.pt: its model_args lack block, text_out .*--overwrite"):
            refused()


def test_read_checkpoint_refuses_other_files(tmp_path):
    with pytest.raises(SystemExit, match="missing.pt: no such checkpoint"):
        read_checkpoint(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="junk.pt: not a readable PAD checkpoint"):
        read_checkpoint(str(junk))
    partial = tmp_path / "partial.pt"
    torch.save({"state": {}, "phase": 1}, partial)
    with pytest.raises(SystemExit, match="partial.pt: not a PAD checkpoint"):
        read_checkpoint(str(partial))
    pickled = tmp_path / "pickled.pt"
    torch.save({"phase": 1, "model_args": {}, "state": {}, "fingerprint": "x", "obj": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(SystemExit, match="pickled.pt: not a readable PAD checkpoint"):  # weights_only refuses it
        read_checkpoint(str(pickled))


# --- The authors' variants (--preset authors): SASRec block and the gate's ramp --------------


def test_authors_sasrec_block_is_causal_and_shaped_as_theirs():
    torch.manual_seed(0)
    enc = SASRec(D, L, n_blocks=2, n_heads=2, dropout=0.0, block="authors").eval()
    block = enc.blocks[0]
    assert block.qkv.bias is None and block.proj.bias is None  # attention projections without bias
    assert block.ffn[0].out_features == 4 * D and enc.ln_in is not None  # width 4d, LayerNorm on the inputs
    e, mask = torch.randn(2, L, D, generator=gen(0)), torch.ones(2, L, dtype=torch.bool)
    with torch.no_grad():
        out = enc(e, mask)
        later = e.clone()
        later[:, 5:] = torch.randn(2, L - 5, D, generator=gen(1))
        assert torch.allclose(enc(later, mask)[:, :5], out[:, :5], atol=1e-6)  # causal
        enc.pos.weight.zero_()  # without positions, LayerNorm on the inputs makes the scale of e irrelevant
        assert torch.allclose(enc(e * 7.0, mask), enc(e, mask), atol=1e-4)


@pytest.mark.parametrize("names", [EXPERTS, ("id", "llm"), ("align", "llm")])
def test_gate_ramp_starts_at_the_authors_probabilities(names):
    """sigmoid-normalised ramp over buckets 0..B: ID 1 -> 0, LLM 0 -> 1, alignment -4 -> -5;
    the bucket gate starts there, and the freq gate (softmax of log-sigmoid, state weights 0) too."""
    import numpy as np

    ramp = {"id": np.linspace(1, 0, N_BUCKETS + 1), "llm": np.linspace(0, 1, N_BUCKETS + 1),
            "align": np.linspace(-4, -5, N_BUCKETS + 1)}
    s = np.stack([1 / (1 + np.exp(-ramp[k])) for k in names], 1)  # (B+1, K)
    want = torch.tensor(s / s.sum(1, keepdims=True), dtype=torch.float32)
    buckets = torch.arange(N_BUCKETS + 1).expand(2, -1)
    h = [torch.randn(2, 1, D, generator=gen(k)) for k in range(len(names))]
    for kind in ("bucket", "freq"):
        with torch.no_grad():
            g = make_gate(kind, N_BUCKETS, D, names, init="ramp")(buckets, h)  # (2, B+1, K)
        assert torch.allclose(g[0], want, atol=1e-6) and torch.allclose(g[1], want, atol=1e-6)
    if "llm" in names and "id" in names:  # the LLM expert's share grows from warm to cold buckets
        assert want[1, names.index("llm")] < want[N_BUCKETS, names.index("llm")]
    with pytest.raises(ValueError, match="per-bucket gate"):
        make_gate("none", N_BUCKETS, D, names, init="ramp")


def test_text_norm_standard_is_a_fixed_per_dimension_zscore():
    """--text-norm standard: f_MLP reads (h_text - mean) / std over items 1..N, per dimension,
    padding kept at zero; the statistics are buffers, never trained or saved."""
    from models import TextMLP

    text = text_table() * 0.05 + 0.3  # small spread, offset: the regime of unit-norm MiniLM rows
    mlp = TextMLP(text, D, 0.0, norm="standard", chunk=7)  # statistics accumulated in chunks of rows
    seen = []
    mlp.mlp[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    items = torch.tensor([[0, 3, 5], [N, 1, 2]])
    mlp(items)
    rows = text[1:].double()
    z = ((text.double() - rows.mean(0)) / rows.std(0)).float()
    z[0] = 0
    assert torch.allclose(seen[0], z[items], atol=1e-5)
    assert not any("mean" in k or "std" in k for k in mlp.state_dict())
    assert all(not b.requires_grad for b in (mlp.mean, mlp.std))


def test_text_out_linear_drops_only_the_last_gelu():
    """--text-out linear: f_MLP is the same network without its final GELU, so item vectors
    may have coordinates below GELU's minimum (about -0.17); --text-out gelu never does."""
    from models import TextMLP

    torch.manual_seed(0)
    gelu = TextMLP(text_table() * 3, D, 0.0, n_layers=1)
    torch.manual_seed(0)
    linear = TextMLP(text_table() * 3, D, 0.0, n_layers=1, out="linear")
    assert [type(m).__name__ for m in linear.mlp] == ["Linear", "GELU", "Dropout", "Linear"]
    items = torch.arange(N + 1)
    x = text_table()[items] * 3
    want = linear.mlp[3](torch.nn.functional.gelu(linear.mlp[0](x)))  # by hand
    assert torch.allclose(linear(items), want, atol=1e-6)
    assert torch.allclose(gelu(items), torch.nn.functional.gelu(want), atol=1e-6)  # same weights, one GELU more
    assert linear(items).min() < -0.2 and gelu(items).min() >= -0.1701
    with pytest.raises(ValueError, match="--text-out"):
        TextMLP(text_table(), D, 0.0, out="relu")


@pytest.mark.parametrize("init", ["uniform", "ramp"])
def test_phase3_llm_expert_gradient_is_its_gate_share_of_the_loss(init):
    """In phase 3 the LLM expert learns only through its gate share g_llm (Eq. 11): its
    parameters' gradient equals that of sum g_llm * o_llm with g and the other experts'
    logits fixed at their values, computed here expert by expert with loop_gate."""
    pad = make_pad(EXPERTS, "freq")
    with torch.no_grad():
        pad.gate.w.zero_()  # the bucket part only, so g does not depend on the experts' states
        if init == "ramp":
            pad.gate.a.weight.copy_(make_gate("freq", N_BUCKETS, D, EXPERTS, init="ramp").a.weight)
    seq = sequences()
    pos, neg = torch.randint(1, N + 1, (2, len(seq), L), generator=gen(3))
    mask = seq != 0
    llm = pad.experts["llm"]
    got = torch.autograd.grad(bce_loss(*pad.bce_logits(seq, pos, neg), mask), list(llm.parameters()))

    h = {k: e(seq) for k, e in pad.experts.items()}  # (B, L, d) each
    logits = []
    for items in (pos, neg):
        phi = torch.zeros(items.shape)
        for b, row in enumerate(items):
            for t, i in enumerate(row):
                with torch.no_grad():
                    g = loop_gate(pad.gate, "freq", int(pad.bucket[i]), [h[k][b, t] for k in EXPERTS])
                for k, name in enumerate(EXPERTS):
                    o = (h[name][b, t] * pad.experts[name].items(i)).sum()
                    phi[b, t] = phi[b, t] + g[k] * (o if name == "llm" else o.detach())
        logits.append(phi)
    want = torch.autograd.grad(bce_loss(*logits, mask), list(llm.parameters()), allow_unused=True)
    for name, a, b in zip([n for n, _ in llm.named_parameters()], got, want):
        assert b is not None and torch.allclose(a, b, atol=1e-6), name
    assert all(a.abs().sum() > 0 for a in got[:2])  # f_MLP's first layer learns


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_aux_weight_adds_each_experts_own_loss(loss):
    """finetune.py --aux-weight w: phase 3's loss gains w * sum_k L_REC of expert k alone
    (BCE of Eq. 1 on its own logits, or its softmax over all items, by loop), logged per
    expert, the text expert left out; the gate gets no gradient from it."""
    from finetune import phase3_loss

    pad = make_pad((*EXPERTS, "text"), "freq")
    seq = sequences()
    pos, neg = torch.randint(1, N + 1, (2, len(seq), L), generator=gen(4))
    pos[0, -1] = 0  # a padding target: not a real position
    mask = (seq != 0) & (pos != 0)
    total, logs = phase3_loss(pad, seq, pos, neg, mask, loss, aux_weight=0.3)
    mixture, mixture_logs = phase3_loss(pad, seq, pos, neg, mask, loss)  # Eq. (11)'s L_REC alone
    assert list(mixture_logs) == [loss] and torch.equal(logs.pop(loss), mixture.detach())
    term = total - mixture
    want, parts = 0.0, {}
    for name in EXPERTS:  # id, align, llm
        e = pad.experts[name]
        h = e(seq)  # (B, L, d)
        table = e.items(torch.arange(N + 1))  # (N+1, d)
        terms = []
        for b, t in mask.nonzero().tolist():
            o = table[1:] @ h[b, t]  # (N,): items 1..N
            if loss == "ce":
                terms.append(-(o[pos[b, t] - 1] - torch.logsumexp(o, 0)))
            else:
                terms.append((torch.nn.functional.softplus(-o[pos[b, t] - 1]), torch.nn.functional.softplus(o[neg[b, t] - 1])))
        own = (sum(terms) / len(terms) if loss == "ce"
               else sum(a for a, _ in terms) / len(terms) + sum(n for _, n in terms) / len(terms))
        parts[name] = float(own.detach())
        want = want + own
    assert float(term.detach()) == pytest.approx(0.3 * float(want.detach()), rel=1e-5)
    assert {k: float(v) for k, v in logs.items()} == pytest.approx({f"{k}-{loss}": v for k, v in parts.items()}, rel=1e-5)
    gate = list(pad.gate.parameters())
    for g_total, g_mixture in zip(torch.autograd.grad(total, gate, retain_graph=True),
                                  torch.autograd.grad(mixture, gate)):
        assert torch.allclose(g_total, g_mixture, rtol=1e-6, atol=1e-9)


def test_gate_fit_ce_is_the_masked_softmax_loss_of_eq11_by_loop(capsys):
    """gate_fit.fit_gate with --loss ce: its validation loss is the cross-entropy of Phi (Eq. 11,
    the loop above) over all items with the user's earlier items masked, averaged over the
    users whose target does not repeat one (lr 0: one pass measures it); then, trained, it
    changes only the gate."""
    import types

    from dataset import history_before_target, split_sequences
    from gate_fit import fit_gate

    pad = make_pad(EXPERTS, "freq")
    g = gen(5)
    seqs = torch.stack([torch.randperm(N, generator=g)[:L + 3] + 1 for _ in range(6)])  # distinct items per user
    seqs[0, -2] = seqs[0, 3]  # user 0's validation target repeats an earlier item: skipped
    data = {"seqs": seqs, "n_items": N}
    args = types.SimpleNamespace(seed=0, quiet=False, loss="ce", gate_fit_epochs=1, gate_fit_lr=0.0,
                                 gate_fit_batch_size=512, gate_fit_negatives=16)
    experts = {k: v.clone() for k, v in pad.state_dict().items() if not k.startswith("gate.")}
    fit_gate(pad, data, args)
    got = float(capsys.readouterr().out.split("ce ")[-1])

    inputs, targets = split_sequences(seqs, "valid")
    history = history_before_target(seqs, "valid")
    phi = loop_pad_scores(list(pad.experts.values()), pad.gate, "freq", pad.bucket, inputs)  # (U, N+1)
    losses = []
    for u in range(1, len(seqs)):
        row = phi[u].clone()
        row[history[u]] = -math.inf
        row[0] = -math.inf
        losses.append(-torch.log_softmax(row, 0)[targets[u]])
    assert got == pytest.approx(float(torch.stack(losses).mean()), abs=1e-4)
    before = {k: v.clone() for k, v in pad.state_dict().items() if k.startswith("gate.")}
    args.gate_fit_lr = 1e-2
    fit_gate(pad, data, args)
    after = pad.state_dict()
    assert all(torch.equal(after[k], v) for k, v in experts.items())
    assert all(not torch.equal(after[k], v) for k, v in before.items())


def test_gate_fit_bce_is_eq1_on_phi_of_eq11_by_loop(capsys):
    """gate_fit.fit_gate with --loss bce: its validation loss is Eq. (1) on Phi (Eq. 11, the loop
    above): -log sigma(Phi of the target) averaged over users, plus -log(1 - sigma(Phi)) of the
    negatives it drew outside each user's items, averaged over users and negatives (lr 0: one
    pass, one batch, measures it)."""
    import types

    from dataset import history_before_target, split_sequences
    from gate_fit import fit_gate

    pad = make_pad(EXPERTS, "freq")
    g = gen(6)
    seqs = torch.stack([torch.randperm(N, generator=g)[:L + 3] + 1 for _ in range(6)])  # no repeated targets
    args = types.SimpleNamespace(seed=3, quiet=False, loss="bce", gate_fit_epochs=1, gate_fit_lr=0.0,
                                 gate_fit_batch_size=512, gate_fit_negatives=4)
    fit_gate(pad, {"seqs": seqs, "n_items": N}, args)
    got = float(capsys.readouterr().out.split("bce ")[-1])

    inputs, targets = split_sequences(seqs, "valid")
    history = history_before_target(seqs, "valid")
    neg = sample_negatives(torch.cat([history, targets[:, None]], 1), N, (len(seqs), 4), torch.Generator().manual_seed(3))
    phi = loop_pad_scores(list(pad.experts.values()), pad.gate, "freq", pad.bucket, inputs)  # (U, N+1)
    pos_term = sum(math.log1p(math.exp(-float(phi[u, targets[u]]))) for u in range(len(seqs))) / len(seqs)
    neg_term = sum(math.log1p(math.exp(float(phi[u, j]))) for u in range(len(seqs)) for j in neg[u]) / neg.numel()
    assert got == pytest.approx(pos_term + neg_term, abs=1e-4)


def test_logit_adjustment_shifts_ranking_scores_only():
    """--logit-adjust tau: full_scores is Eq. (11)'s Phi minus tau * log(1 + n_i), n_i the item's
    training count; the training logits (all_logits) and a tau of 0 leave Phi as it was."""
    plain = make_pad(EXPERTS, "freq", seed=4)
    adjusted = make_pad(EXPERTS, "freq", seed=4, logit_adjust=0.3)
    seq = torch.randint(1, N + 1, (3, L), generator=gen(5))
    freq = torch.randint(0, 50, (N + 1,), generator=gen(4 + 300))  # make_pad's counts
    with torch.no_grad():
        phi = plain.full_scores(seq)
        expect = phi - 0.3 * torch.tensor([math.log(1 + f) for f in freq.tolist()])
        torch.testing.assert_close(adjusted.full_scores(seq), expect)
        torch.testing.assert_close(adjusted.all_logits(seq), plain.all_logits(seq))
        adjusted.adjust_tau.zero_()
        torch.testing.assert_close(adjusted.full_scores(seq), phi)
    assert adjusted.state_dict()["adjust_tau"] == 0 and "adjust_tau" not in plain.state_dict()


@pytest.mark.parametrize("rule", ["valid", "valid-cold"])
def test_logit_adjust_rule_chooses_tau_on_the_other_fold(rule):
    """--logit-adjust valid / valid-cold (gate_fit.cross_fit_gate): each fold is ranked under the
    tau the rule picks on the other fold's users, under the gate fit on that fold (valid: the
    highest nDCG@10; valid-cold: the smallest tau whose cold HR@10 reaches text-kNN's on those
    users, text-kNN's cosine to the last item computed here), and that tau is logged per fold; the
    model keeps the tau the rule picks from the cross-fitted ranks; the test column is never read. Checked against ranks,
    nDCG and hits computed here, tau by tau."""
    import copy
    import types

    from dataset import history_before_target, split_sequences
    from gate_fit import ADJUST_TAUS, cross_fit_gate, fit_gate

    pad = make_pad(("id", "llm", "text"), "freq", seed=6, logit_adjust=rule)
    g = gen(12)
    seqs = torch.stack([torch.randperm(N, generator=g)[:L + 3] + 1 for _ in range(40)])
    seqs[:20] = (torch.randint(0, N, (20, 1), generator=gen(13)) + torch.arange(L + 3)) % N + 1  # walks round a circle
    angle = 2 * math.pi * torch.arange(N + 1) / N
    text = torch.stack([angle.cos(), angle.sin()], -1)  # the circle: text-kNN finds the walkers' next item
    text[0] = 0
    data = {"seqs": seqs, "n_items": N, "item_bucket": pad.bucket, "n_buckets": N_BUCKETS, "text_emb": text}
    args = types.SimpleNamespace(seed=0, quiet=True, loss="ce", gate_fit_epochs=2, gate_fit_lr=0.1, gate_fit_batch_size=8,
                                 gate_fit_negatives=4, gate_fit_folds=2, eval_batch_size=7, keep_repeated_targets=False,
                                 logit_adjust=rule)
    model = copy.deepcopy(pad)
    ranks, curves = cross_fit_gate(model, data, args)
    inputs, targets = split_sequences(seqs, "valid")
    history = history_before_target(seqs, "valid")
    T = range(len(ADJUST_TAUS))
    cold = [u for u in range(len(seqs)) if pad.bucket[targets[u]] >= 8]  # buckets 8-10 of 10
    unit = text / text.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    text_hit = target_ranks(unit[inputs[:, -1]] @ unit.T, targets, history) < 10  # text-kNN, last item

    def ndcg(r):
        return sum(1 / math.log2(x + 2) for x in r.tolist() if x < 10) / len(r)

    def pick(r, users):  # the rule on the ranks r (T, U) of these users
        if rule == "valid":
            return max(T, key=lambda t: (ndcg(r[t, users]), -t))
        c = [u for u in users.tolist() if u in cold]
        hits = [int((r[t, c] < 10).sum()) for t in T]
        reached = [t for t in T if hits[t] >= int(text_hit[c].sum())]  # same users: counts compare as rates
        return min(reached) if reached else max(T, key=lambda t: (hits[t], -t))

    folds = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0)).chunk(2)
    per_tau = torch.empty(len(ADJUST_TAUS), len(seqs), dtype=torch.long)
    for i, fold in enumerate(folds):
        m = copy.deepcopy(pad)
        fit_gate(m, data, args, users=folds[1 - i])
        with torch.no_grad():
            phi = m.full_scores(inputs)  # tau 0
        log_freq = torch.log1p(torch.randint(0, 50, (N + 1,), generator=gen(6 + 300)).double()).float()  # make_pad's counts
        r = torch.stack([target_ranks(phi - t * log_freq, targets, history) for t in ADJUST_TAUS])
        assert torch.equal(ranks[fold], r[pick(r, folds[1 - i]), fold])
        assert curves["fold taus"][i] == ADJUST_TAUS[pick(r, folds[1 - i])]
        per_tau[:, fold] = r[:, fold]
    scores = [ndcg(per_tau[t]) for t in T]
    assert [curves["nDCG@10"][t] for t in ADJUST_TAUS] == pytest.approx([100 * v for v in scores])
    assert cold and [curves["cold HR@10"][t] for t in ADJUST_TAUS] == pytest.approx(
        [100 * sum(per_tau[t, u].item() < 10 for u in cold) / len(cold) for t in T])
    assert curves["text-kNN cold HR@10"] == pytest.approx(100 * text_hit[cold].double().mean().item())
    assert model.adjust_tau.item() == pytest.approx(ADJUST_TAUS[pick(per_tau, torch.arange(len(seqs)))])
    assert rule == "valid" or model.adjust_tau > 0  # the floor is above tau 0's cold HR@10 here
    other = seqs.clone()
    other[:, -1] = torch.tensor([next(i for i in range(1, N + 1) if i not in s) for s in seqs])  # test items replaced
    model2 = copy.deepcopy(pad)
    ranks2, curves2 = cross_fit_gate(model2, {**data, "seqs": other}, args)
    assert torch.equal(ranks, ranks2) and curves == curves2 and model.adjust_tau == model2.adjust_tau


def test_choose_tau_rules_on_made_scores():
    """gate_fit.choose_tau: valid is the best mean (ties: the smallest tau); valid-1se the
    largest tau whose mean is within one standard error of the paired difference to the best,
    checked against statistics.stdev on made per-user scores; valid-cold the smallest tau whose
    cold hit rate reaches the floor, on made hits."""
    import statistics

    from gate_fit import choose_tau

    g = gen(21)
    ndcg = torch.rand(6, 50, generator=g, dtype=torch.float64)
    ndcg[2] += 0.2  # the best
    noise = 0.05 * torch.randn(50, generator=g, dtype=torch.float64)
    noise -= noise.mean()  # paired difference: mean exactly the shift, standard error about 0.007
    ndcg[3] = ndcg[2] - 0.03 + noise  # below by more than one error
    ndcg[4] = ndcg[2] - 0.002 + noise  # within it, though tau 3 is not
    ndcg[5] = ndcg[2] - 0.5
    best = max(range(6), key=lambda t: (ndcg[t].mean().item(), -t))
    assert choose_tau(ndcg, "valid") == best == 2

    def within(t):
        diff = (ndcg[t] - ndcg[best]).tolist()
        return statistics.mean(diff) >= -statistics.stdev(diff) / len(diff) ** 0.5

    assert within(4) and not within(3) and not within(5)
    assert choose_tau(ndcg, "valid-1se") == max(t for t in range(6) if within(t)) == 4
    tied = torch.stack([ndcg[2], ndcg[2], ndcg[5]])
    assert (choose_tau(tied, "valid"), choose_tau(tied, "valid-1se")) == (0, 1)
    # valid-cold: the smallest tau whose cold hit rate reaches the floor; the most hits if none does
    hits = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    assert [choose_tau(ndcg, "valid-cold", hits, f) for f in (0.0, 0.5, 0.75, 1.0)] == [0, 1, 2, 3]
    assert choose_tau(ndcg, "valid-cold", hits[[0, 4, 1, 5]], 0.9) == 3  # none reaches: the most hits, first of ties
    assert choose_tau(ndcg, "valid-cold", hits[:, :0], float("nan")) == best  # no cold users: valid's choice


@pytest.mark.parametrize("loss", ["bce", "ce"])
@pytest.mark.parametrize("gate_kind", GATES)
def test_gate_fit_on_validation_never_reads_the_test_column(loss, gate_kind):
    """gate_fit.cross_fit_gate (--gate-fit valid, valid-only), with the text expert's scale and
    the --bucket-bias and --user-bias offsets and --bucket-temp temperatures fit beside the gate: every user's test item replaced leaves the
    fitted parameters and the cross-fitted validation ranks bit for bit the same; the validation
    items replaced move them. Each fold's ranks are those of a gate fit on the other fold alone."""
    import copy
    import types

    from evaluate import user_ranks
    from gate_fit import cross_fit_gate, fit_gate

    pad = make_pad(("id", "llm", "text"), gate_kind, seed=2, bucket_bias=True, bucket_temp=True, user_bias=True)
    g = gen(11)
    seqs = torch.stack([torch.randperm(N, generator=g)[:L + 3] + 1 for _ in range(12)])  # distinct items per user
    data = {"seqs": seqs, "n_items": N, "item_bucket": pad.bucket, "n_buckets": N_BUCKETS}
    args = types.SimpleNamespace(seed=0, quiet=True, loss=loss, gate_fit_epochs=2, gate_fit_lr=0.1, gate_fit_batch_size=5,
                                 gate_fit_negatives=4, gate_fit_folds=2, eval_batch_size=5, keep_repeated_targets=False)

    def fitted(seqs):
        model = copy.deepcopy(pad)
        ranks, _ = cross_fit_gate(model, {**data, "seqs": seqs}, args)
        return ranks, {k: v for k, v in model.state_dict().items()
                       if k.startswith(("gate.", "user_bias.")) or k in ("bias", "log_temp") or "log_scale" in k}

    ranks, params = fitted(seqs)
    assert all(not torch.equal(v, pad.state_dict()[k]) for k, v in params.items())  # the fit moved every one
    for column, same in ((-1, True), (-2, False)):  # the test item, then the validation item, of every user
        other = seqs.clone()
        for u in range(len(seqs)):  # another item outside the user's sequence
            other[u, column] = next(i for i in range(1, N + 1) if i not in seqs[u])
        ranks2, params2 = fitted(other)
        moved = [k for k in params if not torch.equal(params[k], params2[k])]
        assert (not moved and torch.equal(ranks, ranks2)) if same else moved, (column, moved)
    folds = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0)).chunk(2)
    for i, fold in enumerate(folds):  # the cross-fitted ranks, fold by fold
        model = copy.deepcopy(pad)
        fit_gate(model, data, args, users=folds[1 - i])
        assert torch.equal(ranks[fold], user_ranks(model, data, "valid", 5, users=fold))


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_gate_fit_with_the_frozen_experts_states_computed_once_is_the_per_batch_fit(loss):
    """gate_fit.fit_gate computes the frozen experts' states once and reads them every pass; the
    text expert, whose scale is fit, is run per batch. Written out here with every expert run on
    every batch (Adam on the same loss, the same batches and negatives), the fit gives the same
    parameters."""
    import copy
    import types

    from dataset import history_before_target, split_sequences
    from evaluate import mask_seen
    from gate_fit import fit_gate, gate_params

    pad = make_pad(("id", "llm", "text"), "freq", seed=4, bucket_bias=True, bucket_temp=True, user_bias=True)
    g = gen(12)
    seqs = torch.stack([torch.randperm(N, generator=g)[:L + 3] + 1 for _ in range(13)])
    data = {"seqs": seqs, "n_items": N, "item_bucket": pad.bucket, "n_buckets": N_BUCKETS}
    args = types.SimpleNamespace(seed=0, quiet=True, loss=loss, gate_fit_epochs=3, gate_fit_lr=0.05, gate_fit_batch_size=4,
                                 gate_fit_negatives=3)
    fast = copy.deepcopy(pad)
    fit_gate(fast, data, args)

    ref = copy.deepcopy(pad).eval()  # the per-batch fit
    for w in ref.parameters():
        w.requires_grad_(False)
    params = gate_params(ref)
    for w in params:
        w.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.gate_fit_lr)
    inputs, targets = split_sequences(seqs, "valid")
    history = history_before_target(seqs, "valid")
    with torch.no_grad():
        tables = ref.item_tables()
    gen_ = torch.Generator().manual_seed(0)
    for _ in range(args.gate_fit_epochs):
        neg = sample_negatives(torch.cat([history, targets[:, None]], 1), N, (len(targets), 3), gen_)
        for idx in torch.randperm(len(inputs), generator=gen_).split(4):
            h = [h_k[:, -1] for h_k in ref.states(inputs[idx])]
            if loss == "ce":
                phi = ref.fuse([h_k @ t.T for h_k, t in zip(h, tables)], [h_k[:, None] for h_k in h],
                               ref.bucket.expand(len(idx), -1), per_bucket=True)
                value = ce_loss(mask_seen(phi, history[idx])[:, None], targets[idx, None], torch.ones(len(idx), 1, dtype=torch.bool))
            else:
                items = torch.cat([targets[idx, None], neg[idx]], 1)
                phi = ref.fuse([(h_k[:, None] * t[items]).sum(-1) for h_k, t in zip(h, tables)], [h_k[:, None] for h_k in h],
                               ref.bucket[items])
                value = bce_loss(phi[:, :1].expand(-1, 3), phi[:, 1:], torch.ones_like(phi[:, 1:], dtype=torch.bool))
            opt.zero_grad()
            value.backward()
            opt.step()
    moved = [not torch.equal(a, b) for a, b in zip(gate_params(fast), gate_params(pad))]
    assert all(moved)
    for a, b in zip(gate_params(fast), params):
        assert torch.allclose(a, b, atol=1e-6), (a, b)

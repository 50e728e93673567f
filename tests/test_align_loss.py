"""Eq. (4) of phase 2, L = L_REC + γ · MMD(h^s, h^c), as align.py trains it: align.main() runs
in-process on a tiny dataset up to its first training step, where trainer.PhaseLoss is
recorded (the loss trainer.fit built from align.py's phase2_loss and its flags) with the
batch fit fed it. On that batch, against independent computations:

    --anchor frozen   the MMD's gradient w.r.t. the ID table h^c is zero, w.r.t. f_MLP not; the
                      ID table's gradient of the whole loss is L_REC's alone
    --anchor none     the loss is γ · MMD alone: no L_REC, no gradient to the encoder
    --gamma           scales the term: loss(2γ) - L_REC = 2 (loss(γ) - L_REC)
    --mmd-rows        items: h^c, h^s of the batch windows' real items; batch: of every slot
                      (window, last target, negatives, padding), as the authors' release;
                      each against mmd.mk_mmd on the rows listed by a loop over the batch;
                      above --mmd-sample, min(listed, sample) of those rows (a fixed number of
                      slots, padded), the MMD that of these alone
"""
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import align
import trainer
from dataset import atomic_save
from mmd import mk_mmd
from models import make_expert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic import make_dataset  # noqa: E402

U, N = 40, 30
# a phase-1 checkpoint's model_args; dropout 0, so a batch has one loss
PHASE1 = {"kind": "expert", "expert": "id", "backbone": "sasrec", "d": 16, "L": 20, "n_blocks": 1, "n_heads": 2,
          "dropout": 0.0, "block": "ours", "text_norm": "none", "text_layers": 4, "text_out": "gelu"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny synthetic dataset and a (random) phase-1 checkpoint of it: (data folder, checkpoint)."""
    work = tmp_path_factory.mktemp("align_loss")
    data = make_dataset("tiny", U, N, 12 * U, d_text=8)
    atomic_save(data, work / "tiny" / "dataset.pt")
    torch.manual_seed(0)
    model = make_expert("id", N, data["text_emb"], PHASE1)
    atomic_save({"phase": 1, "model_args": PHASE1, "state": model.state_dict(), "fingerprint": data["fingerprint"],
                 "dataset": "tiny", "n_items": N, "args": {}}, work / "pretrain.pt")
    return work / "tiny", work / "pretrain.pt"


class Captured(Exception):
    pass


def first_step(monkeypatch, files, *flags):
    """align.py FLAGS up to its first training step: (the PhaseLoss trainer.fit built, its batch
    (seq, pos, neg, mask))."""
    got = {}

    class Recording(trainer.PhaseLoss):
        def forward(self, *batch):
            if "loss" in got:  # called by the test: trainer.PhaseLoss's loss
                return super().forward(*batch)
            got.update(loss=self, batch=batch)
            raise Captured

    data, init = files
    monkeypatch.setattr(trainer, "PhaseLoss", Recording)
    monkeypatch.setattr(sys, "argv", ["align.py", "--data", str(data), "--init", str(init), "--batch-size", "8",
                                      "--quiet", "--out", str(data.parent / "unused.pt"), *flags])
    with pytest.raises(Captured):
        align.main()
    got["loss"].model.eval()
    return got["loss"], got["batch"]


def mmd_rows(seq, pos, neg, rows):
    """The item ids whose h^c, h^s enter the MMD, listed by a loop over the batch's users."""
    if rows == "items":
        return [i for s in seq.tolist() for i in s if i != 0]
    return [i for s, p, n in zip(seq.tolist(), pos.tolist(), neg.tolist()) for i in s + [p[-1]] + n]


def mmd_of(model, items):
    """mmd.mk_mmd between f_MLP's rows and the ID table's rows of the items (Eq. 5, default kernels)."""
    items = torch.tensor(items)
    with torch.no_grad():
        return mk_mmd(model.items.f_mlp(items), model.items.id.h_c.weight[items])


def rec_loss(model, seq, pos, neg, mask):
    return trainer.bce_loss(*model.bce_logits(seq, pos, neg), mask)


def grads(loss, params):
    """d loss / d each parameter, zeros where the loss does not reach it."""
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(params, got)]


@pytest.mark.parametrize("sample", [100000, 120, 40])
@pytest.mark.parametrize("rows", ["items", "batch"])
def test_mmd_rows_are_the_ones_the_flag_names(monkeypatch, files, rows, sample):
    """The step feeds f_MLP and the ID table a fixed number of slots, min(slots, --mmd-sample);
    the real ones (items: not padding; batch: every slot) are min(listed, sample) of the rows a
    loop lists (120 leaves padding slots with items, 40 does not), and the logged MMD is mk_mmd's
    on them alone."""
    phase_loss, (seq, pos, neg, mask) = first_step(monkeypatch, files, "--mmd-rows", rows, "--mmd-sample", str(sample))
    model, fed = phase_loss.model, []
    parts = model.items.parts
    monkeypatch.setattr(model.items, "parts", lambda items: fed.append(items) or parts(items))
    with torch.no_grad():
        _, logs = phase_loss(seq, pos, neg, mask)
    (slots,) = [items for items in fed if items.dim() == 1]  # the MMD's (S,); L_REC's are (B, L)
    listed = mmd_rows(seq, pos, neg, rows)
    real = [i for i in slots.tolist() if i != 0] if rows == "items" else slots.tolist()
    every = seq.numel() if rows == "items" else len(listed)
    assert len(slots) == min(every, sample) and len(real) == min(len(listed), sample)
    assert rows == "batch" or len(listed) < 120 < every  # items: padding slots enter, weighing 0, at 120 and above
    assert Counter(real) <= Counter(listed)  # a sub-multiset of the listed rows
    expected = mmd_of(model, real)
    assert torch.allclose(logs["gaussian"], expected, rtol=1e-5, atol=1e-6), (logs["gaussian"], expected)
    if sample > every:  # every listed row
        other = mmd_of(model, mmd_rows(seq, pos, neg, {"items": "batch", "batch": "items"}[rows]))
        assert not torch.allclose(expected, other, rtol=1e-3), "the batch does not tell the two row sets apart"


def test_frozen_anchor_stops_the_mmd_gradient_at_the_id_table(monkeypatch, files):
    h_c = "items.id.h_c.weight"
    for anchor in ("frozen", "rec"):
        phase_loss, (seq, pos, neg, mask) = first_step(monkeypatch, files, "--anchor", anchor)
        model = phase_loss.model
        named = dict(model.named_parameters())
        f_mlp = [w for n, w in named.items() if n.startswith("items.f_mlp.")]
        loss, logs = phase_loss(seq, pos, neg, mask)
        g_c, *g_s = grads(logs["gaussian"], [named[h_c], *f_mlp])  # the MMD's gradient
        assert any(g.abs().max() > 0 for g in g_s)  # f_MLP moves to the ID table either way
        g_loss, g_rec = (grads(x, [named[h_c]])[0] for x in (loss, rec_loss(model, seq, pos, neg, mask)))
        if anchor == "frozen":  # SG(h^c): the ID table is moved by L_REC alone
            assert not g_c.any()
            assert torch.allclose(g_loss, g_rec, rtol=1e-5, atol=1e-9)
        else:  # the test can tell: under rec the MMD does move the ID table
            assert g_c.abs().max() > 1e-6
            assert not torch.allclose(g_loss, g_rec, rtol=1e-5, atol=1e-9)


def test_no_anchor_drops_the_recommendation_loss(monkeypatch, files):
    phase_loss, (seq, pos, neg, mask) = first_step(monkeypatch, files, "--anchor", "none", "--gamma", "0.5")
    model = phase_loss.model
    loss, logs = phase_loss(seq, pos, neg, mask)
    mmd = mmd_of(model, mmd_rows(seq, pos, neg, "items"))
    assert torch.allclose(loss.detach(), 0.5 * mmd, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logs["bce"], rec_loss(model, seq, pos, neg, mask).detach(), rtol=1e-6)  # logged, not trained
    encoder = [w for n, w in model.named_parameters() if n.startswith("encoder.")]
    assert encoder and not any(g.any() for g in grads(loss, encoder))  # only L_REC reaches the encoder
    rec_anchor, batch = first_step(monkeypatch, files, "--anchor", "rec", "--gamma", "0.5")
    assert all(torch.equal(a, b) for a, b in zip(batch, (seq, pos, neg, mask)))
    loss, logs = rec_anchor(*batch)
    assert torch.allclose(loss.detach(), logs["bce"] + 0.5 * mmd, rtol=1e-5, atol=1e-6)


def test_gamma_scales_the_mmd_term(monkeypatch, files):
    terms = {}
    for gamma in (0.3, 0.6):
        phase_loss, batch = first_step(monkeypatch, files, "--gamma", str(gamma))
        loss, logs = phase_loss(*batch)
        terms[gamma] = loss.detach() - rec_loss(phase_loss.model, *batch).detach(), batch, logs["gaussian"]
    (t1, b1, mmd1), (t2, b2, mmd2) = terms[0.3], terms[0.6]
    assert all(torch.equal(a, b) for a, b in zip(b1, b2)) and torch.equal(mmd1, mmd2)  # same start, same batch
    assert mmd1.abs() > 1e-3
    assert torch.allclose(t2, 2 * t1, rtol=1e-4) and torch.allclose(t1, 0.3 * mmd1, rtol=1e-4)

"""Tests of --loss ce --ce-chunk (trainer.chunked_ce_loss): over chunks of items, the loss and the
gradient of every parameter equal the unchunked ce_loss's, for one expert (id, llm) and for PAD
(freq gate, 3 experts), with chunks that do and do not divide N, of 1 item and of more than N+1;
no tensor of the size of the (B, L, N+1) logits is made in forward or backward; a chunk
recomputed in backward draws the forward's dropout masks (torch's and --fast-dropout's, under
bf16 autocast too); and a step compiled through AOT autograd gives the eager loss and gradients."""
import argparse
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs  # noqa: E402
import trainer  # noqa: E402
from models import make_expert  # noqa: E402
from test_models import EXPERTS, L, N, cfg, gen, make_pad, sequences, text_table  # noqa: E402
from pretrain import phase1_loss  # noqa: E402
from speed import step_context  # noqa: E402
from trainer import PhaseLoss, add_training_args, ce_loss, chunked_ce_loss  # noqa: E402


def batch(seed=0, n=N):
    """(seq, pos, neg, mask) as one of fit's batches: left-padded windows whose first padding
    positions still have a real next item, which the mask leaves out, as fit's does."""
    seq = sequences(seed=seed) % (n + 1)  # (B, L)
    pos = torch.cat([seq[:, 1:], torch.randint(1, n + 1, (len(seq), 1), generator=gen(seed))], 1)  # next items
    mask = (seq != 0) & (pos != 0)
    return seq, pos, torch.zeros_like(pos), mask


def model_of(kind, n=N, dropout=0.1):
    torch.manual_seed(0)
    if kind == "pad":
        return make_pad(list(EXPERTS), "freq")
    return make_expert(kind, n, text_table(n=n), {**cfg(), "dropout": dropout}).eval()


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(*batch())
    loss.backward()
    return loss.detach(), {name: w.grad for name, w in model.named_parameters()}


@pytest.mark.parametrize("kind", ["id", "llm", "pad"])
@pytest.mark.parametrize("chunk", [1, 4, 15, N + 1, 100])  # N = 30: 4 leaves a chunk of 2, 15 divides it
def test_chunked_ce_equals_ce_loss_and_its_gradients(kind, chunk):
    model = model_of(kind)
    want_loss, want = loss_and_grads(model, PhaseLoss(model, partial(phase1_loss, loss="ce")))
    got_loss, got = loss_and_grads(model, PhaseLoss(model, partial(phase1_loss, loss="ce", ce_chunk=chunk)))
    assert torch.allclose(got_loss, want_loss, rtol=0, atol=1e-5)
    assert got.keys() == want.keys()
    for name, g in want.items():
        if g is None:  # e.g. a gate weight of an expert without a state part
            assert got[name] is None, name
            continue
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-5), name


def test_chunked_ce_equals_the_formula_with_padding_ignored():
    """Not only ce_loss's twin: the masked mean of log sum_{i=1..N} exp(Phi_i) - Phi_target by loop."""
    model = model_of("id")
    seq, pos, _, mask = batch()
    with torch.no_grad():
        every = model.all_logits(seq).double()  # (B, L, N+1)
        terms = [torch.logsumexp(every[b, t, 1:], 0) - every[b, t, pos[b, t]]
                 for b in range(len(seq)) for t in range(L) if mask[b, t]]
        got = chunked_ce_loss(model, seq, pos, mask, 7)
    assert torch.allclose(got.double(), sum(terms) / len(terms), atol=1e-5)
    assert torch.allclose(got, ce_loss(every.float(), pos, mask), atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation makes, in forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            self.numel = max(self.numel, t.numel() if isinstance(t, torch.Tensor) else 0)
        return out


@pytest.mark.parametrize("chunk", [0, 64])
def test_no_tensor_of_the_logits_size_in_forward_or_backward(chunk):
    """With N = 2000 items the (B, L, N) logits have 80,000 elements; chunks of 64 make none above
    the item table's gradient ((N+1) x d = 32,016: parameter-sized, as the weights themselves)."""
    n = 2000
    model = model_of("id", n=n).train()
    seq, pos, neg, mask = batch(n=n)
    with LargestTensor() as largest:
        PhaseLoss(model, partial(phase1_loss, loss="ce", ce_chunk=chunk))(seq, pos, neg, mask)[0].backward()
    logits = seq.numel() * n  # B x L x N
    if chunk:
        assert largest.numel <= (n + 1) * model.items.h_c.weight.shape[1] < logits / 2
    else:
        assert largest.numel >= logits  # the unchunked path does make them: the test can see them


def no_checkpoint(fn, *args, **kwargs):
    return fn(*args)  # the chunk's graph kept whole, nothing recomputed: the reference


@pytest.mark.parametrize("precision, fast_dropout", [("fp32", False), ("bf16", True)])
def test_a_recomputed_chunk_draws_the_forwards_dropout_masks(precision, fast_dropout, monkeypatch):
    """In train mode f_MLP's dropout draws a mask per chunk; backward recomputes the chunk outside
    step_context (as fit calls loss.backward()), and must redraw the same mask, also with
    --fast-dropout's masks under bf16 autocast, or the gradients would be of another loss."""
    args = argparse.Namespace(precision=precision, fast_dropout=fast_dropout)
    model = model_of("llm", dropout=0.5).train()
    grads = []
    for recompute in (True, False):
        if not recompute:
            monkeypatch.setattr(trainer, "checkpoint", no_checkpoint)
        torch.manual_seed(1)
        with step_context(torch.device("cpu"), args):
            loss = chunked_ce_loss(model, *batch()[:2], batch()[3], 8)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for g, want in zip(*grads):
        assert torch.allclose(g, want, rtol=1e-5, atol=1e-7)


def test_compiled_chunked_step_gives_the_eager_loss_and_gradients():
    """torch.compile through AOT autograd (no C++ compiler needed): the checkpointed chunks
    trace whole (fullgraph) and their compiled backward is the eager one."""
    model = model_of("pad")
    eager = PhaseLoss(model, partial(phase1_loss, loss="ce", ce_chunk=7))
    want_loss, want = loss_and_grads(model, eager)
    got_loss, got = loss_and_grads(model, torch.compile(eager, backend="aot_eager", fullgraph=True, dynamic=False))
    assert torch.allclose(got_loss, want_loss, atol=1e-6)
    for name, g in want.items():
        assert (got[name] is None) == (g is None) and (g is None or torch.allclose(got[name], g, atol=1e-6)), name


def test_ce_chunk_is_a_flag_that_leaves_the_run_identity():
    p = argparse.ArgumentParser()
    add_training_args(p)
    assert p.parse_args([]).ce_chunk == 0  # the unchunked path by default: earlier runs unchanged
    assert p.parse_args(["--loss", "ce", "--ce-chunk", "4096"]).ce_chunk == 4096
    assert runs.flag_diff({"ce_chunk": 0, "loss": "ce"}, {"ce_chunk": 4096, "loss": "ce"}, runs.SAME_RUN_FREE) == []
    assert "ce_chunk" in runs.RESUME_FREE  # a run out of memory may resume in chunks

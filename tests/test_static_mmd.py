"""Phase 2 with static shapes, what --compile reduce-overhead needs: the alignment loss takes a
fixed number of rows and a mask of the real ones (mmd.mk_mmd's x_mask, y_mask; mmd.info_nce's
mask), and align.mmd_rows hands it the same number of slots in every batch. Checked against
the losses of the real rows alone (float64, every --kernel, padding rows full of garbage,
gradients too); the random subset above --mmd-sample is a uniform one of the real rows, as a
random subset of them alone would be; the whole phase-2 step traces as one graph with static
shapes, which two batches with different padding share (no recompile)."""
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align import mmd_rows, phase2_loss  # noqa: E402
from mmd import KERNELS, info_nce, mk_mmd  # noqa: E402
from models import make_expert  # noqa: E402
from test_models import N, cfg, gen, sequences, text_table  # noqa: E402
from trainer import PhaseLoss  # noqa: E402


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=gen(seed))


def padded(real, seed):
    """Rows (n, 3): a draw where real, garbage elsewhere (huge values, an inf, a NaN)."""
    rows = torch.where(real[:, None], randn(len(real), 3, seed=seed), 1e6 * randn(len(real), 3, seed=seed + 50))
    pad = (~real).nonzero().flatten()
    rows[pad[0], 0], rows[pad[-1], 1] = float("inf"), float("nan")
    return rows


# --- The masked losses are those of the real rows ---------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_loss_and_gradients_are_those_of_the_real_rows(kernel):
    x_real = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)  # 6 of 10
    y_real = x_real if kernel == "infonce" else torch.tensor([0, 1, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)  # 7
    x, y = padded(x_real, 1).requires_grad_(), (padded(y_real, 2) + 0.5).requires_grad_()
    x_alone, y_alone = x[x_real].detach().requires_grad_(), y[y_real].detach().requires_grad_()
    if kernel == "infonce":  # paired rows: one mask
        masked, alone = info_nce(x, y, mask=x_real), info_nce(x_alone, y_alone)
    else:
        masked, alone = mk_mmd(x, y, kernel, x_mask=x_real, y_mask=y_real), mk_mmd(x_alone, y_alone, kernel)
    assert torch.allclose(masked, alone, rtol=1e-10, atol=1e-12) and alone.abs() > 1e-3
    (masked + alone).backward()
    for grad, real, grad_alone in ((x.grad, x_real, x_alone.grad), (y.grad, y_real, y_alone.grad)):
        assert torch.allclose(grad[real], grad_alone, rtol=1e-10, atol=1e-12)
        assert torch.equal(grad[~real], torch.zeros_like(grad[~real]))  # padding rows: exactly 0, no NaN


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_sample_without_a_pair_gives_a_finite_loss(kernel):
    """One real row per sample, or none: no pair to average over, so that sum is 0, not 0/0."""
    for count in (0, 1):
        real = torch.arange(6) < count
        x, y = randn(6, 3, seed=3).requires_grad_(), randn(6, 3, seed=4).requires_grad_()
        loss = info_nce(x, y, mask=real) if kernel == "infonce" else mk_mmd(x, y, kernel, x_mask=real, y_mask=real)
        loss.backward()
        assert loss.isfinite() and x.grad.isfinite().all() and y.grad.isfinite().all()
        if count == 0:
            assert loss == 0


# --- align.mmd_rows: a fixed number of slots, the real rows a uniform subset -------------


def test_the_subset_is_uniform_over_the_real_rows():
    """40 slots, 25 of them real, each a distinct item: above --mmd-sample the real rows are a
    uniform random subset of min(25, sample) real slots, the rest padding; at or below it every
    slot is taken as it is, and nothing is drawn (as before: no subset, no draw)."""
    seq = torch.arange(1, 41).reshape(4, 10) * (torch.arange(10) >= torch.tensor([[3], [0], [7], [5]]))  # (B, L)
    pos, neg = seq, seq  # unused by "items"
    listed = seq[seq != 0]  # (25,) the real items
    state = torch.get_rng_state()
    items, real = mmd_rows(seq, pos, neg, "items", 40)
    assert torch.equal(items, seq.flatten()) and torch.equal(real, items != 0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    draws = 4000
    for sample in (10, 30):
        counts = torch.zeros(41)
        for _ in range(draws):
            items, real = mmd_rows(seq, pos, neg, "items", sample)
            assert items.shape == real.shape == (sample,) and torch.equal(real, items != 0)
            chosen = items[real]
            assert len(chosen) == min(25, sample) and len(chosen.unique()) == len(chosen)
            counts[chosen] += 1
        assert counts[0] == 0 and torch.equal(counts[1:] > 0, (torch.arange(1, 41)[:, None] == listed).any(1))
        share = min(25, sample) / 25  # P(a real slot is chosen)
        assert (counts[listed] / draws - share).abs().max() < 5 * (share * (1 - share) / draws) ** 0.5 + 1e-9


def test_every_slot_is_real_in_batch_rows():
    seq = sequences()  # (B, L), padded
    pos, neg = seq.roll(1, 1), torch.zeros_like(seq)
    items, real = mmd_rows(seq, pos, neg, "batch", 10_000)
    assert torch.equal(items, torch.cat([seq, pos[:, -1:], neg], 1).flatten()) and real.all()
    items, real = mmd_rows(seq, pos, neg, "batch", 7)
    assert items.shape == (7,) and real.all()


# --- The phase-2 step traces whole, one graph for every padding --------------------------


def batch(extra_padding):
    """(seq, pos, neg, mask) of left-padded sequences; extra_padding more padding slots in row 0."""
    seq = sequences(seed=0)  # (B, L), 23 real items
    seq[0, :extra_padding] = 0
    pos = torch.cat([seq[:, 1:], torch.randint(1, N + 1, (len(seq), 1), generator=gen(0))], 1)
    mask = (seq != 0) & (pos != 0)
    neg = torch.randint(1, N + 1, seq.shape, generator=gen(1)) * mask
    return seq, pos, neg, mask


@pytest.mark.parametrize("kernel, rows, sample", [*((k, "items", 10) for k in KERNELS), ("gaussian", "items", 512),
                                                  ("gaussian", "batch", 10)])
def test_phase_2_step_traces_whole_as_one_graph(kernel, rows, sample):
    """Dynamo traces the whole phase-2 step (fullgraph=True fails on a graph break) with every
    shape static, as for phases 1 and 3 (tests/test_speed.py); batches with 23 and 19 real items
    run the one graph, not a recompiled one; under bf16 autocast, as fit runs it on a GPU. Sample
    10 takes the random subset (rand, topk), 512 every slot."""
    graphs, sizes = [], set()

    def static_shapes(graph, inputs):
        graphs.append(graph)
        for node in graph.graph.nodes:
            value = node.meta.get("example_value")
            for t in value if isinstance(value, (tuple, list)) else [value]:
                sizes.update(type(n) for n in t.shape) if isinstance(t, torch.Tensor) else None
        return graph.forward

    torch._dynamo.reset()  # a fresh cache: the one graph counted is this test's, and no earlier test's fills it
    torch.manual_seed(0)
    model = make_expert("align", N, text_table(), {**cfg(), "dropout": 0.0}).eval()
    step = PhaseLoss(model, partial(phase2_loss, gamma=0.1, kernel=kernel, rows=rows, sample=sample))
    traced = torch.compile(step, backend=static_shapes, fullgraph=True, dynamic=False)
    for extra_padding in (0, 4):
        b = batch(extra_padding)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)  # the same subset in both calls
            loss, logs = traced(*b)
            torch.manual_seed(1)
            eager, eager_logs = step(*b)
        assert torch.allclose(loss, eager, rtol=1e-6) and torch.allclose(logs[kernel], eager_logs[kernel], rtol=1e-6)
    assert len(graphs) == 1 and sizes == {int}

"""Tests of the training step's speed flags (speed.py): the steps of phases 1 and 3
(BCE, CE and chunked CE) trace whole with static shapes (phase 2's: tests/test_static_mmd.py),
and fit reads nothing back from the device per step (what a CUDA graph needs); the compiled step
gives the eager step's loss and weights, also after a --resume-style load; a failed compile
trains eagerly after one note; --precision bf16 trains under bf16 autocast on a CPU while
evaluation stays float32 (a default run keeps float32 and foreach AdamW), and resumes as an
uninterrupted run; the masks of --fast-dropout have dropout's law, and its attention equals
torch's scaled_dot_product_attention with the same mask; bench.py --baseline prints the
speed-up with its spread."""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import sysconfig
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dataset import split_sequences  # noqa: E402
from models import make_expert  # noqa: E402
from synthetic import make_dataset  # noqa: E402
from test_models import D, N, cfg, gen, make_pad, sequences, text_table  # noqa: E402
from pretrain import phase1_loss  # noqa: E402
from speed import attention_bits16_dropout, bits16_dropout, compile_loss, optimizer, step_context  # noqa: E402
from trainer import PhaseLoss, add_training_args, fit  # noqa: E402


def speed(**flags):
    """Parsed phase-script flags (defaults unless given), as fit and the speed helpers read them."""
    p = argparse.ArgumentParser()
    add_training_args(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k.replace('_', '-')}"
                         for k, v in flags.items()])


def batch(seed=0):
    """(seq, pos, neg, mask) of tiny left-padded sequences, as one of fit's batches."""
    seq = sequences(seed=seed)  # (B, L)
    pos = torch.cat([seq[:, 1:], torch.randint(1, N + 1, (len(seq), 1), generator=gen(seed))], 1)  # next items
    mask = (seq != 0) & (pos != 0)
    neg = torch.randint(1, N + 1, seq.shape, generator=gen(seed + 1)) * mask
    return seq, pos, neg, mask


def tiny_expert():
    """The ID expert of test_models without dropout: a compiled step draws its own masks."""
    torch.manual_seed(0)
    return make_expert("id", N, text_table(), {**cfg(), "dropout": 0.0}).train()


def tiny_data():
    return make_dataset("tiny", users=40, items=30, interactions=400, d_text=12)


def expert_for(data):
    return make_expert("id", data["n_items"], data["text_emb"], {**cfg(), "L": data["max_len"] - 3})


def one_step(loss_fn, opt, b):
    loss, _ = loss_fn(*b)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


# --- --compile: the same step, or eager after one note ------------------------------------


def inductor_or_skip():
    """--compile's backend, inductor, builds C++ kernels on a CPU: with the compiler it looks up
    (config.cpp.cxx: $CXX, else g++) against Python's headers. CI promises nothing but Python, and
    without them --compile trains eagerly after its note (tested below): skip, saying which is missing."""
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        pytest.skip(f"torch.compile's inductor needs a C++ compiler: {e}")
    headers = Path(sysconfig.get_path("include")) / "Python.h"
    if not headers.is_file():
        pytest.skip(f"{headers} not found: torch.compile's inductor builds its kernels against it")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own imports
def test_compiled_step_gives_the_eager_loss_and_parameters(capsys):
    """The step that inductor generates and compiles, not only its trace: the numbers are the point."""
    inductor_or_skip()
    args = speed(compile="default")
    eager = tiny_expert()
    compiled = copy.deepcopy(eager)
    eager_fn, compiled_fn = PhaseLoss(eager, phase1_loss), compile_loss(PhaseLoss(compiled, phase1_loss), args)
    eager_loss = one_step(eager_fn, optimizer(eager.parameters(), args), batch())
    compiled_loss = one_step(compiled_fn, optimizer(compiled.parameters(), args), batch())
    assert "note:" not in capsys.readouterr().out  # it did compile
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, w), w_compiled in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(w_compiled.grad, w.grad, rtol=1e-4, atol=1e-7), name
        # AdamW's first step is about lr * sign(gradient), so a gradient of rounding noise (the key
        # bias: softmax ignores a shift of all logits) moves either way; every other weight agrees
        moved = w.grad.abs() > 1e-6
        assert torch.allclose(w_compiled[moved], w[moved], rtol=1e-5, atol=1e-6), name
    # --resume loads weights into the model: the compiled step reads them, without recompiling
    eager.load_state_dict(tiny_expert().state_dict())
    compiled.load_state_dict(tiny_expert().state_dict())
    assert torch.allclose(compiled_fn(*batch(1))[0], eager_fn(*batch(1))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, loss, ce_chunk", [("id", "bce", 0), ("id", "ce", 0), ("id", "ce", 7),
                                                   ("pad", "bce", 0), ("pad", "ce", 0), ("pad", "ce", 7)])
def test_phase_1_and_3_steps_trace_whole_as_one_graph(model, loss, ce_chunk):
    """Dynamo traces the whole step (fullgraph=True fails on a graph break) and every tensor in
    it has a static shape (a boolean index would give an unbacked size), so reduce-overhead can
    capture it as one CUDA graph; --ce-chunk's checkpointed chunks too (a chunk of 7 leaves a
    shorter last one: its shape is static as well)."""
    sizes = set()

    def static_shapes(graph, inputs):
        for node in graph.graph.nodes:
            value = node.meta.get("example_value")
            for t in value if isinstance(value, (tuple, list)) else [value]:
                sizes.update(type(n) for n in t.shape) if isinstance(t, torch.Tensor) else None
        return graph.forward

    net = tiny_expert() if model == "id" else make_pad(["id", "align", "llm"], "freq")
    step = PhaseLoss(net.eval(), partial(phase1_loss, loss=loss, ce_chunk=ce_chunk))
    traced = torch.compile(step, backend=static_shapes, fullgraph=True, dynamic=False)
    assert torch.allclose(traced(*batch())[0], step(*batch())[0], rtol=1e-6)
    assert sizes == {int}


class HostReads(TorchFunctionMode):
    """Counts the calls in this repository's code that read a tensor's value on the host (on a
    GPU each waits for it). torch's own reads are not ours: AdamW's step counters live on the host."""
    READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = Path(sys._getframe(1).f_code.co_filename)
        self.count += getattr(func, "__name__", "") in self.READS and ROOT in caller.parents and ".venv" not in caller.parts
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path):
    """fit's host reads (negatives' rejection loop, end-of-epoch logs, validation) do not grow
    with the number of steps: 4 times the steps, the same count."""
    data, reads = tiny_data(), []
    for batch_size in (4, 16):
        torch.manual_seed(0)
        with HostReads() as counter:
            fit(expert_for(data), data, speed(epochs=1, quiet=True, batch_size=batch_size), tmp_path / f"b{batch_size}.pt",
                phase1_loss)
        reads.append(counter.count)
    assert reads[0] == reads[1] > 0


def broken_compile(*args, **kwargs):
    raise RuntimeError("Dynamo is not supported on this Python\nsecond line")


def broken_compiled_call(module, **kwargs):
    def call(*batch):
        raise RuntimeError("Compiler: cc not found\nsecond line")
    return call


@pytest.mark.parametrize("compile_fn, why", [(broken_compile, "Dynamo is not supported on this Python"),
                                             (broken_compiled_call, "Compiler: cc not found")])
def test_a_failed_compile_trains_eagerly_after_one_note(compile_fn, why, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", compile_fn)
    step_loss = PhaseLoss(tiny_expert(), phase1_loss)
    loss_fn = compile_loss(step_loss, speed(compile="reduce-overhead"))
    losses = [loss_fn(*batch())[0] for _ in range(2)]
    assert all(torch.equal(loss, step_loss(*batch())[0]) for loss in losses)
    assert capsys.readouterr().out == f"note: --compile reduce-overhead failed (RuntimeError: {why}); training eagerly\n"


def test_fast_dropout_and_compile_are_refused_together():
    with pytest.raises(SystemExit, match="--fast-dropout with --compile"):
        compile_loss(PhaseLoss(tiny_expert(), phase1_loss), speed(compile="default", fast_dropout=True))


# --- --precision: bf16 autocast in training, float32 in evaluation ------------------------


@pytest.mark.parametrize("precision, trained_in, fused", [("auto", torch.float32, None), ("bf16", torch.bfloat16, True)])
def test_precision_of_training_and_evaluation_on_cpu(precision, trained_in, fused, tmp_path):
    data = tiny_data()
    args = speed(precision=precision, epochs=1, quiet=True, batch_size=16, eval_batch_size=7)
    model = expert_for(data)
    seen = set()  # (training?, dtype of the first attention projection's output)
    model.encoder.blocks[0].qkv.register_forward_hook(lambda m, i, out: seen.add((m.training, out.dtype)))
    fit(model, data, args, tmp_path / "run.pt", phase1_loss)
    assert seen == {(True, trained_in), (False, torch.float32)}
    with torch.no_grad():
        assert model.full_scores(split_sequences(data["seqs"], "test")[0][:3]).dtype == torch.float32
    assert optimizer(model.parameters(), args).defaults["fused"] is fused  # None: torch's foreach, as before


def test_resume_with_bf16_and_fast_dropout_matches_an_uninterrupted_run(tmp_path):
    data = tiny_data()

    def train(out, epochs, *resume):
        torch.manual_seed(0)
        model = expert_for(data)
        args = speed(precision="bf16", fast_dropout=True, epochs=epochs, quiet=True, batch_size=16, eval_batch_size=7,
                     **{flag: True for flag in resume})
        return [{k: v for k, v in row.items() if k != "seconds"} for row in fit(model, data, args, out, phase1_loss)[1]]

    full = train(tmp_path / "full.pt", 3)  # per epoch: losses and validation metrics
    train(tmp_path / "cut.pt", 1)  # fit leaves OUT.last.pt after each epoch; only finish() removes it
    assert train(tmp_path / "cut.pt", 3, "resume") == full


# --- --fast-dropout: dropout's law, torch's attention ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bits16_dropout_has_dropouts_law(dtype):
    torch.manual_seed(0)
    x = torch.ones(400_000, dtype=dtype, requires_grad=True)
    y = bits16_dropout(x, 0.1)
    scale = torch.tensor(65536 / (65536 - 6554), dtype=dtype)  # p = 0.1 rounded to 6554 / 65536
    assert set(y.unique().tolist()) == {0.0, scale.item()}
    assert abs((y == 0).double().mean().item() - 6554 / 65536) < 4 * (0.1 * 0.9 / len(x)) ** 0.5
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept elements, scaled
    z = torch.randn(5, 4)
    assert bits16_dropout(z, 0.1, training=False) is z and torch.equal(bits16_dropout(z, 0.0), z)


def test_fast_dropout_replaces_every_dropout_inside_its_block_only():
    args, x = speed(fast_dropout=True), torch.randn(64, 8, D)
    drop = nn.Dropout(0.1)
    torch.manual_seed(3)
    with step_context(torch.device("cpu"), args):
        inside = drop(x)
    torch.manual_seed(3)
    assert torch.equal(inside, bits16_dropout(x, 0.1))  # the same draws from the seeded generator

    def torch_masks():
        torch.manual_seed(3)
        outside = drop(x)
        torch.manual_seed(3)
        return torch.equal(outside, F.dropout(x, 0.1))

    assert torch_masks()  # outside the block: torch's own
    with step_context(torch.device("cpu"), speed()):
        assert torch_masks()  # a default run keeps torch's masks


def test_attention_with_fast_dropout_is_torchs_attention_with_that_mask():
    B, H, L, dh, p = 3, 2, 6, 4, 0.2
    g = gen(0)
    q, k, v = (torch.randn(B, H, L, dh, generator=g) for _ in range(3))
    attn_mask = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L).clone()  # (B, 1, L, L) causal
    attn_mask[0, 0, 2] = False  # a query that may see no key: attends to nothing, as in torch
    torch.manual_seed(5)
    out = attention_bits16_dropout(q, k, v, attn_mask, dropout_p=p)
    torch.manual_seed(5)
    noise = bits16_dropout(torch.ones(B, H, L, L), p)  # the same draws: the mask of the attention weights
    weights = F.scaled_dot_product_attention(q, k, torch.eye(L).expand(B, H, L, L), attn_mask)  # torch's, (B, H, L, L)
    assert torch.allclose(out, (weights * noise) @ v, atol=1e-6)
    assert torch.allclose(attention_bits16_dropout(q, k, v, attn_mask), F.scaled_dot_product_attention(q, k, v, attn_mask))
    with step_context(torch.device("cpu"), speed(fast_dropout=True)):
        torch.manual_seed(5)
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=p), out)


# --- benchmarks/bench.py --baseline: both paths in one process, the ratio with its spread ----


def test_bench_baseline_prints_the_speedup_with_its_spread(tmp_path):
    torch.save(tiny_data(), tmp_path / "dataset.pt")
    r = subprocess.run([sys.executable, "benchmarks/bench.py", "--data", str(tmp_path), "--figures", "train", "--phases",
                        "1,3", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--rounds", "3", "--threads", "1",
                        "--precision", "bf16", "--fast-dropout", "--baseline"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    for phase in (1, 3):
        assert {x["flags"] for x in lines if x["figure"] == "train" and x["phase"] == phase} == {
            "--precision bf16 --fast-dropout", ""}  # the new path and the default one
        up = next(x for x in lines if x["figure"] == "speedup" and x["phase"] == phase)
        assert up["rounds"] == 3 and up["unit"] == "x" and 0 < up["min"] and math.isfinite(up["max"])  # a ratio measured



MALLOC_PROBE = """
import ctypes, sys, torch
from speed import reuse_freed_memory
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
took = reuse_freed_memory()
x = torch.ones(16 * 2 ** 20)  # 64 MiB: above glibc's largest mmap threshold
print(took, libc.mallinfo2().hblkhd >= x.nbytes)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
@pytest.mark.parametrize("env, expect", [({}, "True False"), ({"MALLOC_MMAP_MAX_": "65536"}, "False True"),
                                         ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, "False True")])
def test_reuse_freed_memory_keeps_large_tensors_off_mmap_unless_malloc_is_set(env, expect):
    """speed.reuse_freed_memory (trainer.setup on a CPU): a 64 MiB tensor comes from the heap,
    where a freed block is reused, not from its own mmap; a MALLOC_ variable in the environment
    leaves glibc as it is. (That training gives the same weights either way: the benchmarks page.)"""
    r = subprocess.run([sys.executable, "-c", MALLOC_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in {**os.environ, **env}.items()
                            if not k.startswith("MALLOC_") or k in env})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == expect.split()

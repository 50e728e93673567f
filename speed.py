"""How a training step runs at the hardware's pace, beyond the paper: --precision (bf16
autocast), --fast-dropout (cheaper dropout masks on CPU) and --compile (torch.compile, CUDA
graphs); on a CPU, freed memory is kept for reuse (reuse_freed_memory, trainer.setup).
trainer.fit calls it at three points:

    opt = optimizer(groups, args)            # AdamW, fused on this path
    step = compile_loss(step_loss, args)     # the step's loss, compiled or eager
    with step_context(device, args): ...     # autocast and the dropout masks of one step

Without any of these flags a run keeps float32, torch's dropout and foreach AdamW, so its
numbers do not depend on this module. Measurements: benchmarks/README.md.
"""
import contextlib
import ctypes
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

PRECISIONS = ("auto", "fp32", "bf16")  # --precision
COMPILE_MODES = ("none", "default", "reduce-overhead")  # --compile


def add_speed_args(p):
    """How a training step runs (the phase scripts and benchmarks/bench.py). Any of them also
    switches AdamW to its fused kernel; without them a run keeps its earlier numerics."""
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="training steps in bf16 autocast or float32 (auto: bf16 on CUDA)")
    p.add_argument("--fast-dropout", action="store_true",
                   help="CPU: dropout masks from 16 random bits per element (speed.bits16_dropout)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the step (reduce-overhead: CUDA graphs; benchmarks/README.md)")


def reuse_freed_memory():
    """CPU runs: glibc's malloc gives every block of 32 MiB or more back to the kernel when it is
    freed (mmap / munmap), so the large tensors of a step, the (B, L, N) logits of --loss ce first,
    are faulted in again page by page at every step. With mmap off (M_MMAP_MAX 0) and the heap's
    top kept up to 2 GiB (M_TRIM_THRESHOLD), freed blocks are reused: the same numbers, faster
    steps (benchmarks/README.md), a resident set that stays near its peak. Only with glibc, and not
    when MALLOC_MMAP_MAX_ or MALLOC_MMAP_THRESHOLD_ is set (MALLOC_MMAP_MAX_=65536, glibc's default,
    keeps glibc's behaviour). True when it took effect."""
    if {"MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_"} & set(os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def fast_path(args):
    """True when a run passed any of --precision bf16, --fast-dropout, --compile."""
    return args.precision == "bf16" or args.fast_dropout or args.compile != "none"


def optimizer(groups, args):
    """AdamW with --lr and --weight-decay; fused (one kernel for all parameters) on the fast path,
    torch's default (foreach) otherwise, so that default runs keep their numerics."""
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=True if fast_path(args) else None)


SAME_SIZE_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
                 torch.float64: torch.int64}  # bits16_dropout builds its masks on bit patterns


def bits16_dropout(x, p=0.5, training=True, inplace=False):
    """F.dropout with a cheaper mask: an element is dropped when its 16 random bits fall below
    round(p * 65536), a kept one is scaled by 65536 / (65536 - that) rounded to x's dtype as in
    torch's dropout; so p is rounded to 1/65536. The bits come four per 64-bit draw of torch's
    generator (the seed and --resume hold); torch's dropout draws a double per element, serially
    on non-Intel CPUs. The mask (0 or the scale) is made on integers, the scale's bit pattern
    times 0 or 1, then read as x's dtype: a float mask from a bool one would cost 10 times more."""
    drop = round(p * 65536)
    if not training or not 0 < drop < 65536 or x.dtype not in SAME_SIZE_INT:
        return F.dropout(x, p, training, inplace)
    t = drop - 32768  # a 16-bit integer below t is dropped, with probability drop / 65536
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape).clamp(t - 1, t) - (t - 1)  # 1 kept, 0 dropped
    scale = torch.tensor(65536 / (65536 - drop), dtype=x.dtype, device=x.device).view(SAME_SIZE_INT[x.dtype])
    noise = (keep.to(scale.dtype) * scale).view(x.dtype)  # 0 or the scale, in x's dtype
    return x.mul_(noise) if inplace else x * noise


def attention_bits16_dropout(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention by its reference formula, softmax(q k^T * scale + mask) v,
    with bits16_dropout on the attention weights: q, k, v (B, H, L, d/H), attn_mask boolean
    (True: may attend) or additive. Without dropout, or with is_causal / enable_gqa, it is torch's."""
    if dropout_p == 0 or is_causal or enable_gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, L, L)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -torch.inf) if attn_mask.dtype == torch.bool else s + attn_mask
    a = torch.softmax(s, -1).nan_to_num(0.0)  # a query that may see no key attends to nothing, as torch's
    return bits16_dropout(a, dropout_p) @ v  # (B, H, L, d/H)


class FastDropout(TorchFunctionMode):
    """--fast-dropout: inside this block every F.dropout (so every nn.Dropout) is bits16_dropout,
    and F.scaled_dot_product_attention with dropout is attention_bits16_dropout."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        fast = {F.dropout: bits16_dropout, F.scaled_dot_product_attention: attention_bits16_dropout}.get(func, func)
        return fast(*args, **(kwargs or {}))


@contextlib.contextmanager
def step_context(device, args):
    """The block a training forward runs in: bf16 autocast per --precision (auto: on CUDA only)
    and, on CPU, --fast-dropout's masks. Evaluation runs outside it, in float32."""
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    fast = FastDropout() if args.fast_dropout and device.type == "cpu" else contextlib.nullcontext()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), fast:
        yield


def compile_loss(step_loss, args):
    """--compile: step_loss under torch.compile (reduce-overhead: CUDA graphs), sharing its
    parameters (so --resume loads into both). fit calls it on full batches only and the last,
    smaller batch of an epoch eagerly: one graph shape, no recompile. If torch.compile or the
    compiled call fails, one line says so and training goes on eagerly."""
    if args.compile == "none":
        return step_loss
    if args.fast_dropout:  # its draws (Tensor.random_) would break the graph at every dropout
        raise SystemExit("--fast-dropout with --compile: the compiled step draws its own dropout masks; pass one of them")
    compiled = []

    def eagerly(e):
        why = (str(e).strip().splitlines() or [""])[0][:160]
        print(f"note: --compile {args.compile} failed ({type(e).__name__}: {why}); training eagerly", flush=True)
        compiled.clear()

    try:
        compiled.append(torch.compile(step_loss, mode=None if args.compile == "default" else args.compile))
    except Exception as e:  # e.g. a Python version that torch.compile does not support
        eagerly(e)

    def loss(*batch):
        if compiled:
            try:
                return compiled[0](*batch)
            except Exception as e:  # no C++ compiler, an op the compiler lacks, a backend error
                eagerly(e)
        return step_loss(*batch)
    return loss


def checkpoint_replay():
    """torch.utils.checkpoint's kwargs that redo a recomputed forward in --fast-dropout's mode
    when the forward ran in it (trainer.chunked_ce_loss: backward runs outside step_context;
    checkpoint restores the RNG state and autocast itself), so it draws the forward's masks."""
    fast = any(isinstance(mode, FastDropout) for mode in _get_current_function_mode_stack())
    return {"context_fn": lambda: (contextlib.nullcontext(), FastDropout())} if fast else {}

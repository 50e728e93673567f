"""The training loop every phase shares (Alg. 1), and its plumbing.

    pretrain.py, align.py, finetune.py, baselines.py:
        data, device = setup(args)            # threads, seed, device, dataset.pt
        if reuse_finished(out, data, args): return
        model, log = fit(model, data, args, out, extra_loss=...)   # mini-batches, AdamW, early stopping
        finish(model, model_args, data, args, phase, log, out)    # test, checkpoint, metrics JSON

Each step's loss is L_REC, the BCE of Eq. (1) / (6) with one sampled negative per position,
plus the phase's own term (phase 2: γ · MK-MMD, Eq. 4). Around it: the shared flags, the
per-epoch state behind --resume, the guard that never replaces a finished run made with
other flags, and PyTorch DDP when a script runs under torchrun:

    torchrun --nproc_per_node 4 pretrain.py --data mind --device cuda

Each process trains on its share of the users with --batch-size users per step (the global
batch is --batch-size x processes); rank 0 alone validates, prints and writes.
"""
import contextlib
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from dataset import atomic_save, atomic_write_text, load_dataset, split_sequences
from evaluate import evaluate, format_metrics, parse_device, protocol, summarise_ranks, user_ranks
from models import BLOCKS, TEXT_NORMS, TEXT_OUTS, read_checkpoint

K = 10  # HR@K / nDCG@K of validation and test; paper: 10 (Sec. 4.1.2)
PRECISIONS = ("auto", "fp32", "bf16")  # --precision
COMPILE_MODES = ("none", "default", "reduce-overhead")  # --compile


# --- Flags every phase shares ------------------------------------------------------------


def add_training_args(p):
    """Flags every phase shares (Appendix A values in the help)."""
    p.add_argument("--data", default="ml-100k", help="prepared dataset: a name under data/ or a folder (prepare_data.py)")
    p.add_argument("--seed", type=int, default=0, help="random seed (paper: results averaged over 3 runs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast; under torchrun one GPU per process)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of this process (default: PyTorch's, one per core); on a shared or busy CPU "
                        "set it so that all processes together use no more threads than cores")
    add_speed_args(p)
    p.add_argument("--epochs", type=int, default=200, help="maximum number of epochs (early stopping ends sooner)")
    # DEVIATION: default batch 128 users so that the offline default converges in minutes on a
    # CPU; the paper's Appendix A uses 16 (pass --batch-size 16).
    p.add_argument("--batch-size", type=int, default=128, help="users per mini-batch; paper: 16 (Appendix A)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (not given in the paper); "
                   "pretrain.py with --backbone gru4rec defaults to 3e-3")
    add_loss_args(p)
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay; paper: 0.1 (Appendix A)")
    # DEVIATION: early stopping on validation nDCG@10 with patience 10 (Appendix A gives the early-stop
    # epoch 10, no metric), testing the best epoch; the authors' release watches HR@10 with patience
    # about 20 and tests the last epoch (--stop-metric hr --patience 20 --test-epoch last).
    p.add_argument("--patience", type=int, default=10, help="early stopping: epochs without a better validation "
                   "--stop-metric; paper: 10 (Appendix A); authors' release: about 20")
    p.add_argument("--stop-metric", default="ndcg", choices=("ndcg", "hr"),
                   help="validation metric of early stopping: nDCG@10 or HR@10 (authors' release: hr; paper: not given)")
    p.add_argument("--test-epoch", default="best", choices=("best", "last"),
                   help="weights tested and saved: the best validation epoch's or the last epoch's (authors' release: last)")
    p.add_argument("--keep-repeated-targets", action="store_true",
                   help="rank a target that repeats an earlier item of the user among the others; default: it counts "
                        "as a miss, since all earlier items are masked (the authors' rule)")
    p.add_argument("--eval-batch-size", type=int, default=512, help="users ranked at once in evaluation (bounds memory)")
    p.add_argument("--preset", default="none", choices=tuple(PRESETS),
                   help="authors: the settings of the authors' release (506c72d) where the paper is silent; recipe: "
                        "the text-path recipe (beyond the paper); either as defaults that any flag given on the command "
                        "line overrides (trainer.PRESETS); its runs are named _PRESET")
    p.add_argument("--out", default=None, help="checkpoint path; default runs/NAME/<script>_<settings>_seedS.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain and replace OUT even when it is a finished run (by default a finished run with the "
                        "same flags is reused and one with other flags is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.last.pt (weights, AdamW and RNG state after its latest "
                        "epoch; removed when a run finishes) with the same flags; --epochs may change")


def add_loss_args(p):
    """L_REC's flags (the phase scripts and benchmarks/bench.py)."""
    p.add_argument("--loss", default="bce", choices=("bce", "ce"),
                   help="L_REC: bce, Eq. (1) with one sampled negative per position (paper); ce, softmax "
                        "cross-entropy over all N items (beyond the paper: the strong baseline)")
    p.add_argument("--ce-chunk", type=int, default=0,
                   help="--loss ce over chunks of this many items, each chunk's logits recomputed in backward: memory "
                        "O(B x L x chunk) instead of O(B x L x N), the same loss up to float rounding (e.g. 2048 at "
                        "Electronics' 423k items: benchmarks/README.md); 0: all N items at once")


def add_speed_args(p):
    """How a training step runs (beyond the paper; the phase scripts and benchmarks/bench.py). Any of
    them also switches AdamW to its fused kernel; without them a run keeps its earlier numerics."""
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of training steps: bf16 autocast or float32; auto: bf16 on CUDA, float32 on CPU; "
                        "evaluation is always float32")
    p.add_argument("--fast-dropout", action="store_true",
                   help="CPU: every dropout mask, the attention weights' too, from 16 random bits per element (p rounded "
                        "to 1/65536) instead of torch's draw of a double per element, serial on non-Intel CPUs: "
                        "other masks from the same seed, the same distribution; attention then runs by its reference "
                        "formula in the step's precision")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the training loss (reduce-overhead: with CUDA graphs); falls back to eager with "
                        "a note if compiling fails; on a 2-core CPU slower than eager (benchmarks/README.md)")


# --preset authors: the authors' release (Applied-Machine-Learning-Lab/PAD at 506c72d) where the paper
# gives no value, and their batch size, the paper's 16, per script; every entry is a flag of its own.
# Not in it: InfoNCE's weight, which shares --gamma with the MMD's (pass --kernel infonce --gamma 0.01).
AUTHORS_INFONCE_WEIGHT = 0.01
PRESETS = {
    "none": {},
    "authors": {
        "all": {"lr": 1e-5, "stop_metric": "hr", "patience": 20, "test_epoch": "last", "sasrec_block": "authors",
                "batch_size": 16},
        "align": {"gamma": 0.2, "mmd_rows": "batch", "fuse_dropout": 0.1, "tau": 0.1},
        "finetune": {"lr": 1e-4, "gate": "bucket", "gate_init": "ramp", "gate_weight_decay": 0.01},
    },
    # --preset recipe (beyond the paper): the text-path recipe, chosen on validation (results/experiments.md):
    # CE in every phase, f_MLP one linear layer on the standardised table, the LLM expert from the
    # CE MoRec run (baselines.py --method morec), the experts as phases 1-2 and MoRec left them,
    # the gate fit on validation
    "recipe": {
        "all": {"loss": "ce"},
        "align": {"text_norm": "standard", "text_layers": 0},
        "baselines": {"text_norm": "standard", "text_layers": 0},
        "finetune": {"text_norm": "standard", "text_layers": 0, "gate_fit": "valid-only", "llm_init": "morec"},
    },
}


FLAG_DEFAULTS = {}  # every flag's default, filled by parse_args: a flag an older run did not record had it


def parse_args(p, script):
    """argparse with --preset: the preset's values for `script` become the defaults, then the
    command line is read again, so a flag given explicitly always wins."""
    preset = PRESETS[p.parse_known_args()[0].preset]
    known = {a.dest for a in p._actions}
    FLAG_DEFAULTS.update({k: p.get_default(k) for k in known})  # before the preset: what a run without it meant
    p.set_defaults(**{k: v for k, v in {**preset.get("all", {}), **preset.get(script, {})}.items() if k in known})
    return p.parse_args()


def add_model_args(p):
    """Sizes of a model built from scratch (pretrain.py, baselines.py); later phases read
    them from the phase-1 checkpoint."""
    p.add_argument("--d", "--hidden-size", dest="d", type=int, default=128,
                   help="hidden size d (Fig. 1: 128); under torchrun write --hidden-size, as torchrun reads --d as its own")
    p.add_argument("--n-blocks", type=int, default=5, help="SASRec self-attention blocks; authors' release: 5")
    p.add_argument("--n-heads", type=int, default=2, help="SASRec attention heads; authors' release: 2")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability; paper: 0.1 (Appendix A)")
    add_text_args(p)
    p.add_argument("--sasrec-block", default="ours", choices=BLOCKS,
                   help="SASRec's block: ours (sqrt(d)-scaled inputs, feed-forward width d) or the authors' release's "
                        "(LayerNorm on inputs, width 4d, no attention bias, Xavier init); paper: not given")


# How f_MLP (Eq. 7) reads the text table: (flag, args key, value of a run that did not record it)
TEXT_FLAGS = (("--text-norm", "text_norm", "none"), ("--text-layers", "text_layers", 4), ("--text-out", "text_out", "gelu"))


def add_text_args(p, inherit=False):
    """How f_MLP (Eq. 7) reads the frozen text table, for every script that builds one;
    inherit (finetune.py): by default the phase-2 run's values, so both text experts agree."""
    own = "; default: the phase-2 run's" if inherit else ""
    p.add_argument("--text-norm", default=None if inherit else "none", choices=TEXT_NORMS,
                   help="input of f_MLP (Eq. 7): the frozen text table as it is (paper), or standardised per "
                        "dimension over the items (beyond the paper)" + own)
    p.add_argument("--text-layers", type=int, default=None if inherit else 4,
                   help="hidden [dropout, linear, GELU] layers of f_MLP after its first linear layer; paper: not "
                        "given; authors' release: 4" + own)
    p.add_argument("--text-out", default=None if inherit else "gelu", choices=TEXT_OUTS,
                   help="f_MLP's last activation: gelu (authors' release) or linear (none, beyond the paper)" + own)


def match_text_args(args, model_args, path):
    """Make args' text flags those of the run at `path` (its model_args): a flag left unset
    (None) takes the run's value; one set otherwise is refused in one line, since two text
    experts or a warm start must read the table alike."""
    for flag, key, default in TEXT_FLAGS:
        trained = model_args.get(key, default)
        if getattr(args, key) not in (None, trained):
            raise SystemExit(f"{flag} {getattr(args, key)}: {path} was trained with {flag} {trained}; "
                             f"pass that, or a run made with {flag} {getattr(args, key)}")
        setattr(args, key, trained)


def model_config(data, args):
    """The encoder configuration of a model built from scratch (a checkpoint's model_args)."""
    return {"backbone": args.backbone, "d": args.d, "L": data["max_len"] - 3, "n_blocks": args.n_blocks,
            "n_heads": args.n_heads, "dropout": args.dropout, "block": args.sasrec_block, "text_norm": args.text_norm,
            "text_layers": args.text_layers, "text_out": args.text_out}


def setup(args):
    """Threads, seed, device and the prepared dataset of a phase script: (data, device)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > cores and torch.get_num_threads() > 1 and is_main_process():
        print(f"note: the CPU is busy (load {os.getloadavg()[0]:.1f} on {cores} cores) and this process uses "
              f"{torch.get_num_threads()} threads; --threads 1 (or OMP_NUM_THREADS=1) avoids oversubscription", flush=True)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    return load_dataset(args.data), device


def resolve_device(name):
    """--device -> torch.device; under torchrun, --device cuda means this process's GPU."""
    device = parse_device(name)
    if device.type == "cuda" and device.index is None and world_size() > 1:
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(device)
    return device


# --- Plumbing: several processes under torchrun (DistributedDataParallel) ----------------


def world_size():
    """Processes started by torchrun (its WORLD_SIZE), 1 for a plain `python pretrain.py`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process():
    """Rank 0 of torchrun, or the only process: the one that validates, prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def shard(order, rank, world):
    """This process's users of an epoch: every world-th of `order`, which every rank draws
    alike from the shared seed; the order wraps around so each rank gets as many users and
    takes as many steps (as torch's DistributedSampler)."""
    return torch.cat([order, order[:-len(order) % world]])[rank::world]


def broadcast(obj):
    """Rank 0's value of a picklable object on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- Eq. (1): BCE with one sampled negative per position ----------------------------------


def sample_negatives(history, n_items, shape, generator):
    """One uniform negative item per position (Eq. 1), never one of the user's training
    items: history (U, H) -> negatives of `shape` = (U, L), redrawn by rejection, drawn on
    the generator's device (fit: the training device, so a GPU step reads them in place)."""
    h = history.sort(1).values  # (U, H); count each user's distinct real items
    distinct = ((h[:, 1:] != h[:, :-1]) & (h[:, 1:] != 0)).sum(1) + (h[:, 0] != 0)
    if (distinct >= n_items).any():
        raise SystemExit(f"a user's training items cover all {n_items} items, so no negative can be sampled; "
                         f"prepare a dataset with more items")
    device = generator.device
    neg = torch.randint(1, n_items + 1, shape, generator=generator, device=device)
    while True:
        bad = (neg[:, :, None] == history[:, None, :]).any(-1)  # (U, L)
        if not bad.any():
            return neg
        neg[bad] = torch.randint(1, n_items + 1, (int(bad.sum()),), generator=generator, device=device)


def bce_loss(pos_logits, neg_logits, mask):
    """Eq. (1): BCE with logits, label 1 on the next item and 0 on the sampled negative,
    each averaged over the real positions of the batch: (B, L) each. The mask weighs the
    positions (no boolean indexing), so every batch has the same shapes (a graph to capture)."""
    pos, neg, w = pos_logits.float(), neg_logits.float(), mask.float()
    per_position = (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none")
                    + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none"))
    return (per_position * w).sum() / w.sum()


def ce_loss(logits, pos, mask):
    """--loss ce, beyond the paper: softmax cross-entropy of the next item against all N
    items (the padding column 0 dropped), averaged over the real positions: logits (B, L, N+1).
    Padding positions are ignored by their target (-100), not removed: static shapes."""
    targets = (pos - 1).masked_fill(~mask, -100)  # (B, L) item i is class i - 1
    return F.cross_entropy(logits[..., 1:].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def chunked_ce_loss(model, seq, pos, mask, chunk):
    """--loss ce --ce-chunk C: ce_loss without the (B, L, N+1) logits. Over chunks c of C items
    (1..N, padding left out), log sum_i exp(Phi_i) = logsumexp_c(logsumexp_{i in c} Phi_i), and
    the target's logit is read in the chunk that holds it. Each chunk runs inside
    torch.utils.checkpoint, which keeps only its two (B, L) results and recomputes its logits
    in backward: memory O(B x L x C) in forward and backward instead of O(B x L x N); the loss
    and gradients are ce_loss's up to float rounding (in training, f_MLP's dropout draws a mask
    per chunk: other masks, the same law). model: any with states and logits_of (models.py)."""
    h = model.states(seq)  # (B, L, d), or PAD's K x (B, L, d)
    ids = torch.arange(1, model.n_items + 1, device=seq.device)  # (N,) items 1..N

    def chunk_stats(h, ids):
        logits = model.logits_of(h, ids).float()  # (B, L, C)
        at = pos - ids[0]  # (B, L) the target's column in this chunk, when 0 <= at < C
        target = logits.gather(-1, at.clamp(0, len(ids) - 1)[..., None])[..., 0]  # (B, L)
        return torch.logsumexp(logits, -1), torch.where((at >= 0) & (at < len(ids)), target, 0.0)  # (B, L) each

    # backward recomputes a chunk outside trainer.step_context: re-enter --fast-dropout there, so that
    # f_MLP's dropout draws the forward's masks (checkpoint restores the RNG state and autocast itself)
    fast = any(isinstance(mode, FastDropout) for mode in _get_current_function_mode_stack())
    replay = {"context_fn": lambda: (contextlib.nullcontext(), FastDropout())} if fast else {}
    stats = [checkpoint(chunk_stats, h, ids[i:i + chunk], use_reentrant=False, **replay)
             for i in range(0, len(ids), chunk)]
    lse = torch.logsumexp(torch.stack([s[0] for s in stats]), 0)  # (B, L) log of the softmax's denominator
    target = torch.stack([s[1] for s in stats]).sum(0)  # (B, L) Phi of the next item
    w = mask.float()  # padding positions weigh 0, as ce_loss's ignore_index
    return ((lse - target) * w).sum() / w.sum()


def rec_loss(model, seq, pos, neg, mask, loss="bce", ce_chunk=0):
    """L_REC of a model (an expert or PAD) on one batch: BCE (Eq. 1) on the sampled negatives,
    or --loss ce's cross-entropy over all items (in chunks of ce_chunk items when > 0)."""
    if loss == "ce" and ce_chunk > 0:
        return chunked_ce_loss(model, seq, pos, mask, ce_chunk)
    if loss == "ce":
        return ce_loss(model.all_logits(seq), pos, mask)
    return bce_loss(*model.bce_logits(seq, pos, neg), mask)


class PhaseLoss(nn.Module):
    """One batch's training loss: L_REC unless use_rec_loss is False, plus the phase's
    extra_loss(model, seq, pos) -> (term, {name: value to log}). L_REC is the BCE of Eq. (1) /
    (6) with the sampled negatives, or with rec_loss="ce" the full-softmax cross-entropy (over
    chunks of ce_chunk items when it is > 0). A module because DistributedDataParallel
    all-reduces the gradients of what its forward computed. Returns (loss, {name: value to log})."""

    def __init__(self, model, extra_loss, use_rec_loss, rec_loss="bce", ce_chunk=0):
        super().__init__()
        self.model, self.extra_loss, self.use_rec_loss, self.rec_loss = model, extra_loss, use_rec_loss, rec_loss
        self.ce_chunk = ce_chunk

    def forward(self, seq, pos, neg, mask):
        with torch.set_grad_enabled(self.use_rec_loss):  # L_REC is logged even when not trained on
            rec = rec_loss(self.model, seq, pos, neg, mask, self.rec_loss, self.ce_chunk)
        loss, logs = (rec if self.use_rec_loss else 0.0), {self.rec_loss: rec.detach()}
        if self.extra_loss is not None:
            term, extra_logs = self.extra_loss(self.model, seq, pos, neg)
            loss, logs = loss + term, {**logs, **extra_logs}
        return loss, logs


# --- Plumbing: finished runs, and the per-epoch state behind --resume -----------------------

# flags that may differ between two runs with the same output: they do not change the weights
# (the data is compared by its fingerprint, not by the name it was given)
# (--ce-chunk: the same loss up to float rounding, as --threads: a run out of memory may resume in chunks)
SAME_RUN_FREE = ("resume", "quiet", "out", "overwrite", "threads", "eval_batch_size", "ce_chunk", "data", "preset")
RESUME_FREE = (*SAME_RUN_FREE, "epochs")


def flag_diff(then, now, free):
    """'--flag A (now B)' for every flag set differently in two vars(args) dicts; a flag that
    the earlier run did not record (it did not exist yet) counts at its default."""
    then = {**{k: FLAG_DEFAULTS[k] for k in now if k not in then and k in FLAG_DEFAULTS}, **then}
    return [f"--{k.replace('_', '-')} {then.get(k)} (now {now.get(k)})" for k in sorted(now.keys() | then.keys())
            if k not in free and now.get(k) != then.get(k)]


def reuse_finished(out, data, args):
    """True when OUT and its metrics JSON are a finished run of these flags on this data:
    the run is reused (its test metrics printed), not retrained. A finished run with other
    flags or data is refused, naming the flags, unless --overwrite."""
    out = Path(out)
    if args.overwrite or args.resume or not (out.is_file() and out.with_suffix(".json").is_file()):
        return False
    ckpt = read_checkpoint(out, keys=("args", "fingerprint", "metrics"))
    diff = flag_diff(ckpt["args"], vars(args), SAME_RUN_FREE)
    if ckpt["fingerprint"] != data["fingerprint"]:
        diff.append(f"data fingerprint {ckpt['fingerprint']} (now {data['fingerprint']})")
    if diff:
        raise SystemExit(f"{out} is a finished run with {', '.join(diff)}; pass --out to write elsewhere, "
                         f"or --overwrite to replace it")
    if is_main_process():
        print(f"reusing finished run {out} (same flags and data; --overwrite retrains)\n"
              f"test: {format_metrics(ckpt['metrics']['test'])}", flush=True)
    return True


def state_path(out):
    """Where a run keeps its resumable state while it trains: OUT.last.pt beside OUT."""
    return Path(out).with_suffix(".last.pt")


def read_state(path, data, args):
    """The state file for --resume, refused when it was written for other data or flags."""
    if not path.is_file():
        raise SystemExit(f"--resume: {path} not found (no epoch of this run finished, or it completed); "
                         f"run without --resume")
    state = read_checkpoint(path, keys=("epoch", "state", "optimizer", "rng", "args", "fingerprint"))
    if state["fingerprint"] != data["fingerprint"]:
        raise SystemExit(f"--resume: {path} was written for dataset {state['args']['data']!r} (fingerprint "
                         f"{state['fingerprint']}), not {args.data!r} ({data['fingerprint']}); pass that --data "
                         f"or run without --resume")
    diff = flag_diff(state["args"], vars(args), RESUME_FREE)
    if diff:
        raise SystemExit(f"--resume: {path} was written with {', '.join(diff)}; pass the same flags "
                         f"or run without --resume")
    return state


# --- Plumbing: a training step at the hardware's pace (--precision, --fast-dropout, --compile) -


def fast_path(args):
    """True when a run passed any of --precision bf16, --fast-dropout, --compile."""
    return args.precision == "bf16" or args.fast_dropout or args.compile != "none"


def adamw(groups, args):
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


# --- Alg. 1's loop ------------------------------------------------------------------------


def fit(model, data, args, out, extra_loss=None, use_rec_loss=True):
    """Alg. 1's loop: mini-batches of users, L_REC (Eq. 1 / 6) plus, if given, the phase's
    extra term extra_loss(model, seq, pos, neg) -> (term, {name: value to log}); AdamW,
    validation --stop-metric after each epoch, early stopping with patience. After each epoch
    the state (weights, AdamW, RNGs, best so far, log) goes to OUT.last.pt for --resume.
    Returns the model with its best-validation (or, --test-epoch last, last) weights and the log.

    Under torchrun (world_size() > 1) every process draws the same negatives and user order
    and trains on its shard of the users; DDP all-reduces the gradients, so the weights stay
    equal on every rank. Rank 0 validates and shares the early-stopping decision."""
    device = next(model.parameters()).device
    rank, world = int(os.environ.get("RANK", "0")), world_size()
    main = rank == 0
    if main:
        print(protocol(data, K, args.keep_repeated_targets), flush=True)
    train_in, train_pos = split_sequences(data["seqs"], "train")  # (U, L) each
    train_items = data["seqs"][:, :-2]  # (U, L+1) every training item, excluded from negatives
    real = (train_in != 0) & (train_pos != 0)
    keep = real.any(1)  # users with at least one training position
    train_in, train_pos, train_items, real = train_in[keep], train_pos[keep], train_items[keep], real[keep]
    # on CUDA the (U, L) tables go to the GPU once, from pinned memory; batches are indexed there
    on_device = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else (lambda t: t)
    batch_in, batch_pos, batch_real, batch_items = (on_device(t) for t in (train_in, train_pos, real, train_items))
    step_loss = PhaseLoss(model, extra_loss, use_rec_loss, args.loss, args.ce_chunk)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # the frozen text table and the buckets are equal on every rank: never broadcast them per step
        step_loss = nn.parallel.DistributedDataParallel(step_loss, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False, find_unused_parameters=True)
    trained = [(n, w) for n, w in model.named_parameters() if w.requires_grad]
    # finetune.py: the gate (and --bucket-bias) may decay differently, the experts learn at --expert-lr
    gate_decay, expert_lr = getattr(args, "gate_weight_decay", None), getattr(args, "expert_lr", None)
    gate = {n for n, _ in trained if n.startswith("gate.") or n == "bias"}
    groups = [{"params": [w for _, w in trained]}] if gate_decay is None and expert_lr is None else [
        {"params": [w for n, w in trained if n not in gate], **({} if expert_lr is None else {"lr": expert_lr})},
        {"params": [w for n, w in trained if n in gate], **({} if gate_decay is None else {"weight_decay": gate_decay})}]
    opt = adamw(groups, args)
    compiled_loss = compile_loss(step_loss, args)
    gen = torch.Generator(device).manual_seed(args.seed)  # negatives and batch order, drawn where training runs
    epoch, best, best_state, log, since_best = 0, -1.0, None, [], 0
    last = state_path(out)
    if args.resume:
        state = read_state(last, data, args)
        model.load_state_dict(state["state"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"]["negatives"])
        torch.set_rng_state(state["rng"]["torch"])  # dropout (and align.py's MMD subset) on CPU
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        epoch, best, best_state, log, since_best = (state[k] for k in ("epoch", "best", "best_state", "log", "since_best"))
        if main:
            print(f"resumed from {last} after epoch {epoch}", flush=True)
    elif last.exists() and main:
        print(f"starting over: {last} of an earlier run will be overwritten (--resume continues it)", flush=True)
    stop = {"ndcg": f"nDCG@{K}", "hr": f"HR@{K}"}[args.stop_metric]
    while epoch < args.epochs and since_best < args.patience:
        epoch += 1
        t0 = time.time()
        model.train()
        neg = sample_negatives(batch_items, data["n_items"], train_pos.shape, gen) * batch_real  # (U, L), each epoch
        order = shard(torch.randperm(len(train_in), generator=gen, device=device), rank, world)
        # no step waits for the device: the logged sums and the first non-finite loss stay there
        # until the epoch ends (a GPU step then runs ahead of the host; the state of the last
        # finished epoch is what a non-finite loss leaves behind either way)
        sums, first_bad, bad_loss = {}, torch.tensor(-1, device=device), torch.tensor(0.0, device=device)
        batches = range(0, len(order), args.batch_size)
        # progress bars only on a terminal (disable=None), never with --quiet or on other ranks
        for step, i in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False,
                                      disable=True if args.quiet or not main else None)):
            idx = order[i:i + args.batch_size]
            seq, pos, n, m = (t[idx] for t in (batch_in, batch_pos, neg, batch_real))
            with step_context(device, args):
                loss, logs = (compiled_loss if len(idx) == args.batch_size else step_loss)(seq, pos, n, m)
            fresh = (first_bad < 0) & ~torch.isfinite(loss.detach())
            first_bad, bad_loss = torch.where(fresh, step, first_bad), torch.where(fresh, loss.detach().float(), bad_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for name, v in logs.items():
                sums[name] = sums.get(name, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)
        stopped = (first_bad >= 0).float()
        if world > 1:  # every rank stops together, or the others would wait for it forever
            dist.all_reduce(stopped, op=dist.ReduceOp.MAX)
        if stopped:
            kept = f"the state after epoch {epoch - 1} is kept in {last}" if epoch > 1 else "no epoch finished"
            where = f"batch {int(first_bad) + 1} of {len(batches)}" if first_bad >= 0 else "a batch of another process"
            raise SystemExit(f"non-finite loss {float(bad_loss)} at epoch {epoch}, {where}; "
                             f"lower --lr or check the input data ({kept})")
        valid = evaluate(model, data, "valid", K, args.eval_batch_size, args.keep_repeated_targets) if main else None
        if world > 1:
            valid = broadcast(valid)  # the same early-stopping decision on every rank
        row = {"epoch": epoch, **{n: float(v) / len(batches) for n, v in sums.items()},
               f"valid_HR@{K}": valid[f"HR@{K}"], f"valid_nDCG@{K}": valid[f"nDCG@{K}"], "seconds": time.time() - t0}
        log.append(row)
        better = valid[stop] > best
        if better:
            best, best_state, since_best = valid[stop], copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
        if not main:
            continue
        losses = " ".join(f"{n} {row[n]:.4f}" for n in sums)  # under torchrun: rank 0's batches
        print(f"epoch {epoch:3d}  {losses}  valid HR@{K} {row[f'valid_HR@{K}']:.2f} nDCG@{K} "
              f"{row[f'valid_nDCG@{K}']:.2f}  {row['seconds']:.1f}s{'  *' if better else ''}", flush=True)
        rng = {"negatives": gen.get_state(), "torch": torch.get_rng_state(),
               **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
        atomic_save({"epoch": epoch, "state": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng,
                     "best": best, "best_state": best_state, "since_best": since_best, "log": log,
                     "args": vars(args), "fingerprint": data["fingerprint"]}, last)
    if since_best >= args.patience and main:
        print(f"early stop: no better valid {stop} for {args.patience} epochs", flush=True)
    if args.test_epoch == "best":  # DEVIATION (default): the authors' release tests the last epoch's weights
        model.load_state_dict(best_state)
    if world > 1:
        checksum = sum(w.double().sum().item() for w in model.state_dict().values() if w.is_floating_point())
        print(f"rank {rank} of {world}: trained weights checksum {checksum:.10e}", flush=True)
        dist.barrier()  # rank 0 finished its last save before the others leave
        # the DDP wrapper holds the process group: free it first, so that the group is torn
        # down here, while the interpreter is whole, and not when the wrapper happens to go
        del step_loss, compiled_loss
        dist.destroy_process_group()
    return model, log


def finish(model, model_args, data, args, phase, log, out, extra=None, valid_ranks=None):
    """Test the restored best model, print the metrics, write the self-describing checkpoint
    and a metrics JSON beside it (both atomically), and remove the run's OUT.last.pt: the
    phase is done. The test is scored under both rules for repeated targets: `test` under
    the run's rule, `test_rules` overall under each. `ranks` holds every user's validation
    and test rank under the run's rule (user order of dataset.pt), for intervals over users;
    valid_ranks replaces the validation ranking (finetune.py's cross-fitted gate fit)."""
    t0 = time.time()
    keep = args.keep_repeated_targets
    ranks = {"valid": user_ranks(model, data, "valid", args.eval_batch_size, keep) if valid_ranks is None else valid_ranks,
             "test": user_ranks(model, data, "test", args.eval_batch_size, keep)}
    valid, test = (summarise_ranks(ranks[split], data, split, K) for split in ("valid", "test"))
    eval_seconds = (time.time() - t0) / (1 if valid_ranks is not None else 2)
    other = evaluate(model, data, "test", K, args.eval_batch_size, not keep)
    rules = {("repeat_kept" if keep else "repeat_is_miss"): test, ("repeat_is_miss" if keep else "repeat_kept"): other}
    print(f"phase {phase} test: {format_metrics(test)}  (full ranking {eval_seconds:.2f}s)")
    stop = {"ndcg": f"valid_nDCG@{K}", "hr": f"valid_HR@{K}"}[args.stop_metric]
    best_epoch = max(log, key=lambda r: r[stop])["epoch"] if log else 0  # 0: nothing trained
    tested = best_epoch if args.test_epoch == "best" else len(log)
    metrics = {"phase": phase, "valid": valid, "test": test,
               "test_rules": {r: {m: v[m] for m in (f"HR@{K}", f"nDCG@{K}")} for r, v in rules.items()},
               "best_epoch": best_epoch, "tested_epoch": tested, "epochs": log, "eval_seconds": eval_seconds, **(extra or {}),
               "ranks": {split: r.tolist() for split, r in ranks.items()}}
    ckpt = {"phase": phase, "model_args": model_args, "state": {k: v.cpu() for k, v in model.state_dict().items()},
            "args": vars(args), "dataset": data["name"], "n_items": data["n_items"],
            "fingerprint": data["fingerprint"], "metrics": json.loads(json.dumps(metrics))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, out)
    atomic_write_text(json.dumps(metrics, indent=1), out.with_suffix(".json"))
    state_path(out).unlink(missing_ok=True)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return metrics

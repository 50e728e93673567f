"""The training loop every phase shares (Alg. 1), and its plumbing.

    pretrain.py, align.py, finetune.py, baselines.py:
        data, device = setup(args)            # threads, seed, device, dataset.pt
        if reuse_finished(out, data, args): return
        model, log = fit(model, data, args, out, loss_fn)   # mini-batches, AdamW, early stopping
        finish(model, model_args, data, args, phase, log, out)    # test, checkpoint, metrics JSON

loss_fn is the phase's loss, written in its script: L_REC (rec_loss: the BCE of Eq. (1) / (6)
with one sampled negative per position, or --loss ce), plus phase 2's γ · MK-MMD (Eq. 4).
Around fit: the shared flags, and PyTorch DDP when a script runs under torchrun (the
--resume state and the finished-run guard are in runs.py, the speed flags in speed.py):

    torchrun --nproc_per_node 4 pretrain.py --data mind --device cuda

Each process trains on its share of the users with --batch-size users per step (the global
batch is --batch-size x processes); rank 0 alone validates, prints and writes.
"""
import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from dataset import atomic_save, load_dataset, split_sequences
from evaluate import evaluate, format_metrics, parse_device, protocol, summarise_ranks, user_ranks
from models import BLOCKS, TEXT_NORMS, TEXT_OUTS
from runs import read_state, state_path, write_run
from speed import add_speed_args, checkpoint_replay, compile_loss, optimizer, reuse_freed_memory, step_context

K = 10  # HR@K / nDCG@K of validation and test; paper: 10 (Sec. 4.1.2)


# --- Flags every phase shares ------------------------------------------------------------

SECTIONS = ("equation", "training", "authors", "beyond", "run")  # --help's sections, in this order


class HelpFormat(argparse.RawDescriptionHelpFormatter):
    """--help: the script's docstring as written; each flag's default after its help, where it has one."""

    def _get_help_string(self, action):
        shown = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        return action.help + (" (default: %(default)s)" if shown else "")


def parser(doc, script, equation):
    """A phase script's argparse parser with --help in the order a reader of the paper needs:
    the phase's equation, training (Appendix A), the authors' release, beyond the paper, run
    management and speed. Returns (parser, {section: argument group})."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormat,
                                usage=f"python {script}.py [flags: the paper's first, below]")
    titles = {"equation": equation, "training": "training (Appendix A; README: Paper to code)",
              "authors": "where the paper is silent: the authors' release or ours (README: Deviations)",
              "beyond": "beyond the paper (results/experiments.md#flags-beyond-the-paper)",
              "run": "run management and speed"}
    return p, {k: p.add_argument_group(titles[k]) for k in SECTIONS}


def add_training_args(p, groups=None):
    """Flags every phase shares, each in its --help section (all in p when groups is None)."""
    g = groups or dict.fromkeys(SECTIONS, p)
    t, a, b, r = g["training"], g["authors"], g["beyond"], g["run"]
    add_loss_args(t, r)
    t.add_argument("--epochs", type=int, default=200,
                   help="maximum epochs (early stopping ends sooner); 0 tests the starting weights")
    # DEVIATION: default batch 128 users so that the offline default converges in minutes on a
    # CPU; the paper's Appendix A uses 16 (pass --batch-size 16).
    t.add_argument("--batch-size", type=int, default=128, help="users per mini-batch; paper: 16")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, 1e-3 (pretrain.py --backbone gru4rec: "
                   "3e-3); paper: not given")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay; paper: 0.1")
    # DEVIATION: early stopping on validation nDCG@10 with patience 10 (Appendix A gives the early-stop
    # epoch 10, no metric), testing the best epoch; the authors' release watches HR@10 with patience
    # about 20 and tests the last epoch (--stop-metric hr --patience 20 --test-epoch last).
    t.add_argument("--patience", type=int, default=10, help="early stopping patience in epochs; paper: 10")
    t.add_argument("--seed", type=int, default=0, help="random seed; paper: mean of 3 runs")
    a.add_argument("--preset", default="none", choices=tuple(PRESETS),
                   help="defaults of a configuration (trainer.PRESETS; flags given win): authors, recipe")
    a.add_argument("--stop-metric", default="ndcg", choices=("ndcg", "hr"),
                   help="validation metric of early stopping; authors' release: hr")
    a.add_argument("--test-epoch", default="best", choices=("best", "last"),
                   help="weights tested and saved: best validation epoch; authors' release: last")
    b.add_argument("--keep-repeated-targets", action="store_true",
                   help="rank a target that repeats an earlier item (default: a miss, the authors' rule)")
    r.add_argument("--data", default="ml-100k", help="prepared dataset: a name under data/ or a folder")
    r.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun one GPU per process)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads of this process (default: one per core)")
    add_speed_args(r)
    r.add_argument("--eval-batch-size", type=int, default=512, help="users ranked at once (bounds memory)")
    r.add_argument("--out", default=None, help="checkpoint path; default runs/NAME/<script>_<settings>_seedS.pt")
    r.add_argument("--overwrite", action="store_true", help="retrain and replace a finished OUT")
    r.add_argument("--resume", action="store_true", help="continue a killed run from OUT.last.pt (same flags)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def add_loss_args(p, memory=None):
    """L_REC's flags (the phase scripts and benchmarks/bench.py): --loss in p, --ce-chunk in
    memory (default p)."""
    p.add_argument("--loss", default="bce", choices=("bce", "ce"),
                   help="L_REC: bce, Eq. (1), one sampled negative (paper); ce: softmax over all items")
    (memory or p).add_argument("--ce-chunk", type=int, default=0,
                               help="--loss ce over chunks of this many items: memory O(B L chunk); 0: all")


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
    # --preset recipe (beyond the paper), each part chosen on validation (results/experiments.md):
    # CE in every phase, f_MLP one linear layer on the standardised table, the LLM expert from the
    # CE MoRec run (baselines.py --method morec), the text-kNN expert beside the three experts,
    # the experts as phases 1-2 and MoRec left them, the gate fit on validation
    "recipe": {
        "all": {"loss": "ce"},
        "align": {"text_norm": "standard", "text_layers": 0},
        "baselines": {"text_norm": "standard", "text_layers": 0},
        "finetune": {"text_norm": "standard", "text_layers": 0, "gate_fit": "valid-only", "llm_init": "morec",
                     "experts": "id,align,llm,text"},
    },
}


def parse_args(p, script):
    """argparse with --preset: the preset's values for `script` become the defaults, then the
    command line is read again, so a flag given explicitly always wins."""
    preset = PRESETS[p.parse_known_args()[0].preset]
    known = {a.dest for a in p._actions}
    p.set_defaults(**{k: v for k, v in {**preset.get("all", {}), **preset.get(script, {})}.items() if k in known})
    return p.parse_args()


def add_model_args(p, groups=None):
    """Sizes of a model built from scratch (pretrain.py, baselines.py); later phases read
    them from the phase-1 checkpoint."""
    g = groups or dict.fromkeys(SECTIONS, p)
    g["training"].add_argument("--d", "--hidden-size", dest="d", type=int, default=128,
                               help="hidden size d; paper: 128 (Fig. 1); under torchrun: --hidden-size")
    g["training"].add_argument("--dropout", type=float, default=0.1, help="dropout probability; paper: 0.1")
    g["authors"].add_argument("--n-blocks", type=int, default=5, help="SASRec blocks; authors' release: 5")
    g["authors"].add_argument("--n-heads", type=int, default=2, help="SASRec attention heads; authors' release: 2")
    g["authors"].add_argument("--sasrec-block", default="ours", choices=BLOCKS,
                              help="SASRec's block: ours or the authors' release's")
    add_text_args(p, groups)


def add_text_args(p, groups=None, inherit=False):
    """How f_MLP (Eq. 7) reads the frozen text table, for every script that builds one;
    inherit (finetune.py): by default the phase-2 run's values, so both text experts agree."""
    g = groups or dict.fromkeys(SECTIONS, p)
    own = "; default: the phase-2 run's" if inherit else ""
    g["authors"].add_argument("--text-layers", type=int, default=None if inherit else 4,
                              help="f_MLP's hidden layers (Eq. 7); authors' release: 4" + own)
    g["authors"].add_argument("--text-out", default=None if inherit else "gelu", choices=TEXT_OUTS,
                              help="f_MLP's last activation; authors' release: gelu" + own)
    g["beyond"].add_argument("--text-norm", default=None if inherit else "none", choices=TEXT_NORMS,
                             help="f_MLP's input: the text table as is (paper) or standardised" + own)


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
    if device.type == "cpu":
        reuse_freed_memory()  # the same numbers, faster CE steps on a CPU (speed.py)
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

    replay = checkpoint_replay()  # backward recomputes a chunk: with --fast-dropout, the forward's masks
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
    """A phase's loss on one batch as a module: loss_fn(model, seq, pos, neg, mask) -> (loss,
    {name: value to log}), each phase script's own (pretrain.phase1_loss, align.phase2_loss,
    finetune.phase3_loss). A module because DistributedDataParallel all-reduces the gradients
    of what its forward computed."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, seq, pos, neg, mask):
        return self.loss_fn(self.model, seq, pos, neg, mask)


# --- Alg. 1's loop ------------------------------------------------------------------------


def fit(model, data, args, out, loss_fn):
    """Alg. 1's loop: mini-batches of users, the phase's loss_fn(model, seq, pos, neg, mask) ->
    (loss, {name: value to log}) on each (seq, pos (B, L) next items, neg (B, L) one sampled
    negative per position, mask (B, L) real positions); AdamW,
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
    step_loss = PhaseLoss(model, loss_fn)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # the frozen text table and the buckets are equal on every rank: never broadcast them per step
        step_loss = nn.parallel.DistributedDataParallel(step_loss, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False, find_unused_parameters=True)
    trained = [(n, w) for n, w in model.named_parameters() if w.requires_grad]
    # finetune.py: the gate (and --bucket-bias, --user-bias, --bucket-temp) may decay differently, the experts learn
    # at --expert-lr
    gate_decay, expert_lr = getattr(args, "gate_weight_decay", None), getattr(args, "expert_lr", None)
    gate = {n for n, _ in trained if n.startswith(("gate.", "user_bias.")) or n in ("bias", "log_temp")}
    groups = [{"params": [w for _, w in trained]}] if gate_decay is None and expert_lr is None else [
        {"params": [w for n, w in trained if n not in gate], **({} if expert_lr is None else {"lr": expert_lr})},
        {"params": [w for n, w in trained if n in gate], **({} if gate_decay is None else {"weight_decay": gate_decay})}]
    opt = optimizer(groups, args)
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
                     "args": vars(args), "fingerprint": data["fingerprint"]}, last)  # read_state's keys
    if since_best >= args.patience and main:
        print(f"early stop: no better valid {stop} for {args.patience} epochs", flush=True)
    if args.test_epoch == "best" and best_state is not None:  # None: --epochs 0, the starting weights are tested
        # DEVIATION (default): the authors' release tests the last epoch's weights
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
    write_run(model, model_args, data, args, phase, metrics, out)
    return metrics

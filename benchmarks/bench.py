"""Speed and memory of PAD on a prepared or synthetic dataset, one JSON line per figure.

    python benchmarks/bench.py --data ml-100k --ckpt runs/ml-100k/finetune_sasrec_freq_id-align-llm_gaussian_rec_gamma0.1_seed0.pt
    python benchmarks/synthetic.py --preset electronics && \\
    python benchmarks/bench.py --data synthetic-electronics --phases 3 --eval-users 2048
    python benchmarks/bench.py --data pantry --figures train --phases 1,3 --threads 1 \
        --precision bf16 --fast-dropout --baseline
    python benchmarks/bench.py --data synthetic-electronics --figures train --phases 1 --loss ce --ce-chunk 2048

Figures (each line: {"figure", "value", "unit", "dataset", "device", "threads", "malloc", ...}):
  negatives    seconds of trainer.fit's per-epoch draw of negatives for every user;
  train        sequences (users) per second of --steps training steps of each phase, each as in
               trainer.fit: its real loss (pretrain.phase1_loss, align.phase2_loss, finetune.phase3_loss),
               backward and AdamW, with the phase scripts' --precision, --fast-dropout and
               --compile (`flags`) and their --loss, --ce-chunk; the batches' negatives are
               drawn beforehand;
  speedup      with --baseline: the default path's time over the flags' path's, timed in the same
               process in alternating blocks, median over --rounds with its min and max;
  train_peak   peak memory of the draw and the steps (CPU: resident set, CUDA: allocated), and
               above_start_mib: that peak less what was in use before them (the model, AdamW's
               state, the step's activations and loss; on CPU run with MALLOC_MMAP_THRESHOLD_=1048576
               so that freed tensors leave the resident set: benchmarks/README.md);
  eval         users per second of evaluate.evaluate(), full ranking of the test split over
               all N items (the first --eval-users users, default all), and its peak memory;
  serve        latency of the top-10 items for a batch of users with the item tables cached
               (model.item_tables(), built once: its time and size are the `serve_cache`
               figures), p50 and p99 in ms, batch 1 and 256, float32 and float16 tables.
Models have the default sizes (d = 128, 5 blocks, 2 heads) and random weights unless --ckpt
names a trained checkpoint (then used for eval and serve): speed does not depend on the
weights. Another recommender (e.g. RecBole) is compared by printing the same JSON keys.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align import phase2_loss  # noqa: E402
from dataset import history_before_target, load_dataset, split_sequences  # noqa: E402
from evaluate import evaluate  # noqa: E402
from models import EXPERTS, build_model
from serve import top_items  # noqa: E402
from finetune import phase3_loss  # noqa: E402
from pretrain import phase1_loss  # noqa: E402
from speed import add_speed_args, compile_loss, optimizer, reuse_freed_memory, step_context  # noqa: E402
from trainer import PhaseLoss, add_loss_args, resolve_device, sample_negatives  # noqa: E402
from runs import model_from_checkpoint, read_checkpoint  # noqa: E402


# --- Measuring: peak memory and wall time -------------------------------------------------


def reset_peak(device):
    """Start a new peak-memory window: CUDA's allocator counter, or Linux's VmHWM (the
    peak resident set, reset by writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device):
    """Peak memory in MiB since reset_peak: CUDA allocated, else the process's peak RSS
    (on a system without /proc, since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    status = Path("/proc/self/status")
    if status.exists():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_use_mb(device):
    """Memory in use now, in MiB: CUDA allocated, else the resident set (Linux VmRSS; 0 elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    status = Path("/proc/self/status")
    if not status.exists():
        return 0.0
    return int(next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --- The figures ---------------------------------------------------------------------------


def phase_model(phase, data, args):
    """Phase 1: the ID expert; 2: the alignment expert; 3: PAD with all experts, freq gate."""
    cfg = {"backbone": args.backbone, "d": 128, "L": data["max_len"] - 3, "n_blocks": 5, "n_heads": 2,
           "dropout": 0.1}
    model_args = ({"kind": "pad", "experts": list(EXPERTS), "gate": "freq", **cfg} if phase == 3 else
                  {"kind": "expert", "expert": "id" if phase == 1 else "align", **cfg})
    return build_model(model_args, data)


def train_batches(data, args, device, count):
    """`count` random batches of --batch-size users (seq, pos, neg, mask), each (B, L), on
    `device`; their negatives are drawn here, as trainer.fit draws them once per epoch."""
    train_in, train_pos = split_sequences(data["seqs"], "train")  # (U, L) each
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        idx = torch.randint(len(train_in), (args.batch_size,), generator=gen)
        seq, pos = train_in[idx], train_pos[idx]  # (B, L)
        mask = (seq != 0) & (pos != 0)
        neg = sample_negatives(data["seqs"][idx, :-2], data["n_items"], pos.shape, gen) * mask
        batches.append(tuple(t.to(device) for t in (seq, pos, neg, mask)))
    return batches


def train_step(phase, data, args, device, speed):
    """One training step of a phase as in trainer.fit, run with the speed flags `speed`
    (speed.py): its real loss (the phase script's, as trainer.PhaseLoss) in speed.step_context,
    backward, AdamW. Returns step(batch)."""
    torch.manual_seed(0)
    model = phase_model(phase, data, args).to(device).train()
    phase_loss = {1: phase1_loss, 2: partial(phase2_loss, gamma=0.1), 3: phase3_loss}[phase]
    loss_fn = compile_loss(PhaseLoss(model, partial(phase_loss, loss=args.loss, ce_chunk=args.ce_chunk)), speed)
    opt = optimizer(model.parameters(), argparse.Namespace(lr=1e-3, weight_decay=0.1, **vars(speed)))

    def step(batch):
        with step_context(device, speed):
            loss, _ = loss_fn(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(step, batches, device):
    """Seconds of one step per batch."""
    start = clock(device)
    for batch in batches:
        step(batch)
    return clock(device) - start


def speed_flags(speed):
    """The speed flags as a command line, e.g. '--precision bf16 --fast-dropout' ('' for the defaults)."""
    return " ".join([f"--precision {speed.precision}"] * (speed.precision != "auto")
                    + ["--fast-dropout"] * speed.fast_dropout + [f"--compile {speed.compile}"] * (speed.compile != "none"))


def train_figures(phase, data, args, device, emit):
    """--steps training steps of a phase after --warmup steps, with the speed flags given; with
    --baseline, the default path too, in the same process, in alternating blocks of --steps
    (new, old, old, new, ...) for --rounds rounds: the speed-up is old time / new time per round."""
    speed = argparse.Namespace(**{k: getattr(args, k) for k in ("precision", "fast_dropout", "compile")})
    reset_peak(device)
    start_mib = in_use_mb(device)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    train_pos = split_sequences(data["seqs"], "train")[1]
    sample_negatives(data["seqs"][:, :-2], data["n_items"], train_pos.shape, gen)  # fit's draw for every user
    emit("negatives", time.perf_counter() - start, "s", phase=phase, note="once per epoch, all users")
    batches = train_batches(data, args, device, args.warmup + args.steps)
    warm, batches = batches[:args.warmup], batches[args.warmup:]
    paths = {"new": train_step(phase, data, args, device, speed)}
    if args.baseline:
        paths["old"] = train_step(phase, data, args, device, argparse.Namespace(precision="auto", fast_dropout=False,
                                                                               compile="none"))
    for step in paths.values():
        timed(step, warm, device)  # compiles, if --compile
    seconds = {name: [] for name in paths}
    for r in range(args.rounds if args.baseline else 1):
        for name in (paths if r % 2 == 0 else reversed(paths)):
            seconds[name].append(timed(paths[name], batches, device))
    flags = {"new": speed_flags(speed), "old": ""}
    for name, s in seconds.items():
        emit("train", args.steps * args.batch_size / statistics.median(s), "sequences/s", phase=phase, steps=args.steps,
             batch_size=args.batch_size, flags=flags[name], loss=args.loss, ce_chunk=args.ce_chunk,
             **({"rounds": len(s)} if args.baseline else {}))
    if args.baseline:
        ratios = [old / new for old, new in zip(seconds["old"], seconds["new"])]
        emit("speedup", statistics.median(ratios), "x", phase=phase, min=round(min(ratios), 4), max=round(max(ratios), 4),
             rounds=args.rounds, steps=args.steps, batch_size=args.batch_size, flags=flags["new"],
             baseline="the default path: eager, foreach AdamW, float32 on CPU (bf16 autocast on CUDA)")
    peak = peak_mb(device)
    emit("train_peak", peak, "MiB", phase=phase, steps=args.steps, batch_size=args.batch_size, loss=args.loss,
         ce_chunk=args.ce_chunk, above_start_mib=round(peak - start_mib, 1))


def eval_figures(model, phase, data, args, device, emit):
    """evaluate() on the test split of the first --eval-users users (all by default)."""
    users = min(args.eval_users or len(data["seqs"]), len(data["seqs"]))
    subset = {**data, "seqs": data["seqs"][:users]}
    evaluate(model, {**subset, "seqs": subset["seqs"][:min(users, 64)]}, "test", 10, args.eval_batch_size)  # warm-up
    reset_peak(device)
    start = clock(device)
    evaluate(model, subset, "test", 10, args.eval_batch_size)
    seconds = clock(device) - start
    emit("eval", users / seconds, "users/s", phase=phase, users=users, seconds=round(seconds, 3),
         eval_batch_size=args.eval_batch_size)
    emit("eval_peak", peak_mb(device), "MiB", phase=phase, users=users, eval_batch_size=args.eval_batch_size)


def serve_figures(model, phase, data, args, device, emit):
    """Top-10 latency with cached item tables, for each table dtype and batch size."""
    model.eval()
    inputs, _ = split_sequences(data["seqs"], "test")  # (U, L) each user's latest window
    history = history_before_target(data["seqs"], "test")  # (U, L+2) excluded from the ranking
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        name = str(dtype).removeprefix("torch.")
        reset_peak(device)
        start = clock(device)
        tables = model.item_tables(dtype)
        emit("serve_cache", clock(device) - start, "s", phase=phase, dtype=name,
             size_mib=round(sum(t.numel() * t.element_size() for t in tables) / 2 ** 20, 1))
        for batch, repeats in ((1, args.serve_repeats), (256, max(5, args.serve_repeats // 10))):
            times = []
            for r in range(repeats + 2):  # the first two are warm-up
                idx = torch.randint(len(inputs), (batch,), generator=gen)
                seq, exclude = inputs[idx].to(device), history[idx].to(device)
                start = clock(device)
                top_items(model, tables, seq, exclude, 10)
                times.append(clock(device) - start)
            times = torch.tensor(times[2:]) * 1000
            for q in (50, 99):
                emit("serve", torch.quantile(times, q / 100).item(), "ms", phase=phase, batch=batch, dtype=name,
                     quantile=f"p{q}", repeats=repeats)
        emit("serve_peak", peak_mb(device), "MiB", phase=phase, dtype=name)
        del tables


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml-100k", help="prepared dataset (prepare_data.py or benchmarks/synthetic.py)")
    p.add_argument("--ckpt", default=None, help="trained checkpoint of any phase for the eval and serve figures; "
                                                "default: random weights for each of --phases")
    p.add_argument("--phases", default="1,2,3", help="comma-separated phases to measure")
    p.add_argument("--figures", default="train,eval,serve", help="comma-separated subset of train,eval,serve")
    p.add_argument("--backbone", default="sasrec", choices=("sasrec", "gru4rec", "caser"), help="sequence encoder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (training as the phase scripts: --precision auto is bf16 on CUDA)")
    p.add_argument("--batch-size", type=int, default=128, help="users per training step (phase scripts' default; paper: 16)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per phase")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps before them (with --compile: compiling)")
    add_speed_args(p)
    add_loss_args(p)
    p.add_argument("--baseline", action="store_true",
                   help="also time the default path (eager, foreach AdamW, float32 on CPU) in the same process, in "
                        "blocks alternating with the flags' path, and print the speed-up with its spread")
    p.add_argument("--rounds", type=int, default=5, help="with --baseline: blocks of --steps steps per path")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--eval-users", type=int, default=None, help="evaluate the first this many users (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=512, help="users ranked at once, as --eval-batch-size of the phases")
    p.add_argument("--serve-repeats", type=int, default=100, help="timed requests at batch 1 (a tenth, at least 5, at 256)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    malloc = "reuse" if device.type == "cpu" and reuse_freed_memory() else "glibc"  # as trainer.setup does
    start = time.perf_counter()
    data = load_dataset(args.data)
    common = {"dataset": data["name"], "users": len(data["seqs"]), "items": data["n_items"],
              "d_text": data["text_emb"].shape[1], "device": str(device), "threads": torch.get_num_threads(),
              "malloc": malloc}

    def emit(figure, value, unit, **fields):
        print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **common, **fields}), flush=True)

    emit("load", time.perf_counter() - start, "s", rss_mib=round(peak_mb(device), 1))
    figures = args.figures.split(",")
    phases = [int(x) for x in args.phases.split(",")]
    if "train" in figures:
        for phase in phases:
            train_figures(phase, data, args, device, emit)
    if args.ckpt:
        ckpt = read_checkpoint(args.ckpt)
        models = {ckpt["phase"]: model_from_checkpoint(ckpt, data, args.ckpt).to(device)}
    else:
        torch.manual_seed(0)
        models = {phase: phase_model(phase, data, args).to(device) for phase in phases}
    for phase, model in models.items():
        if "eval" in figures:
            eval_figures(model, phase, data, args, device, emit)
        if "serve" in figures:
            serve_figures(model, phase, data, args, device, emit)


if __name__ == "__main__":
    main()

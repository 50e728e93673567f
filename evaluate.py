"""Full-ranking evaluation of any PAD phase's checkpoint (Sec. 4.1.2, Fig. 2).

    python evaluate.py --ckpt runs/ml-100k/pretrain_sasrec_seed0.pt [--split test] [--k 10] [--json]
    python evaluate.py --table SASRec='runs/ml-100k/pretrain_sasrec_seed*.json' PAD=...   # mean ± std
    python evaluate.py --text-knn last --data pantry     # the text-similarity floor, no checkpoint

Protocol (printed at run time): validation predicts item l-1 from the 20 items before
it, test predicts item l; every one of the N items is ranked (no sampled negatives);
the items the user interacted with before the target are masked, so a target that repeats
one of them is a miss (the authors' rule; --keep-repeated-targets ranks it instead); ties
count against the target; HR@k and nDCG@k are averaged over all users and reported in %,
overall, per frequency bucket of the target item (1 = warmest 10% of training
interactions, B = coldest) and for warm / median / cold targets.
"""
import argparse
import glob
import itertools
import json
import math
from pathlib import Path

import torch

from dataset import GROUPS, bucket_groups, history_before_target, load_dataset, split_sequences
from models import Blend, TextKNN
from runs import model_from_checkpoint, read_checkpoint


def parse_device(name):
    """--device cpu / cuda / cuda:N -> torch.device, refused in one line when absent."""
    if name != "cpu" and not name.startswith("cuda"):
        raise SystemExit(f"--device {name}: expected cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


# --- HR@k and nDCG@k over the full item set ----------------------------------------------


def mask_seen(scores, history):
    """Scores (B, N+1) with padding (column 0) and the user's earlier items history (B, H) at
    -inf: out of the ranking, and out of a softmax over the items (gate_fit.fit_gate)."""
    masked = scores.scatter(1, history, -math.inf)
    masked[:, 0] = -math.inf
    return masked


def target_ranks(scores, target, history, keep_repeats=False):
    """0-based rank of each target among all items (B, N+1) -> (B,).

    Padding (id 0) and the user's history are removed from the ranking; an item scoring
    exactly as high as the target counts as ranked above it. A target that repeats a
    history item is masked with it, so it gets rank N+1, a miss at any k (the authors'
    rule), unless keep_repeats ranks it among the other items.
    """
    scores = scores.float()
    s_target = scores.gather(1, target[:, None])  # (B, 1)
    others = mask_seen(scores, history).scatter(1, target[:, None], -math.inf)
    ranks = (others >= s_target).sum(1)  # (B,)
    if keep_repeats:
        return ranks
    repeated = (history == target[:, None]).any(1)  # (B,)
    return torch.where(repeated, scores.shape[1], ranks)


def hr_ndcg(ranks, k):
    """Per-user HR@k and nDCG@k from 0-based ranks: one relevant item, so the ideal DCG
    is 1 and nDCG = 1 / log2(rank + 2) inside the top k."""
    hit = (ranks < k).float()
    return hit, hit / torch.log2(ranks.float() + 2)


def summarise(hit, ndcg, bucket, n_buckets, k):
    """Mean HR/nDCG in % overall, per target bucket and per warm/median/cold group."""

    def mean(m):
        n = int(m.sum())
        return {"users": n, f"HR@{k}": 100 * hit[m].mean().item() if n else float("nan"),
                f"nDCG@{k}": 100 * ndcg[m].mean().item() if n else float("nan")}

    everyone = torch.ones_like(bucket, dtype=torch.bool)
    out = mean(everyone)
    out["buckets"] = {b: mean(bucket == b) for b in range(1, n_buckets + 1)}
    out["groups"] = {g: mean(torch.isin(bucket, torch.tensor(list(r)))) for g, r in bucket_groups(n_buckets).items()}
    return out


@torch.no_grad()
def user_ranks(model, data, split="test", batch_size=512, keep_repeats=False, users=None, offsets=None):
    """0-based rank of every user's `split` target (target_ranks), (U,) in the order of
    data["seqs"], or of the rows `users` (an index tensor) only. Users are ranked in chunks
    of batch_size, so memory is O(batch_size x N), never users x items; the item tables are
    computed once per call. Scores are float32 even on a GPU (bf16 scores would tie).
    offsets (T, N+1): rank under each scores + offsets[t] instead, from one pass, (T, U)."""
    was_training = model.training
    model.eval()
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    inputs, targets = split_sequences(data["seqs"], split)
    history = history_before_target(data["seqs"], split)
    if users is not None:
        inputs, targets, history = inputs[users], targets[users], history[users]
    tables = model.item_tables()  # once per call, not once per chunk of users
    ranks = []
    for i in range(0, len(inputs), batch_size):
        seq = inputs[i:i + batch_size].to(device, non_blocking=True)
        scores = model.full_scores(seq, tables)  # (b, N+1)
        target, hist = targets[i:i + batch_size].to(device), history[i:i + batch_size].to(device)
        if offsets is None:
            ranks.append(target_ranks(scores, target, hist, keep_repeats).cpu())
        else:
            ranks.append(torch.stack([target_ranks(scores + o, target, hist, keep_repeats) for o in offsets.to(device)]).cpu())
    model.train(was_training)
    return torch.cat(ranks, -1)


def summarise_ranks(ranks, data, split="test", k=10, users=None):
    """summarise() of user_ranks' output: HR@k / nDCG@k overall, per bucket and per group."""
    _, targets = split_sequences(data["seqs"], split)
    targets = targets if users is None else targets[users]
    hit, ndcg = hr_ndcg(ranks, k)
    return summarise(hit, ndcg, data["item_bucket"][targets], data["n_buckets"], k)


def evaluate(model, data, split="test", k=10, batch_size=512, keep_repeats=False):
    """Full ranking of every user's `split` target (user_ranks) -> summarise()'s dict."""
    return summarise_ranks(user_ranks(model, data, split, batch_size, keep_repeats), data, split, k)


def protocol(data, k, keep_repeats=False):
    """The evaluation protocol in one line, printed before any metric."""
    repeats = "ranked like any item (--keep-repeated-targets)" if keep_repeats else "a miss (authors' rule)"
    return (f"protocol: {data['name']}, {len(data['seqs'])} users; validation ranks item l-1, test item l, after the "
            f"{data['max_len'] - 3} items before it; full ranking over all {data['n_items']} items; the user's earlier "
            f"items masked, so a target repeating one is {repeats}; ties count against the target; "
            f"HR@{k}/nDCG@{k} in %, mean over users")


# --- Reporting -------------------------------------------------------------------------------


def format_metrics(m, k=10):
    line = f"HR@{k} {m[f'HR@{k}']:.4f}  nDCG@{k} {m[f'nDCG@{k}']:.4f}"
    groups = "  ".join(f"{g} {m['groups'][g][f'HR@{k}']:.2f}/{m['groups'][g][f'nDCG@{k}']:.2f}" for g in GROUPS)
    return f"{line}  |  HR/nDCG {groups}"


def metric_row(metrics, k=10):
    """A run's metrics JSON -> its test HR@k / nDCG@k overall and per warm / median / cold
    group, flat: {"HR@10": ..., "cold HR@10": ..., ...}."""
    test = metrics["test"]
    row = {f"HR@{k}": test[f"HR@{k}"], f"nDCG@{k}": test[f"nDCG@{k}"]}
    for g in GROUPS:
        row[f"{g} HR@{k}"], row[f"{g} nDCG@{k}"] = (test["groups"][g][m] for m in (f"HR@{k}", f"nDCG@{k}"))
    return row


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def summary_table(table, metrics=("HR@10", "nDCG@10", "cold HR@10"), base=None, star=None, extra=None):
    """Markdown: one line per label of table = {label: [rows]}, each metric as mean ± std
    over the rows (seeds), or the value alone for one row; Impr. of each label's nDCG@10
    over the label `base`; star = (label, p-value) marks that label with ★ when p < 0.05;
    extra = (column name, {label: text}) adds a last column (e.g. the paper's numbers)."""
    head = "| method | seeds | " + " | ".join(metrics) + (" | Impr. nDCG@10 |" if base else " |")
    head += f" {extra[0]} |" if extra else ""
    lines = [head, "|" + "---|" * (len(metrics) + 2 + bool(base) + bool(extra))]
    for label, rs in table.items():
        cells = []
        for metric in metrics:
            m, s = mean_std([r[metric] for r in rs])
            mark = "★" if star and star[0] == label and star[1] < 0.05 else ""
            cells.append((f"{m:.2f} ± {s:.2f}" if len(rs) > 1 else f"{m:.2f}") + mark)
        impr = ""
        if base:
            b, m = (mean_std([r["nDCG@10"] for r in table[x]])[0] for x in (base, label))
            impr = f" {100 * (m / b - 1):+.1f}% |" if b > 0 else " n/a |"
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + " |" + impr
                     + (f" {extra[1].get(label, '')} |" if extra else ""))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint written by pretrain.py, align.py, finetune.py or baselines.py")
    p.add_argument("--table", nargs="+", metavar="LABEL=GLOB[,GLOB]",
                   help="instead of --ckpt: compare the test metrics JSONs of finished runs, e.g. "
                        "SASRec='runs/ml-100k/pretrain_sasrec_seed*.json' PAD='runs/ml-100k/finetune_*_seed*.json'; "
                        "Impr. is over the first label")
    p.add_argument("--text-knn", choices=("last", "mean"),
                   help="instead of --ckpt: the text-similarity floor, every item ranked by the cosine of its frozen "
                        "text embedding to the window's last item or mean (models.TextKNN); needs --data")
    p.add_argument("--blend", metavar="CKPT_B",
                   help="with --ckpt A: score a fixed mixture W * z(A) + (1 - W) * z(B) of the two models' scores, "
                        "each standardised per user (models.Blend, nothing trained): do they carry different signal?")
    p.add_argument("--weight", type=float, default=0.5, help="--blend: the weight W of --ckpt's scores")
    p.add_argument("--data", default=None, help="prepared dataset (dir or name); default: the one the checkpoint names")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="which target to rank (Appendix A)")
    p.add_argument("--k", type=int, default=10, help="cut-off k of HR@k / nDCG@k; paper: 10")
    p.add_argument("--keep-repeated-targets", action="store_true",
                   help="rank a target that repeats an earlier item of the user; default: a miss (authors' rule)")
    p.add_argument("--json", action="store_true", help="print the whole metrics dict (per bucket and group) as JSON")
    p.add_argument("--batch-size", type=int, default=512, help="users ranked at once (bounds memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, one per core)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        table = {}
        for spec in args.table:
            label, _, pattern = spec.partition("=")
            files = sorted(f for part in pattern.split(",") for f in glob.glob(part))
            if not files:
                raise SystemExit(f"--table {spec}: no file matches {pattern!r}; run the phase first")
            table[label] = [metric_row(json.loads(Path(f).read_text()), args.k) for f in files]
        print(summary_table(table, (f"HR@{args.k}", f"nDCG@{args.k}", *(f"{g} HR@{args.k}" for g in GROUPS)),
                            base=next(iter(table))))
        return
    if args.blend and not args.ckpt:
        raise SystemExit("--blend CKPT_B mixes with --ckpt A: pass --ckpt too")
    if not args.ckpt and not (args.text_knn and args.data):
        raise SystemExit("pass --ckpt PATH (a checkpoint), --table LABEL=GLOB ... (finished runs) or "
                         "--text-knn last|mean --data NAME")
    device = parse_device(args.device)
    if args.ckpt:
        ckpt = read_checkpoint(args.ckpt)
        data = load_dataset(args.data or ckpt["args"]["data"])
        model, what = model_from_checkpoint(ckpt, data, args.ckpt).to(device), f"phase {ckpt['phase']} {args.ckpt}"
        if args.blend:
            other = model_from_checkpoint(read_checkpoint(args.blend), data, args.blend).to(device)
            model, what = Blend(model, other, args.weight), f"{args.weight:g} x {args.ckpt} + {1 - args.weight:g} x {args.blend}"
    else:
        data = load_dataset(args.data)
        model, what = TextKNN(data["text_emb"], args.text_knn).to(device), f"text-kNN ({args.text_knn})"
    m = evaluate(model, data, args.split, args.k, args.batch_size, args.keep_repeated_targets)
    if args.json:
        print(json.dumps(m, indent=1))
        return
    print(protocol(data, args.k, args.keep_repeated_targets))
    print(f"{what}, {args.split}: {format_metrics(m, args.k)}")
    print("bucket (1 = warmest)  users  " + f"HR@{args.k}  nDCG@{args.k}")
    for b, row in m["buckets"].items():
        print(f"{b:>20}  {row['users']:5d}  {row[f'HR@{args.k}']:6.2f}  {row[f'nDCG@{args.k}']:7.2f}")


if __name__ == "__main__":
    main()

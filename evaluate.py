"""Full-ranking evaluation of any PAD phase's checkpoint (Sec. 4.1.2, Fig. 2).

    python evaluate.py --ckpt runs/ml-100k/pretrain_sasrec_seed0.pt [--split test] [--k 10]

Protocol (printed at run time): validation predicts item l-1 from the 20 items before
it, test predicts item l; every one of the N items is ranked (no sampled negatives);
items the user interacted with before the target are removed from the ranking, the
target never is; ties count against the target; HR@k and nDCG@k are averaged over all
users and reported in %, overall, per frequency bucket of the target item (1 = warmest
10% of training interactions, B = coldest) and for warm / median / cold targets.
"""
import argparse
import glob
import json
import math
from pathlib import Path

import torch

GROUPS = ("warm", "median", "cold")


# --- Data splits of Appendix A -----------------------------------------------------------


def split_sequences(seqs, split):
    """seqs (U, L+3), left-padded, time order -> the model input and target of a split.

    train: inputs i_1..i_{l-3}, targets every next item up to i_{l-2}   -> (U, L), (U, L)
    valid: the L items before i_{l-1}, target i_{l-1}                   -> (U, L), (U,)
    test:  the L items before i_l,     target i_l                       -> (U, L), (U,)
    """
    L = seqs.shape[1] - 3
    if split == "train":
        return seqs[:, :L], seqs[:, 1:L + 1]
    offset = {"valid": 1, "test": 2}[split]
    return seqs[:, offset:offset + L], seqs[:, offset + L]


def history_before_target(seqs, split):
    """Every item the user interacted with before the split's target, (U, L+1 or L+2)."""
    L = seqs.shape[1] - 3
    return seqs[:, :L + {"valid": 1, "test": 2}[split]]


def bucket_groups(n_buckets):
    """Warm / median / cold as bucket ranges: the warmest 30% of buckets, the middle 40%,
    the coldest 30% (buckets 1-3, 4-7, 8-10 for B = 10)."""
    w, c = round(0.3 * n_buckets), n_buckets - round(0.3 * n_buckets)
    return {"warm": range(1, w + 1), "median": range(w + 1, c + 1), "cold": range(c + 1, n_buckets + 1)}


# --- HR@k and nDCG@k over the full item set ----------------------------------------------


def target_ranks(scores, target, history):
    """0-based rank of each target among all items (B, N+1) -> (B,).

    Padding (id 0) and the user's history are removed from the ranking, the target is
    kept; an item scoring exactly as high as the target counts as ranked above it.
    """
    scores = scores.float()
    s_target = scores.gather(1, target[:, None])  # (B, 1)
    others = scores.scatter(1, history, -math.inf).scatter(1, target[:, None], -math.inf)
    others[:, 0] = -math.inf
    return (others >= s_target).sum(1)  # (B,)


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
def evaluate(model, data, split="test", k=10, batch_size=512):
    """Rank every item for every user of `split` in user chunks of batch_size, so memory
    is O(batch_size x N), never users x items. Returns summarise()'s dict."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs, targets = split_sequences(data["seqs"], split)
    history = history_before_target(data["seqs"], split)
    ranks = []
    for i in range(0, len(inputs), batch_size):
        seq = inputs[i:i + batch_size].to(device, non_blocking=True)
        scores = model.full_scores(seq)  # (b, N+1), float32 even on cuda: bf16 would create ties
        ranks.append(target_ranks(scores, targets[i:i + batch_size].to(device), history[i:i + batch_size].to(device)).cpu())
    model.train(was_training)
    hit, ndcg = hr_ndcg(torch.cat(ranks), k)
    return summarise(hit, ndcg, data["item_bucket"][targets], data["n_buckets"], k)


def protocol(data, split, k):
    L = data["seqs"].shape[1] - 3
    target = {"valid": "item l-1", "test": "item l"}[split]
    return (f"[{split}] {data['name']}: {len(data['seqs'])} users, target {target} after its {L} previous items; "
            f"full ranking over all {data['n_items']} items, earlier items of the user masked (target kept), "
            f"ties count against the target; HR@{k}/nDCG@{k} in %, mean over users")


def format_metrics(m, k=10):
    line = f"HR@{k} {m[f'HR@{k}']:.4f}  nDCG@{k} {m[f'nDCG@{k}']:.4f}"
    groups = "  ".join(f"{g} {m['groups'][g][f'HR@{k}']:.2f}/{m['groups'][g][f'nDCG@{k}']:.2f}" for g in GROUPS)
    return f"{line}  |  HR/nDCG {groups}"


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def comparison_table(runs, k=10):
    """Markdown table of test HR@k / nDCG@k, overall and warm / median / cold, mean ± std
    over seeds, for runs = {label: [metrics JSON paths]}; the last column is the relative
    improvement of the last label over the first (Table 2's "Impr.", Fig. 2)."""
    tests = {label: [json.loads(Path(f).read_text())["test"] for f in files] for label, files in runs.items()}
    labels = list(tests)
    head = "| items | metric | " + " | ".join(f"{lb} (n={len(tests[lb])})" for lb in labels) + " | Impr. |"
    lines = [head, "|" + "---|" * (len(labels) + 3)]
    for group in ("overall", *GROUPS):
        for metric in (f"HR@{k}", f"nDCG@{k}"):
            cells, means = [], []
            for lb in labels:
                m, s = mean_std([(t if group == "overall" else t["groups"][group])[metric] for t in tests[lb]])
                cells.append(f"{m:.2f} ± {s:.2f}")
                means.append(m)
            impr = f"{100 * (means[-1] / means[0] - 1):+.1f}%" if means[0] > 0 else "n/a"
            lines.append(f"| {group} | {metric} | " + " | ".join(cells) + f" | {impr} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint written by pretrain.py, align.py or finetune.py")
    p.add_argument("--table", nargs="+", metavar="LABEL=GLOB[,GLOB]",
                   help="instead of --ckpt: compare the test metrics JSONs of finished runs, e.g. "
                        "SASRec='runs/ml-100k/pretrain_sasrec_seed*.json' PAD='runs/ml-100k/finetune_*_seed*.json'")
    p.add_argument("--data", default=None, help="prepared dataset (dir or name); default: the one the checkpoint names")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="which target to rank (Appendix A)")
    p.add_argument("--k", type=int, default=10, help="cut-off k of HR@k / nDCG@k; paper: 10")
    p.add_argument("--batch-size", type=int, default=512, help="users ranked at once (bounds memory)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    if args.table:
        runs = {}
        for spec in args.table:
            label, _, pattern = spec.partition("=")
            files = sorted(f for part in pattern.split(",") for f in glob.glob(part))
            if not files:
                raise SystemExit(f"--table {spec}: no file matches {pattern!r}; run the phase first")
            runs[label] = files
        print(comparison_table(runs, args.k))
        return
    if not args.ckpt:
        raise SystemExit("pass --ckpt PATH (a checkpoint) or --table LABEL=GLOB ... (finished runs)")

    from models import model_from_checkpoint, read_checkpoint
    from prepare_data import load_dataset
    from pretrain import resolve_device

    device = resolve_device(args.device)
    ckpt = read_checkpoint(args.ckpt)
    data = load_dataset(args.data or ckpt["args"]["data"])
    model = model_from_checkpoint(ckpt, data, args.ckpt)
    print(protocol(data, args.split, args.k))
    m = evaluate(model.to(device), data, args.split, args.k, args.batch_size)
    print(f"phase {ckpt['phase']} {args.ckpt}: {format_metrics(m, args.k)}")
    print(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()

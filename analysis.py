"""Sec. 4.3: how far an embedding space moved, as Kendall's tau between the embedding
distances of behaviour-target pairs under two tables (Eq. 13, Fig. 6).

    python analysis.py --kendall runs/ml-100k/pretrain_sasrec_seed0.pt text          # ID vs text distances
    python analysis.py --kendall runs/ml-100k/pretrain_sasrec_seed0.pt runs/ml-100k/align_..._seed0.pt

Each table is 'text' (the frozen text table) or CKPT.pt[:STATE_KEY] (default: the
checkpoint's collaborative ID table h^c; phase 2 and 3: the alignment expert's).
"""
import argparse
import math

import torch

from dataset import load_dataset
from runs import check_checkpoint, read_checkpoint


def kendall_tau(a, b, chunk=1024):
    """Eq. (13): KT = (#concordant - #discordant) / #pairs over all pairs of samples j < k;
    a pair is concordant when a and b order it the same way, discordant when they order it
    oppositely. a, b: (n,) -> float. Exact, O(n^2) comparisons in chunks of rows.

    DEVIATION: #pairs counts, per variable, only the pairs it does not tie and takes the
    geometric mean (tau-b, scipy's default): the same item pair recurs in many sequences,
    and with ties in #pairs (tau-a, as printed) a table compared with itself scores < 1."""
    a, b = a.double(), b.double()
    s = n_a = n_b = 0.0
    for i in range(0, len(a), chunk):
        sa, sb = torch.sign(a[i:i + chunk, None] - a), torch.sign(b[i:i + chunk, None] - b)  # (c, n)
        s, n_a, n_b = s + (sa * sb).sum().item(), n_a + sa.abs().sum().item(), n_b + sb.abs().sum().item()
    return s / math.sqrt(n_a * n_b) if n_a and n_b else float("nan")


def behaviour_target_pairs(seqs):
    """Sec. 4.3: every (behaviour item, target item) pair of the training part of each
    sequence, behaviour before target: e.g. {i1, i2, i3} gives (i1, i2), (i1, i3), (i2, i3).
    Returns two (P,) tensors of item ids."""
    train = seqs[:, :-2]  # (U, L+1) items 1..l-2
    s, t = torch.triu_indices(train.shape[1], train.shape[1], offset=1)  # position s < t
    behaviour, target = train[:, s], train[:, t]  # (U, P_u)
    real = (behaviour != 0) & (target != 0)
    return behaviour[real], target[real]


def embedding_kendall_tau(e_a, e_b, seqs, item_bucket, n_buckets, max_pairs=5000, seed=0):
    """Fig. 6: for each bucket b of the target item, Kendall's tau (Eq. 13) between the
    Euclidean distances of behaviour-target pairs under two embedding tables, e_a (N+1, d_a)
    and e_b (N+1, d_b); the sizes may differ (e.g. a 128-d ID table and a 384-d text table).
    At most max_pairs pairs per bucket, sampled with a fixed seed. Returns {b: tau}."""
    behaviour, target = behaviour_target_pairs(seqs)
    gen = torch.Generator().manual_seed(seed)
    taus = {}
    for b in range(1, n_buckets + 1):
        idx = (item_bucket[target] == b).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)[:max_pairs]]
        d_a = (e_a[behaviour[idx]].double() - e_a[target[idx]].double()).norm(dim=1)  # (P_b,)
        d_b = (e_b[behaviour[idx]].double() - e_b[target[idx]].double()).norm(dim=1)
        taus[b] = kendall_tau(d_a, d_b) if len(idx) > 1 else float("nan")
    return taus


ID_TABLES = ("items.h_c.weight", "items.id.h_c.weight", "experts.align.items.id.h_c.weight", "experts.id.items.h_c.weight")


def embedding_table(spec, data):
    """'text' -> the dataset's frozen text table; 'CKPT.pt[:KEY]' -> a table of a checkpoint's
    state, by default its collaborative ID table h^c (phase 1: the ID expert's, phase 2 and
    3: the alignment expert's)."""
    if spec == "text":
        return data["text_emb"].float()
    path, _, key = spec.partition(":")
    ckpt = read_checkpoint(path)
    check_checkpoint(ckpt, data, path)
    key = key or next((k for k in ID_TABLES if k in ckpt["state"]), None)
    if key not in ckpt["state"]:
        raise SystemExit(f"--kendall {spec}: no table {key!r} in {path}; pass PATH:KEY with one of "
                         f"{', '.join(k for k in ckpt['state'] if k.endswith('weight'))}")
    return ckpt["state"][key].float()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kendall", nargs=2, metavar="TABLE", required=True,
                   help="Kendall's tau (Eq. 13) per target bucket between two embedding tables, each 'text' (the "
                        "frozen text table) or CKPT.pt[:STATE_KEY] (default: its collaborative ID table)")
    p.add_argument("--max-pairs", type=int, default=5000, help="behaviour-target pairs sampled per bucket")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--data", default=None, help="prepared dataset (dir or name); default: the one the checkpoint names")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpts = [spec.partition(":")[0] for spec in args.kendall if spec != "text"]
    if not ckpts and not args.data:
        raise SystemExit("--kendall text text needs --data")
    data = load_dataset(args.data or read_checkpoint(ckpts[0])["args"]["data"])
    e_a, e_b = (embedding_table(spec, data) for spec in args.kendall)
    taus = embedding_kendall_tau(e_a, e_b, data["seqs"], data["item_bucket"], data["n_buckets"], args.max_pairs)
    print(f"Kendall's tau (Eq. 13) of behaviour-target Euclidean distances, {args.kendall[0]} vs {args.kendall[1]}, "
          f"training pairs of {data['name']}, at most {args.max_pairs} per bucket of the target (1 = warmest)")
    print("bucket " + " ".join(f"{b:>6}" for b in taus))
    print("tau    " + " ".join(f"{t:6.3f}" for t in taus.values()))


if __name__ == "__main__":
    main()

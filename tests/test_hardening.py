"""Fault injection: each test breaks one thing on purpose and checks that the
program says what and where in one line, exits != 0, never runs pickled code and never
loses a finished epoch.

Training runs are real subprocesses of the phase scripts, chained on their checkpoints,
on a tiny dataset built here with prepare_data's own functions (random text table, no
encoder). Faults that need a process to die at an exact point run a script's main() in a
child (CHILD below) with one function monkeypatched: torch.save writes half a file and
waits for our SIGKILL, or bce_loss returns NaN at a chosen batch. The data protocol's
properties are checked with hypothesis on random interaction logs.
"""
import gzip
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dataset
import prepare_data
from dataset import atomic_save, load_dataset, split_sequences
from prepare_data import PrepareError
from runs import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
U, N_ITEMS, BATCH = 40, 60, 16
TRAIN = ["--epochs", "3", "--quiet", "--batch-size", str(BATCH)]
MODEL = ["--d", "16", "--n-blocks", "1"]
SCRIPTS = ("pretrain", "align", "finetune")

# A phase script's main() with one fault injected: python -c CHILD MODE N SCRIPT flags...
CHILD = r"""
import importlib, io, sys, time
import torch
import trainer
mode, n, script, calls = sys.argv[1], int(sys.argv[2]), sys.argv[3], [0]
if mode == "half-save":  # the n-th torch.save writes half its bytes, then waits to be killed
    save = torch.save
    def half_save(obj, f):
        calls[0] += 1
        if calls[0] < n:
            return save(obj, f)
        buf = io.BytesIO()
        save(obj, buf)
        f.write(buf.getvalue()[:buf.tell() // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(300)
    torch.save = half_save
elif mode == "nan-loss":  # the n-th mini-batch's BCE is NaN
    bce = trainer.bce_loss
    def nan_bce(*a):
        calls[0] += 1
        return bce(*a) * (float("nan") if calls[0] == n else 1.0)
    trainer.bce_loss = nan_bce
sys.argv = [f"{script}.py", *sys.argv[4:]]
importlib.import_module(script).main()
"""


def run(*args, ok=True):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def refused(r, *needles):
    """Exit code != 0, one line on stderr that says why, no traceback."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def one_line_exit(call, *needles):
    """In-process variant of refused(): call() raises SystemExit with one line naming needles."""
    with pytest.raises(SystemExit) as e:
        call()
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def metrics(out):
    """The metrics JSON without wall-clock times, which no two runs share."""
    m = json.loads(Path(out).with_suffix(".json").read_text())
    m.pop("eval_seconds")
    for row in m["epochs"]:
        row.pop("seconds")
    return m


def make_dataset(folder, users=U, seed=0):
    """A prepared dataset through prepare_data's own protocol functions, random text table."""
    rng = random.Random(seed)
    log = [(str(u), str(rng.randint(1, 10) if rng.random() < 0.5 else rng.randint(1, N_ITEMS)), 1000 * u + t)
           for u in range(1, users + 1) for t in range(rng.randint(5, 30))]
    user, _ = prepare_data.factorize([u for u, _, _ in log])
    item, raw = prepare_data.factorize([i for _, i, _ in log])
    seqs, stats = prepare_data.build_sequences(user, item, np.array([t for *_, t in log], dtype=float), 5, 23)
    seqs, raw_index = prepare_data.remap_items(seqs, len(raw))
    seqs, n = torch.from_numpy(seqs), len(raw_index)
    freq = dataset.item_frequency(seqs, n)
    text_emb = torch.randn(n + 1, 32, generator=torch.Generator().manual_seed(seed))
    text_emb[0] = 0
    data = {"name": Path(folder).name, "seqs": seqs, "max_len": 23, "n_items": n, "item_freq": freq,
            "item_bucket": dataset.frequency_buckets(freq, 10), "n_buckets": 10, "text_emb": text_emb,
            "titles": [""] + [f"item {raw[k]}" for k in raw_index], "raw_ids": [""] + [raw[k] for k in raw_index],
            "encoder": {"name": "random"}, "stats": stats, "fingerprint": dataset.fingerprint(seqs, n)}
    atomic_save(data, Path(folder) / "dataset.pt")
    return Path(folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def data(work):
    return make_dataset(work / "tiny")


def flags(script, data, work):
    """The script's flags for the tiny runs; align and finetune start from the full runs."""
    full = work / "full"
    chain = {"pretrain": MODEL, "align": ["--init", full / "pretrain.pt", "--mmd-sample", "64"],  # random MMD subset too
             "finetune": ["--pretrain", full / "pretrain.pt", "--align", full / "align.pt"]}
    return ["--data", data, *TRAIN, *chain[script]]


@pytest.fixture(scope="module")
def full(work, data):
    """Uninterrupted 3-epoch runs of the three phases, chained: {script: checkpoint path}."""
    for script in SCRIPTS:
        run(f"{script}.py", *flags(script, data, work), "--out", work / "full" / f"{script}.pt")
    return {script: work / "full" / f"{script}.pt" for script in SCRIPTS}


@pytest.fixture(scope="module")
def killed(work, data, full):
    """The same runs, SIGKILLed while epoch 2's state is half written: {script: --out path}."""
    outs = {}
    for script in SCRIPTS:
        outs[script] = out = work / "killed" / f"{script}.pt"
        p = subprocess.Popen([sys.executable, "-c", CHILD, "half-save", "2", script, *flags(script, data, work),
                              "--out", out], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # reading the pipe has no timeout of its own: a child that hangs before "half written" is
        # killed by the watchdog, and the test fails on the missing line instead of hanging
        watchdog = threading.Timer(300, p.kill)
        watchdog.start()
        seen = []
        try:
            for line in p.stdout:
                seen.append(line)
                if "half written" in line:  # stderr shares the pipe: the line need not start with it
                    os.kill(p.pid, signal.SIGKILL)
                    break
        finally:
            watchdog.cancel()
        assert seen and "half written" in seen[-1], "".join(seen)[-3000:]  # not the watchdog's kill
        assert p.wait(timeout=60) == -signal.SIGKILL, "".join(seen)[-3000:]
        p.stdout.close()
    return outs


def copy_state(killed, folder):
    """A private copy of a killed run's OUT.last.pt, as OUT.last.pt of folder/NAME.pt."""
    folder.mkdir()
    shutil.copy(killed.with_suffix(".last.pt"), folder / f"{killed.stem}.last.pt")
    return folder / killed.name


# --- Determinism, atomic writes, resume -------------------------------------------------------


def test_same_seed_same_data_same_metrics(tmp_path, work, data, full):
    out = tmp_path / "again.pt"
    run("pretrain.py", *flags("pretrain", data, work), "--out", out)
    assert metrics(out) == metrics(full["pretrain"])
    assert not out.with_suffix(".last.pt").exists()  # removed when the run finishes
    assert sorted(p.name for p in (work / "full").iterdir()) == sorted(f"{s}.{e}" for s in SCRIPTS for e in ("pt", "json"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_mid_save_keeps_the_previous_state(killed, script):
    out = killed[script]
    files = sorted(p.name for p in out.parent.iterdir() if p.name.startswith((script, f".{script}")))
    assert files[1:] == [f"{script}.last.pt"], files  # no final checkpoint, no JSON
    state = torch.load(out.with_suffix(".last.pt"), weights_only=True)  # epoch 1's, intact
    assert state["epoch"] == 1 and len(state["log"]) == 1
    half = out.parent / files[0]  # the temporary file that was never renamed
    assert half.name.startswith(f".{script}.last.pt.") and half.name.endswith(".tmp")
    one_line_exit(lambda: read_checkpoint(half), half.name, "not a readable PAD checkpoint")


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, work, data, full, killed, script):
    out = copy_state(killed[script], tmp_path / "resumed")
    r = run(f"{script}.py", *flags(script, data, work), "--out", out, "--resume")
    assert f"resumed from {out.with_suffix('.last.pt')} after epoch 1" in r.stdout
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("epoch")] == ["2", "3"]
    assert metrics(out) == metrics(full[script])
    assert not out.with_suffix(".last.pt").exists()


def test_resume_refuses_other_flags_data_or_no_state(tmp_path, work, data, killed):
    out = copy_state(killed["pretrain"], tmp_path / "refused")
    pretrain = flags("pretrain", data, work)
    r = run("pretrain.py", *pretrain, "--lr", "0.01", "--out", out, "--resume", ok=False)
    refused(r, str(out.with_suffix(".last.pt")), "--lr 0.001 (now 0.01)", "run without --resume")
    other = make_dataset(tmp_path / "other", users=U - 1)
    r = run("pretrain.py", *pretrain, "--data", other, "--out", out, "--resume", ok=False)
    refused(r, str(out.with_suffix(".last.pt")), "fingerprint", "pass that --data")
    r = run("pretrain.py", *pretrain, "--out", tmp_path / "never.pt", "--resume", ok=False)
    refused(r, "never.last.pt not found", "run without --resume")


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_last_state(tmp_path, work, data):
    out = tmp_path / "nan.pt"
    batches = math.ceil(U / BATCH)
    r = run("-c", CHILD, "nan-loss", batches + 2, "pretrain", *flags("pretrain", data, work), "--out", out, ok=False)
    refused(r, f"non-finite loss nan at epoch 2, batch 2 of {batches}", f"the state after epoch 1 is kept in {out.with_suffix('.last.pt')}")
    state = torch.load(out.with_suffix(".last.pt"), weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["state"].values())
    assert not out.exists()


def test_diverging_lr_stops_at_first_nonfinite_batch(tmp_path, work, data):
    r = run("pretrain.py", *flags("pretrain", data, work), "--lr", "1e30", "--out", tmp_path / "big.pt", ok=False)
    refused(r, "non-finite loss", f"at epoch 1, batch 2 of {math.ceil(U / BATCH)}", "lower --lr", "no epoch finished")


# --- Nothing pickled is executed ------------------------------------------------------------


class Payload:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = {"phase": 1, "model_args": {}, "state": {}, "fingerprint": "x", "payload": Payload(marker)}
    torch.save(ckpt, tmp_path / "pretrain.pt")
    contents = {k: 0 for k in dataset.CONTRACT_KEYS} | {"payload": Payload(marker)}
    torch.save(contents, tmp_path / "dataset.pt")
    one_line_exit(lambda: read_checkpoint(tmp_path / "pretrain.pt"), "pretrain.pt", "not a readable PAD checkpoint")
    one_line_exit(lambda: load_dataset(tmp_path / "dataset.pt"), "dataset.pt is unreadable", "prepare_data.py")
    assert not marker.exists()
    torch.load(tmp_path / "dataset.pt", weights_only=False)  # control: a plain unpickler runs the payload
    assert marker.exists()


# --- Bad input: one line naming the file and the fix, before any training ---------------------


def test_non_utf8_text_names_the_file(tmp_path):
    raw = tmp_path / "toy"
    raw.mkdir()
    (raw / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                   + "".join(f"1\t{i}\t{i}\n" for i in range(1, 6)))
    (raw / "toy.item").write_bytes("item_id:token\ttitle:token_seq\n1\tAmélie\n".encode("latin-1"))
    one_line_exit(lambda: prepare_data.main(["--data", f"recbole:{raw}", "--out", str(tmp_path / "o")]),
                  f"{raw / 'toy.item'}: not utf-8 text", "convert it")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_truncated_or_corrupt_gzip_names_the_file(tmp_path, damage):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "Prime_Pantry.csv").write_text("".join(f"B{i:03d},A{u},5.0,{i}\n" for u in range(3) for i in range(1, 8)))
    meta = raw / "meta_Prime_Pantry.json.gz"
    with gzip.open(meta, "wt") as f:
        f.writelines(json.dumps({"asin": f"B{i:03d}", "title": f"pantry item {i} " * 20}) + "\n" for i in range(1, 400))
    good = meta.read_bytes()
    meta.write_bytes(good[:len(good) // 2] if damage == "truncated" else b"{not gzip at all}\n")
    one_line_exit(lambda: prepare_data.main(["--data", "pantry", "--raw-dir", str(raw), "--out", str(tmp_path / "o")]),
                  f"{meta}: truncated or corrupt gzip file", "download it again")


@pytest.mark.parametrize("fault,needle", [
    ("text table one row short", f"text_emb has {N_ITEMS} rows for {N_ITEMS} items (expected {N_ITEMS + 1})"),
    ("NaN text rows", "text_emb holds NaN or infinite values"),
    ("item id beyond N", f"seqs holds item ids outside 0..{N_ITEMS}"),
])
def test_inconsistent_dataset_is_refused_at_load(tmp_path, data, fault, needle):
    d = torch.load(data / "dataset.pt", weights_only=True)
    assert d["n_items"] == N_ITEMS
    if fault == "text table one row short":
        d["text_emb"] = d["text_emb"][:-1]
    elif fault == "NaN text rows":
        d["text_emb"][5:8] = float("nan")
    else:
        d["seqs"][0, -1] = N_ITEMS + 1
    atomic_save(d, tmp_path / "bad" / "dataset.pt")
    r = run("align.py", "--data", tmp_path / "bad", "--epochs", "1", "--out", tmp_path / "unused.pt", ok=False)
    refused(r, f"dataset file {tmp_path / 'bad' / 'dataset.pt'} is inconsistent", needle, "python prepare_data.py")


# --- Properties of the data protocol (Appendix A) on random interaction logs -------------------


@st.composite
def interaction_logs(draw):
    """(user, item, timestamp) rows: up to 8 users with 0-40 interactions each over 30 items
    and 6 timestamps (many ties), in a random file order."""
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=8))
    log = [(u, draw(st.integers(0, 29)), draw(st.integers(0, 5))) for u, n in enumerate(sizes) for _ in range(n)]
    return draw(st.permutations(log))


# derandomize: the same 40 logs on every run, so a failure reproduces and no run fails by the draw;
# database=None: no .hypothesis/ folder replays an earlier run's failures; deadline=None: the time an
# example takes on a busy CPU is not a property of the protocol
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(log=interaction_logs(), n_buckets=st.integers(1, 10))
def test_protocol_properties_on_random_logs(log, n_buckets):
    user, users = prepare_data.factorize([str(u) for u, _, _ in log])
    item, raw = prepare_data.factorize([str(i) for _, i, _ in log])
    t = np.array([float(x) for *_, x in log])
    counts = Counter(u for u, _, _ in log)
    if max(counts.values(), default=0) < 5:
        with pytest.raises(PrepareError, match="--min-interactions"):
            prepare_data.build_sequences(user, item, t, 5, 23)
        return
    seqs, _ = prepare_data.build_sequences(user, item, t, 5, 23)
    seqs, raw_index = prepare_data.remap_items(seqs, len(raw))
    seqs, n = torch.from_numpy(seqs), len(raw_index)

    # plain-loop reference: users with >= 5 interactions, their latest 23 items by (time, file order)
    expected = [[str(i) for _, _, i in sorted((x, k, i) for k, (v, i, x) in enumerate(log) if v == int(u))][-23:]
                for u in users if counts[int(u)] >= 5]
    got = [[raw[raw_index[i - 1]] for i in row if i] for row in seqs.tolist()]
    assert got == expected
    assert seqs.shape[1] == 23 and all(5 <= len(row) <= 23 for row in got)
    real = seqs > 0
    assert torch.equal(real, real.cummax(1).values)  # left-padded: no padding after an item
    assert set(seqs[real].tolist()) == set(range(1, n + 1))  # every id 1..N is used

    # no leak: training is items 1..l-2 only, and the frequency counts exactly those
    train_in, train_pos = split_sequences(seqs, "train")
    assert torch.equal(train_in, seqs[:, :-3]) and torch.equal(train_pos, seqs[:, 1:-2])
    freq = dataset.item_frequency(seqs, n)  # (N+1,)
    train_counts = Counter(i for row in expected for i in row[:-2])  # valid and test targets left out
    assert freq[0] == 0 and {raw[raw_index[i - 1]]: int(freq[i]) for i in range(1, n + 1) if freq[i]} == train_counts

    # buckets partition the items: each item has one b(i) in 1..B, warm to cold, each bucket
    # holding under 1/B of the training interactions plus its coldest counted item
    bucket = dataset.frequency_buckets(freq, n_buckets)  # (N+1,)
    assert bucket[0] == 0 and ((bucket[1:] >= 1) & (bucket[1:] <= n_buckets)).all()
    for b in range(1, n_buckets + 1):
        f, colder = freq[1:][bucket[1:] == b], freq[1:][bucket[1:] > b]
        if len(f) and len(colder):
            assert f.min() >= colder.max()
        if (f > 0).any():
            assert f.sum() < freq.sum() / n_buckets + f[f > 0].min()
    assert (bucket[1:][freq[1:] == 0] == n_buckets).all()  # items unseen in training are coldest

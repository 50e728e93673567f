"""Learning tests: the phase scripts must learn a signal planted in tiny data, so that a wrong
target, a loss that does not reach the weights or an optimiser that does not step fails here
(the other end-to-end tests only check that the scripts run and chain their files).

The data: every user walks a fixed random cycle over the N items from a random start, so the
next item is a function of the last one (and no item repeats within a user, so no target is a
miss by the repeated-target rule); the text table places each item on a circle by its position
in the cycle. A random ranking scores HR@10 of about 10/N; the trained recommender nearly 100%.
A recommender trained on wrong targets still learns the cycle's neighbourhood (trained on the
item two ahead, SASRec puts the next item second: HR@10 80-90%), so phase 3 and make run are
also held to nDCG@10 > 80 (the next item at rank 1 scores 100, at rank 2 63).

    pretrain.py   test HR@10 far above random and above the same run with --lr 0
    align.py      validation nDCG@10 and HR@10 above its own start (the same run with --lr 0:
                  phase 1's ID table and encoder, a new f_MLP and fusion layer); test HR@10 far
                  above random; the MK-MMD goes down
    finetune.py   validation and test nDCG@10 above its own start (--lr 0: phases 1-2's experts,
                  a new LLM expert, a uniform gate), test nDCG@10 > 80
    make run      the Makefile's path on the same data, in a copy of the repository's files:
                  the dataset is not prepared again, the phases chain, the table shows SASRec
                  and PAD with their runs' metrics, nDCG@10 > 80

Models are tiny (d = 16, one block, 3 epochs at lr 1e-2; make run: the default model for two
epochs at lr 3e-3, since the Makefile passes the same FLAGS to every phase and align.py and
finetune.py take no --d): about a minute on one core.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dataset import atomic_save, fingerprint, frequency_buckets, item_frequency  # noqa: E402
from synthetic import make_dataset  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):  # under `make test`: no outer make's variables
    ENV.pop(key, None)
U, N, NAME = 300, 100, "learntest"
RANDOM_HR = 100 * 10 / N  # HR@10 (%) of a random ranking, about (10 / (N - history) with the history masked)
TRAIN = ["--batch-size", "32", "--eval-batch-size", "128", "--quiet"]
FAST = ["--lr", "1e-2", *TRAIN]


def run(script, *args):
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{script} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def metrics(path):
    return json.loads(Path(path).with_suffix(".json").read_text())


def cycle_dataset(name=NAME, users=U, items=N, seed=0):
    """The dataset.pt contract (benchmarks/synthetic.py's keys) with a planted signal: user u
    holds 8-12 consecutive items of one random cycle over the items; frequency, buckets and
    fingerprint recomputed by dataset.py's functions."""
    data = make_dataset(name, users, items, users * 10, d_text=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(items, generator=g) + 1  # (N,) item ids in cycle order
    seqs = torch.zeros(users, data["max_len"], dtype=torch.long)  # (U, 23), left-padded
    for u in range(users):
        length, start = int(torch.randint(8, 13, (1,), generator=g)), int(torch.randint(0, items, (1,), generator=g))
        seqs[u, -length:] = cycle[(start + torch.arange(length)) % items]
    angle = torch.zeros(items + 1)
    angle[cycle] = 2 * math.pi * torch.arange(items) / items  # each item's place on the cycle
    text = torch.cat([torch.cos(k * angle[:, None]) for k in range(1, 9)] +
                     [torch.sin(k * angle[:, None]) for k in range(1, 9)], 1)  # (N+1, 16)
    text[0] = 0
    freq = item_frequency(seqs, items)
    data.update(seqs=seqs, item_freq=freq, item_bucket=frequency_buckets(freq, data["n_buckets"]), text_emb=text,
                fingerprint=fingerprint(seqs, items),
                stats={"dataset": name, "users": users, "items": items, "interactions": int((seqs > 0).sum())})
    return data


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("learn")


@pytest.fixture(scope="module")
def dataset(work):
    out = work / NAME
    atomic_save(cycle_dataset(), out / "dataset.pt")
    return out


@pytest.fixture(scope="module")
def phase1(work, dataset):
    """pretrain.py trained (3 epochs) and with --lr 0 (its random start): (trained, start) paths."""
    paths = work / "pretrain.pt", work / "pretrain_lr0.pt"
    run("pretrain.py", "--data", dataset, "--d", 16, "--n-blocks", 1, "--epochs", 3, *FAST, "--out", paths[0])
    run("pretrain.py", "--data", dataset, "--d", 16, "--n-blocks", 1, "--epochs", 1, *TRAIN, "--lr", 0,
        "--out", paths[1])
    return paths


@pytest.fixture(scope="module")
def phase2(work, dataset, phase1):
    """align.py (its defaults: Gaussian MK-MMD, rec anchor) from the trained phase 1, trained
    (3 epochs) and with --lr 0: (trained, start) paths."""
    paths = work / "align.pt", work / "align_lr0.pt"
    run("align.py", "--data", dataset, "--init", phase1[0], "--epochs", 3, *FAST, "--out", paths[0])
    run("align.py", "--data", dataset, "--init", phase1[0], "--epochs", 1, *TRAIN, "--lr", 0, "--out", paths[1])
    return paths


def test_pretrain_learns_the_planted_signal(phase1):
    trained, start = (metrics(p) for p in phase1)
    assert start["epochs"][0]["valid_HR@10"] == start["valid"]["HR@10"]  # lr 0: the start, as evaluated
    assert start["test"]["HR@10"] < 3 * RANDOM_HR, start["test"]
    assert trained["test"]["HR@10"] > 6 * RANDOM_HR, trained["epochs"]
    assert trained["test"]["HR@10"] > start["test"]["HR@10"] + 40, (trained["test"], start["test"])
    assert trained["test"]["nDCG@10"] > start["test"]["nDCG@10"] + 25
    bce = [row["bce"] for row in trained["epochs"]]
    assert bce[-1] < bce[0], bce  # the training loss goes down


def test_align_beats_its_start(phase2):
    trained, start = (metrics(p) for p in phase2)
    assert trained["valid"]["nDCG@10"] > start["valid"]["nDCG@10"] + 15, (trained["epochs"], start["valid"])
    assert trained["valid"]["HR@10"] > start["valid"]["HR@10"] + 15
    assert trained["test"]["HR@10"] > 6 * RANDOM_HR
    mmd = [row["gaussian"] for row in trained["epochs"]]
    assert mmd[-1] < mmd[0], mmd  # the MK-MMD of Eq. (4) goes down as it is trained on


def test_finetune_beats_its_start(work, dataset, phase1, phase2):
    paths = work / "finetune.pt", work / "finetune_lr0.pt"
    common = ["--data", dataset, "--pretrain", phase1[0], "--align", phase2[0]]
    run("finetune.py", *common, "--epochs", 3, *FAST, "--out", paths[0])
    run("finetune.py", *common, "--epochs", 1, *TRAIN, "--lr", 0, "--out", paths[1])
    trained, start = (metrics(p) for p in paths)
    assert trained["valid"]["nDCG@10"] > start["valid"]["nDCG@10"] + 10, (trained["epochs"], start["valid"])
    assert trained["test"]["nDCG@10"] > start["test"]["nDCG@10"] + 10
    assert trained["test"]["nDCG@10"] > 80, trained["test"]  # the next item first: see the module docstring


@pytest.mark.skipif(shutil.which("make") is None, reason="no `make` on this machine")
@pytest.mark.parametrize("preset", ["none", "recipe"])
def test_make_run_on_the_tiny_data(tmp_path, dataset, preset):
    """`make run DATA=learntest [PRESET=recipe]` in a copy of the repository's scripts (nothing
    under the real data/ or runs/ is touched): data/learntest/ holds the dataset and the prepare
    flags make writes, so prepare_data.py is not run; the install step is marked done and BIN is
    this interpreter's folder. FLAGS is the Makefile's own (--data --device --preset --threads)
    with short training: the Makefile has no variable for extra phase flags. PRESET=recipe also
    trains the CE MoRec run and fits the gate of its experts (with the text-kNN one) on validation."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for f in [*ROOT.glob("*.py"), ROOT / "Makefile", ROOT / "requirements.txt"]:
        shutil.copy(f, copy / f.name)
    (copy / ".venv").mkdir()
    (copy / ".venv" / ".installed").touch()  # newer than the copied requirements.txt: no install
    data = copy / "data" / NAME
    data.mkdir(parents=True)
    (data / "prepare.flags").write_text(f"{NAME} \n")  # what the Makefile writes for DATA=NAME, PREPARE empty
    shutil.copy(dataset / "dataset.pt", data / "dataset.pt")
    later = (data / "prepare.flags").stat().st_mtime + 10
    os.utime(data / "dataset.pt", (later, later))  # newer than its flags: up to date
    before = (data / "dataset.pt").read_bytes()
    flags = f"--data {NAME} --device cpu --preset {preset} --threads 1 --epochs 2 --batch-size 32 --lr 3e-3 --quiet"
    r = subprocess.run(["make", "-C", str(copy), "run", f"DATA={NAME}", f"PRESET={preset}",
                        f"BIN={Path(sys.executable).parent}", f"FLAGS={flags}"], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"make run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "prepare_data.py" not in r.stdout and (data / "dataset.pt").read_bytes() == before
    runs = copy / "runs" / NAME
    tag = "" if preset == "none" else "_text-std-l0_ce_recipe"
    p1 = runs / ("pretrain_sasrec_seed0.pt" if preset == "none" else "pretrain_sasrec_ce_recipe_seed0.pt")
    p2 = runs / f"align_sasrec_gaussian_rec_gamma0.1{tag}_seed0.pt"
    p3 = runs / ("finetune_sasrec_freq_id-align-llm_gaussian_rec_gamma0.1_seed0.pt" if preset == "none" else
                 f"finetune_sasrec_freq-validonly_id-align-llm-text_gaussian_rec_gamma0.1_llm-morec{tag}_seed0.pt")
    morec = runs / f"baseline_morec_sasrec{tag}_seed0.pt"
    m1, m2, m3 = (metrics(p) for p in (p1, p2, p3))
    assert m2["init"] == str(p1.relative_to(copy))  # each phase starts from the one before
    assert m3["init"] == {"id": str(p1.relative_to(copy)), "align": str(p2.relative_to(copy)),
                          **({"llm": str(morec.relative_to(copy))} if preset == "recipe" else {})}
    assert (m3["epochs"] == []) == (preset == "recipe")  # the recipe fits the gate alone, on validation
    table = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines() if line.startswith("| ")]
    rows = {row[0]: row for row in table[1:]}
    labels = ("SASRec", "PAD") if preset == "none" else ("SASRec (CE)", "PAD (recipe)")
    for label, m in zip(labels, (m1, m3)):
        assert rows[label][2:4] == [f"{m['test']['HR@10']:.2f}", f"{m['test']['nDCG@10']:.2f}"], rows
        assert m["test"]["nDCG@10"] > 80, (label, m["epochs"])  # the next item first

"""End-to-end tests of the phase scripts through subprocess, chaining the real .pt files:
prepare_data.py (a tiny RecBole atomic fixture, MiniLM text) -> pretrain.py (every backbone)
-> align.py (every kernel and anchor) -> finetune.py (every gate, expert subsets), with
evaluate.py on the checkpoints, the checkpoint refusals and the command-line errors.

The dataset is made by the real prepare_data.py (about 5 s with MiniLM on 60 titles); a
second dataset for the "another dataset" refusals is derived from it by dropping one user,
with a new name and fingerprint, and saved with atomic_save.
Every model is tiny (d = 16, one block, one epoch) so the file runs in about two minutes.
"""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models import BACKBONES  # noqa: E402
from dataset import atomic_save, fingerprint  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TRAIN = ["--epochs", "1", "--quiet", "--batch-size", "16", "--eval-batch-size", "7"]  # 40 users: uneven chunks
MODEL = ["--d", "16", "--n-blocks", "1"]
U, N_ITEMS = 40, 60


def run(script, *args, ok=True):
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, f"{script} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def refused(r, *needles):
    """Exit code != 0, one line on stderr that says why, no traceback."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def check_metrics(m, users, n_buckets=10):
    assert m["users"] == users
    for key in ("HR@10", "nDCG@10"):
        assert 0 <= m[key] <= 100
    assert m["nDCG@10"] <= m["HR@10"] + 1e-9
    assert sorted(int(b) for b in m["buckets"]) == list(range(1, n_buckets + 1))
    assert sum(b["users"] for b in m["buckets"].values()) == users
    assert set(m["groups"]) == {"warm", "median", "cold"}
    assert sum(g["users"] for g in m["groups"].values()) == users


def log_row(stdout):
    rows = [line for line in stdout.splitlines() if re.match(r"epoch\s+1\s", line)]
    assert len(rows) == 1, stdout
    return rows[0]


# --- Fixtures: dataset, phase-1 and phase-2 checkpoints (module-scoped, built once) -------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pad")


@pytest.fixture(scope="module")
def dataset(work):
    """Tiny RecBole atomic dataset through the real prepare_data.py."""
    raw = work / "raw" / "tiny"
    raw.mkdir(parents=True)
    rng = random.Random(0)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(1, U + 1):
        for t in range(rng.randint(5, 30)):
            item = rng.randint(1, 10) if rng.random() < 0.5 else rng.randint(1, N_ITEMS)  # popular head
            lines.append(f"{u}\t{item}\t{1000 * u + t}")
    (raw / "tiny.inter").write_text("\n".join(lines) + "\n")
    titles = ["item_id:token\tmovie_title:token_seq"] + [f"{i}\tmovie number {i} about topic {i % 7}"
                                                           for i in range(1, N_ITEMS + 1)]
    (raw / "tiny.item").write_text("\n".join(titles) + "\n")
    out = work / "tiny"
    run("prepare_data.py", "--data", f"recbole:{raw}", "--out", out, "--encoder", "minilm", "--device", "cpu")
    data = load(out / "dataset.pt")
    assert data["seqs"].shape == (U, 23) and data["n_items"] == N_ITEMS
    assert data["item_bucket"].max() == data["n_buckets"] == 10  # every bucket present
    return out


@pytest.fixture(scope="module")
def other_dataset(work, dataset):
    """Another dataset (one user fewer): new name and fingerprint, same items and text."""
    data = load(dataset / "dataset.pt")
    data["seqs"] = data["seqs"][:-1].clone()
    data["name"] = "other"
    data["fingerprint"] = fingerprint(data["seqs"], data["n_items"])
    out = work / "other"
    atomic_save(data, out / "dataset.pt")
    return out


@pytest.fixture(scope="module")
def phase1(work, dataset):
    """pretrain.py for every backbone: {backbone: (checkpoint path, stdout)}."""
    out = {}
    for backbone in BACKBONES:
        path = work / f"pretrain_{backbone}.pt"
        r = run("pretrain.py", "--data", dataset, "--backbone", backbone, *MODEL, *TRAIN, "--out", path)
        out[backbone] = path, r.stdout
    return out


@pytest.fixture(scope="module")
def phase2(work, dataset, phase1):
    """align.py with its defaults (the paper's Gaussian kernel and rec anchor; gamma 0.1, which the paper does not
    give) from the SASRec phase 1."""
    path = work / "align_sasrec.pt"
    r = run("align.py", "--data", dataset, "--init", phase1["sasrec"][0], *TRAIN, "--out", path)
    return path, r.stdout


@pytest.fixture(scope="module")
def phase3(work, dataset, phase1, phase2):
    """finetune.py with its defaults (Eq. (11)'s frequency gate, all three experts)."""
    path = work / "finetune_sasrec.pt"
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2[0],
            *TRAIN, "--out", path)
    return path, r.stdout


# --- Phase 1 + evaluate.py ---------------------------------------------------------------


def evaluate_cli(*args):
    """evaluate.py's readable summary (protocol, overall and per bucket), then its --json dict."""
    r = run("evaluate.py", *args)
    assert "full ranking over all 60 items" in r.stdout and "ties count against the target" in r.stdout
    assert "a target repeating one is a miss" in r.stdout and len(r.stdout.splitlines()) == 3 + 10
    return json.loads(run("evaluate.py", *args, "--json").stdout)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pretrain_then_evaluate(backbone, phase1, dataset):
    path, stdout = phase1[backbone]
    assert re.search(r"bce \d+\.\d+\s+valid HR@10 [\d.]+ nDCG@10 [\d.]+", log_row(stdout))
    assert "full ranking over all 60 items" in stdout
    ckpt = load(path)  # self-describing, loadable without pickle
    data = load(dataset / "dataset.pt")
    assert ckpt["phase"] == 1 and ckpt["fingerprint"] == data["fingerprint"] and ckpt["n_items"] == N_ITEMS
    assert ckpt["model_args"]["backbone"] == backbone and ckpt["model_args"]["expert"] == "id"
    assert ckpt["dataset"] == "tiny" and ckpt["model_args"]["d"] == 16
    metrics = json.loads(path.with_suffix(".json").read_text())  # beside the checkpoint
    assert metrics["phase"] == 1 and len(metrics["epochs"]) == 1 and metrics["best_epoch"] == 1
    check_metrics(metrics["test"], U)
    check_metrics(metrics["valid"], U)
    m = evaluate_cli("--ckpt", path)  # the dataset is found from the checkpoint's args
    check_metrics(m, U)
    for key in ("HR@10", "nDCG@10"):
        assert m[key] == pytest.approx(metrics["test"][key], abs=1e-4)
        for g in ("warm", "median", "cold"):
            assert m["groups"][g][key] == pytest.approx(metrics["test"]["groups"][g][key], nan_ok=True, abs=1e-4)
    valid = evaluate_cli("--ckpt", path, "--split", "valid", "--batch-size", "3")
    assert valid["HR@10"] == pytest.approx(metrics["valid"]["HR@10"], abs=1e-4)


def test_epochs_0_tests_the_starting_weights_through_every_phase(work, dataset):
    """--epochs 0 trains nothing: the checkpoint holds the starting weights (the seed's init, or
    the previous phase's), best_epoch is 0 and the written metrics are those weights' ranking."""
    zero = [*MODEL, "--epochs", "0", "--quiet", "--seed", "3"]
    paths = [work / f"epochs0_{k}.pt" for k in (1, 2)]
    for path in paths:
        run("pretrain.py", "--data", dataset, *zero, "--out", path)
    first, again = (load(p)["state"] for p in paths)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    metrics = json.loads(paths[0].with_suffix(".json").read_text())
    assert metrics["epochs"] == [] and metrics["best_epoch"] == 0
    assert evaluate_cli("--ckpt", paths[0])["nDCG@10"] == pytest.approx(metrics["test"]["nDCG@10"], abs=1e-4)
    aligned = work / "epochs0_align.pt"
    run("align.py", "--data", dataset, "--init", paths[0], *zero[4:], "--out", aligned)
    assert torch.equal(load(aligned)["state"]["items.id.h_c.weight"], first["items.h_c.weight"])
    assert json.loads(aligned.with_suffix(".json").read_text())["best_epoch"] == 0
    final = work / "epochs0_finetune.pt"
    run("finetune.py", "--data", dataset, "--pretrain", paths[0], "--align", aligned, *zero[4:], "--out", final)
    assert json.loads(final.with_suffix(".json").read_text())["best_epoch"] == 0


# --- Phase 2 -----------------------------------------------------------------------------


def check_align(path, stdout, kernel, anchor):
    row = log_row(stdout)
    assert re.search(rf"\b{kernel} -?\d+\.\d+", row), row  # the alignment term is logged
    assert re.search(r"\bbce \d+\.\d+", row), row  # logged for every anchor, trained on unless "none"
    ckpt = load(path)
    assert ckpt["phase"] == 2 and ckpt["model_args"]["expert"] == "align"
    assert not any("h_text" in k for k in ckpt["state"])  # the frozen text table is not copied
    metrics = json.loads(path.with_suffix(".json").read_text())
    check_metrics(metrics["test"], U)
    assert torch.isfinite(torch.tensor(metrics["epochs"][0][kernel]))


def test_align_default(phase2):
    path, stdout = phase2
    assert "kernel gaussian, anchor rec, gamma 0.1" in stdout
    check_align(path, stdout, "gaussian", "rec")


@pytest.mark.parametrize("kernel,anchor,gamma", [
    ("laplacian", "rec", "0.1"), ("linear", "rec", "0.1"), ("cosine", "rec", "0.1"), ("infonce", "rec", "0.1"),
    ("gaussian", "none", "0.1"), ("gaussian", "frozen", "0.1"), ("gaussian", "rec", "0"),
])
def test_align_variants(kernel, anchor, gamma, work, dataset, phase1):
    path = work / f"align_{kernel}_{anchor}_{gamma}.pt"
    r = run("align.py", "--data", dataset, "--init", phase1["sasrec"][0], "--kernel", kernel, "--anchor", anchor,
            "--gamma", gamma, *TRAIN, "--out", path)
    check_align(path, r.stdout, kernel, anchor)


@pytest.fixture(scope="module")
def phase1_d8(work, dataset):
    path = work / "pretrain_sasrec_d8.pt"
    run("pretrain.py", "--data", dataset, "--backbone", "sasrec", "--d", "8", "--n-blocks", "1", *TRAIN, "--out", path)
    return path


@pytest.fixture(scope="module")
def phase2_d8(work, dataset, phase1_d8):
    """align.py with learning rate 0: its checkpoint must hold phase 1's ID table and encoder."""
    path = work / "align_sasrec_d8_lr0.pt"
    run("align.py", "--data", dataset, "--init", phase1_d8, "--lr", "0", *TRAIN, "--out", path)
    return path


def test_align_starts_from_phase1(phase1_d8, phase2_d8):
    p1, p2 = load(phase1_d8)["state"], load(phase2_d8)["state"]
    assert torch.equal(p2["items.id.h_c.weight"], p1["items.h_c.weight"])
    encoder = [k for k in p1 if k.startswith("encoder.")]
    assert encoder and all(torch.equal(p2[k], p1[k]) for k in encoder)
    assert any(k.startswith("items.f_mlp.") for k in p2) and any(k.startswith("items.fuse.") for k in p2)


def test_align_without_any_loss_is_refused(work, dataset, phase1):
    r = run("align.py", "--data", dataset, "--init", phase1["sasrec"][0], "--anchor", "none", "--gamma", "0",
            *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, "--anchor none", "--gamma 0")


def test_align_refuses_other_dataset_and_backbone(work, dataset, other_dataset, phase1):
    p1 = str(phase1["sasrec"][0])
    r = run("align.py", "--data", other_dataset, "--init", p1, *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, p1, "'tiny'", "'other'")
    r = run("align.py", "--data", dataset, "--backbone", "gru4rec", "--init", p1, *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, p1, "backbone 'sasrec', not 'gru4rec'")


# --- Phase 3 -----------------------------------------------------------------------------


def check_finetune(path, stdout, experts, gate):
    assert "mean gate probability per target bucket" in stdout
    ckpt = load(path)
    assert ckpt["phase"] == 3 and ckpt["model_args"]["kind"] == "pad"
    assert ckpt["model_args"]["experts"] == experts and ckpt["model_args"]["gate"] == gate
    assert not any("h_text" in k for k in ckpt["state"])
    metrics = json.loads(path.with_suffix(".json").read_text())
    check_metrics(metrics["test"], U)
    rows = metrics["gate_per_bucket"]
    assert sorted(int(b) for b in rows) == list(range(1, 11))
    for row in rows.values():
        assert list(row) == experts
        assert all(p > 0 for p in row.values()) and sum(row.values()) == pytest.approx(1, abs=1e-5)
    return metrics


def test_finetune_default(phase3):
    check_finetune(*phase3, ["id", "align", "llm"], "freq")


@pytest.mark.parametrize("gate,experts", [
    ("bucket", "id,align,llm"), ("none", "id,align,llm"), ("freq", "id,llm"), ("freq", "llm"), ("bucket", "llm,id"),
])
def test_finetune_gates_and_experts(gate, experts, work, dataset, phase1, phase2):
    path = work / f"finetune_{gate}_{experts}.pt"
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2[0],
            "--gate", gate, "--experts", experts, *TRAIN, "--out", path)
    canonical = [e for e in ("id", "align", "llm") if e in experts.split(",")]
    check_finetune(path, r.stdout, canonical, gate)


def test_finetune_starts_from_phase1_and_phase2(work, dataset, phase1, phase2):
    path = work / "finetune_lr0.pt"
    run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2[0], "--lr", "0",
        *TRAIN, "--out", path)
    p1, p2, p3 = load(phase1["sasrec"][0])["state"], load(phase2[0])["state"], load(path)["state"]
    assert all(torch.equal(p3[f"experts.id.{k}"], v) for k, v in p1.items())
    assert all(torch.equal(p3[f"experts.align.{k}"], v) for k, v in p2.items())
    assert any(k.startswith("experts.llm.items.mlp.") for k in p3)  # a new LLM expert


def test_evaluate_phase3_and_table(phase1, phase3):
    path, _ = phase3
    m = evaluate_cli("--ckpt", path)
    metrics = json.loads(path.with_suffix(".json").read_text())
    check_metrics(m, U)
    assert m["HR@10"] == pytest.approx(metrics["test"]["HR@10"], abs=1e-4)
    assert m["nDCG@10"] == pytest.approx(metrics["test"]["nDCG@10"], abs=1e-4)
    r = run("evaluate.py", "--table", f"SASRec={phase1['sasrec'][0].with_suffix('.json')}",
            f"PAD={path.with_suffix('.json')}")
    head, _, sasrec, pad = r.stdout.strip().splitlines()
    assert head == "| method | seeds | HR@10 | nDCG@10 | warm HR@10 | median HR@10 | cold HR@10 | Impr. nDCG@10 |"
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip("|").split("|")] for line in (sasrec, pad))}
    tests = {label: json.loads(p.with_suffix(".json").read_text())["test"] for label, p in
             (("SASRec", phase1["sasrec"][0]), ("PAD", path))}
    for label, test in tests.items():  # one seed: the value alone, no spread
        assert cells[label][:3] == ["1", f"{test['HR@10']:.2f}", f"{test['nDCG@10']:.2f}"]
        assert cells[label][5] == f"{test['groups']['cold']['HR@10']:.2f}"
    assert cells["PAD"][-1] == f"{100 * (tests['PAD']['nDCG@10'] / tests['SASRec']['nDCG@10'] - 1):+.1f}%"
    # --blend: weight 1 ranks as --ckpt alone; a refusal without --ckpt
    blended = json.loads(run("evaluate.py", "--ckpt", path, "--blend", phase1["sasrec"][0], "--weight", "1", "--json").stdout)
    assert blended["HR@10"] == pytest.approx(m["HR@10"], abs=1e-4) and blended["nDCG@10"] == pytest.approx(m["nDCG@10"], abs=1e-4)
    refused(run("evaluate.py", "--blend", path, ok=False), "--blend", "--ckpt")


def test_finetune_refuses_other_backbone(work, dataset, phase1, phase2):
    p1 = str(phase1["gru4rec"][0])
    r = run("finetune.py", "--data", dataset, "--backbone", "sasrec", "--pretrain", p1, "--align", phase2[0],
            *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, p1, "backbone 'gru4rec', not 'sasrec'")


def test_finetune_refuses_other_dataset(work, dataset, other_dataset, phase1, phase2):
    path = work / "pretrain_other.pt"
    run("pretrain.py", "--data", other_dataset, *MODEL, *TRAIN, "--out", path)  # a valid phase 1 on 'other'
    r = run("finetune.py", "--data", other_dataset, "--pretrain", path, "--align", phase2[0], *TRAIN,
            "--out", work / "unused.pt", ok=False)
    refused(r, str(phase2[0]), "'tiny'", "'other'")  # the phase-2 file comes from 'tiny'
    r = run("finetune.py", "--data", dataset, "--pretrain", path, "--align", phase2[0], *TRAIN,
            "--out", work / "unused.pt", ok=False)
    refused(r, str(path), "'other'", "'tiny'")  # the phase-1 file comes from 'other'
    r = run("evaluate.py", "--ckpt", path, "--data", dataset, ok=False)
    refused(r, str(path), "'other'", "'tiny'")


def test_finetune_refuses_wrong_phase(work, dataset, phase1):
    p1 = str(phase1["sasrec"][0])
    r = run("finetune.py", "--data", dataset, "--pretrain", p1, "--align", p1, *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, p1, "phase-1 checkpoint", "phase-2")


def test_finetune_without_id_expert_still_checks_phase1(dataset, phase1, phase2, work):
    p1 = str(phase1["gru4rec"][0])
    r = run("finetune.py", "--data", dataset, "--backbone", "sasrec", "--experts", "llm", "--pretrain", p1,
            "--align", phase2[0], *TRAIN, "--out", work / "finetune_llm_wrong.pt", ok=False)
    refused(r, p1, "gru4rec")


def test_finetune_refuses_mismatched_phase2_cleanly(dataset, phase1, phase2_d8, work):
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2_d8, *TRAIN,
            "--out", work / "finetune_mismatch.pt", ok=False)
    refused(r, str(phase2_d8))


# --- Command-line errors -----------------------------------------------------------------


@pytest.mark.parametrize("script,args,needle", [
    ("pretrain.py", ["--backbone", "bert4rec"], "invalid choice: 'bert4rec'"),
    ("align.py", ["--kernel", "rbf"], "invalid choice: 'rbf'"),
    ("align.py", ["--anchor", "soft"], "invalid choice: 'soft'"),
    ("finetune.py", ["--gate", "moe"], "invalid choice: 'moe'"),
    ("finetune.py", ["--backbone", "bert4rec"], "invalid choice: 'bert4rec'"),
    ("finetune.py", ["--experts", "id,bert"], "comma-separated subset"),
    ("evaluate.py", ["--split", "train"], "invalid choice: 'train'"),
])
def test_unknown_choices_exit_nonzero(script, args, needle):
    r = run(script, *args, ok=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["pretrain.py", "align.py", "finetune.py", "evaluate.py"])
def test_device_cuda_without_cuda(script, work, dataset, phase1):
    args = ["--ckpt", phase1["sasrec"][0]] if script == "evaluate.py" else ["--data", dataset, *TRAIN, "--out", work / "unused.pt"]
    r = run(script, *args, "--device", "cuda", ok=False)
    refused(r, "CUDA is not available")


def test_analysis_kendall_cli_refuses_a_missing_table(dataset, phase1, phase2):
    """analysis.py --kendall names the missing key and the tables there are (its values are
    checked against scipy in test_analysis.py)."""
    p1, p2 = phase1["sasrec"][0], phase2[0]
    r = run("analysis.py", "--kendall", p2, f"{p1}:no.such.key", "--data", dataset, ok=False)
    refused(r, "no.such.key", "items.h_c.weight")


def test_serve_recommend_cli(dataset, phase3):
    """serve.py --recommend: a header, the history echoed with its titles, then the top-k
    with labelled columns, history excluded."""
    data = load(Path(dataset) / "dataset.pt")
    history = data["raw_ids"][1:4]
    r = run("serve.py", "--ckpt", phase3[0], "--recommend", ",".join(history), "--k", "5", "--data", dataset)
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"{phase3[0]} (phase 3, tiny): top 5 after a history of 3 items")
    assert lines[1] == "history (oldest first):"
    assert [line.split(None, 1) for line in lines[2:5]] == [[raw, data["titles"][i]] for i, raw in enumerate(history, 1)]
    assert lines[5].split() == ["rank", "raw", "id", "score", "title"]
    rows = lines[6:]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
    assert not any(row.split()[1] in history for row in rows)
    refused(run("serve.py", "--ckpt", phase3[0], "--recommend", "no-such-id", "--data", dataset, ok=False), "no-such-id")


# --- Run names: finished runs are reused, never silently replaced ----------------------------


def test_smem_recipe_leaves_pad_intact_and_finished_runs_are_guarded(tmp_path, dataset):
    """The README's recipes with default output names (runs/NAME/ under the working folder):
    PAD, then SMEM (align.py --gamma 0, finetune.py --align on it) writes a second run and
    leaves PAD's checkpoint byte for byte; a rerun with the same flags reuses the finished
    run; other flags are refused, naming them; --overwrite retrains."""
    import hashlib

    def go(script, *args, ok=True):
        r = subprocess.run([sys.executable, ROOT / script, "--data", dataset, *map(str, args), *TRAIN],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        if ok:
            assert r.returncode == 0, f"{script} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    runs = tmp_path / "runs" / "tiny"
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    go("pretrain.py", *MODEL)
    go("align.py")
    go("finetune.py")
    pad = runs / "finetune_sasrec_freq_id-align-llm_gaussian_rec_gamma0.1_seed0.pt"
    before = digest(pad)
    go("align.py", "--gamma", "0")
    go("finetune.py", "--align", "runs/tiny/align_sasrec_gaussian_rec_gamma0_seed0.pt")
    smem = runs / "finetune_sasrec_freq_id-align-llm_gaussian_rec_gamma0_seed0.pt"
    assert digest(pad) == before and smem.is_file()
    assert json.loads(smem.with_suffix(".json").read_text())["init"]["align"].endswith("_gamma0_seed0.pt")
    r = go("finetune.py")  # the same flags: reused, not retrained
    assert "reusing finished run" in r.stdout and "epoch" not in r.stdout and digest(pad) == before
    refused(go("finetune.py", "--lr", "0.01", ok=False), str(pad.relative_to(tmp_path)), "--lr 0.001 (now 0.01)", "--overwrite")
    assert digest(pad) == before
    r = go("finetune.py", "--lr", "0.01", "--overwrite")
    assert re.search(r"epoch\s+1\s", r.stdout) and load(pad)["args"]["lr"] == 0.01


def test_loss_ce_through_every_phase(work, dataset):
    """--loss ce (full softmax over all items) trains each phase; default names carry _ce, so
    a CE pipeline never meets a BCE one."""
    from runs import run_path

    assert run_path("tiny", "pretrain", backbone="sasrec", seed=0, loss="ce").name == "pretrain_sasrec_ce_seed0.pt"
    assert run_path("tiny", "pretrain", backbone="sasrec", seed=0).name == "pretrain_sasrec_seed0.pt"
    p1, p2, p3 = (work / f"ce_phase{i}.pt" for i in (1, 2, 3))
    r1 = run("pretrain.py", "--data", dataset, "--loss", "ce", *MODEL, *TRAIN, "--out", p1)
    r2 = run("align.py", "--data", dataset, "--loss", "ce", "--init", p1, *TRAIN, "--out", p2)
    r3 = run("finetune.py", "--data", dataset, "--loss", "ce", "--pretrain", p1, "--align", p2, *TRAIN, "--out", p3)
    for r, path in ((r1, p1), (r2, p2), (r3, p3)):
        assert re.search(r"\bce \d+\.\d+", log_row(r.stdout)), r.stdout
        metrics = json.loads(path.with_suffix(".json").read_text())
        check_metrics(metrics["test"], U)
        assert "ce" in metrics["epochs"][0] and load(path)["args"]["loss"] == "ce"


def test_preset_authors_sets_its_flags_and_a_flag_given_wins(work, dataset):
    """--preset authors: the authors' release's settings as defaults, each also a flag; a flag
    given on the command line overrides the preset; every phase runs with it (MMD rows of the
    whole batch, fusion dropout, ramp-initialised bucket gate, last epoch tested)."""
    p1, p2, p3 = (work / f"authors_phase{i}.pt" for i in (1, 2, 3))
    two = ["--epochs", "2", "--quiet"]
    run("pretrain.py", "--data", dataset, "--preset", "authors", "--lr", "2e-3", *MODEL, *two, "--out", p1)
    run("align.py", "--data", dataset, "--preset", "authors", "--init", p1, *two, "--out", p2)
    run("finetune.py", "--data", dataset, "--preset", "authors", "--pretrain", p1, "--align", p2, *two, "--out", p3)
    a1, a2, a3 = (load(p) for p in (p1, p2, p3))
    assert a1["args"]["lr"] == 2e-3 and a1["args"]["stop_metric"] == "hr" and a1["args"]["patience"] == 20
    assert a1["args"]["batch_size"] == a2["args"]["batch_size"] == a3["args"]["batch_size"] == 16
    assert a1["model_args"]["block"] == "authors" and a3["model_args"]["block"] == "authors"
    assert a2["args"]["lr"] == 1e-5 and a2["args"]["gamma"] == 0.2 and a2["args"]["mmd_rows"] == "batch"
    assert a2["model_args"]["fuse_dropout"] == 0.1 and a3["model_args"]["fuse_dropout"] == 0.1
    assert a3["args"]["lr"] == 1e-4 and a3["model_args"]["gate"] == "bucket" and a3["model_args"]["gate_init"] == "ramp"
    for ckpt in (a1, a2, a3):  # --test-epoch last: the weights tested score on validation as epoch 2 logged them
        m = ckpt["metrics"]
        assert m["tested_epoch"] == 2 and len(m["epochs"]) == 2
        assert (m["valid"]["HR@10"], m["valid"]["nDCG@10"]) == (m["epochs"][-1]["valid_HR@10"], m["epochs"][-1]["valid_nDCG@10"])
    # the gate starts from the authors' ramp: with lr 0, phase 3 keeps it (AdamW moves nothing)
    from models import ramp_logits

    start = work / "authors_phase3_lr0.pt"
    run("finetune.py", "--data", dataset, "--preset", "authors", "--pretrain", p1, "--align", p2, "--lr", "0",
        "--epochs", "1", "--quiet", "--out", start)
    assert torch.equal(load(start)["state"]["gate.v.weight"], ramp_logits(["id", "align", "llm"], 10))
    assert not torch.equal(a3["state"]["gate.v.weight"], ramp_logits(["id", "align", "llm"], 10))  # trained, it moved


@pytest.mark.parametrize("script", ["pretrain", "baselines", "align", "finetune"])
def test_preset_recipe_sets_its_flags_and_a_flag_given_wins(script, monkeypatch):
    """--preset recipe: each script's parsed flags carry trainer.PRESETS["recipe"]'s values
    for it (parsed as the flag parses them), and a flag given on the command line wins."""
    import importlib

    from trainer import PRESETS

    module = importlib.import_module(script)
    want = {**PRESETS["recipe"]["all"], **PRESETS["recipe"].get(script, {})}
    base = [f"{script}.py", "--preset", "recipe", *(["--method", "morec"] if script == "baselines" else [])]
    monkeypatch.setattr(sys, "argv", base)
    args = vars(module.flags())
    parsed = {"experts": lambda v: v.split(",")}
    assert {k: args[k] for k in want} == {k: parsed.get(k, lambda v: v)(v) for k, v in want.items()}
    assert args["loss"] == "ce" and (script != "finetune" or args["experts"] == ["id", "align", "llm", "text"])
    given = ["--loss", "bce", *(["--experts", "id,align,llm", "--gate-fit", "valid"] if script == "finetune" else [])]
    monkeypatch.setattr(sys, "argv", base + given)
    args = vars(module.flags())
    assert args["loss"] == "bce" and args["preset"] == "recipe"
    if script == "finetune":
        assert (args["experts"], args["gate_fit"], args["llm_init"]) == (["id", "align", "llm"], "valid", "morec")
    if script != "pretrain":
        assert (args["text_norm"], args["text_layers"]) == ("standard", 0)  # the preset's, not given


def test_text_norm_flows_from_phase_2_and_a_mismatch_is_refused(work, dataset, phase1):
    p2, p3 = work / "align_std.pt", work / "finetune_std.pt"
    run("align.py", "--data", dataset, "--init", phase1["sasrec"][0], "--text-norm", "standard", *TRAIN, "--out", p2)
    run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, *TRAIN, "--out", p3)
    assert load(p2)["model_args"]["text_norm"] == load(p3)["model_args"]["text_norm"] == "standard"
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, "--text-norm", "none",
            *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, str(p2), "--text-norm standard")


def test_a_flag_an_older_run_did_not_record_is_a_difference():
    """A run made before a flag existed is not reused under it (its value is not guessed),
    unless ADDED_LATER records the value the code ran with before the flag; a flag free to
    differ (SAME_RUN_FREE) never counts."""
    from runs import SAME_RUN_FREE, flag_diff

    older = {"lr": 1e-3, "seed": 0}  # made before --text-norm existed
    assert flag_diff(older, {"lr": 1e-3, "seed": 0, "text_norm": "none"}, ()) == ["--text-norm (not recorded) (now none)"]
    assert flag_diff({**older, "text_norm": "none"}, {"lr": 1e-3, "seed": 0, "text_norm": "standard"}, ()) == \
        ["--text-norm none (now standard)"]
    assert flag_diff(older, {**older, "threads": 2}, SAME_RUN_FREE) == []
    assert flag_diff(older, {**older, "logit_adjust": 0, "bucket_temp": False}, ()) == []  # off before they existed
    assert flag_diff(older, {**older, "logit_adjust": "valid"}, ()) == ["--logit-adjust 0 (now valid)"]


def test_text_layers_shape_f_mlp_and_flow_from_phase_2(work, dataset, phase1):
    p2, p3 = work / "align_l0.pt", work / "finetune_l0.pt"
    run("align.py", "--data", dataset, "--init", phase1["sasrec"][0], "--text-layers", "0", *TRAIN, "--out", p2)
    run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, *TRAIN, "--out", p3)
    state = load(p3)["state"]
    for expert in ("align.items.f_mlp", "llm.items"):  # one linear layer (and its GELU) in both text experts
        assert sorted(k for k in state if k.startswith(f"experts.{expert}.mlp.")) == \
            [f"experts.{expert}.mlp.0.bias", f"experts.{expert}.mlp.0.weight"]
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, "--text-layers", "4",
            *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, str(p2), "--text-layers 0")


def test_llm_init_seeds_the_llm_expert_and_text_flags_flow(work, dataset, phase1):
    """finetune.py --llm-init: the LLM expert starts from a MoRec run (checked: with lr 0 it
    stays that run's weights); --text-out and the other text flags flow from phase 2, and a
    MoRec run that reads the text otherwise is refused in one line."""
    from runs import DEFAULT_ALIGN, align_tag, run_path

    named = dict(backbone="sasrec", gate="freq", experts=["id", "align", "llm"], align=align_tag(**DEFAULT_ALIGN), seed=0)
    assert run_path("t", "finetune", **named, llm_init=True).name == \
        "finetune_sasrec_freq_id-align-llm_gaussian_rec_gamma0.1_llm-morec_seed0.pt"
    assert "llm-morec" not in run_path("t", "finetune", **named).name
    text_named = run_path("t", "baseline", method="morec", backbone="sasrec", seed=0, loss="ce",
                          text={"text_norm": "standard", "text_layers": 0, "text_out": None})
    assert text_named.name == "baseline_morec_sasrec_text-std-l0_ce_seed0.pt"  # the authors' f_MLP leaves no tag
    assert run_path("t", "align", **DEFAULT_ALIGN, backbone="sasrec", seed=0,
                    text={"text_norm": "none", "text_layers": 4, "text_out": "gelu"}).name == "align_sasrec_gaussian_rec_gamma0.1_seed0.pt"
    text = ["--text-layers", "0", "--text-out", "linear"]
    morec, p2 = work / "morec_lin.pt", work / "align_lin.pt"
    run("baselines.py", "--data", dataset, "--method", "morec", *MODEL, *text, *TRAIN, "--out", morec)
    run("align.py", "--data", dataset, "--init", phase1["sasrec"][0], *text, *TRAIN, "--out", p2)
    p3 = work / "finetune_llm_init.pt"
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, "--llm-init", morec,
            "--lr", "0", *TRAIN, "--out", p3)
    assert str(morec) in r.stdout
    seeded, got = load(morec)["state"], load(p3)
    assert got["model_args"]["text_out"] == "linear" and got["metrics"]["init"]["llm"] == str(morec)
    for key, value in seeded.items():
        assert torch.equal(got["state"][f"experts.llm.{key}"], value), key
    assert "experts.llm.items.mlp.1.weight" not in got["state"]  # one linear layer, no activation after it
    # trained (default lr), the LLM expert's scores move away from the MoRec run's it started from
    moved = work / "finetune_llm_moved.pt"
    run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, "--llm-init", morec,
        *TRAIN, "--out", moved)
    from dataset import load_dataset, split_sequences
    from runs import model_from_checkpoint, read_checkpoint

    data = load_dataset(dataset)
    seq, _ = split_sequences(data["seqs"], "test")
    with torch.no_grad():
        start = model_from_checkpoint(read_checkpoint(morec), data, morec).eval().full_scores(seq)
        end = model_from_checkpoint(read_checkpoint(moved), data, moved).eval().experts["llm"].full_scores(seq)
    assert (end - start)[:, 1:].abs().max() > 1e-3
    gelu = work / "morec_gelu.pt"
    run("baselines.py", "--data", dataset, "--method", "morec", *MODEL, "--text-layers", "0", *TRAIN, "--out", gelu)
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, "--llm-init", gelu,
            *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, str(gelu), "--text-out gelu")
    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", p2, "--llm-init", morec,
            "--experts", "id,align", *TRAIN, "--out", work / "unused.pt", ok=False)
    refused(r, "--llm-init", "leaves out")


def test_gate_fit_valid_refits_only_the_gate(work, dataset, phase1, phase2):
    """--gate-fit valid: the same training as the default (experts equal bit for bit), then
    the gate alone is refit on the validation targets, lowering their cross-entropy."""
    base, refit = work / "finetune_gate_train.pt", work / "finetune_gate_valid.pt"
    common = ["--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2[0], "--epochs", "1",
              "--batch-size", "16", "--eval-batch-size", "7"]
    run("finetune.py", *common, "--quiet", "--out", base)
    r = run("finetune.py", *common, "--gate-fit", "valid", "--gate-fit-epochs", "4", "--out", refit)
    ce = [float(x) for x in re.findall(r"gate fit on validation, pass \d+: bce ([0-9.]+)", r.stdout)]
    assert len(ce) == 4 and ce[-1] < ce[0], r.stdout[-2000:]
    a, b = load(base)["state"], load(refit)["state"]
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key])
        assert same != key.startswith("gate."), key  # experts untouched, every gate tensor moved
    assert load(refit)["args"]["gate_fit"] == "valid"


def test_expert_lr_aux_weight_bucket_bias_and_temp(work, dataset, phase1, phase2):
    """Phase-3 flags beyond the paper: --expert-lr 0 keeps the ID and alignment experts their
    phase-1 / phase-2 tensors bit for bit while the gate, the --bucket-bias and --user-bias
    offsets and the --bucket-temp temperatures learn; --aux-weight logs each expert's own loss;
    the checkpoint carries the three flags, and evaluate.py ranks it as the run did."""
    from dataset import load_dataset
    from runs import model_from_checkpoint, read_checkpoint

    r = run("finetune.py", "--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2[0], "--epochs", "1",
            "--batch-size", "16", "--eval-batch-size", "7", "--expert-lr", "0", "--aux-weight", "0.5", "--bucket-bias",
            "--bucket-temp", "--user-bias", "--out", work / "finetune_expert_lr0.pt")
    out = work / "finetune_expert_lr0.pt"
    assert re.search(r"^epoch +1 .*id-bce [0-9.]+ .*llm-bce [0-9.]+", r.stdout, re.M), r.stdout[-2000:]
    got, data = load(out), load_dataset(dataset)
    for kind, phase, path in (("id", 1, phase1["sasrec"][0]), ("align", 2, phase2[0])):
        seeded = model_from_checkpoint(read_checkpoint(path), data, path, phase=phase).state_dict()
        for key, value in seeded.items():
            assert torch.equal(got["state"][f"experts.{kind}.{key}"], value), (kind, key)
    learnt = {k: v for k, v in got["state"].items() if k.startswith(("gate.", "user_bias.")) or k in ("bias", "log_temp")}
    assert {"bias", "log_temp", "user_bias.weight", "user_bias.bias"} <= learnt.keys()
    assert all(v.abs().sum() > 0 for v in learnt.values())  # all start at zeros
    assert got["model_args"]["bucket_bias"] and got["model_args"]["bucket_temp"] and got["model_args"]["user_bias"]
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert evaluate_cli("--ckpt", out)["nDCG@10"] == pytest.approx(metrics["test"]["nDCG@10"], abs=1e-4)


def test_mix_prob_gate_fit_and_its_refusals(work, dataset):
    """finetune.py --mix prob (the experts' distributions mixed): refused with BCE or chunked CE,
    in one line; with CE and the gate fit on validation it runs and stores the mix, and
    evaluate.py ranks the checkpoint as the run did."""
    p1, p2 = work / "mix_phase1.pt", work / "mix_phase2.pt"
    run("pretrain.py", "--data", dataset, "--loss", "ce", *MODEL, *TRAIN, "--out", p1)
    run("align.py", "--data", dataset, "--loss", "ce", "--init", p1, *TRAIN, "--out", p2)
    common = ["--data", dataset, "--pretrain", p1, "--align", p2, "--experts", "id,align,text", "--mix", "prob",
              "--gate-fit", "valid-only", "--gate-fit-epochs", "2", "--eval-batch-size", "7"]
    refused(run("finetune.py", *common, "--out", work / "unused.pt", ok=False), "--mix prob", "--loss ce")
    refused(run("finetune.py", *common, "--loss", "ce", "--ce-chunk", "16", "--out", work / "unused.pt", ok=False),
            "--mix prob", "--ce-chunk")
    path = work / "mix_prob.pt"
    run("finetune.py", *common, "--loss", "ce", "--out", path)
    ckpt, metrics = load(path), json.loads(path.with_suffix(".json").read_text())
    assert ckpt["model_args"]["mix"] == "prob" and metrics["best_epoch"] == 0
    assert ckpt["state"]["log_sharpness"].abs().min() > 0  # each expert's sharpness fit with the gate, from 0
    assert evaluate_cli("--ckpt", path)["nDCG@10"] == pytest.approx(metrics["test"]["nDCG@10"], abs=1e-4)


def test_logit_adjust_valid_end_to_end(work, dataset, phase1, phase2):
    """finetune.py --logit-adjust valid: refused without a gate fit on validation and for a
    negative tau, in one line; with --gate-fit valid-only the run keeps a tau of the grid, the
    one with the highest cross-fitted validation nDCG@10 in its JSON (with the tau each fold was
    ranked under), and evaluate.py ranks
    the checkpoint under that tau as the run did; valid-1se and valid-cold pick from the same
    cross-fitted curves by their own rules."""
    from gate_fit import ADJUST_TAUS
    from runs import adjust_tag

    common = ["--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2[0], "--experts", "id,align,text",
              "--gate-fit-epochs", "2", "--eval-batch-size", "7"]
    refused(run("finetune.py", *common, "--logit-adjust", "valid", *TRAIN, "--out", work / "unused.pt", ok=False),
            "--logit-adjust valid", "--gate-fit valid")
    r = run("finetune.py", *common, "--logit-adjust", "-1", "--out", work / "unused.pt", ok=False)  # argparse's usage line
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--logit-adjust '-1': a number >= 0" in r.stderr
    path = work / "finetune_lavalid.pt"
    r = run("finetune.py", *common, "--gate-fit", "valid-only", "--logit-adjust", "valid", "--out", path)
    ckpt, metrics = load(path), json.loads(path.with_suffix(".json").read_text())
    curve = {float(t): v for t, v in metrics["logit_adjust_valid_nDCG@10"].items()}
    assert list(curve) == list(ADJUST_TAUS) and "--logit-adjust valid: tau" in r.stdout
    tau = max(curve, key=lambda t: (curve[t], -t))
    assert metrics["logit_adjust_tau"] == tau and ckpt["state"]["adjust_tau"].item() == pytest.approx(tau)
    assert ckpt["model_args"]["logit_adjust"] == "valid"
    assert evaluate_cli("--ckpt", path)["nDCG@10"] == pytest.approx(metrics["test"]["nDCG@10"], abs=1e-4)
    assert list(map(float, metrics["logit_adjust_valid_cold HR@10"])) == list(ADJUST_TAUS)
    folds = metrics["logit_adjust_valid_fold taus"]  # the tau each of the --gate-fit-folds folds was ranked under
    assert len(folds) == 2 and set(folds) <= set(ADJUST_TAUS) and "the folds' tau" in r.stdout
    # valid-1se: the one-standard-error rule keeps the best tau or a larger one, from the same curves
    refused(run("finetune.py", *common, "--logit-adjust", "valid-1se", *TRAIN, "--out", work / "unused.pt", ok=False),
            "--logit-adjust valid-1se", "--gate-fit valid")
    path = work / "finetune_lavalid-1se.pt"
    run("finetune.py", *common, "--gate-fit", "valid-only", "--logit-adjust", "valid-1se", "--out", path)
    one_se = json.loads(path.with_suffix(".json").read_text())
    assert one_se["logit_adjust_valid_nDCG@10"] == metrics["logit_adjust_valid_nDCG@10"]  # same cross-fit, same curve
    assert one_se["logit_adjust_tau"] >= tau and load(path)["model_args"]["logit_adjust"] == "valid-1se"
    # valid-cold: the smallest tau whose cross-fitted cold HR@10 reaches text-kNN's, from the same curves
    path = work / "finetune_lavalid-cold.pt"
    run("finetune.py", *common, "--gate-fit", "valid-only", "--logit-adjust", "valid-cold", "--out", path)
    cold = json.loads(path.with_suffix(".json").read_text())
    assert cold["logit_adjust_valid_cold HR@10"] == metrics["logit_adjust_valid_cold HR@10"]
    curve, floor = {float(t): v for t, v in cold["logit_adjust_valid_cold HR@10"].items()}, cold["logit_adjust_valid_text-kNN cold HR@10"]
    reached = [t for t, v in curve.items() if v >= floor - 1e-4]
    assert cold["logit_adjust_tau"] == pytest.approx(min(reached) if reached else max(curve, key=lambda t: (curve[t], -t)))
    assert 0 < floor < 100  # text-kNN's cold HR@10 on this data, computed in the run
    assert (adjust_tag(0), adjust_tag(0.2), adjust_tag("valid"), adjust_tag("valid-1se"), adjust_tag("valid-cold")) == (
        "", "-la0.2", "-lavalid", "-lavalid-1se", "-lavalid-cold")


def test_gate_fit_valid_only_trains_the_gate_alone(work, dataset, phase1, phase2):
    """--gate-fit valid-only: no epoch on the training data; every expert tensor is the one
    its phase-1 / phase-2 run holds, bit for bit, and every gate tensor moved from its
    uniform start by the fit on the validation targets."""
    from dataset import load_dataset
    from runs import model_from_checkpoint, read_checkpoint

    out = work / "finetune_validonly.pt"
    common = ["--data", dataset, "--pretrain", phase1["sasrec"][0], "--align", phase2[0], "--gate-fit", "valid-only",
              "--gate-fit-epochs", "2", "--eval-batch-size", "7"]
    r = run("finetune.py", *common, "--out", work / "unused.pt", ok=False)  # a new LLM expert would stay random
    refused(r, "--gate-fit valid-only", "--llm-init")
    r = run("finetune.py", *common, "--experts", "id,align", "--out", out)
    # the fit's settings are flags stored with the run: the reuse guard sees a change
    refused(run("finetune.py", *common, "--experts", "id,align", "--gate-fit-lr", "0.5", "--out", out, ok=False),
            "--gate-fit-lr 0.01 (now 0.5)")
    assert not re.search(r"^epoch +\d", r.stdout, re.M) and "gate fit on validation, pass 2" in r.stdout, r.stdout[-2000:]
    got = load(out)
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["epochs"] == [] and metrics["best_epoch"] == 0 and got["args"]["gate_fit"] == "valid-only"
    data = load_dataset(dataset)
    for kind, phase, path in (("id", 1, phase1["sasrec"][0]), ("align", 2, phase2[0])):
        seeded = model_from_checkpoint(read_checkpoint(path), data, path, phase=phase).state_dict()
        for key, value in seeded.items():
            assert torch.equal(got["state"][f"experts.{kind}.{key}"], value), (kind, key)
    gate = {k: v for k, v in got["state"].items() if k.startswith("gate.")}
    assert gate and all(v.abs().sum() > 0 for v in gate.values())  # uniform start: zeros

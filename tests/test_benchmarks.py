"""Tests of benchmarks/: the synthetic generator writes a dataset that load_dataset() accepts,
with the protocol's sequence lengths, every item id used and a long-tailed popularity; the
benchmark prints one JSON line per figure for every phase on a tiny synthetic dataset."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from conftest import SHARED, require_shared  # noqa: E402
from dataset import fingerprint, frequency_buckets, item_frequency, load_dataset  # noqa: E402
from synthetic import PRESETS, make_dataset  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    r = run("benchmarks/synthetic.py", "--users", 300, "--items", 200, "--interactions", 3000, "--d-text", 1024,
            "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_synthetic_dataset_follows_the_format_and_protocol(tiny):
    data = load_dataset(tiny)  # every key, consistent tables, finite text
    seqs, N = data["seqs"], data["n_items"]
    assert seqs.shape == (300, 23) and N == 200 and data["name"] == "synthetic"
    lengths = (seqs > 0).sum(1)
    assert lengths.min() >= 5 and lengths.max() <= 23
    assert (seqs != 0).long().cumsum(1).gt(0).eq(seqs != 0).all()  # left-padded: no gap after the first item
    assert torch.equal(torch.unique(seqs[seqs > 0]), torch.arange(1, N + 1))  # ids 1..N all used
    assert data["text_emb"].shape == (N + 1, 1024) and data["text_emb"].dtype == torch.float16
    assert not data["text_emb"][0].any()
    assert torch.equal(data["item_freq"], item_frequency(seqs, N))
    assert torch.equal(data["item_bucket"], frequency_buckets(data["item_freq"], 10))
    assert data["fingerprint"] == fingerprint(seqs, N)
    assert abs(lengths.float().mean().item() - 10) < 1.5  # 3000 / 300 interactions per user
    freq = data["item_freq"][1:].sort(descending=True).values
    assert freq[:20].sum() > 0.3 * freq.sum()  # long tail: the top 10% of items hold > 30% of interactions


PAPER = SHARED / "paper" / "PAD.md"


def test_presets_are_the_papers_table_1():
    require_shared(PAPER, what="put the paper's markdown there")
    rows = {}
    for line in PAPER.read_text().splitlines():  # Table 1: "Dataset<TAB>Users<TAB>Items<TAB>Interactions"
        cells = line.split("\t")
        if len(cells) == 4 and cells[0] in ("MIND", "Electronics", "Prime Pantry"):
            rows[cells[0]] = [int(c.replace(",", "")) for c in cells[1:]]
    assert len(rows) == 3
    for preset, name in (("mind", "MIND"), ("electronics", "Electronics"), ("pantry", "Prime Pantry")):
        assert [PRESETS[preset][k] for k in ("users", "items", "interactions")] == rows[name]


def test_make_dataset_has_the_sizes_asked_for():
    data = make_dataset("s", 600, 420, 5137, 8)  # Electronics / 1000
    lengths = (data["seqs"] > 0).sum(1)
    assert data["seqs"].shape[0] == 600 and data["n_items"] == 420
    assert abs(int(lengths.sum()) - 5137) < 0.1 * 5137  # interactions near the target (lengths cut at 23)
    assert data["text_emb"].dtype == torch.float32  # d_text < 1024 stays float32
    assert torch.equal(make_dataset("s", 600, 420, 5137, 8)["seqs"], data["seqs"])  # seeded


def test_synthetic_refuses_too_few_interactions():
    r = run("benchmarks/synthetic.py", "--users", 10, "--items", 500, "--interactions", 60, "--d-text", 8, "--out", "/nonexistent")
    assert r.returncode != 0 and "--items 500" in r.stderr and "Traceback" not in r.stderr
    r = run("benchmarks/synthetic.py", "--users", 10)
    assert r.returncode != 0 and "--items" in r.stderr and "--preset" in r.stderr


def test_bench_prints_one_json_line_per_figure(tiny):
    r = run("benchmarks/bench.py", "--data", tiny, "--steps", 1, "--warmup", 0, "--serve-repeats", 2, "--eval-users", 50)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    for line in lines:
        assert {"figure", "value", "unit", "dataset", "device", "threads"} <= line.keys()
        assert math.isfinite(line["value"]) and line["value"] > 0, line  # a time, rate or size was measured
    got = {(x["figure"], x.get("phase"), x.get("batch"), x.get("dtype"), x.get("quantile")) for x in lines}
    for phase in (1, 2, 3):
        assert {("train", phase, None, None, None), ("train_peak", phase, None, None, None),
                ("eval", phase, None, None, None), ("eval_peak", phase, None, None, None)} <= got
        for dtype in ("float32", "float16"):
            assert ("serve_cache", phase, None, dtype, None) in got
            assert {("serve", phase, b, dtype, q) for b in (1, 256) for q in ("p50", "p99")} <= got
    assert next(x for x in lines if x["figure"] == "eval")["users"] == 50


def test_pipeline_times_every_run_of_the_recipe(tiny, tmp_path):
    """benchmarks/pipeline.py: the recipe's runs (phase 1, phase 2, the MoRec baseline, phase 3)
    trained in a fresh folder, dependencies first, one JSON line each as it ends, with its wall time and
    epochs as its metrics JSON records them, then the whole pipeline's time."""
    r = run("benchmarks/pipeline.py", "--data", tiny, "--epochs", 1, "--model-flags", "--d 16 --n-blocks 1",
            "--runs", tmp_path / "runs")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    per_run, whole = lines[:-1], lines[-1]
    scripts = [x["script"] for x in per_run]  # in the order they finished, each after the runs it needs
    assert sorted(scripts) == ["align.py", "baselines.py", "finetune.py", "pretrain.py"]
    assert scripts.index("pretrain.py") < scripts.index("align.py") and scripts[-1] == "finetune.py"
    assert all(x["threads"] == 1 for x in lines)  # ENV's OMP_NUM_THREADS, what each run was given
    for x in per_run:
        metrics = json.loads((tmp_path / "runs" / "synthetic" / x["run"]).with_suffix(".json").read_text())
        assert x["epochs"] == len(metrics["epochs"]) == (0 if x["script"] == "finetune.py" else 1)  # the gate fit trains no epoch
        assert x["value"] >= 1 and x["unit"] == "s" and x["dataset"] == "synthetic"
    assert whole["figure"] == "pipeline" and whole["value"] >= sum(x["value"] for x in per_run)



def test_gpu_pipeline_script_runs_its_steps_on_a_cpu(tmp_path):
    """benchmarks/gpu-pipeline.sh, the lent GPU's command, on a CPU at a tiny scale: it makes the
    synthetic MIND and times the recipe's four runs through pipeline.py into OUT; it names a
    dataset it cannot run and why."""
    env = {**ENV, "DEVICE": "cpu", "COMPILE": "", "SCALE": "0.0005", "MODEL": "--d 16 --n-blocks 1",
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu-pipeline.sh", "mind"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "out" / "pipeline-mind.jsonl").read_text().splitlines()]
    assert [x["figure"] for x in lines] == ["run"] * 4 + ["pipeline"]
    assert all(x["dataset"] == "synthetic-mind" and x["device"] == "cpu" for x in lines)
    assert all(x["epochs"] == 1 for x in lines[:4] if x["script"] != "finetune.py")  # one epoch a run
    assert "mind: exit 0" in (tmp_path / "out" / "pipeline-mind.log").read_text()
    bare = tmp_path / "clone" / "benchmarks"  # a checkout with no prepared data
    bare.mkdir(parents=True)
    (bare / "gpu-pipeline.sh").write_text((ROOT / "benchmarks" / "gpu-pipeline.sh").read_text())
    for name, code, says in (("pantry", 1, "data/pantry/dataset.pt: missing"),
                             ("movies", 2, "movies: not a dataset of this script")):
        r = subprocess.run(["bash", str(bare / "gpu-pipeline.sh"), name], capture_output=True, text=True, timeout=60,
                           env=env)
        assert r.returncode == code and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

"""experiments.py end to end on the tiny dataset of test_phases.py: every experiment through
the real scripts (one epoch, d = 16), the files it writes, the skip of finished runs, the
paired t-test and the fig3 / fig6 statistics against independent computations."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import ttest_rel

from analysis import embedding_kendall_tau, embedding_table
from dataset import load_dataset
from evaluate import summary_table
from experiments import EXPERIMENTS, pair_distances, paired_t, separation, significance
from test_phases import ENV, ROOT, dataset, run, work  # noqa: F401  (module fixtures)

FAST = ["--extra", "--epochs 1 --batch-size 8", "--model-flags", "--d 16 --n-blocks 1"]


def experiments(work, dataset, *args):
    return subprocess.run([sys.executable, "experiments.py", *args, "--data", str(dataset), "--runs", str(work / "runs"),
                           "--results", str(work / "results"), "--jobs", "2", *FAST],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def all_experiments(work, dataset):
    """table2 and deviations over two seeds, every other experiment over one, in one call."""
    r = experiments(work, dataset, "table2", "deviations", "--seeds", "0", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = experiments(work, dataset, *[e for e in EXPERIMENTS if e not in ("table2", "deviations")], "--seeds", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work / "results" / "tiny"


def test_every_experiment_writes_its_files(all_experiments):
    for exp in EXPERIMENTS:
        for ext in ("md", "csv", "json"):
            assert (all_experiments / f"{exp}.{ext}").stat().st_size > 0, (exp, ext)
        if exp not in ("table2", "table3", "deviations"):
            assert (all_experiments / f"{exp}.png").read_bytes()[:4] == b"\x89PNG"


def test_table2_rows_and_significance(all_experiments):
    rows = list(csv.DictReader(open(all_experiments / "table2.csv")))
    beyond = ["MoRec (std f_MLP)", "PAD (std f_MLP)", "MoRec (CE, std f_MLP)", "PAD (CE, std f_MLP, LLM from MoRec)",
              "PAD (CE, std f_MLP, LLM from MoRec, gate fit on valid)",
              "PAD (CE, std f_MLP, LLM from MoRec, experts not fine-tuned, gate fit on valid)"]
    labels = ["SASRec", "SASRec (CE)", "text-kNN", "text-kNN (mean)", "Hybrid", "MoRec", "CTRL", "MAKE", "DisCo", "SMEM",
              "PAD", *beyond]
    assert sorted({r["label"] for r in rows}) == sorted(labels)
    names = {r["label"]: Path(r["run"]).name for r in rows if r["seed"] == "0"}
    assert names["MoRec (CE, std f_MLP)"] == "baseline_morec_sasrec_text-std-l0_ce_seed0.pt"
    assert names[beyond[4]] == "finetune_sasrec_freq-validfit_id-align-llm_gaussian_rec_gamma0.1_llm-morec_text-std-l0_ce_seed0.pt"
    assert names[beyond[5]] == "finetune_sasrec_freq-validonly_id-align-llm_gaussian_rec_gamma0.1_llm-morec_text-std-l0_ce_seed0.pt"
    assert all(sum(r["label"] == lb for r in rows) == 2 for lb in labels)  # two seeds each
    for r in rows:
        assert 0 <= float(r["nDCG@10"]) <= float(r["HR@10"]) <= 100
        metrics = json.loads((ROOT / r["run"]).with_suffix(".json").read_text() if not r["run"].startswith("/")
                             else open(r["run"].replace(".pt", ".json")).read())
        assert float(r["HR@10"]) == pytest.approx(metrics["test"]["HR@10"])  # the CSV is the runs' own metrics
    md = (all_experiments / "table2.md").read_text()
    assert "| PAD | 2 |" in md and "paired t-test" in md


def test_deviations_set_one_authors_choice_each(all_experiments):
    """deviations: every run of a row has that choice of --preset authors and our default for
    every other flag of the preset; a row's p is scipy's paired t-test against ours."""
    from trainer import PRESETS

    rows = list(csv.DictReader(open(all_experiments / "deviations.csv")))
    by = {(r["panel"], r["label"]): [x for x in rows if (x["panel"], x["label"]) == (r["panel"], r["label"])] for r in rows}
    assert {lb for p, lb in by if p == "SASRec (phase 1)"} == {"ours", "batch 16 (the paper's)", "lr 1e-5 (phase 3: 1e-4)",
                                                              "SASRec block (LayerNorm inputs, width 4d, Xavier)",
                                                              "stop on HR@10, patience 20, test the last epoch"}
    assert len({lb for p, lb in by if p == "PAD"}) == 11 and all(len(v) == 2 for v in by.values())
    authors = {**PRESETS["authors"]["all"], **PRESETS["authors"]["align"], **PRESETS["authors"]["finetune"]}
    ours = {"lr": 1e-3, "stop_metric": "ndcg", "patience": 10, "test_epoch": "best", "sasrec_block": "ours", "gamma": 0.1,
            "mmd_rows": "items", "fuse_dropout": 0.0, "tau": 0.07, "gate": "freq", "gate_init": "uniform",
            "gate_weight_decay": None, "batch_size": 8}  # FAST: --extra "--batch-size 8"
    changed = {"batch 16 (the paper's)": {"batch_size"}, "lr 1e-5 (phase 3: 1e-4)": {"lr"}, "stop on HR@10, patience 20, test the last epoch":
               {"stop_metric", "patience", "test_epoch"}, "SASRec block (LayerNorm inputs, width 4d, Xavier)": {"sasrec_block"},
               "γ 0.2": {"gamma"}, "MMD over every batch slot": {"mmd_rows"}, "fusion dropout 0.1": {"fuse_dropout"},
               "bucket gate, ramp start, weight decay 0.01": {"gate", "gate_init", "gate_weight_decay"}}
    for label, keys in changed.items():
        run = Path(by[("PAD", label)][0]["run"])
        p3 = torch.load(run, weights_only=False)
        p1 = torch.load(p3["args"]["pretrain"], weights_only=False)
        p2 = torch.load(p3["args"]["align"], weights_only=False)
        for phase, ckpt in (("pretrain", p1), ("align", p2), ("finetune", p3)):
            for k, v in ckpt["args"].items():
                if k not in ours or (k == "sasrec_block" and phase != "pretrain"):
                    continue
                want = {**PRESETS["authors"]["all"], **PRESETS["authors"].get(phase, {})}.get(k, authors[k]) if k in keys else ours[k]
                assert v == want, (label, phase, k, v, want)
    md = (all_experiments / "deviations.md").read_text()
    for (panel, label), rs in by.items():
        if label == "ours":
            continue
        base = {r["seed"]: float(r["HR@10"]) for r in by[(panel, "ours")]}
        want = ttest_rel([float(r["HR@10"]) for r in rs], [base[r["seed"]] for r in rs]).pvalue
        line = next(x for x in md.splitlines() if x.startswith(f"| {label} |") and md.index(x) > md.index(panel))
        assert line.split("|")[-2].strip().split(" / ")[0] == f"{want:.2g}", (label, line)


def test_finished_runs_are_not_recomputed(work, dataset, all_experiments):
    before = {p: p.stat().st_mtime_ns for p in (work / "runs" / "tiny").glob("*.pt")}
    assert len(before) > 20  # every run of the experiments, under RUNS/NAME/
    r = experiments(work, dataset, "fig4", "--seeds", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [line for line in r.stdout.splitlines() if line.startswith(("done ", "FAILED"))]  # nothing ran
    assert {p: p.stat().st_mtime_ns for p in before} == before
    dry = experiments(work, dataset, "fig4", "--seeds", "0", "7", "--dry-run")
    assert dry.returncode == 0 and "--seed 7" in dry.stdout and "--seed 0 " not in dry.stdout


def test_fig6_and_fig3_statistics(all_experiments, dataset):
    fig6 = json.loads((all_experiments / "fig6.json").read_text())["rows"]
    assert {r["label"] for r in fig6} == {"Non-Anchored", "Rec-Anchored & Frozen", "Rec-Anchored", "w/o align (SE-BCE-Tune)",
                                       "with align (SE-BCE-Align-Tune)", "Single-aligned", "Multi-origin", "Multi-aligned"}
    for r in fig6:
        taus = [v for k, v in r.items() if k.startswith("bucket ")]
        assert len(taus) == 10 and all(-1 <= t <= 1 for t in taus if t == t)
    multi = next(r for r in fig6 if r["label"] == "Multi-origin")  # recomputed by analysis.py's own tool
    data = load_dataset(str(dataset))
    phase1 = Path(multi["run"]).with_name("pretrain_sasrec_seed0.pt")
    taus = embedding_kendall_tau(embedding_table(str(phase1), data), embedding_table(f"{multi['run']}:experts.id.items.h_c.weight", data),
                                 data["seqs"], data["item_bucket"], data["n_buckets"], 5000)
    assert [multi[f"bucket {b}"] for b in range(1, 11)] == pytest.approx([taus[b] for b in range(1, 11)], nan_ok=True)
    fig3 = json.loads((all_experiments / "fig3.json").read_text())["rows"]
    assert [r["label"] for r in fig3] == ["SASRec", "SMEM", "CTRL", "PAD"]
    # SASRec's spaces by hand: its phase-1 ID table and the frozen text table, on fig3's pairs
    sasrec = fig3[0]
    id_table = torch.load(sasrec["run"], weights_only=True)["state"]["items.h_c.weight"]
    d_c, d_s = pair_distances((id_table, data["text_emb"].float()), data)
    top, bottom = d_c >= d_c.quantile(0.9), d_c <= d_c.quantile(0.1)
    assert sasrec["textual separation"] == pytest.approx(separation(d_s[top], d_s[bottom]))


def test_paired_t_matches_scipy_and_picks_the_best_baseline():
    a, b = [12.1, 11.8, 12.9], [11.0, 11.5, 12.0]
    assert paired_t(a, b) == pytest.approx(ttest_rel(a, b).pvalue)
    table = {lb: [{"seed": s, "nDCG@10": v, "HR@10": v, "cold HR@10": 0.0} for s, v in enumerate(vals)]
             for lb, vals in {"SASRec": [5, 5.2, 5.1], "SMEM": [6, 6.3, 6.1], "PAD": [6.5, 6.9, 6.6]}.items()}
    best, p, diff = significance(table)
    assert best == "SMEM" and p == pytest.approx(ttest_rel([6.5, 6.9, 6.6], [6, 6.3, 6.1]).pvalue)
    assert diff == pytest.approx((6.5 + 6.9 + 6.6 - 6 - 6.3 - 6.1) / 3)
    table["text-kNN"] = [{"seed": s, "nDCG@10": 9.0 + s / 10, "HR@10": 9.0, "cold HR@10": 0.0} for s in range(3)]
    best, p_below, diff = significance(table)  # PAD significantly below the best row: a p-value, no star
    assert best == "text-kNN" and p_below < 0.05 and diff < 0
    del table["text-kNN"]
    md = summary_table(table, base="SASRec", star=("PAD", p))
    assert "6.67 ± 0.21★" in md and f"{100 * (6.6667 / 5.1 - 1):+.1f}%" in md


def test_bad_flags_are_refused(work, dataset):
    r = experiments(work, dataset, "fig9")
    assert r.returncode != 0 and "invalid choice: 'fig9'" in r.stderr


def test_separation_matches_a_loop_over_pairs():
    g = torch.Generator().manual_seed(0)
    far, near = torch.randint(0, 6, (40,), generator=g).float(), torch.randint(0, 5, (30,), generator=g).float()  # ties
    loop = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in far.tolist() for b in near.tolist()) / (40 * 30)
    assert separation(far, near) == pytest.approx(loop)
    assert separation(far + 10, near) == 1.0 and separation(near, near) == pytest.approx(0.5)


def test_preset_runs_are_named_for_it(work, dataset):
    """--preset authors: every run of the plan carries the preset and is named _authors."""
    r = experiments(work, dataset, "table2", "--seeds", "0", "--preset", "authors", "--only", "SASRec", "PAD", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    outs = [line.split("--out ")[1].split()[0] for line in r.stdout.splitlines()]
    assert len(outs) == 3 and all(Path(o).name.endswith("_authors_seed0.pt") for o in outs), outs
    assert all("--preset authors" in line for line in r.stdout.splitlines())


def test_preset_tables_do_not_overwrite_ours(work, dataset):
    """--preset authors writes table2-authors.* beside table2.*, which it leaves as it was."""
    ours = work / "results" / "tiny" / "table2.md"
    before = ours.read_bytes() if ours.is_file() else None
    r = experiments(work, dataset, "table2", "--seeds", "0", "--preset", "authors", "--only", "SASRec")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (ours.read_bytes() if ours.is_file() else None) == before
    md = (work / "results" / "tiny" / "table2-authors.md").read_text()
    assert md.startswith("## Table 2 (tiny, seeds [0], --preset authors)") and "| SASRec | 1 |" in md
    rows = list(csv.DictReader(open(work / "results" / "tiny" / "table2-authors.csv")))
    assert [Path(r["run"]).name for r in rows] == ["pretrain_sasrec_authors_seed0.pt"]
    assert json.loads((work / "results" / "tiny" / "table2-authors.json").read_text())["preset"] == "authors"

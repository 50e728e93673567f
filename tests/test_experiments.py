"""experiments.py end to end on the tiny dataset of test_phases.py: every experiment through
the real scripts (one epoch, d = 16), the files it writes, the skip of finished runs, the
paired t-test and the fig3 / fig6 statistics against independent computations."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ttest_rel

from analysis import embedding_kendall_tau, embedding_table
from dataset import load_dataset
from evaluate import summary_table
from experiments import CONTROLS, EXPERIMENTS, RECIPE_LABEL, SHORT, pair_distances, paired_t, separation, significance
from test_phases import ENV, ROOT, dataset, run, work  # noqa: F401  (module fixtures)

FAST = ["--extra", "--epochs 1 --batch-size 8", "--model-flags", "--d 16 --n-blocks 1"]


def experiments(work, dataset, *args):
    return subprocess.run([sys.executable, "experiments.py", *args, "--data", str(dataset), "--runs", str(work / "runs"),
                           "--results", str(work / "results"), "--jobs", "2", *FAST],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def all_experiments(work, dataset):
    """verdict over two seeds (its intervals over users and p over seeds need real runs), every
    other experiment over one; the statistics over seeds of table2 and deviations are checked on
    their pages rendered from these rows with a second seed made up (test_*_over_seeds_*)."""
    r = experiments(work, dataset, "verdict", "--seeds", "0", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = experiments(work, dataset, *[e for e in EXPERIMENTS if e != "verdict"], "--seeds", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work / "results" / "tiny"


def test_every_experiment_writes_its_files(all_experiments):
    """Each experiment's JSON holds one row per run of its labels (per seed asked), its CSV the
    same rows, its table a line per label, and the figures are PNGs."""
    for exp in EXPERIMENTS:
        record = json.loads((all_experiments / f"{exp}.json").read_text())
        assert record["experiment"] == exp and record["rows"], exp
        csv_rows = list(csv.DictReader(open(all_experiments / f"{exp}.csv")))
        assert [(r["label"], str(r["seed"]), r["run"]) for r in record["rows"]] == \
            [(r["label"], r["seed"], r["run"]) for r in csv_rows], exp
        md = (all_experiments / f"{exp}.md").read_text()
        for label in {r["label"] for r in record["rows"]}:
            assert f"| {label} " in md or f" {label} (chosen)" in md, (exp, label)
        runs = {r["run"] for r in record["rows"]}
        assert all(Path(run).is_file() for run in runs), exp  # every row is a finished run
        if exp not in ("table2", "table3", "deviations", "verdict", "screen", "phase3"):
            assert (all_experiments / f"{exp}.png").read_bytes()[:4] == b"\x89PNG"


def test_table2_rows_and_significance(all_experiments):
    rows = list(csv.DictReader(open(all_experiments / "table2.csv")))
    beyond = ["MoRec (std f_MLP)", "PAD (std f_MLP)", "MoRec (CE, std f_MLP)", "PAD (CE, std f_MLP, LLM from MoRec)",
              "PAD (CE, std f_MLP, LLM from MoRec, gate fit on valid)",
              "PAD (CE, std f_MLP, LLM from MoRec, experts not fine-tuned, gate fit on valid)",
              "PAD (std f_MLP, LLM from MoRec)", RECIPE_LABEL, *CONTROLS]
    labels = ["SASRec", "SASRec (CE)", "text-kNN", "text-kNN (mean)", "Hybrid", "MoRec", "CTRL", "MAKE", "DisCo", "SMEM",
              "PAD", *beyond]
    assert sorted({r["label"] for r in rows}) == sorted(labels)
    names = {r["label"]: Path(r["run"]).name for r in rows if r["seed"] == "0"}
    assert names["MoRec (CE, std f_MLP)"] == "baseline_morec_sasrec_text-std-l0_ce_seed0.pt"
    assert names[beyond[4]] == "finetune_sasrec_freq-validfit_id-align-llm_gaussian_rec_gamma0.1_llm-morec_text-std-l0_ce_seed0.pt"
    assert names[beyond[5]] == "finetune_sasrec_freq-validonly_id-align-llm_gaussian_rec_gamma0.1_llm-morec_text-std-l0_ce_seed0.pt"
    recipe = names[RECIPE_LABEL]  # the text path's run with the text-kNN expert beside its three
    assert recipe == names[beyond[5]].replace("id-align-llm_", "id-align-llm-text_")
    stack, text, gamma0, nogate = CONTROLS  # the controls reuse the recipe's expert runs, each changing one thing
    assert names[stack] == "finetune_sasrec_freq-validonly_id-llm_llm-morec_text-std-l0_ce_seed0.pt"
    assert names[text] == "finetune_sasrec_freq-validonly_id-llm-text_llm-morec_text-std-l0_ce_seed0.pt"
    assert names[gamma0] == recipe.replace("gamma0.1", "gamma0")
    assert names[nogate] == recipe.replace("freq-", "none-")
    assert all(sum(r["label"] == lb for r in rows) == 1 for lb in labels)  # seed 0 each
    for r in rows:
        metrics = json.loads((ROOT / r["run"]).with_suffix(".json").read_text() if not r["run"].startswith("/")
                             else open(r["run"].replace(".pt", ".json")).read())
        assert float(r["HR@10"]) == pytest.approx(metrics["test"]["HR@10"])  # the CSV is the runs' own metrics
    md = (all_experiments / "table2.md").read_text()
    assert "| PAD | 1 |" in md and "PAD vs the best other row" in md and "p = n/a (one seed)" in md
    assert "| method | seeds | valid HR@10 | valid nDCG@10 | HR@10 | nDCG@10 | cold HR@10 |" in md  # validation beside test
    record = {r["label"]: r for r in json.loads((all_experiments / "table2.json").read_text())["rows"]}
    for label in ("PAD", RECIPE_LABEL):  # gate shares per bucket, warmest -> coldest, from the run's own JSON
        gate = json.loads(Path(record[label]["run"]).with_suffix(".json").read_text())["gate_per_bucket"]
        warm, cold = gate[min(gate, key=int)], gate[max(gate, key=int)]
        assert f"| {label} | " + ", ".join(f"{e} {warm[e]:.2f}→{cold[e]:.2f}" for e in warm) + " |" in md
    assert "| SASRec | id " not in md  # no gate, no shares


def with_second_seed(rows):
    """The rows of one seed and a made-up seed 1: every metric moved by its own random amount."""
    import random

    rng = random.Random(0)
    metrics = [k for k in rows[0] if k.endswith("@10")]
    return rows + [{**r, "seed": 1, **{m: r[m] + rng.uniform(-1, 1) for m in metrics if m in r}} for r in rows]


def test_table2_significance_over_seeds_on_its_page(all_experiments, tmp_path):
    """table2's page: PAD against the best other row by mean nDCG@10, seeds paired, p is
    scipy's paired t-test, ★ only where PAD is above that row and p < 0.05."""
    from experiments import render

    record = json.loads((all_experiments / "table2.json").read_text())
    rows = with_second_seed(record["rows"])
    md = "\n".join(render("table2", rows, record["summary"], "t", "tiny", tmp_path / "t.png"))
    mean = {}
    for r in rows:
        mean.setdefault(r["label"], []).append(r["nDCG@10"])
    best = max((lb for lb in mean if lb != "PAD"), key=lambda lb: sum(mean[lb]))
    pad, other = ([r["nDCG@10"] for r in rows if r["label"] == lb] for lb in ("PAD", best))
    p = ttest_rel(pad, other).pvalue
    above = sum(pad) > sum(other)
    assert f"PAD vs the best other row ({best}), paired t-test over seeds on nDCG@10: PAD " \
           f"{'above' if above else 'below'} it by {abs(sum(pad) - sum(other)) / 2:.2f}, p = {p:.3g}" in md
    assert ("★" in md) == (above and p < 0.05) and "| PAD | 2 |" in md


def per_user(run, metric):
    """A run's per-user test HR@10 / nDCG@10 (%) from the ranks in its JSON, by loop."""
    ranks = json.loads(Path(run).with_suffix(".json").read_text())["ranks"]["test"]
    return [100.0 * (r < 10) * (1.0 if metric == "HR@10" else 1 / math.log2(r + 2)) for r in ranks]


def test_verdict_rows_and_intervals_over_users(all_experiments):
    """verdict: the baselines, the paper's PAD, the four controls and the recipe, validation
    beside test (the runs' own numbers); each comparison's interval is scipy's paired t-interval
    over the users of the seed-averaged per-user metric, recomputed from the runs' ranks."""
    out = json.loads((all_experiments / "verdict.json").read_text())
    rows = out["rows"]
    assert {r["label"] for r in rows} == {"SASRec", "SASRec (CE)", "text-kNN", "MoRec (CE, std f_MLP)", "PAD",
                                          *CONTROLS, RECIPE_LABEL}
    for r in rows:
        metrics = json.loads(Path(r["run"]).with_suffix(".json").read_text())
        assert r["valid nDCG@10"] == metrics["valid"]["nDCG@10"] and r["HR@10"] == metrics["test"]["HR@10"]
    comparisons = out["summary"]["comparisons"]
    assert [(c["a"], c["b"]) for c in comparisons[:4]] == [(RECIPE_LABEL, c) for c in CONTROLS]
    mean = {lb: sum(r["nDCG@10"] for r in rows if r["label"] == lb) / 2 for lb in {r["label"] for r in rows}}
    best = {ours: max((lb for lb in mean if lb != ours), key=mean.get) for ours in (RECIPE_LABEL, "PAD")}
    pairs = [(c["a"], c["b"]) for c in comparisons]  # each against its best other row, once
    assert all(pairs.count((ours, b)) == 1 for ours, b in best.items()) and len(pairs) == len(set(pairs))
    for c in comparisons:
        for metric in ("HR@10", "nDCG@10"):
            users = [[sum(vals) / 2 for vals in zip(*(per_user(r["run"], metric) for r in rows if r["label"] == lb))]
                     for lb in (c["a"], c["b"])]  # two seeds
            d = [a - b for a, b in zip(*users)]
            got = c[metric]
            assert got["users"] == len(d) and got["difference"] == pytest.approx(sum(d) / len(d))
            if len(set(d)) > 1:
                ci = ttest_rel(*users).confidence_interval(0.95)
                assert got["ci95"] == pytest.approx([ci.low, ci.high])
    md = (all_experiments / "verdict.md").read_text()
    assert f"| {RECIPE_LABEL} − {next(iter(CONTROLS))} |" in md and "valid HR@10" in md


def test_screen_chooses_on_validation_and_reports_test_for_that_one_only(all_experiments):
    out = json.loads((all_experiments / "screen.json").read_text())
    valid = {}
    for r in out["rows"]:
        valid.setdefault(r["label"], []).append(r["valid nDCG@10"])
    chosen = max(valid, key=lambda lb: sum(valid[lb]) / len(valid[lb]))
    assert out["summary"]["chosen"] == chosen and len(valid) == 6
    for r in out["rows"]:  # test numbers only for the chosen variant
        assert ("HR@10" in r and "cold HR@10" in r) == (r["label"] == chosen), r
    md = (all_experiments / "screen.md").read_text()
    assert md.count("(chosen)") == 1 and f"| 1 | {chosen} (chosen) |" in md


def test_phase3_ranks_by_validation_and_runs_each_variants_flags(all_experiments):
    """phase3: the variants in the order of their validation nDCG@10, each row with its test
    and cold numbers and gate shares (and --logit-adjust's tau, the whole fit's and each fold's);
    each run carries its variant's flags, and the gate-only variants reuse the recipe's expert runs."""
    from experiments import PHASE3

    out = json.loads((all_experiments / "phase3.json").read_text())
    rows = {r["label"]: r for r in out["rows"]}  # one seed
    assert list(rows) == list(PHASE3)
    order = sorted(rows, key=lambda lb: (rows[lb]["valid nDCG@10"], rows[lb]["valid HR@10"]), reverse=True)
    assert out["summary"]["order"] == order and out["summary"]["chosen"] == order[0]
    md = (all_experiments / "phase3.md").read_text()
    lines = [x for x in md.splitlines() if x.startswith("| ") and x[2].isdigit()]
    assert [x.split(" | ")[1].removesuffix(" (chosen)") for x in lines] == order
    assert sum("logit_adjust_tau" in r for r in rows.values()) == 3  # valid, valid-1se, valid-cold
    for line, label in zip(lines, order):  # --logit-adjust valid*: the tau kept, and each fold's
        if "logit_adjust_tau" in rows[label]:
            folds = ", ".join(f"{t:g}" for t in rows[label]["logit_adjust_valid_fold taus"])
            assert f"τ {rows[label]['logit_adjust_tau']:g} (folds {folds})" in line, line
    recipe = torch.load(rows[RECIPE_LABEL]["run"], weights_only=False)["args"]
    for label, (_, flags, settings) in PHASE3.items():
        r = rows[label]
        assert {"HR@10", "cold HR@10", "valid cold HR@10", "gate_per_bucket"} <= r.keys()
        args = torch.load(r["run"], weights_only=False)["args"]
        assert args["expert_lr"] == (1e-4 if "--expert-lr" in flags else None)
        assert args["aux_weight"] == (1.0 if "--aux-weight" in flags else 0.0)
        assert args["bucket_bias"] == settings.get("bucket_bias", False)
        assert args["bucket_temp"] == settings.get("bucket_temp", False)
        assert args.get("user_bias", False) == settings.get("user_bias", False)
        assert args["gate"] == settings.get("gate", "freq")
        assert args["mix"] == settings.get("mix", "logit")
        assert args["logit_adjust"] == settings.get("logit_adjust", 0)
        assert args["gate_fit_epochs"] == (20 if "--gate-fit-epochs" in flags else 5)
        assert args["gate_fit"] == settings.get("gate_fit", "valid-only")
        assert ("text" in args["experts"]) == ("text" in settings.get("experts", ""))
        assert (args["pretrain"], args["align"], args["llm_init"]) == (recipe["pretrain"], recipe["align"], recipe["llm_init"])
    # each variant against the recipe over the validation users: the paired t-interval, from the runs' ranks
    from scipy import stats

    def valid_ndcg(row):
        ranks = np.array(json.loads(Path(row["run"]).with_suffix(".json").read_text())["ranks"]["valid"])
        return np.where(ranks < 10, 100 / np.log2(ranks + 2), 0.0)
    assert set(out["summary"]["valid_vs_recipe"]) == set(PHASE3) - {RECIPE_LABEL}
    for label, got in out["summary"]["valid_vs_recipe"].items():
        d = valid_ndcg(rows[label]) - valid_ndcg(rows[RECIPE_LABEL])
        low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d)) if d.std() else (d.mean(),) * 2
        assert got["difference"] == pytest.approx(d.mean(), abs=1e-5) and got["users"] == len(d)
        assert (got["low"], got["high"]) == (pytest.approx(low, abs=1e-5), pytest.approx(high, abs=1e-5))
        assert "{:+.2f} [{:+.2f}, {:+.2f}]".format(d.mean(), low, high) in md


def test_report_remakes_every_page_from_its_json(all_experiments, tmp_path):
    """experiments.py report: every EXP.md is remade from its EXP.json alone, as the runs wrote
    it, and results/README.md states each verdict comparison with its interval."""
    import shutil

    shutil.copytree(all_experiments, tmp_path / "tiny")
    for md in (tmp_path / "tiny").glob("*.md"):
        md.write_text("stale")
    r = subprocess.run([sys.executable, "experiments.py", "report", "--results", str(tmp_path)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for md in all_experiments.glob("*.md"):
        assert (tmp_path / "tiny" / md.name).read_text() == md.read_text(), md.name
        assert not re.search(r"\n\n\|(-+\|)+[ \t]*$", md.read_text(), re.M), f"{md.name}: a table cut by a blank line"
    index = (tmp_path / "README.md").read_text()
    comps = json.loads((all_experiments / "verdict.json").read_text())["summary"]["comparisons"]
    for c in comps:
        name = {lb: SHORT.get(lb, lb) for lb in (c["a"], c["b"])}
        assert f"({name[c['a']]} − {name[c['b']]}): HR@10 {c['HR@10']['difference']:+.2f}" in index
    refused = subprocess.run([sys.executable, "experiments.py", "report", "table2", "--results", str(tmp_path)], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "run it alone" in refused.stderr


def test_committed_pages_are_the_report_of_their_json(tmp_path):
    """results/: every committed page is what `experiments.py report` makes of the committed
    JSON files, so no number on them is typed by hand."""
    import shutil

    shutil.copytree(ROOT / "results", tmp_path / "results")
    r = subprocess.run([sys.executable, "experiments.py", "report", "--results", str(tmp_path / "results")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pages = [p for p in (ROOT / "results").rglob("*.md") if p.name != "experiments.md"]  # the methods page is prose
    assert len(pages) > 10
    for page in pages:
        assert (tmp_path / page.relative_to(ROOT)).read_text() == page.read_text(), page


def test_deviations_set_one_authors_choice_each(all_experiments):
    """deviations: every run of a row has that choice of --preset authors and our default for
    every other flag of the preset; a row's p is scipy's paired t-test against ours."""
    from trainer import PRESETS

    rows = list(csv.DictReader(open(all_experiments / "deviations.csv")))
    by = {(r["panel"], r["label"]): [x for x in rows if (x["panel"], x["label"]) == (r["panel"], r["label"])] for r in rows}
    assert {lb for p, lb in by if p == "SASRec (phase 1)"} == {"ours", "batch 16 (the paper's)", "lr 1e-5 (phase 3: 1e-4)",
                                                              "SASRec block (LayerNorm inputs, width 4d, Xavier)",
                                                              "stop on HR@10, patience 20, test the last epoch"}
    assert len({lb for p, lb in by if p == "PAD"}) == 11 and all(len(v) == 1 for v in by.values())
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


def test_deviations_p_over_seeds_on_its_page(all_experiments, tmp_path):
    """deviations' page: each row's p is scipy's paired t-test against ours, seeds matched."""
    from experiments import render

    record = json.loads((all_experiments / "deviations.json").read_text())
    rows = with_second_seed(record["rows"])
    md = "\n".join(render("deviations", rows, {}, "t", "tiny", tmp_path / "t.png"))
    panels = [r["panel"] for r in rows]
    for panel in dict.fromkeys(panels):
        section = md[md.index(f"### {panel}"):]
        section = section[:section.find("### ", 4)] if "### " in section[4:] else section
        base = {r["seed"]: r for r in rows if (r["panel"], r["label"]) == (panel, "ours")}
        for label in dict.fromkeys(r["label"] for r in rows if r["panel"] == panel and r["label"] != "ours"):
            rs = [r for r in rows if (r["panel"], r["label"]) == (panel, label)]
            want = " / ".join(f"{ttest_rel([r[m] for r in rs], [base[r['seed']][m] for r in rs]).pvalue:.2g}"
                              for m in ("HR@10", "nDCG@10"))
            line = next(x for x in section.splitlines() if x.startswith(f"| {label} |"))
            assert line.split("|")[-2].strip() == want, (panel, label, line)


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
        assert len(taus) == 10
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


def test_preset_tables_do_not_overwrite_ours(work, dataset, all_experiments):
    """--preset authors writes table2-authors.* beside table2.*, which it leaves as it was; with
    --only, table2-authors-only.*, titled as some of its rows."""
    ours = all_experiments / "table2.md"
    before = ours.read_bytes()
    r = experiments(work, dataset, "table2", "--seeds", "0", "--preset", "authors", "--only", "SASRec")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert ours.read_bytes() == before
    md = (work / "results" / "tiny" / "table2-authors-only.md").read_text()
    assert md.startswith("## Table 2 (tiny, seeds [0], --preset authors, only 1 of its rows (--only))") and "| SASRec | 1 |" in md
    rows = list(csv.DictReader(open(work / "results" / "tiny" / "table2-authors-only.csv")))
    assert [Path(r["run"]).name for r in rows] == ["pretrain_sasrec_authors_seed0.pt"]
    assert json.loads((work / "results" / "tiny" / "table2-authors-only.json").read_text())["preset"] == "authors"


def test_ready_runs_start_by_how_many_runs_wait_on_them(tmp_path, monkeypatch):
    """execute: of the runs whose dependencies are done, the one that more runs need (directly or
    through others) starts first, the experiment's order breaking ties; one at a time here."""
    import types

    import experiments
    from experiments import Run, execute

    order = []

    def fake_call(run, args, env):  # a finished run: its checkpoint and metrics
        order.append(run.out.stem)
        run.out.write_text("")
        run.out.with_suffix(".json").write_text("{}")
        return 0, 0.0

    monkeypatch.setattr(experiments, "call", fake_call)
    a, b = Run(tmp_path / "a.pt", []), Run(tmp_path / "b.pt", [])
    c = Run(tmp_path / "c.pt", [], [b])
    d, e = Run(tmp_path / "d.pt", [], [c]), Run(tmp_path / "e.pt", [], [c])
    f = Run(tmp_path / "f.pt", [], [a])
    assert experiments.waiting_on([a, b, c, d, e, f]) == {id(a): 1, id(b): 3, id(c): 2, id(d): 0, id(e): 0, id(f): 0}
    execute([a, f, b, c, d, e], types.SimpleNamespace(dry_run=False, jobs=1))
    assert order == ["b", "c", "a", "f", "d", "e"]


def test_a_resumed_run_adds_to_its_log(tmp_path):
    """experiments.call: a run with OUT.last.pt is resumed (--resume) and its output is added to
    the log it began; a fresh run starts a new log."""
    import types

    from experiments import Run, call

    run = Run(tmp_path / "r.pt", ["-c", "import sys; print('args', *sys.argv[1:])"])
    args = types.SimpleNamespace(extra="", model_flags="", data="d", device="cpu")
    run.out.with_suffix(".log").write_text("epoch 1\n")
    run.out.with_suffix(".last.pt").write_text("")
    assert call(run, args, dict(os.environ))[0] == 0
    log = run.out.with_suffix(".log").read_text()
    assert log.startswith("epoch 1\n") and "--resume" in log.splitlines()[1]
    run.out.with_suffix(".last.pt").unlink()
    call(run, args, dict(os.environ))
    assert run.out.with_suffix(".log").read_text().splitlines() == ["args --data d --device cpu --quiet"]

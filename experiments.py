"""The paper's experiments (Sec. 4): Table 2-3 and Fig. 2-6, on any prepared dataset, for
several seeds, through the real phase scripts.

    python experiments.py table2 fig2 fig4 fig5 --data ml-100k --seeds 0 1 2 --jobs 2

Each experiment is a set of runs (one script call: pretrain.py, align.py, finetune.py or
baselines.py) grouped under the paper's labels. A run whose checkpoint and metrics JSON
exist is never recomputed, so an interrupted call picks up where it stopped (a run killed
mid-way continues from its OUT.last.pt with --resume); runs shared by experiments (SASRec,
PAD) are trained once. Runs go to RUNS/NAME/ under the phase scripts' own default names, so
`make run` outputs are reused (and the other way round). Per experiment, RESULTS/NAME/ gets EXP.csv (one row per
run), EXP.json (the rows and the summary), EXP.md (the table) and EXP.png (the figure); with
--preset P they are EXP-P.* and the runs are named _P.

  table2  SASRec, Hybrid, MoRec, CTRL, MAKE, DisCo, SMEM and PAD: HR@10 / nDCG@10 mean ± std,
          Impr. of PAD over SASRec, paired t-test of PAD against the best baseline (★: above it, p < 0.05);
          beyond the paper SASRec (CE), text-kNN, the text path, the recipe and the verdict's controls,
          validation beside test, gate shares per bucket
  table3  GRU4Rec and Caser alone ("Origin") and inside PAD
  fig2    HR@10 of SASRec and PAD on warm / median / cold target items
  fig3    cold item pairs with the top / bottom 10% collaborative distance: their distances
          in the collaborative and the textual space (SASRec, SMEM, CTRL, PAD; first seed)
  fig4    No Alignment (SMEM), Non-Anchored, Rec-Anchored & Frozen, Rec-Anchored (PAD)
  fig5    (a) alignment loss: linear, cosine, InfoNCE, Laplacian, Gaussian; (b) experts and gate
  fig6    Kendall's tau (Eq. 13) per bucket between phase-1 and later collaborative tables:
          (a) after each anchoring variant (phase 2); (b) one table fine-tuned on BCE after
          phase 1 (SE-BCE-Tune: finetune.py --experts id) or after alignment (SE-BCE-Align-
          Tune: --experts align); (c) that single aligned table vs PAD's two ID tables
  deviations  beyond the paper: each choice of the authors' release where the paper is silent
          (--preset authors), alone on top of our defaults: SASRec where it reaches phase 1, and
          PAD; paired t-test of each against ours
  verdict beyond the paper: the baselines, the paper's PAD and the recipe (--preset recipe)
          beside its same-treatment controls, with paired 95% intervals over test users
  screen  beyond the paper: the text-path screen's six PAD variants ranked by validation, test
          for the chosen one only
  phase3  beyond the paper: phase-3 variants on the text path's expert runs (the text-kNN expert,
          --bucket-bias, --user-bias, --bucket-temp, --mix prob, --gate bucket, --logit-adjust, the gate fit's passes, joint
          training with --expert-lr / --aux-weight and the gate refit on validation), ranked
          by validation, test and gate shares beside it
--extra passes flags to every training run (e.g. --extra "--epochs 2" for a smoke test),
--model-flags to the runs that build a model from scratch; --dry-run lists the commands
still to run.
"""
import argparse
import concurrent.futures as cf
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from analysis import embedding_kendall_tau, embedding_table
from dataset import GROUPS, atomic_write_text, bucket_groups, load_dataset
from evaluate import hr_ndcg, mean_std, metric_row, summary_table
from runs import DEFAULT_ALIGN, GATE_FITS, adjust_tag, align_tag, model_from_checkpoint, read_checkpoint, run_path
from trainer import AUTHORS_INFONCE_WEIGHT, PRESETS

EXPERIMENTS = ("table2", "table3", "fig2", "fig3", "fig4", "fig5", "fig6", "deviations", "verdict", "screen", "phase3")
TEXT_FIX = {"text_norm": "standard", "text_layers": 0}  # the text-path screen's f_MLP (experiments.py screen)
# the text path (beyond the paper; the text-path screen's choice on validation, experiments.py
# screen): CE, the standardised one-layer f_MLP, the LLM expert from the CE MoRec, the experts as
# phases 1-2 left them and the gate fit on validation
TEXT_PATH = {"loss": "ce", "text": TEXT_FIX, "llm_init": True, "gate_fit": "valid-only"}
TEXT_PATH_LABEL = "PAD (CE, std f_MLP, LLM from MoRec, experts not fine-tuned, gate fit on valid)"
# the recipe (--preset recipe): the text path with the text-kNN expert under the gate, the
# phase-3 screen's choice on validation (experiments.py phase3; the rule: results/experiments.md)
RECIPE = {**TEXT_PATH, "experts": "id,align,llm,text"}
RECIPE_LABEL = "PAD recipe (the text path + text-kNN expert)"
# verdict: the controls that reuse the recipe's expert runs and fit their gate on validation
# alike, and what each difference to the recipe measures
CONTROLS = {"stack: SASRec (CE) + MoRec (CE, std f_MLP), gate fit on valid": "what the alignment and text-kNN experts add "
                                                                             "over the plain stack",
            "stack + text-kNN expert, gate fit on valid": "what the alignment expert adds over the stack with the text floor",
            "recipe with γ = 0 (SMEM's alignment expert)": "what the alignment (MK-MMD) adds",
            "recipe with one weight per expert (--gate none)": "what the frequency-aware gate adds"}
# experiments.py phase3: phase-3 variants on the text path's expert runs, chosen on validation:
# {label: (run-name tag, finetune.py flags, Plan.finetune settings)}; a tag names runs with flags
EXPERT_LR = ["--expert-lr", "1e-4"]
AUX = ["--aux-weight", "1"]
PHASE3 = {
    TEXT_PATH_LABEL: ("", [], {}),
    RECIPE_LABEL: ("", [], {"experts": "id,align,llm,text"}),
    "text path + bucket bias": ("", [], {"bucket_bias": True}),
    "text path + text-kNN expert + bucket bias": ("", [], {"experts": "id,align,llm,text", "bucket_bias": True}),
    "the recipe, gate fit over 20 passes (default 5)": ("gf20", ["--gate-fit-epochs", "20"], {"experts": "id,align,llm,text"}),
    "the recipe, the experts' distributions mixed (--mix prob)": ("", [], {"experts": "id,align,llm,text", "mix": "prob"}),
    "text path, the experts' distributions mixed (--mix prob)": ("", [], {"mix": "prob"}),
    "the recipe + an offset per bucket that moves with the user (--user-bias)": (
        "", [], {"experts": "id,align,llm,text", "user_bias": True}),
    "the recipe + a temperature per bucket (--bucket-temp)": ("", [], {"experts": "id,align,llm,text", "bucket_temp": True}),
    "the recipe + a temperature and an offset per bucket": (
        "", [], {"experts": "id,align,llm,text", "bucket_temp": True, "bucket_bias": True}),
    "the recipe with a weight per bucket and expert, no expert state (--gate bucket)": (
        "", [], {"experts": "id,align,llm,text", "gate": "bucket"}),
    "the recipe + logit adjustment, τ chosen on validation (--logit-adjust valid)": (
        "", [], {"experts": "id,align,llm,text", "logit_adjust": "valid"}),
    "the recipe + logit adjustment, the largest τ within one standard error of the best (--logit-adjust valid-1se)": (
        "", [], {"experts": "id,align,llm,text", "logit_adjust": "valid-1se"}),
    "the recipe + logit adjustment, the smallest τ whose cold HR@10 reaches text-kNN's (--logit-adjust valid-cold)": (
        "", [], {"experts": "id,align,llm,text", "logit_adjust": "valid-cold"}),
    "phase 3 trained (Alg. 1), gate refit on valid": ("", [], {"gate_fit": "valid"}),
    "phase 3, experts at lr 1e-4, gate refit on valid": ("elr1e-4", EXPERT_LR, {"gate_fit": "valid"}),
    "phase 3, each expert's own loss too (--aux-weight 1), gate refit on valid": ("aux1", AUX, {"gate_fit": "valid"}),
    "phase 3, experts at lr 1e-4, own losses, text-kNN expert, bucket bias, gate refit on valid": (
        "elr1e-4-aux1", EXPERT_LR + AUX, {"gate_fit": "valid", "experts": "id,align,llm,text", "bucket_bias": True}),
}


def authors_flags(keys, scripts=("pretrain", "align", "finetune")):
    """The flags of --preset authors (trainer.PRESETS) for `keys`, per phase script that reads them."""
    preset = PRESETS["authors"]
    per_script = {s: {**preset["all"], **preset.get(s, {})} for s in scripts}
    return {s: [part for k in keys for part in (f"--{k.replace('_', '-')}", str(v[k]))] for s, v in per_script.items()}


# experiments.py deviations: each choice of the authors' release where the paper is silent (the
# issue-15 audit, trainer.PRESETS["authors"]), alone on top of our defaults:
# {label: (run-name tag, flags per phase script, PAD's gamma and gate)}
AUTHORS_CHOICES = {
    "batch 16 (the paper's)": ("authors-batch", authors_flags(["batch_size"]), {}),
    "lr 1e-5 (phase 3: 1e-4)": ("authors-lr", authors_flags(["lr"]), {}),
    "stop on HR@10, patience 20, test the last epoch": (
        "authors-stop", authors_flags(["stop_metric", "patience", "test_epoch"]), {}),
    "SASRec block (LayerNorm inputs, width 4d, Xavier)": ("authors-block", authors_flags(["sasrec_block"], ["pretrain"]), {}),
    "γ 0.2": ("", {}, {"gamma": PRESETS["authors"]["align"]["gamma"]}),  # the gamma is in the run names
    "MMD over every batch slot": ("authors-mmdrows", authors_flags(["mmd_rows"], ["align"]), {}),
    "fusion dropout 0.1": ("authors-fusedrop", authors_flags(["fuse_dropout"], ["align"]), {}),
    "bucket gate, ramp start, weight decay 0.01": (
        "authors-gate", authors_flags(["gate_init", "gate_weight_decay"], ["finetune"]),
        {"gate": PRESETS["authors"]["finetune"]["gate"]}),
}

# The paper's Table 2 (HR@10, nDCG@10 in %), printed beside ours for its datasets
PAPER_TABLE2 = {
    "mind": {"SASRec": (16.8437, 9.0520), "Hybrid": (17.3385, 9.3321), "MoRec": (14.1235, 7.7090),
             "CTRL": (18.1318, 9.7996), "MAKE": (16.4317, 8.9684), "DisCo": (17.3367, 9.4131),
             "SMEM": (18.4319, 10.0003), "PAD": (18.6703, 10.1515)},
    "electronics": {"SASRec": (1.6754, 0.7938), "Hybrid": (1.5673, 0.8385), "MoRec": (0.9562, 0.4721),
                    "CTRL": (1.9468, 0.9370), "MAKE": (0.9495, 0.4611), "DisCo": (1.8148, 0.9025),
                    "SMEM": (2.3492, 1.4287), "PAD": (2.4804, 1.5373)},
    "pantry": {"SASRec": (2.6338, 1.2926), "Hybrid": (3.1000, 1.5606), "MoRec": (3.1699, 1.6013),
               "CTRL": (2.8048, 1.3700), "MAKE": (3.3408, 1.6379), "DisCo": (2.8358, 1.3451),
               "SMEM": (3.4341, 1.7440), "PAD": (3.8303, 1.9104)},
}


# --- Runs: one call of a phase script, named as the script names its output -----------------


@dataclass(eq=False)  # runs compare by identity: each is built once by Plan
class Run:
    out: Path  # checkpoint; its metrics are out.with_suffix(".json")
    cmd: list  # script and its own flags
    deps: list = field(default_factory=list)  # Runs that must finish first
    variant: str = ""  # deviations: the authors' choice this run (or a run it needs) was trained with

    @property
    def done(self):
        return self.out.is_file() and self.out.with_suffix(".json").is_file()

    def metrics(self):
        return json.loads(self.out.with_suffix(".json").read_text())


class Plan:
    """The runs of one dataset and backbone-seed grid, each built once (shared by experiments),
    named by runs.run_path as the scripts name their own output."""

    def __init__(self, runs, data, preset="none", gamma=None, gate=None):
        self.runs_root, self.data, self.preset, self.runs = Path(runs), data, preset, {}  # runs go to RUNS/NAME/
        # PAD's own settings: the scripts' defaults, or the preset's
        self.gamma = gamma if gamma is not None else PRESETS[preset].get("align", {}).get("gamma", DEFAULT_ALIGN["gamma"])
        self.gate = gate or PRESETS[preset].get("finetune", {}).get("gate", "freq")
        self.pad_align = (DEFAULT_ALIGN["kernel"], DEFAULT_ALIGN["anchor"], self.gamma)
        self.tag, self.flags = "", {}  # a variant's name tag and its flags per script

    def variant(self, tag, flags, **settings):
        """The same plan with extra flags per script ({"align": ["--mmd-rows", "batch"]}) and
        PAD's gamma or gate; a run given flags, and every run that needs one, is named _TAG.
        Runs are shared with this plan."""
        v = Plan(self.runs_root, self.data, self.preset, **settings)
        v.runs, v.tag, v.flags = self.runs, tag, flags
        return v

    def _run(self, script, cmd, seed, deps=(), **settings):
        flags = self.flags.get(script, [])
        variant = self.tag if flags or any(d.variant for d in deps) else ""
        out = run_path(self.data["name"], script, runs=self.runs_root, seed=seed,
                       preset="-".join(t for t in (self.preset, variant) if t not in ("none", "")) or "none", **settings)
        if out not in self.runs:
            self.runs[out] = Run(out, [*cmd, *flags, "--seed", str(seed), "--preset", self.preset, "--out", str(out)],
                                 list(deps), variant)
        return self.runs[out]

    def pretrain(self, seed, backbone="sasrec", loss="bce"):
        return self._run("pretrain", ["pretrain.py", "--backbone", backbone, "--loss", loss], seed, backbone=backbone, loss=loss)

    def align(self, seed, kernel="gaussian", anchor="rec", gamma=None, backbone="sasrec", loss="bce", text=None):
        gamma = self.gamma if gamma is None else gamma
        p1 = self.pretrain(seed, backbone, loss)
        return self._run("align", ["align.py", "--backbone", backbone, "--init", str(p1.out), "--kernel", kernel,
                                   "--anchor", anchor, "--gamma", f"{gamma:g}", "--loss", loss, *text_flags(text)], seed, [p1],
                         backbone=backbone, kernel=kernel, anchor=anchor, gamma=gamma, loss=loss, text=text)

    def finetune(self, seed, align=None, experts="id,align,llm", gate=None, backbone="sasrec", loss="bce", text=None,
                 llm_init=False, gate_fit="train", bucket_bias=False, mix="logit", bucket_temp=False, logit_adjust=0,
                 user_bias=False):
        """llm_init: the LLM expert starts from the MoRec run of the same loss and text flags;
        gate_fit valid: the gate is refit on the validation split after training, valid-only: the
        experts are not trained and the gate is fit on the validation split (finetune.py --gate-fit);
        bucket_bias, bucket_temp, mix, logit_adjust, user_bias: finetune.py --bucket-bias, --bucket-temp, --mix,
        --logit-adjust, --user-bias."""
        align, gate = align or self.pad_align, gate or self.gate
        p1 = self.pretrain(seed, backbone, loss)
        cmd = ["finetune.py", "--backbone", backbone, "--pretrain", str(p1.out), "--experts", experts, "--gate", gate,
               "--loss", loss, *text_flags(text), *(["--gate-fit", gate_fit] if gate_fit != "train" else []),
               *(["--bucket-bias"] if bucket_bias else []), *(["--user-bias"] if user_bias else []),
               *(["--bucket-temp"] if bucket_temp else []),
               *(["--mix", mix] if mix != "logit" else []), *(["--logit-adjust", str(logit_adjust)] if logit_adjust else [])]
        deps, tag = [p1], ""
        if "align" in experts.split(","):
            p2 = self.align(seed, *align, backbone=backbone, loss=loss, text=text)
            cmd, deps, tag = cmd + ["--align", str(p2.out)], deps + [p2], align_tag(*align)
        if llm_init:
            morec = self.baseline(seed, "morec", backbone, loss, text)
            cmd, deps = cmd + ["--llm-init", str(morec.out)], deps + [morec]
        gate = (gate + "-bias" * bucket_bias + "-ubias" * user_bias + "-temp" * bucket_temp + "-prob" * (mix == "prob")
                + adjust_tag(logit_adjust) + GATE_FITS[gate_fit])  # as finetune.py names it
        return self._run("finetune", cmd, seed, deps, backbone=backbone, gate=gate,
                         experts=experts.split(","), align=tag, llm_init=llm_init, loss=loss, text=text)

    def baseline(self, seed, method, backbone="sasrec", loss="bce", text=None):
        deps, cmd = [], ["baselines.py", "--method", method, "--backbone", backbone, "--loss", loss, *text_flags(text)]
        if method.startswith("textknn-"):  # textknn-last, textknn-mean: baselines.py --method textknn --knn MODE
            cmd = ["baselines.py", "--method", "textknn", "--knn", method.split("-")[1], "--backbone", backbone]
        if method == "make":
            morec = self.baseline(seed, "morec", backbone, loss, text)
            deps, cmd = [morec], cmd + ["--morec", str(morec.out)]
        return self._run("baseline", cmd, seed, deps, method=method, backbone=backbone, loss=loss, text=text)


def text_flags(text):
    """{"text_norm": "standard", ...} -> ["--text-norm", "standard", ...]."""
    return [part for k, v in (text or {}).items() for part in (f"--{k.replace('_', '-')}", str(v))]


def groups(exp, plan, seeds):
    """An experiment's runs: {panel: {label: [Run per seed]}}, labelled as in the paper."""
    def per_seed(make):
        return [make(s) for s in seeds]

    table2 = {"SASRec": per_seed(plan.pretrain),
              "SASRec (CE)": per_seed(lambda s: plan.pretrain(s, loss="ce")),
              "text-kNN": per_seed(lambda s: plan.baseline(s, "textknn-last")),
              "text-kNN (mean)": per_seed(lambda s: plan.baseline(s, "textknn-mean")),
              **{m: per_seed(lambda s, m=m: plan.baseline(s, m.lower())) for m in ("Hybrid", "MoRec", "CTRL", "MAKE", "DisCo")},
              "SMEM": per_seed(lambda s: plan.finetune(s, ("gaussian", "rec", 0.0))),
              "PAD": per_seed(plan.finetune),
              # beyond the paper: the text path's screen (experiments.py screen), f_MLP on the standardised
              # table with one linear layer, with the paper's BCE and with the full-softmax CE
              "MoRec (std f_MLP)": per_seed(lambda s: plan.baseline(s, "morec", text=TEXT_FIX)),
              "PAD (std f_MLP)": per_seed(lambda s: plan.finetune(s, text=TEXT_FIX)),
              "MoRec (CE, std f_MLP)": per_seed(lambda s: plan.baseline(s, "morec", loss="ce", text=TEXT_FIX)),
              "PAD (CE, std f_MLP, LLM from MoRec)": per_seed(lambda s: plan.finetune(s, loss="ce", text=TEXT_FIX,
                                                                                       llm_init=True)),
              "PAD (CE, std f_MLP, LLM from MoRec, gate fit on valid)": per_seed(
                  lambda s: plan.finetune(s, loss="ce", text=TEXT_FIX, llm_init=True, gate_fit="valid")),
              TEXT_PATH_LABEL: per_seed(lambda s: plan.finetune(s, **TEXT_PATH)),
              RECIPE_LABEL: per_seed(lambda s: plan.finetune(s, **RECIPE)),
              "PAD (std f_MLP, LLM from MoRec)": per_seed(lambda s: plan.finetune(s, text=TEXT_FIX, llm_init=True))}
    controls = dict(zip(CONTROLS, (per_seed(lambda s: plan.finetune(s, **{**RECIPE, "experts": "id,llm"})),
                                   per_seed(lambda s: plan.finetune(s, **{**RECIPE, "experts": "id,llm,text"})),
                                   per_seed(lambda s: plan.finetune(s, ("gaussian", "rec", 0.0), **RECIPE)),
                                   per_seed(lambda s: plan.finetune(s, gate="none", **RECIPE)))))
    table2.update(controls)
    if exp == "table2":
        return {"": table2}
    if exp == "verdict":  # the baselines, the paper's PAD, the same-treatment controls and the recipe
        return {"": {**{k: table2[k] for k in ("SASRec", "SASRec (CE)", "text-kNN", "MoRec (CE, std f_MLP)", "PAD")},
                     **controls, RECIPE_LABEL: table2[RECIPE_LABEL]}}
    if exp == "screen":  # the text-path screen's PAD variants, to be ranked by validation
        return {"": {k: table2[k] for k in ("PAD", "PAD (std f_MLP)", "PAD (std f_MLP, LLM from MoRec)",
                                            "PAD (CE, std f_MLP, LLM from MoRec)",
                                            "PAD (CE, std f_MLP, LLM from MoRec, gate fit on valid)", TEXT_PATH_LABEL)}}
    if exp == "phase3":  # phase-3 variants on the text path's expert runs, to be chosen on validation
        variants = {lb: (plan.variant(tag, {"finetune": flags}) if tag else plan, kw) for lb, (tag, flags, kw) in PHASE3.items()}
        return {"": {lb: per_seed(lambda s, v=v, kw=kw: v.finetune(s, **{**TEXT_PATH, **kw})) for lb, (v, kw) in variants.items()}}
    if exp == "deviations":
        choices = {lb: plan.variant(tag, flags, **settings) for lb, (tag, flags, settings) in AUTHORS_CHOICES.items()}
        infonce = plan.variant("authors-tau", authors_flags(["tau"], ["align"]), gamma=AUTHORS_INFONCE_WEIGHT)
        return {"SASRec (phase 1)": {"ours": table2["SASRec"], **{lb: per_seed(v.pretrain) for lb, v in choices.items()
                                                                  if "pretrain" in v.flags}},
                "PAD": {"ours": table2["PAD"], **{lb: per_seed(v.finetune) for lb, v in choices.items()},
                        "InfoNCE kernel (ours: τ 0.07, weight γ 0.1)": per_seed(
                            lambda s: plan.finetune(s, ("infonce", "rec", plan.gamma))),
                        "InfoNCE kernel, τ 0.1, weight 0.01": per_seed(
                            lambda s: infonce.finetune(s, ("infonce", "rec", infonce.gamma)))}}
    if exp == "table3":
        return {b: {"Origin": per_seed(lambda s: plan.pretrain(s, b.lower())),
                    "+PAD": per_seed(lambda s: plan.finetune(s, backbone=b.lower()))} for b in ("GRU4Rec", "Caser")}
    if exp == "fig2":
        return {"": {k: table2[k] for k in ("SASRec", "PAD")}}
    if exp == "fig3":
        return {"": {k: table2[k][:1] for k in ("SASRec", "SMEM", "CTRL", "PAD")}}
    if exp == "fig4":
        return {"": {"No Alignment": table2["SMEM"],
                     "Non-Anchored": per_seed(lambda s: plan.finetune(s, ("gaussian", "none", plan.gamma))),
                     "Rec-Anchored & Frozen": per_seed(lambda s: plan.finetune(s, ("gaussian", "frozen", plan.gamma))),
                     "Rec-Anchored": table2["PAD"]}}
    if exp == "fig5":
        kernels = {"Linear": "linear", "Cosine": "cosine", "InfoNCE": "infonce", "Laplacian": "laplacian"}
        ablation = {"w/o ID": ("align,llm", None), "w/o align": ("id,llm", None), "w/o LLM": ("id,align", None),
                    "only ID": ("id", None), "only align": ("align", None), "only LLM": ("llm", None),
                    "w/o gating": ("id,align,llm", "none")}
        return {"(a) alignment loss": {**{lb: per_seed(lambda s, k=k: plan.finetune(s, (k, "rec", plan.gamma))) for lb, k in kernels.items()},
                                       "Gaussian": table2["PAD"]},
                "(b) ablation": {"PAD": table2["PAD"], **{lb: per_seed(lambda s, e=e, g=g: plan.finetune(s, experts=e, gate=g))
                                                          for lb, (e, g) in ablation.items()}}}
    if exp == "fig6":  # the labels name the table compared (KENDALL_TABLE)
        single = {"w/o align (SE-BCE-Tune)": per_seed(lambda s: plan.finetune(s, experts="id")),
                  "with align (SE-BCE-Align-Tune)": per_seed(lambda s: plan.finetune(s, experts="align"))}
        return {"(a) anchoring": {"Non-Anchored": per_seed(lambda s: plan.align(s, anchor="none")),
                                  "Rec-Anchored & Frozen": per_seed(lambda s: plan.align(s, anchor="frozen")),
                                  "Rec-Anchored": per_seed(plan.align)},
                "(b) single expert": single,
                "(c) single vs triple experts": {"Single-aligned": single["with align (SE-BCE-Align-Tune)"],
                                                 "Multi-origin": table2["PAD"], "Multi-aligned": table2["PAD"]}}
    raise ValueError(exp)


# --- Running: dependencies first, --jobs at a time, finished runs skipped ------------------


def waiting_on(runs):
    """{id(run): how many of `runs` need it, directly or through others}."""
    count = {id(r): 0 for r in runs}
    for r in runs:
        seen, stack = set(), list(r.deps)
        while stack:
            d = stack.pop()
            if id(d) not in seen:
                seen.add(id(d))
                stack.extend(d.deps)
        for i in seen:
            count[i] = count.get(i, 0) + 1
    return count


def execute(runs, args):
    """Run every unfinished run after its dependencies, args.jobs at a time; of the runs ready,
    the one that more runs wait on starts first (then the experiment's order), so that a long
    chain (phase 1 -> align -> finetunes) is not left behind a run that ends one. Each run's
    output goes to OUT.log; a failure stops its dependants, not the others, and is reported at the end."""
    todo = [r for r in runs if not r.done]
    waiting = waiting_on(todo)
    if args.dry_run:
        for r in todo:
            print(" ".join(shlex.quote(c) for c in command(r, args)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))}
    failed, running = [], {}
    bar = tqdm(total=len(todo), desc="runs", disable=None if todo else True)  # on a terminal only
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        while todo or running:
            ready = sorted([r for r in todo if all(d.done for d in r.deps)], key=lambda r: -waiting[id(r)])  # stable
            for r in ready[:args.jobs - len(running)]:
                todo.remove(r)
                running[pool.submit(call, r, args, env)] = r
            blocked = [r for r in todo if any(d in failed for d in r.deps)]  # identity: eq=False
            for r in blocked:
                todo.remove(r)
                failed.append(r)
                tqdm.write(f"skipped {r.out.name}: a run it needs failed")
            if not running:
                failed += todo  # unreachable: only when a dependency is missing
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                r, (rc, seconds) = running.pop(f), f.result()
                bar.update()
                tqdm.write(f"{'done' if rc == 0 else f'FAILED (exit {rc})'} {r.out.name} in {seconds:.0f}s, log {r.out.with_suffix('.log')}")
                if rc != 0:
                    failed.append(r)
    bar.close()
    if failed:
        raise SystemExit(f"{len(failed)} run(s) did not finish: {', '.join(r.out.name for r in failed)}; read their .log "
                         f"files, fix the cause and rerun the same command (finished runs are kept)")


def command(run, args):
    """The run's script with --extra and --model-flags first, so that a flag of the run itself
    (which its name records: --gamma, a deviations choice, ...) wins over them."""
    resume = ["--resume"] if run.out.with_suffix(".last.pt").is_file() else []
    model = shlex.split(args.model_flags) if run.cmd[0] in ("pretrain.py", "baselines.py") else []  # the others read it from a checkpoint
    return [sys.executable, run.cmd[0], *shlex.split(args.extra), *model, *run.cmd[1:], "--data", args.data,
            "--device", args.device, "--quiet", *resume]


def call(run, args, env):
    """Run one script call, its output to OUT.log; a resumed run (OUT.last.pt) adds to the log it began."""
    run.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    resumed = run.out.with_suffix(".last.pt").is_file()
    with open(run.out.with_suffix(".log"), "a" if resumed else "w") as log:
        rc = subprocess.call(command(run, args), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent)
    return rc, time.time() - t0


# --- Results: rows per run, mean ± std per label, paired t-test ---------------------------


def rows(exp, panels):
    """One row per run: test HR@10 / nDCG@10 overall and per warm / median / cold group, and
    validation HR@10 / nDCG@10 (cross-fitted where the gate was fit on validation)."""
    out = []
    for panel, labels in panels.items():
        for label, runs in labels.items():
            for r in runs:
                m = r.metrics()
                kept = m.get("test_rules", {}).get("repeat_kept", {})  # the other rule for repeated targets
                out.append({"experiment": exp, "panel": panel, "label": label, "seed": seed_of(r), "run": str(r.out),
                            **metric_row(m), **{f"{k} (repeats kept)": v for k, v in kept.items()},
                            **{f"valid {k}": m["valid"][k] for k in ("HR@10", "nDCG@10")},
                            "valid cold HR@10": m["valid"]["groups"]["cold"]["HR@10"],
                            "best_epoch": m["best_epoch"],
                            **({"gate_per_bucket": m["gate_per_bucket"]} if "gate_per_bucket" in m else {}),
                            **{k: v for k, v in m.items() if k.startswith("logit_adjust_")}})  # tau, its curves
    return out


def seed_of(run):
    return int(run.cmd[run.cmd.index("--seed") + 1])


def paired_t(a, b):
    """Two-sided paired t-test over seeds (scipy), p-value; nan with fewer than 2 pairs."""
    from scipy.stats import ttest_rel

    return float(ttest_rel(a, b).pvalue) if len(a) > 1 else float("nan")


def user_metric(run, metric, split="test"):
    """Per-user HR@10 or nDCG@10 (in %) of a finished run, (U,), from the ranks in its JSON."""
    ranks = torch.tensor(run.metrics()["ranks"][split])
    hit, ndcg = hr_ndcg(ranks, 10)
    return 100 * {"HR@10": hit, "nDCG@10": ndcg}[metric].double()


def user_interval(a, b, metric="nDCG@10", split="test"):
    """a - b over users with a paired 95% t-interval: each user's metric is averaged over the
    seeds both labels ran (a, b: lists of Runs), then differenced user by user. Returns
    (mean difference, low, high, users); the users' spread, not the seeds', sets the width."""
    from scipy.stats import t as student

    seeds = sorted({seed_of(r) for r in a} & {seed_of(r) for r in b})
    pick = [{seed_of(r): r for r in runs} for runs in (a, b)]
    d = sum(user_metric(pick[0][s], metric, split) - user_metric(pick[1][s], metric, split) for s in seeds) / len(seeds)
    half = student.ppf(0.975, len(d) - 1) * d.std().item() / len(d) ** 0.5
    return d.mean().item(), d.mean().item() - half, d.mean().item() + half, len(d)


def gate_shares(rs):
    """'id 0.61→0.30, llm 0.39→0.70': each expert's mean gate probability on the test users,
    warmest → coldest bucket, averaged over the runs (rows with gate_per_bucket)."""
    per = [r["gate_per_bucket"] for r in rs]
    buckets = sorted(per[0], key=int)
    experts = list(per[0][buckets[0]])
    mean = {e: [sum(p[b][e] for p in per) / len(per) for b in buckets] for e in experts}
    return ", ".join(f"{e} {v[0]:.2f}→{v[-1]:.2f}" for e, v in mean.items())


def by_label(all_rows):
    out = {}
    for r in all_rows:
        out.setdefault(r["panel"], {}).setdefault(r["label"], []).append(r)
    return out


def significance(table, ours="PAD", metric="nDCG@10"):
    """Paired t-test of `ours` against the best other label (by mean `metric`), seeds matched:
    (that label, p, mean difference ours - it over those seeds)."""
    others = {lb: rs for lb, rs in table.items() if lb != ours}
    best = max(others, key=lambda lb: mean_std([r[metric] for r in others[lb]])[0])
    seeds = sorted({r["seed"] for r in table[ours]} & {r["seed"] for r in table[best]})
    pick = {lb: {r["seed"]: r[metric] for r in table[lb]} for lb in (ours, best)}
    a, b = [pick[ours][s] for s in seeds], [pick[best][s] for s in seeds]
    return best, paired_t(a, b), (sum(a) - sum(b)) / len(seeds)


# --- Figures -----------------------------------------------------------------------------


def bar_figure(panels, path, title, metric="HR@10", groups=None):
    """Bars of mean `metric` ± std per label (per panel); with groups, one bar per label in
    each of warm / median / cold (Fig. 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 5.5 * len(panels)), 4), squeeze=False)
    for ax, (panel, table) in zip(axes[0], panels.items()):
        labels = list(table)
        if groups:
            width = 0.8 / len(labels)
            for i, lb in enumerate(labels):
                stats = [mean_std([r[f"{g} {metric}"] for r in table[lb]]) for g in groups]
                ax.bar([j + i * width for j in range(len(groups))], [m for m, _ in stats], width,
                       yerr=[s for _, s in stats], capsize=3, label=lb)
            ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(groups))], groups)
            ax.legend()
        else:
            stats = [mean_std([r[metric] for r in table[lb]]) for lb in labels]
            ax.bar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, color="tab:blue")
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            low, high = min(m - s for m, s in stats), max(m + s for m, s in stats)
            span = max(high - low, 0.05 * high, 1e-3)  # zoomed like the paper's bars, never flat
            ax.set_ylim(max(0.0, low - 0.3 * span), high + 0.1 * span)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(panel)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# fig6: which collaborative table of a run is compared with phase 1's (default: the run's
# alignment-expert table if it has one, else its ID table; analysis.ID_TABLES)
KENDALL_TABLE = {"w/o align (SE-BCE-Tune)": ":experts.id.items.h_c.weight", "Multi-origin": ":experts.id.items.h_c.weight",
                 "Multi-aligned": ":experts.align.items.id.h_c.weight"}


def kendall_rows(panels, data, max_pairs):
    """fig6: Kendall's tau per target bucket between the phase-1 ID table and each run's."""
    out = []
    for panel, labels in panels.items():
        for label, runs in labels.items():
            for r in runs:
                key = KENDALL_TABLE.get(label, "")
                p1 = next(d for d in r.deps if d.out.name.startswith("pretrain_"))
                taus = embedding_kendall_tau(embedding_table(str(p1.out), data), embedding_table(f"{r.out}{key}", data),
                                             data["seqs"], data["item_bucket"], data["n_buckets"], max_pairs)
                out.append({"experiment": "fig6", "panel": panel, "label": label, "seed": seed_of(r), "run": str(r.out),
                            **{f"bucket {b}": t for b, t in taus.items()}})
    return out


def line_figure(panels, path, title, n_buckets):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, table) in zip(axes[0], panels.items()):
        for label, rs in table.items():
            ax.plot(range(1, n_buckets + 1), [mean_std([r[f"bucket {b}"] for r in rs])[0] for b in range(1, n_buckets + 1)],
                    marker="o", label=label)
        ax.set_xlabel("item bucket (1 = warm, %d = cold)" % n_buckets)
        ax.set_ylabel("Kendall's tau")
        ax.set_title(panel)
        ax.legend()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def spaces(run, data):
    """fig3: a run's collaborative table and its textual table over all items. SASRec has no
    text side, so its textual space is the frozen text table itself; SMEM and PAD use the
    alignment expert's h^c and f_MLP; CTRL its final ID table and its stage-1 text tower."""
    ckpt = read_checkpoint(run.out)
    model = model_from_checkpoint(ckpt, data, run.out).eval()
    items = torch.arange(data["n_items"] + 1)
    if "experts" in ckpt["model_args"]:
        return model.experts["align"].items.parts(items)
    if ckpt["phase"] == "baseline ctrl":
        stage1 = Path(ckpt["metrics"]["stage1"])
        return model.items(items), model_from_checkpoint(read_checkpoint(stage1), data, stage1).eval().items.f_mlp(items)
    return model.items(items), data["text_emb"].float()


def pair_distances(table, data, n_pairs=200_000, seed=0):
    """Euclidean distances of random pairs of distinct cold items (buckets 8-10) in each table."""
    cold = torch.nonzero(torch.isin(data["item_bucket"], torch.tensor(list(bucket_groups(data["n_buckets"])["cold"])))).flatten()
    cold = cold[cold != 0]
    g = torch.Generator().manual_seed(seed)
    i, j = (cold[torch.randint(len(cold), (n_pairs,), generator=g)] for _ in range(2))
    keep = i != j
    return [(t[i[keep]] - t[j[keep]]).norm(dim=-1) for t in table]


def separation(far, near):
    """fig3's textual separation: P(a pair of the far group is farther apart than a pair of
    the near group), ties counting one half (the Mann-Whitney U over all cross pairs, /
    their number); 0.5 when the space ignores the grouping."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(far.numpy(), near.numpy()).statistic) / (len(far) * len(near))


def fig3(panels, data, path, title):
    """Pairs with the top / bottom 10% collaborative distance, their distance distribution in
    both spaces; the textual separation is P(top pair farther than bottom pair) (0.5: none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = panels[""]
    fig, axes = plt.subplots(len(table), 2, figsize=(9, 2.4 * len(table)), squeeze=False)
    out = []
    for row, (label, runs) in zip(axes, table.items()):
        d_c, d_s = pair_distances(spaces(runs[0], data), data)
        lo, hi = d_c.quantile(0.1), d_c.quantile(0.9)
        top, bottom = d_c >= hi, d_c <= lo
        for ax, d, space in zip(row, (d_c, d_s), ("collaborative", "textual")):
            d = d / d.mean()
            ax.hist(d[bottom].numpy(), bins=60, alpha=0.6, color="tab:green", label="bottom-10% ID pairs", density=True)
            ax.hist(d[top].numpy(), bins=60, alpha=0.6, color="tab:red", label="top-10% ID pairs", density=True)
            ax.set_title(f"{label}: {space} space")
            ax.set_xlabel("distance / mean distance")
        row[0].legend(fontsize=7)
        sep = separation(d_s[top], d_s[bottom])
        out.append({"experiment": "fig3", "panel": "", "label": label, "seed": seed_of(runs[0]), "run": str(runs[0].out),
                    "textual separation": float(sep)})
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return out


# --- Reports ----------------------------------------------------------------------------

VALID_AND_TEST = ["valid HR@10", "valid nDCG@10", "HR@10", "nDCG@10", "warm HR@10", "cold HR@10"]


def comparisons(runs, t, with_controls):
    """The recipe against each same-treatment control (with_controls), and the recipe and
    the paper's PAD against the best other row (by mean test nDCG@10: the hardest comparison),
    each as a paired 95% interval over the test users (user_interval) and a paired t-test
    over the seeds. runs: {label: [Run]}; t: {label: [row]}."""
    pairs = [(RECIPE_LABEL, c, why) for c, why in CONTROLS.items() if with_controls and c in t and RECIPE_LABEL in t]
    for ours in (RECIPE_LABEL, "PAD"):
        best = significance(t, ours)[0] if ours in t and len(t) > 1 else None
        if best and (ours, best) not in [(a, b) for a, b, _ in pairs]:  # a control may be the best other row
            pairs.append((ours, best, "against the best other row"))
    out = []
    for a, b, why in pairs:
        c = {"a": a, "b": b, "measures": why}
        for metric in ("HR@10", "nDCG@10"):
            mean, low, high, users = user_interval(runs[a], runs[b], metric)
            c[metric] = {"difference": mean, "ci95": [low, high], "users": users}
        p = significance({a: t[a], b: t[b]}, a)[1]
        c["p_seeds_nDCG@10"] = None if math.isnan(p) else p  # one seed: no test over seeds
        out.append(c)
    return out


def p_seeds(c):
    p = c["p_seeds_nDCG@10"]
    return "n/a (one seed)" if p is None or math.isnan(p) else f"{p:.2g}"


def comparisons_md(comps):
    if not comps:
        return []
    table = ["| a − b | measures | Δ HR@10 [95% CI over users] | Δ nDCG@10 [95% CI over users] | p over seeds (nDCG@10) |",
             "|---|---|---|---|---|",
             *(f"| {c['a']} − {c['b']} | {c['measures']} | "
               + " | ".join("{:+.2f} [{:+.2f}, {:+.2f}]".format(c[m]["difference"], *c[m]["ci95"]) for m in ("HR@10", "nDCG@10"))
               + f" | {p_seeds(c)} |" for c in comps)]
    return ["\n".join(table), f"Intervals: each test user's metric averaged over the seeds, then a paired t-interval "
                               f"over the {comps[0]['HR@10']['users']} users; p: paired t-test over the seeds."]


VALID_NOTE = ("valid: validation HR@10 / nDCG@10; a gate fit on validation is scored cross-fitted (each half of the "
              "users by a gate fit on the other half).")


def gates_md(t):
    """A table of each gated row's gate shares per expert, warmest → coldest bucket."""
    gated = {lb: rs for lb, rs in t.items() if all("gate_per_bucket" in r for r in rs)}
    if not gated:
        return []
    return ["\n".join(["| row | gate share per expert, warmest → coldest bucket (test users, mean over seeds) |",
                        "|---|---|", *(f"| {lb} | {gate_shares(rs)} |" for lb, rs in gated.items())])]


def verdict_md(t, summary):
    """The verdict table: validation beside test for every row, the comparisons, the gates."""
    md = [summary_table(t, VALID_AND_TEST, base="SASRec (CE)" if "SASRec (CE)" in t else None),
          VALID_NOTE + " Impr.: nDCG@10 over SASRec (CE)."]
    return md + comparisons_md(summary["comparisons"]) + gates_md(t)


SHORT = {RECIPE_LABEL: "the recipe", **dict(zip(CONTROLS, ("the stack", "the stack + text-kNN", "the recipe with γ = 0",
                                             "the recipe with --gate none"))),
         "PAD": "the paper's PAD"}  # the labels as results/README.md's sentences name them


def verdicts_md(comps, name):
    """One sentence per comparison for results/README.md: the difference and whether its
    interval over users excludes 0."""
    lines = []
    for c in comps:
        h, n = c["HR@10"], c["nDCG@10"]
        sign = "lies above 0" if n["ci95"][0] > 0 else "lies below 0" if n["ci95"][1] < 0 else "contains 0"
        lines.append(f"- {c['measures'][0].upper() + c['measures'][1:]} ({SHORT.get(c['a'], c['a'])} − {SHORT.get(c['b'], c['b'])}): "
                     f"HR@10 {h['difference']:+.2f} [{h['ci95'][0]:+.2f}, {h['ci95'][1]:+.2f}], nDCG@10 "
                     f"{n['difference']:+.2f} [{n['ci95'][0]:+.2f}, {n['ci95'][1]:+.2f}]; the nDCG@10 interval "
                     f"({n['users']} users) {sign}, p over seeds {p_seeds(c)}.")
    return "\n".join(lines)


def screen(all_rows, keep_test=False):
    """Rank the variants by mean validation nDCG@10 (HR@10 breaks ties) and keep test numbers
    for the chosen one only: the other rows keep their validation numbers, not their test ones
    (keep_test, phase3: every row keeps them, to show why a variant loses; the choice is the same)."""
    t = by_label(all_rows)[""]
    key = {lb: tuple(mean_std([r[f"valid {m}"] for r in rs])[0] for m in ("nDCG@10", "HR@10")) for lb, rs in t.items()}
    order = sorted(t, key=key.get, reverse=True)
    kept = [r if r["label"] == order[0] or keep_test else
            {k: v for k, v in r.items() if not k.endswith("@10") or k.startswith("valid ")} for r in all_rows]
    return kept, {"chosen": order[0], "order": order}


def cell(rs, m):
    """A metric of a label's rows: mean ± std over seeds, or the value of one seed."""
    return " ± ".join(f"{v:.2f}" for v in mean_std([r[m] for r in rs])) if len(rs) > 1 else f"{rs[0][m]:.2f}"


def screen_md(t, summary):
    """The screen's variants in the order validation ranks them; test for the chosen one only:
    [table, note], each a markdown block."""
    md = ["| rank | variant | seeds | valid HR@10 | valid nDCG@10 | test HR@10 | test nDCG@10 |", "|---|---|---|---|---|---|---|"]
    for i, lb in enumerate(summary["order"], 1):
        rs, chosen = t[lb], lb == summary["chosen"]
        cells = [cell(rs, m) for m in ["valid HR@10", "valid nDCG@10", *(["HR@10", "nDCG@10"] if chosen else [])]]
        md.append(f"| {i} | {lb}{' (chosen)' if chosen else ''} | {len(rs)} | " + " | ".join(cells + ["", ""] * (not chosen)) + " |")
    return ["\n".join(md), "Chosen by mean validation nDCG@10 over the seeds (a gate fit on validation scored "
                             "cross-fitted); test is reported for the chosen variant only."]


def phase3_md(t, summary):
    """The phase-3 variants in the order validation ranks them, validation beside test, cold
    targets and each expert's gate share (warmest → coldest bucket): [table, note], each a
    markdown block."""
    metrics = ["valid HR@10", "valid nDCG@10", "valid cold HR@10", "HR@10", "nDCG@10", "cold HR@10"]
    vs = summary.get("valid_vs_recipe", {})
    md = ["| rank | variant | seeds | " + " | ".join(metrics) + " | valid nDCG@10 − the recipe's [95% CI over users] "
          "| gate shares |", "|---|---|---|" + "---|" * (len(metrics) + 2)]
    for i, lb in enumerate(summary["order"], 1):
        rs = t[lb]
        cells = [cell(rs, m) for m in metrics]
        d = vs.get(lb)
        cells.append("{:+.2f} [{:+.2f}, {:+.2f}]".format(d["difference"], d["low"], d["high"]) if d else "")
        shares = gate_shares(rs) if all("gate_per_bucket" in r for r in rs) else ""
        if all("logit_adjust_tau" in r for r in rs):  # --logit-adjust: the tau of each seed (and of its folds)
            shares += "; τ " + ", ".join(f"{r['logit_adjust_tau']:g}" + (
                " (folds " + ", ".join(f"{t:g}" for t in r["logit_adjust_valid_fold taus"]) + ")"
                if "logit_adjust_valid_fold taus" in r else "") for r in rs)
        md.append(f"| {i} | {lb}{' (chosen)' if lb == summary['chosen'] else ''} | {len(rs)} | " + " | ".join(cells)
                  + f" | {shares} |")
    return ["\n".join(md), "Ranked by mean validation nDCG@10 over the seeds (a gate fit on validation scored "
                             "cross-fitted); this dataset's choice is the first, whatever the test columns say. The "
                             "interval: each validation user's nDCG@10 averaged over the seeds, then a paired t-interval "
                             "over the users. A variant joins the recipe only where it raises validation nDCG@10 on every "
                             "dataset screened, with an interval above 0 on at least one "
                             "([how](../experiments.md#how-the-recipe-was-chosen))."]


RESULTS_INTRO = """# Results

Written by `python experiments.py report` from the JSON files beside each table (every
`results/NAME/EXP.json` holds the rows of its runs and the statistics); do not edit by hand.
HR@10 / nDCG@10 in %, test split, full ranking, a repeated target is a miss
([protocol](../README.md#evaluation-protocol)); how each experiment is run and what each row
is: [experiments.md](experiments.md).

Per dataset, the recipe (`--preset recipe`: `--loss ce`, standardised one-layer f_MLP, LLM
expert from the CE MoRec, the text-kNN expert beside the three, experts not fine-tuned, gate
fit on validation) against controls that reuse its expert runs and fit their gate on
validation alike; each line is the difference a − b with its paired 95% interval over test
users."""


TITLES = {"table2": "Table 2", "table3": "Table 3", "fig2": "Fig. 2: SASRec vs PAD by target frequency",
          "fig3": "Fig. 3: top/bottom-10% collaborative pairs of cold items", "fig4": "Fig. 4: anchoring",
          "fig5": "Fig. 5", "fig6": "Fig. 6: Kendall's tau to the phase-1 ID table",
          "deviations": "The authors' choices, one at a time",
          "verdict": "Same-treatment controls of the recipe",
          "screen": "The text-path screen, chosen on validation",
          "phase3": "Phase-3 variants on the text path's experts, chosen on validation"}
TABLES_ONLY = ("table2", "table3", "deviations", "verdict", "screen", "phase3")  # no figure


def title_of(exp, name, seeds, preset):
    title = TITLES[exp] + (f" ({name}, seed {seeds[0]}" if exp == "fig3" else f" ({name}, seeds {seeds}")
    return title + (")" if preset == "none" else f", --preset {preset})")


def collect(exp, panels, data, args, png):
    """An experiment's rows (one per run) and summary (intervals over users, the screen's
    choice), from the finished runs; fig3's histograms need the runs, so its figure is drawn here."""
    if exp == "verdict":
        all_rows = rows(exp, panels)
        return all_rows, {"comparisons": comparisons(panels[""], by_label(all_rows)[""], with_controls=True)}
    if exp == "screen":
        return screen(rows(exp, panels))
    if exp == "phase3":  # the choice, and each variant against the recipe over the validation users
        kept, summary = screen(rows(exp, panels), keep_test=True)
        runs = panels[""]
        if RECIPE_LABEL in runs:
            summary["valid_vs_recipe"] = {lb: dict(zip(("difference", "low", "high", "users"),
                                                       user_interval(rs, runs[RECIPE_LABEL], "nDCG@10", "valid")))
                                          for lb, rs in runs.items() if lb != RECIPE_LABEL}
        return kept, summary
    if exp == "fig6":
        return kendall_rows(panels, data, args.max_pairs), {"n_buckets": data["n_buckets"]}
    if exp == "fig3":
        return fig3(panels, data, png, title_of(exp, data["name"], args.seeds, args.preset)), {}
    all_rows = rows(exp, panels)
    if exp == "table2":  # PAD (and the recipe) against the best other row, over users
        return all_rows, {"comparisons": comparisons(panels[""], by_label(all_rows)[""], with_controls=False)}
    return all_rows, {}


def render(exp, all_rows, summary, title, name, png):
    """The markdown of an experiment (and its bar or line figure) from its rows and summary
    alone, so `experiments.py report` remakes every page from the committed JSON files."""
    tables = by_label(all_rows)
    md = [f"## {title}"]
    if exp == "verdict":
        md += verdict_md(tables[""], summary)
    elif exp == "screen":
        md += screen_md(tables[""], summary)
    elif exp == "phase3":
        md += phase3_md(tables[""], summary)
    elif exp == "fig6":
        buckets = [f"bucket {b}" for b in range(1, summary.get("n_buckets", 10) + 1)]
        md += [f"### {p}\n" + summary_table(t, metrics=buckets) for p, t in tables.items()]
        line_figure(tables, png, title, len(buckets))
    elif exp == "fig3":
        md += [summary_table(tables[""], metrics=("textual separation",))]
    for panel, t in tables.items() if exp not in ("verdict", "screen", "phase3", "fig6", "fig3") else ():
        if exp == "table2":
            valid = all("valid HR@10" in r for rs in t.values() for r in rs)
            metrics = [*(["valid HR@10", "valid nDCG@10"] if valid else []), "HR@10", "nDCG@10", "cold HR@10"]
            if all("HR@10 (repeats kept)" in r for rs in t.values() for r in rs):
                metrics += ["HR@10 (repeats kept)", "nDCG@10 (repeats kept)"]
            best, p, diff = significance(t) if "PAD" in t and len(t) > 1 else (None, float("nan"), 0.0)
            paper = PAPER_TABLE2.get(name)
            extra = ("paper HR@10 / nDCG@10", {lb: "%.2f / %.2f" % v for lb, v in paper.items()}) if paper else None
            md += [summary_table(t, metrics, base="SASRec" if "SASRec" in t else None,
                                 star=("PAD", p if diff > 0 else float("nan")), extra=extra)] + ([VALID_NOTE] if valid else [])
            if best:  # ★ only where PAD is above that row
                md += [f"\nPAD vs the best other row ({best}), paired t-test over seeds on nDCG@10: "
                       f"PAD {'above' if diff > 0 else 'below'} it by {abs(diff):.2f}, p = "
                       + ("n/a (one seed)" if math.isnan(p) else f"{p:.3g}")]
            md += comparisons_md(summary.get("comparisons", [])) + gates_md(t)
        elif exp == "deviations":  # each authors' choice against ours, seeds paired
            ours = {r["seed"]: r for r in t["ours"]}
            p_ours = {lb: " / ".join(f"{paired_t([r[m] for r in rs], [ours[r['seed']][m] for r in rs]):.2g}"
                                     for m in ("HR@10", "nDCG@10")) for lb, rs in t.items() if lb != "ours"}
            md += [f"### {panel}\n" + summary_table(t, base="ours", extra=("p vs ours, HR@10 / nDCG@10", p_ours))]
        elif exp == "table3":
            md += [f"### {panel}\n" + summary_table(t, base="Origin")]
        elif exp == "fig2":
            md += [summary_table(t, metrics=[f"{g} HR@10" for g in GROUPS] + [f"{g} nDCG@10" for g in GROUPS], base="SASRec")]
        else:
            md += [(f"### {panel}\n" if panel else "") + summary_table(t)]
    if exp not in TABLES_ONLY + ("fig6", "fig3"):
        bar_figure(tables, png, title, groups=GROUPS if exp == "fig2" else None)
    return md


def write_files(results, stem, md, record):
    atomic_write_text("\n\n".join(md) + "\n", results / f"{stem}.md")
    atomic_write_text(json.dumps(record, indent=1), results / f"{stem}.json")
    with open(results / f"{stem}.csv.tmp", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in record["rows"] for k in r if k != "gate_per_bucket"))
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(record["rows"])
    os.replace(results / f"{stem}.csv.tmp", results / f"{stem}.csv")


def report(exp, panels, data, args, results):
    name = data["name"]
    stem = exp if args.preset == "none" else f"{exp}-{args.preset}"  # a preset's tables beside ours, not over them
    title = title_of(exp, name, args.seeds, args.preset)
    if args.only:  # some of its labels: beside the full page, not over it, and titled so
        n = sum(len(labels) for labels in panels.values())
        stem, title = f"{stem}-only", f"{title[:-1]}, only {n} of its rows (--only))"
    all_rows, summary = collect(exp, panels, data, args, results / f"{stem}.png")
    md = render(exp, all_rows, summary, title, name, results / f"{stem}.png")
    write_files(results, stem, md, {"experiment": exp, "data": name, "seeds": args.seeds, "preset": args.preset,
                                    "title": title, "commit": commit(), "rows": all_rows,
                                    **({"summary": summary} if summary else {})})
    print("\n".join(md))
    print(f"wrote {results}/{stem}.md, .csv, .json" + ("" if exp in TABLES_ONLY else ", .png"))


def commit():
    """The code's git commit ('+' when the working tree differs from it), or 'unknown'."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    return (head + "+" * bool(git("status", "--porcelain", "--untracked-files=no"))) if head else "unknown"


def rerender(results):
    """experiments.py report: remake every RESULTS/NAME/EXP.md (and its figure) from its JSON,
    and RESULTS/README.md's per-dataset verdicts; nothing is trained or read from runs/."""
    for path in sorted(Path(results).glob("*/*.json")):
        record = json.loads(path.read_text())
        exp, png = record["experiment"], path.with_suffix(".png")
        title = record.get("title") or title_of(exp, record["data"], record["seeds"], record.get("preset", "none"))
        md = render(exp, record["rows"], record.get("summary", {}), title, record["data"], png)
        write_files(path.parent, path.stem, md, record)
        print(f"remade {path.with_suffix('.md')}")
    write_index(results)


def write_index(results):
    """RESULTS/README.md: per dataset folder, the verdict sentences and table, Fig. 2, and
    every table with the commit of the code that wrote it."""
    index = [RESULTS_INTRO]
    for folder in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        name, pages = folder.name, sorted(folder.glob("*.md"))
        index.append(f"## {name}")
        if (folder / "verdict.json").is_file():
            record = json.loads((folder / "verdict.json").read_text())
            index += [verdicts_md(record["summary"]["comparisons"], name),
                      "\n\n".join(verdict_md(by_label(record["rows"])[""], record["summary"])[:1])]
        else:
            index.append("No verdict yet (`experiments.py verdict --data %s`)." % name)
        if (folder / "fig2.png").is_file():
            index.append(f"![Fig. 2, {name}]({name}/fig2.png)")
        made = {p.stem: json.loads(p.with_suffix(".json").read_text()).get("commit", "not recorded") for p in pages}
        index.append("Every table, with the commit of the code that wrote it (its runs may be older; 'not recorded': "
                     "a table older than this record, whose commit `git log` on the file gives): "
                     + ", ".join(f"[{p.stem}]({name}/{p.name}) ({made[p.stem]})" for p in pages))
    atomic_write_text("\n\n".join(index) + "\n", Path(results) / "README.md")
    print(f"remade {Path(results) / 'README.md'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+", choices=(*EXPERIMENTS, "report"),
                   help="which of the paper's tables / figures; report (alone): remake every page under --results from "
                        "its JSON, nothing run")
    p.add_argument("--data", default="ml-100k", help="prepared dataset (prepare_data.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="paper: 3 runs")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (CPU: one per core; each gets cores/jobs threads)")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for every run")
    p.add_argument("--extra", default="", help='flags for every training run, e.g. "--epochs 2 --batch-size 16"; they '
                   'are not in run names and finished runs are reused by name, so give such a plan its own --runs; a flag a '
                   'run sets itself (its name records it) wins over them')
    p.add_argument("--model-flags", default="", help='model flags for the runs that build one from scratch (pretrain.py, '
                   'baselines.py), e.g. "--d 64 --n-blocks 2"; align.py and finetune.py take them from phase 1')
    p.add_argument("--runs", default="runs", help="checkpoints go to RUNS/NAME/")
    p.add_argument("--results", default="results", help="tables and figures go to RESULTS/NAME/ (EXP.md; with --preset P, EXP-P.md)")
    p.add_argument("--max-pairs", type=int, default=5000, help="fig6: behaviour-target pairs per bucket")
    p.add_argument("--preset", default="none", choices=("none", "authors"),
                   help="every run with this --preset (trainer.PRESETS), named _PRESET; tables EXP-PRESET.md (the "
                        "recipe preset's configuration is a row of verdict and phase3 already)")
    p.add_argument("--only", nargs="+", metavar="LABEL",
                   help="run and report only these labels of the chosen experiments, e.g. SASRec text-kNN PAD; the "
                        "pages are EXP[-PRESET]-only.*, beside the full ones")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do, run nothing")
    args = p.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be at least 1")
    if "deviations" in args.experiments and args.preset != "none":
        raise SystemExit(f"--preset {args.preset}: deviations sets the authors' choices one at a time on top of the "
                         f"defaults; run it without --preset")

    if "report" in args.experiments:
        if args.experiments != ["report"]:
            raise SystemExit("report remakes the pages from the JSON files of finished experiments: run it alone")
        return rerender(args.results)
    data = load_dataset(args.data)
    plan = Plan(args.runs, data, args.preset)
    chosen = {exp: groups(exp, plan, args.seeds) for exp in args.experiments}
    if args.only:
        known = {lb for panels in chosen.values() for labels in panels.values() for lb in labels}
        if set(args.only) - known:
            raise SystemExit(f"--only {' '.join(sorted(set(args.only) - known))}: no such label in "
                             f"{' '.join(args.experiments)}; labels: {', '.join(sorted(known))}")
        chosen = {exp: {p: {lb: rs for lb, rs in labels.items() if lb in args.only} for p, labels in panels.items()}
                  for exp, panels in chosen.items()}
        chosen = {exp: {p: labels for p, labels in panels.items() if labels} for exp, panels in chosen.items()}
    needed = {r.out: r for panels in chosen.values() for labels in panels.values() for rs in labels.values() for r in rs}
    closure, stack = {}, list(needed.values())
    while stack:  # add dependencies, then order them first
        r = stack.pop()
        if r.out not in closure:
            closure[r.out] = r
            stack += r.deps
    execute(sorted(closure.values(), key=lambda r: len(r.deps)), args)
    if args.dry_run:
        return
    results = Path(args.results) / data["name"]
    results.mkdir(parents=True, exist_ok=True)
    for exp, panels in chosen.items():
        report(exp, panels, data, args, results)
    write_index(args.results)  # results/README.md follows every table written


if __name__ == "__main__":
    main()

"""Runs on disk: where each run is written (its name holds the settings that tell two runs
apart), and its checkpoint files: read, checked against the dataset and the phase, rebuilt
into a model, reused when finished, resumed from OUT.last.pt.

    runs/NAME/pretrain_sasrec_seed0.pt       a finished run: {"phase", "model_args", "state",
    runs/NAME/pretrain_sasrec_seed0.json       "args", "fingerprint", "metrics", ...}; its metrics
    runs/NAME/pretrain_sasrec_seed0.last.pt  while it trains: the state after its latest epoch

A checkpoint describes itself (complete model_args, the flags, the dataset's fingerprint): the
next phase rebuilds its model from it and refuses one of another dataset, phase or encoder, or
one whose model_args lack a key (MODEL_ARGS); nothing is guessed for an older run.
"""
import json
import os
from pathlib import Path

import torch

from dataset import atomic_save, atomic_write_text
from models import build_model

# --- Where runs are written --------------------------------------------------------------------

# One template per script: the settings that tell two runs of it apart. Any other flag is
# checked against the stored arguments before a finished run is replaced (reuse_finished).
RUN_NAMES = {
    "pretrain": "pretrain_{backbone}{tags}_seed{seed}",
    "align": "align_{backbone}_{kernel}_{anchor}_gamma{gamma:g}{tags}_seed{seed}",
    "finetune": "finetune_{backbone}_{gate}_{experts}{align}{llm}{tags}_seed{seed}",
    "baseline": "baseline_{method}_{backbone}{tags}_seed{seed}",
}
DEFAULT_ALIGN = {"kernel": "gaussian", "anchor": "rec", "gamma": 0.1}  # align.py's defaults, finetune.py's input
GATE_FITS = {"train": "", "valid": "-validfit", "valid-only": "-validonly"}  # finetune.py --gate-fit: run-name suffix


def adjust_tag(logit_adjust):
    """finetune.py --logit-adjust in the run name: '' (off), -la0.2, -lavalid, -lavalid-1se, -lavalid-cold."""
    return "" if not logit_adjust else f"-la{logit_adjust}" if isinstance(logit_adjust, str) else f"-la{logit_adjust:g}"


# How f_MLP (Eq. 7) reads the text table: (flag, args key, align.py's default)
TEXT_FLAGS = (("--text-norm", "text_norm", "none"), ("--text-layers", "text_layers", 4), ("--text-out", "text_out", "gelu"))


def align_tag(kernel, anchor, gamma):
    """The phase-2 variant in a finetune run's name: _KERNEL_ANCHOR_gammaG."""
    return f"_{kernel}_{anchor}_gamma{gamma:g}"


def text_of(args):
    """The text flags (TEXT_FLAGS) of parsed arguments, None where unset."""
    return {k: getattr(args, k, None) for k in ("text_norm", "text_layers", "text_out")}


def text_tag(text_norm=None, text_layers=None, text_out=None):
    """How f_MLP reads the text (TEXT_FLAGS) in a run's name, relative to the authors'
    release (None: theirs): '' for theirs, else e.g. _text-std-l0-lin (standardised, 0 hidden
    layers, linear out)."""
    parts = (["std"] * (text_norm == "standard") + [f"l{text_layers}"] * (text_layers not in (None, 4))
             + ["lin"] * (text_out == "linear"))
    return "_text-" + "-".join(parts) if parts else ""


def run_path(data_name, script, runs="runs", **settings):
    """runs/NAME/<script>_<settings>_seedS.pt, the checkpoint of one run; its metrics are the
    .json beside it. finetune takes experts as a list, align as align_tag(...) or '' and
    llm_init (a MoRec-seeded LLM expert, _llm-morec); text (a dict of text flags, text_tag), a
    loss other than the paper's bce (_ce) and a --preset (_authors) are named."""
    settings["llm"] = "_llm-morec" if settings.pop("llm_init", False) else ""
    if isinstance(settings.get("experts"), (list, tuple)):
        settings["experts"] = "-".join(settings["experts"])
    loss, preset = settings.pop("loss", "bce"), settings.pop("preset", "none")
    settings["tags"] = (text_tag(**settings.pop("text", None) or {}) + ("" if loss == "bce" else f"_{loss}")
                        + ("" if preset == "none" else f"_{preset}"))
    return Path(runs) / data_name / (RUN_NAMES[script].format(**settings) + ".pt")


# --- Reading a checkpoint, and rebuilding its model -------------------------------------


def read_checkpoint(path, keys=("phase", "model_args", "state", "fingerprint")):
    """torch.load with weights_only=True (nothing pickled is executed) and a one-line error;
    the file must be a dict holding `keys` (a phase's checkpoint, or fit's OUT.last.pt)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such checkpoint; run the phase that writes it (pretrain.py, align.py, finetune.py)")
    except Exception as e:
        raise SystemExit(f"{path}: not a readable PAD checkpoint ({type(e).__name__}); re-run the phase that writes it")
    if not isinstance(ckpt, dict) or not set(keys) <= ckpt.keys():
        raise SystemExit(f"{path}: not a PAD checkpoint (no {'/'.join(keys)})")
    return ckpt


ENCODER_ARGS = ("backbone", "d", "L", "n_blocks", "n_heads", "dropout", "block")
# what every checkpoint's model_args holds, by kind; an alignment expert (alone or in PAD) also fuse_dropout
MODEL_ARGS = {"expert": ("expert", *ENCODER_ARGS, *(key for _, key, _ in TEXT_FLAGS)),
              "pad": ("experts", "gate", "gate_init", "bucket_bias", *ENCODER_ARGS, *(key for _, key, _ in TEXT_FLAGS)),
              "textknn": ("mode",)}


def check_model_args(ckpt, path):
    """Refuse a checkpoint whose model_args lack a key its model needs (MODEL_ARGS): one written
    by an older version of this code, which the next phase would otherwise have to guess."""
    model_args = ckpt["model_args"]
    aligned = model_args.get("expert") == "align" or "align" in model_args.get("experts", ())
    need = (*MODEL_ARGS.get(model_args.get("kind"), ("kind",)), *("fuse_dropout",) * aligned)
    lacking = [k for k in need if k not in model_args]
    if lacking:
        raise SystemExit(f"{path}: its model_args lack {', '.join(lacking)} (written by an older version of this code); "
                         f"re-run the script that wrote it with --overwrite")


def check_checkpoint(ckpt, data, path, phase=None, backbone=None, like=None):
    """Refuse a checkpoint from another dataset, phase or backbone, or (like=model_args of
    another checkpoint) one with another encoder configuration, naming the file and the fix."""
    if ckpt["fingerprint"] != data["fingerprint"]:
        raise SystemExit(f"{path} was trained on dataset {ckpt['dataset']!r} (fingerprint {ckpt['fingerprint']}), "
                         f"not on {data['name']!r} ({data['fingerprint']}); pass the matching --data or re-run the "
                         f"earlier phases on {data['name']!r}")
    if phase is not None and ckpt["phase"] != phase:
        raise SystemExit(f"{path} is a phase-{ckpt['phase']} checkpoint; this step needs a phase-{phase} one")
    if backbone is not None and ckpt["model_args"]["backbone"] != backbone:
        raise SystemExit(f"{path} uses backbone {ckpt['model_args']['backbone']!r}, not {backbone!r}; "
                         f"pass a checkpoint of the same backbone")
    if like is not None:
        check_model_args(ckpt, path)
        diff = {k: (ckpt["model_args"][k], like[k]) for k in ENCODER_ARGS if ckpt["model_args"][k] != like[k]}
        if diff:
            raise SystemExit(f"{path} was built with {', '.join(f'{k}={a}' for k, (a, b) in diff.items())} but the "
                             f"phase-1 checkpoint with {', '.join(f'{k}={b}' for k, (a, b) in diff.items())}; "
                             f"pass checkpoints of one pipeline")


def model_from_checkpoint(ckpt, data, path, phase=None, backbone=None):
    """Rebuild a checkpoint's model for `data` after check_checkpoint."""
    check_checkpoint(ckpt, data, path, phase, backbone)
    check_model_args(ckpt, path)
    model = build_model(ckpt["model_args"], data)
    model.load_state_dict(ckpt["state"])
    return model


# --- Finished runs, and the per-epoch state behind --resume -----------------------------

# flags that may differ between two runs with the same output: they do not change the weights
# (the data is compared by its fingerprint, not by the name it was given)
# (--ce-chunk: the same loss up to float rounding, as --threads: a run out of memory may resume in chunks)
SAME_RUN_FREE = ("resume", "quiet", "out", "overwrite", "threads", "eval_batch_size", "ce_chunk", "data", "preset")
RESUME_FREE = (*SAME_RUN_FREE, "epochs")


# flags added after runs were written, each with the value under which the code ran before it
# existed: an earlier run that does not record one ran with that value
ADDED_LATER = {"bucket_temp": False, "logit_adjust": 0, "user_bias": False}


def flag_diff(then, now, free):
    """'--flag A (now B)' for every flag set differently in two vars(args) dicts; a flag that
    the earlier run did not record (it did not exist yet) differs, unless ADDED_LATER says
    what it ran with: the run is not reused."""
    then = {**{k: v for k, v in ADDED_LATER.items() if k in now}, **then}

    def shown(args, k):
        return args[k] if k in args else "(not recorded)"
    return [f"--{k.replace('_', '-')} {shown(then, k)} (now {shown(now, k)})" for k in sorted(now.keys() | then.keys())
            if k not in free and (k not in then or k not in now or now[k] != then[k])]


def reuse_finished(out, data, args):
    """True when OUT and its metrics JSON are a finished run of these flags on this data:
    the run is reused (its test metrics printed), not retrained. A finished run with other
    flags or data is refused, naming the flags, unless --overwrite."""
    out = Path(out)
    if args.overwrite or args.resume or not (out.is_file() and out.with_suffix(".json").is_file()):
        return False
    ckpt = read_checkpoint(out, keys=("args", "fingerprint", "metrics"))
    diff = flag_diff(ckpt["args"], vars(args), SAME_RUN_FREE)
    if ckpt["fingerprint"] != data["fingerprint"]:
        diff.append(f"data fingerprint {ckpt['fingerprint']} (now {data['fingerprint']})")
    if diff:
        raise SystemExit(f"{out} is a finished run with {', '.join(diff)}; pass --out to write elsewhere, "
                         f"or --overwrite to replace it")
    if os.environ.get("RANK", "0") == "0":  # the only process, or torchrun's rank 0 (trainer.is_main_process)
        test = ckpt["metrics"]["test"]
        print(f"reusing finished run {out} (same flags and data; --overwrite retrains)\n"
              f"test: {'  '.join(f'{m} {v:.4f}' for m, v in test.items() if '@' in m)}", flush=True)
    return True


def write_run(model, model_args, data, args, phase, metrics, out):
    """A finished run: the self-describing checkpoint OUT and its metrics OUT.json (each written
    to a temporary file, then renamed); OUT.last.pt, the state --resume needed, is removed."""
    ckpt = {"phase": phase, "model_args": model_args, "state": {k: v.cpu() for k, v in model.state_dict().items()},
            "args": vars(args), "dataset": data["name"], "n_items": data["n_items"],
            "fingerprint": data["fingerprint"], "metrics": json.loads(json.dumps(metrics))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, out)
    atomic_write_text(json.dumps(metrics, indent=1), out.with_suffix(".json"))
    state_path(out).unlink(missing_ok=True)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def state_path(out):
    """Where a run keeps its resumable state while it trains: OUT.last.pt beside OUT."""
    return Path(out).with_suffix(".last.pt")


def read_state(path, data, args):
    """The state file for --resume, refused when it was written for other data or flags."""
    if not path.is_file():
        raise SystemExit(f"--resume: {path} not found (no epoch of this run finished, or it completed); "
                         f"run without --resume")
    state = read_checkpoint(path, keys=("epoch", "state", "optimizer", "rng", "args", "fingerprint"))
    if state["fingerprint"] != data["fingerprint"]:
        raise SystemExit(f"--resume: {path} was written for dataset {state['args']['data']!r} (fingerprint "
                         f"{state['fingerprint']}), not {args.data!r} ({data['fingerprint']}); pass that --data "
                         f"or run without --resume")
    diff = flag_diff(state["args"], vars(args), RESUME_FREE)
    if diff:
        raise SystemExit(f"--resume: {path} was written with {', '.join(diff)}; pass the same flags "
                         f"or run without --resume")
    return state


# --- finetune.py's inputs: the runs its experts start from --------------------------------


def match_text_args(args, model_args, path):
    """Make args' text flags those of the run at `path` (its model_args): a flag left unset
    (None) takes the run's value; one set otherwise is refused in one line, since two text
    experts or a warm start must read the table alike."""
    for flag, key, _ in TEXT_FLAGS:
        trained = model_args[key]
        if getattr(args, key) not in (None, trained):
            raise SystemExit(f"{flag} {getattr(args, key)}: {path} was trained with {flag} {trained}; "
                             f"pass that, or a run made with {flag} {getattr(args, key)}")
        setattr(args, key, trained)


def phase3_inputs(args, data):
    """finetune.py's input runs, reconciled with its flags: the phase-1 (--pretrain), phase-2
    (--align, when the alignment expert is kept) and MoRec (--llm-init) checkpoints, by default
    the runs named like this one (same seed, loss, preset, text flags); each checked against
    the data and phase 1's encoder. The text flags left unset take the text experts' values, so
    that both read the table alike. Returns ({expert: path}, {expert: checkpoint}, the phase-2
    run's name tag), for the experts that start from a run."""
    name, tags = data["name"], {"loss": args.loss, "preset": args.preset}
    args.pretrain = str(args.pretrain or run_path(name, "pretrain", backbone=args.backbone, seed=args.seed, **tags))
    args.align = (str(args.align or run_path(name, "align", backbone=args.backbone, seed=args.seed, **tags,
                                             **DEFAULT_ALIGN, text=text_of(args)))
                  if "align" in args.experts else None)
    if args.llm_init == "morec":
        args.llm_init = str(run_path(name, "baseline", method="morec", backbone=args.backbone, seed=args.seed, **tags,
                                     text=text_of(args)))
    paths = {k: p for k, p in (("id", args.pretrain), ("align", args.align), ("llm", args.llm_init)) if p}
    ckpts = {k: read_checkpoint(p) for k, p in paths.items()}
    # every expert takes phase 1's encoder configuration, so phase 1 is checked even without the ID expert
    check_checkpoint(ckpts["id"], data, paths["id"], phase=1, backbone=args.backbone)
    check_model_args(ckpts["id"], paths["id"])
    for kind, phase in (("align", 2), ("llm", "baseline morec")):
        if kind in ckpts:
            check_checkpoint(ckpts[kind], data, paths[kind], phase=phase, backbone=args.backbone,
                             like=ckpts["id"]["model_args"])
            match_text_args(args, ckpts[kind]["model_args"], paths[kind])
    for _, key, default in TEXT_FLAGS:  # no text expert run: align.py's defaults
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    tag = align_tag(*(ckpts["align"]["args"][k] for k in ("kernel", "anchor", "gamma"))) if "align" in ckpts else ""
    return paths, ckpts, tag

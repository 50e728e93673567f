"""One configuration's whole pipeline, timed: every run it needs (phase 1, the MoRec baseline,
phase 2, phase 3), trained from nothing into a fresh --runs folder, one after the other
through experiments.py, then each run's wall time, epochs and seconds per epoch.

    python benchmarks/pipeline.py --data pantry                            # the text-path recipe, CPU
    python benchmarks/pipeline.py --data synthetic-mind --device cuda --epochs 1 --extra "--compile reduce-overhead"

The configuration is a label of an experiments.py experiment (default: the recipe of
`verdict`). Prints one JSON line per run as it finishes (figure "run": wall seconds, epochs
trained, mean seconds per epoch, evaluation seconds) and one for the whole ("pipeline": wall
seconds), with bench.py's keys `figure`, `value`, `unit`, `dataset`, `device`, `threads`.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dataset import load_dataset  # noqa: E402
from experiments import RECIPE_LABEL, Plan, groups  # noqa: E402


def needed(run):
    """The run and every run it depends on, dependencies first."""
    out = []
    for d in run.deps:
        out += [r for r in needed(d) if r not in out]
    return out + [run]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml-100k", help="prepared dataset (name under data/ or a folder)")
    p.add_argument("--experiment", default="verdict", help="the experiments.py experiment that holds --label")
    p.add_argument("--label", default=RECIPE_LABEL, help="the configuration: a row label of --experiment")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="cap every training run at this many epochs")
    p.add_argument("--extra", default="", help="more flags for every training run, e.g. \"--compile reduce-overhead\"")
    p.add_argument("--model-flags", default="", help="model flags for the runs that build one, e.g. \"--d 64\"")
    p.add_argument("--runs", default=None, help="where the runs go (default: a new temporary folder; finished runs "
                                                "there are reused, not timed)")
    args = p.parse_args()
    runs = Path(args.runs or tempfile.mkdtemp(prefix="pipeline-"))
    data = load_dataset(args.data)
    panels = groups(args.experiment, Plan(runs, data), [args.seed])
    final = next((rs[0] for labels in panels.values() for lb, rs in labels.items() if lb == args.label), None)
    if final is None:
        raise SystemExit(f"--label {args.label!r}: not a row of experiments.py {args.experiment}")
    extra = " ".join([*(["--epochs", str(args.epochs)] if args.epochs else []), args.extra]).strip()
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)  # what experiments.py gives a run (--jobs 1)
    base = {"dataset": data["name"], "device": args.device, "threads": threads}
    runs_by_name = {run.out.name: run for run in needed(final)}
    t0 = time.time()
    # experiments.py prints "done NAME in Ns" as each run ends: each run's line is printed then,
    # so that a pipeline stopped by a time limit still leaves the runs that finished
    child = subprocess.Popen([sys.executable, "experiments.py", args.experiment, "--only", args.label, "--data", args.data,
                              "--seeds", str(args.seed), "--device", args.device, "--jobs", "1", "--runs", str(runs),
                              "--results", str(runs / "results"), *(["--extra", extra] if extra else []),
                              *(["--model-flags", args.model_flags] if args.model_flags else [])],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = []
    for line in child.stdout:
        tail = (tail + [line])[-40:]
        done = re.match(r"done (\S+) in (\d+)s", line)
        if done and done[1] in runs_by_name:
            metrics = runs_by_name[done[1]].metrics()
            seconds = [e["seconds"] for e in metrics["epochs"]]
            print(json.dumps({"figure": "run", "run": done[1], "script": runs_by_name[done[1]].cmd[0],
                              "value": float(done[2]), "unit": "s", "epochs": len(seconds),
                              "s_per_epoch": round(sum(seconds) / len(seconds), 2) if seconds else None,
                              "eval_s": round(metrics["eval_seconds"], 2), **base}), flush=True)
    if child.wait() != 0:
        raise SystemExit(f"experiments.py failed (exit {child.returncode}):\n{''.join(tail)[-3000:]}")
    print(json.dumps({"figure": "pipeline", "label": args.label, "value": round(time.time() - t0, 1), "unit": "s",
                      **base}))


if __name__ == "__main__":
    main()

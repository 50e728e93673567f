#!/bin/bash
# The recipe's whole pipeline timed on one CUDA GPU (benchmarks/pipeline.py), for a lent machine
# with no network: Pantry's every run to convergence, and one epoch of every run at MIND's and
# Electronics' sizes (Table 1), on synthetic data made here (benchmarks/synthetic.py; random text).
#
#   bash benchmarks/gpu-pipeline.sh pantry              # carry data/pantry (no MiniLM on a GPU machine)
#   bash benchmarks/gpu-pipeline.sh mind electronics    # one call each where a call's 10 minutes are short
#   DEVICE=cpu COMPILE= SCALE=0.002 bash benchmarks/gpu-pipeline.sh mind   # the same steps on a CPU, tiny
#
# Each dataset writes $OUT/pipeline-NAME.jsonl (pipeline.py's lines: every run's wall seconds,
# epochs, seconds per epoch and evaluation seconds, then the total) and $OUT/pipeline-NAME.log
# (experiments.py's failures, timeouts). CAP bounds each dataset in seconds (default 540,
# inside one call's 10 minutes); COMPILE holds the flags for every training run (default:
# CUDA graphs), MODEL pipeline.py's --model-flags (default: none, the model of the runs
# measured). The checkpoints stay in a temporary folder.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
CAP=${CAP:-540}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}
COMPILE=${COMPILE---compile reduce-overhead}
MODEL=${MODEL:-}
PY=${PYTHON:-python}
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu-pipeline.sh pantry|mind|electronics ..." >&2; exit 2; }
for name in "$@"; do
  case $name in pantry|mind|electronics) ;;
    *) echo "$name: not a dataset of this script; choose pantry, mind or electronics" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
R=$(mktemp -d)
status=0  # 1 when any dataset did not finish; the others still run
for name in "$@"; do
  log="$OUT/pipeline-$name.log"
  case $name in
    pantry)
      [ -f data/pantry/dataset.pt ] || { echo "data/pantry/dataset.pt: missing; prepare it and carry data/pantry" | tee "$log" >&2; status=1; continue; }
      data=pantry; cap=() ;;
    mind|electronics)
      start=$(date +%s)
      $PY benchmarks/synthetic.py --preset "$name" --scale "$SCALE" --out "$R/synthetic-$name" > "$log" 2>&1 \
        || { echo "$name: synthetic.py failed (see $log)" >&2; status=1; continue; }
      echo "synthetic.py: $(( $(date +%s) - start )) s" >> "$log"
      data="$R/synthetic-$name"; cap=(--epochs 1) ;;
  esac
  timeout "$CAP" $PY benchmarks/pipeline.py --data "$data" --device "$DEVICE" --runs "$R/runs-$name" "${cap[@]}" \
    ${COMPILE:+--extra "$COMPILE"} ${MODEL:+--model-flags "$MODEL"} > "$OUT/pipeline-$name.jsonl" 2>> "$log"
  code=$?
  echo "$name: exit $code" >> "$log"
  [ $code -eq 0 ] || { echo "$name: pipeline.py exit $code (124: past CAP; see $log)" >&2; status=1; }
done
rm -rf "$R"
exit $status

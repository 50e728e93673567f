#!/bin/bash
# experiments.py verdict and screen on Prime Pantry, verdict on Amazon Beauty, in one call of
# a lent GPU machine (no network, no MiniLM there: carry the prepared data/pantry and
# data/beauty). Every run trains on the GPU. What comes back (a lent machine returns eight
# files at most) is one JSON per table, $OUT/NAME-EXP.json, and the log; copy each to
# results/NAME/EXP.json and run `python experiments.py report`, which writes the .md, .csv
# and results/README.md from them.
#
#   OUT=/tmp/v SEEDS="0 1 2" CAP=540 bash benchmarks/gpu-verdict.sh
#
# CAP bounds the whole script in seconds (default 540, inside one call's 10 minutes); an
# experiment whose runs did not all finish writes no table, and the log says which ran.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
SEEDS=${SEEDS:-0}
CAP=${CAP:-540}
JOBS=${JOBS:-4}  # small models: several runs share the GPU
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/verdict.log"
R=$(mktemp -d)
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } > "$LOG" 2>&1
end=$(( $(date +%s) + CAP ))
for job in "pantry verdict" "beauty verdict" "pantry screen"; do
  set -- $job
  [ -f "data/$1/dataset.pt" ] || { echo "data/$1/dataset.pt: missing; prepare it here and carry data/$1" >> "$LOG"; continue; }
  left=$(( end - $(date +%s) ))
  [ "$left" -gt 30 ] || { echo "$1 $2: no time left" >> "$LOG"; continue; }
  start=$(date +%s)
  OMP_NUM_THREADS=2 timeout "$left" $PY experiments.py "$2" --data "$1" --seeds $SEEDS --device cuda --jobs "$JOBS" \
    --runs "$R/runs" --results "$R/results" >> "$LOG" 2>&1
  echo "$1 $2: exit $? after $(( $(date +%s) - start )) s" >> "$LOG"
  [ -f "$R/results/$1/$2.json" ] && cp "$R/results/$1/$2.json" "$OUT/$1-$2.json"
done

#!/bin/bash
# The GPU measurement of benchmarks/README.md ("On one H100") in one script, for a lent machine with one CUDA GPU and no
# network: every figure and log goes to $OUT (default benchmarks/gpu-out). It needs the prepared
# Pantry tensors, which a GPU machine cannot make (no MiniLM there): carry data/pantry.
#
#   bash benchmarks/gpu.sh            # about 8 minutes on one H100 before phase 2 ran compiled too (not run since)
#   CAP=110 bash benchmarks/gpu.sh    # each of its eight timed commands capped at 110 s (default 150)
#
# 1. bench.py's phase-1 train figures at the paper's batch 16 and at 128: the default CUDA
#    path (bf16 autocast, eager) against --compile reduce-overhead (CUDA graphs), timed in
#    alternating blocks in one process (--baseline), so the ratio holds on a busy machine.
# 2. The Pantry pipeline at batch 16, two epochs a phase, each phase eager and compiled: seconds
#    per epoch, with validation, from the logs. Phase 2's MMD takes a fixed number of rows with a
#    mask of the real ones (align.mmd_rows), so its compiled step too is one graph for every batch.
# Eight files come back from a lent machine at most: both batch sizes' figures go to one file
# (each line names its batch), the checkpoints stay in a temporary folder.
set -u
CAP=${CAP:-150}
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
[ -f data/pantry/dataset.pt ] || { echo "data/pantry/dataset.pt: missing; prepare it here and carry data/pantry" >&2; exit 1; }
PY=${PYTHON:-python}
ENV="$OUT/env-and-errors.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$ENV" 2>&1

: > "$OUT/train.jsonl"  # both batch sizes append to it
for batch in 16 128; do
  timeout $CAP $PY benchmarks/bench.py --data pantry --device cuda --figures train --phases 1 --batch-size $batch \
    --compile reduce-overhead --baseline --steps 20 --rounds 5 >> "$OUT/train.jsonl" 2>> "$ENV"
done

R=$(mktemp -d)
F=(--data pantry --device cuda --batch-size 16 --epochs 2 --quiet)
timeout $CAP $PY pretrain.py "${F[@]}" --out "$R/p1.pt" > "$OUT/phase1-eager.log" 2>&1
timeout $CAP $PY pretrain.py "${F[@]}" --compile reduce-overhead --out "$R/p1c.pt" > "$OUT/phase1-compiled.log" 2>&1
timeout $CAP $PY align.py "${F[@]}" --init "$R/p1.pt" --out "$R/p2.pt" > "$OUT/phase2-eager.log" 2>&1
timeout $CAP $PY align.py "${F[@]}" --compile reduce-overhead --init "$R/p1.pt" --out "$R/p2c.pt" \
  > "$OUT/phase2-compiled.log" 2>&1
timeout $CAP $PY finetune.py "${F[@]}" --pretrain "$R/p1.pt" --align "$R/p2.pt" --out "$R/p3.pt" > "$OUT/phase3-eager.log" 2>&1
timeout $CAP $PY finetune.py "${F[@]}" --compile reduce-overhead --pretrain "$R/p1.pt" --align "$R/p2.pt" \
  --out "$R/p3c.pt" > "$OUT/phase3-compiled.log" 2>&1
rm -rf "$R"  # the figures are the logs' seconds per epoch, not the weights

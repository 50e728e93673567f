#!/bin/bash
# The GPU measurement of issue 16 in one script, for a lent machine with one CUDA GPU and no
# network: every figure and log goes to $OUT (default benchmarks/gpu-out). It needs the prepared
# Pantry tensors, which a GPU machine cannot make (no MiniLM there): carry data/pantry.
#
#   bash benchmarks/gpu.sh            # about 8 minutes on one H100
#
# 1. bench.py's train figures, phases 1 and 3, at the paper's batch 16 and at 128: the default
#    CUDA path (bf16 autocast, eager) against --compile reduce-overhead (CUDA graphs), timed
#    in alternating blocks in one process (--baseline), so the ratio holds on a busy machine.
# 2. The Pantry pipeline at batch 16 with --compile reduce-overhead, three epochs a phase (each
#    capped at 150 s): seconds per epoch, with validation, from the logs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
[ -f data/pantry/dataset.pt ] || { echo "data/pantry/dataset.pt: missing; prepare it here and carry data/pantry" >&2; exit 1; }
PY=${PYTHON:-python}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1

for batch in 16 128; do
  timeout 150 $PY benchmarks/bench.py --data pantry --device cuda --figures train --phases 1,3 --batch-size $batch \
    --compile reduce-overhead --baseline --steps 20 --rounds 5 > "$OUT/train_b$batch.jsonl" 2> "$OUT/train_b$batch.err"
done

R="$OUT/runs"
F=(--data pantry --device cuda --batch-size 16 --compile reduce-overhead --epochs 3 --quiet)
timeout 150 $PY pretrain.py "${F[@]}" --out "$R/p1.pt" > "$OUT/phase1.log" 2>&1
timeout 150 $PY align.py "${F[@]}" --init "$R/p1.pt" --out "$R/p2.pt" > "$OUT/phase2.log" 2>&1
timeout 150 $PY finetune.py "${F[@]}" --pretrain "$R/p1.pt" --align "$R/p2.pt" --out "$R/p3.pt" > "$OUT/phase3.log" 2>&1
rm -f "$R"/*.pt  # the figures are the logs' seconds per epoch, not the weights
ls -la "$OUT" > "$OUT/files.txt"

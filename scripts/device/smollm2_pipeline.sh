#!/usr/bin/env bash
# The GPU run that produces the embedded default draft for SmolLM2-135M-Instruct. Runs on the device machine after
# `source scripts/device/device_stage.sh assemble` (see scripts/device/stage_smollm2.py), one stage per call:
#
#   bash scripts/device/smollm2_pipeline.sh data   # prompts + on-policy answers (greedy and T=0.7) -> /tmp/dspark_data
#   bash scripts/device/smollm2_pipeline.sh train  # 4 variants (DSpark/DFlash x 1/2 layers), time-boxed, in parallel
#   bash scripts/device/smollm2_pipeline.sh default  # the shipped draft + its DFlash ablation, then evaluation
#
# Everything worth keeping is copied to $OUT; /tmp survives only while the machine stays warm (~30 s between calls).
set -euo pipefail
DATA=/tmp/dspark_data
RUNS=/tmp/dspark_runs
OUT=${OUT:-/tmp/dspark_out}
TRAIN_MINUTES=${TRAIN_MINUTES:-6}
PROMPT_SEED=${PROMPT_SEED:-0}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"

case "$1" in
  data)
    mkdir -p "$DATA"
    python3 -m dspark.cli data prompts --source topics:4750 --source code:490 --source math:1500 \
      --seed "$PROMPT_SEED" --out "$DATA/prompts.jsonl"
    python3 - "$DATA/prompts.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
half = len(records) // 2
with open(sys.argv[1].replace(".jsonl", "_greedy.jsonl"), "w") as greedy, \
     open(sys.argv[1].replace(".jsonl", "_sampled.jsonl"), "w") as sampled:
    for index, record in enumerate(records):
        (greedy if index % 2 == 0 else sampled).write(json.dumps(record) + "\n")
print(f"{half} greedy + {len(records) - half} sampled prompts")
EOF
    python3 -m dspark.cli data respond --prompts "$DATA/prompts_greedy.jsonl" --out "$DATA/greedy" \
      --device cuda --dtype bfloat16 --batch-size 512 --max-new-tokens 384 --temperature 0 &
    python3 -m dspark.cli data respond --prompts "$DATA/prompts_sampled.jsonl" --out "$DATA/sampled" \
      --device cuda --dtype bfloat16 --batch-size 512 --max-new-tokens 384 --temperature 0.7 --top-p 0.9 &
    wait
    tar -czf "$OUT/data.tar.gz" -C "$DATA" .
    ls -la "$OUT"
    ;;
  train)
    mkdir -p "$RUNS"
    common=(--config configs/train/smollm2_dspark.yaml --data-dir "$DATA/greedy,$DATA/sampled"
            --time-budget-minutes "$TRAIN_MINUTES" --progress false)
    python3 -m dspark.cli train "${common[@]}" --output-dir "$RUNS/dspark-1L" > "$RUNS/dspark-1L.log" 2>&1 &
    python3 -m dspark.cli train "${common[@]}" --output-dir "$RUNS/dflash-1L" \
      --markov-rank 0 --enable-confidence-head false > "$RUNS/dflash-1L.log" 2>&1 &
    python3 -m dspark.cli train "${common[@]}" --output-dir "$RUNS/dspark-2L" \
      --num-hidden-layers 2 > "$RUNS/dspark-2L.log" 2>&1 &
    python3 -m dspark.cli train "${common[@]}" --output-dir "$RUNS/dflash-2L" --num-hidden-layers 2 \
      --markov-rank 0 --enable-confidence-head false > "$RUNS/dflash-2L.log" 2>&1 &
    wait || true
    tail -n 3 "$RUNS"/*.log
    tar -czf "$OUT/runs_metrics.tar.gz" -C "$RUNS" --exclude='checkpoints' --exclude='*.safetensors' .
    ls -la "$OUT"
    ;;
  default)
    # the shipped draft and its DFlash-only ablation, same data and time budget, then evaluation and speed
    if [ ! -d "$DATA/greedy" ]; then
      mkdir -p "$DATA" && tar -xzf .stage/data/data.tar.gz -C "$DATA"
    fi
    mkdir -p "$RUNS"
    common=(--config configs/train/smollm2_dspark.yaml --data-dir "$DATA/greedy,$DATA/sampled"
            --time-budget-minutes "$TRAIN_MINUTES" --progress false)
    python3 -m dspark.cli train "${common[@]}" --output-dir "$RUNS/dspark" > "$RUNS/dspark.log" 2>&1 &
    python3 -m dspark.cli train "${common[@]}" --output-dir "$RUNS/dflash" \
      --markov-rank 0 --enable-confidence-head false > "$RUNS/dflash.log" 2>&1 &
    wait || true
    grep -h "budget\|Error\|error" "$RUNS"/*.log || true
    tar -czf "$OUT/runs_default.tar.gz" -C "$RUNS" --exclude='checkpoints' --exclude='*.safetensors' .
    python3 benchmarks/smollm2_default.py --draft "dflash=$RUNS/dflash/final" --draft "dspark=$RUNS/dspark/final" \
      --ship dspark --out "$OUT" --speed-prompts 3 --speed-tokens 128
    ls -la "$OUT" "$OUT/shipped"
    ;;
  *)
    echo "usage: smollm2_pipeline.sh data|train|default" >&2
    exit 2
    ;;
esac

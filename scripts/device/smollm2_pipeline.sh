#!/usr/bin/env bash
# The GPU run that produces the embedded default draft for SmolLM2-135M-Instruct and every number published about it.
# Runs on the device machine after `source scripts/device/device_stage.sh assemble` (see
# scripts/device/stage_smollm2.py), one stage per device call (each call is limited to 10 minutes):
#
#   bash scripts/device/smollm2_pipeline.sh data     # prompts + on-policy answers (greedy and T=0.7) -> $DATA
#   bash scripts/device/smollm2_pipeline.sh train    # depth sweep: DSpark/DFlash x 1/2 layers, time-boxed, parallel
#   bash scripts/device/smollm2_pipeline.sh blocks   # block-size sweep: DSpark 1L at blocks 4/8/16 + DFlash-only at 8
#   bash scripts/device/smollm2_pipeline.sh measure  # dspark eval (all drafts) + dspark bench + the 8B cost model
#   bash scripts/device/smollm2_pipeline.sh speed    # issue #3: our loop's paths with the shipped draft, batches
#                                                    # 1/4/16/32, and the graph/compiled paths on SmolLM2
#
# Stages that train restore $DATA from $DATA_ARCHIVE (committed) or, without it, run `data` first.
# Everything worth keeping is copied to $OUT (at most 8 files of 16 MiB); /tmp survives only while the machine stays
# warm (~30 s between calls), so `measure` must be issued right after `blocks`.
set -euo pipefail
DATA=/tmp/dspark_data
RUNS=/tmp/dspark_runs
OUT=${OUT:-/tmp/dspark_out}
TRAIN_MINUTES=${TRAIN_MINUTES:-6}
PROMPT_SEED=${PROMPT_SEED:-0}
# the committed on-policy data of the last `data` run (2.3 MB); set DATA_ARCHIVE=none to generate afresh
DATA_ARCHIVE=${DATA_ARCHIVE:-data/smollm2_onpolicy_2026-12-01.tar.gz}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"

generate_data() {
  mkdir -p "$DATA"
  python3 -m dspark.cli data prompts --source topics:4750 --source code:490 --source math:1500 \
    --seed "$PROMPT_SEED" --out "$DATA/prompts.jsonl"
  # half the prompts answered greedily, half sampled: the draft meets both kinds of target output
  awk -v dir="$DATA" 'NR % 2 == 1 {print > dir "/prompts_greedy.jsonl"} NR % 2 == 0 {print > dir "/prompts_sampled.jsonl"}' \
    "$DATA/prompts.jsonl"
  python3 -m dspark.cli data respond --prompts "$DATA/prompts_greedy.jsonl" --out "$DATA/greedy" \
    --device cuda --dtype bfloat16 --batch-size 512 --max-new-tokens 384 --temperature 0 &
  python3 -m dspark.cli data respond --prompts "$DATA/prompts_sampled.jsonl" --out "$DATA/sampled" \
    --device cuda --dtype bfloat16 --batch-size 512 --max-new-tokens 384 --temperature 0.7 --top-p 0.9 &
  wait
  tar -czf "$OUT/data.tar.gz" -C "$DATA" .
}

ensure_data() {
  if [ -d "$DATA/greedy" ]; then return; fi
  if [ -f "$DATA_ARCHIVE" ]; then
    mkdir -p "$DATA" && tar -xzf "$DATA_ARCHIVE" -C "$DATA"
  else
    generate_data
  fi
}

# FlexAttention (compiled) is the default for packed blocks on CUDA; fall back to the dense mask if it cannot compile
training_attention() {
  if python3 -m dspark.cli train --config configs/train/smollm2_dspark.yaml --data-dir "$DATA/greedy,$DATA/sampled" \
      --output-dir /tmp/dspark_flex_check --max-steps 3 --eval-every 0 --progress false --attention flex \
      > /tmp/dspark_flex_check.log 2>&1; then
    echo flex
  else
    tail -n 20 /tmp/dspark_flex_check.log >&2
    echo dense
  fi
}

# train NAME [overrides...]: one time-boxed run in the background, log beside it
train() {
  local name=$1
  shift
  python3 -m dspark.cli train --config configs/train/smollm2_dspark.yaml --data-dir "$DATA/greedy,$DATA/sampled" \
    --time-budget-minutes "$TRAIN_MINUTES" --progress false --attention "$ATTENTION" --output-dir "$RUNS/$name" "$@" \
    > "$RUNS/$name.log" 2>&1 &
}

# ship NAME: the run's final draft in bf16, shards under 16 MB, as two tar parts in $OUT (each under 16 MiB)
ship() {
  python3 - "$RUNS/$1/final" /tmp/dspark_ship/"$1" <<'EOF'
import sys, torch
from dspark import DSparkDraftModel
DSparkDraftModel.from_pretrained(sys.argv[1]).to(torch.bfloat16).save_pretrained(sys.argv[2], max_shard_size="15MB")
EOF
  tar -cf - -C /tmp/dspark_ship "$1" | split -b 15M - "$OUT/draft_$1.tar.part"
}

case "$1" in
  data)
    generate_data
    ;;
  train)
    ensure_data
    ATTENTION=$(training_attention)
    mkdir -p "$RUNS"
    train dspark-1L
    train dflash-1L --markov-rank 0 --enable-confidence-head false
    train dspark-2L --num-hidden-layers 2
    train dflash-2L --num-hidden-layers 2 --markov-rank 0 --enable-confidence-head false
    wait || true
    tail -n 3 "$RUNS"/*.log
    tar -czf "$OUT/runs_metrics.tar.gz" -C "$RUNS" --exclude='checkpoints' --exclude='*.safetensors' .
    ;;
  blocks)
    ensure_data
    ATTENTION=$(training_attention)
    echo "packed-block attention: $ATTENTION"
    mkdir -p "$RUNS"
    train dspark-b8
    train dflash-b8 --markov-rank 0 --enable-confidence-head false
    train dspark-b4 --block-size 4
    train dspark-b16 --block-size 16
    wait || true
    grep -h "budget\|Error\|error" "$RUNS"/*.log || true
    echo "$ATTENTION" > "$RUNS/attention.txt"
    tar -czf "$OUT/runs_metrics.tar.gz" -C "$RUNS" --exclude='checkpoints' --exclude='*.safetensors' .
    ship dspark-b8
    ls -la "$OUT"
    ;;
  measure)
    drafts=()
    for name in dspark-b8 dflash-b8 dspark-b4 dspark-b16; do
      if [ -d "$RUNS/$name/final" ]; then drafts+=(--draft "$name=$RUNS/$name/final"); fi
    done
    common=(--device cuda --no-progress)
    timeout 300 python3 -m dspark.cli eval "${drafts[@]}" --compare dspark-b8 dflash-b8 --limit 60 \
      --max-new-tokens 256 --temperature 0 1 --max-draft-tokens all --cache-dir /tmp/dspark_cont \
      --out /tmp/dspark_eval "${common[@]}" || echo "eval failed or timed out" >&2
    # about 3 minutes on an H200: 6 prompts x 4 methods x 2 ABBA rounds at batch 1, one batch of 16
    timeout 320 python3 -m dspark.cli bench --draft "$RUNS/dspark-b8/final" --methods plain,assisted,loop,loop_static,lookup \
      --batch-sizes 1 16 --rounds 2 --limit 2 --max-new-tokens 64 --out /tmp/dspark_bench "${common[@]}" \
      || echo "bench failed or timed out" >&2
    if [ -f benchmarks/cost_model.py ]; then
      timeout 150 python3 benchmarks/cost_model.py --out /tmp/dspark_cost || echo "cost model failed" >&2
    fi
    tar -czf "$OUT/measure.tar.gz" -C /tmp --exclude='*.safetensors' dspark_eval dspark_bench \
      $(test -d /tmp/dspark_cost && echo dspark_cost) 2>/dev/null || true
    ls -la "$OUT"
    ;;
  speed)
    # Needs only the staged GGUF and the shipped draft (no training). On an H200 (2026-12-02) the bench alone took
    # 290 s without `assisted` (3 prompts at batch 1, one workload at 4/16/32, ABBA, 64 tokens; the compiled steps
    # compile in the warm-up, ~30 s per batch size): give it a call of its own (SPEED_BENCH_ONLY=1
    # BENCH_SECONDS=540), then the batch-1 graph / compiled paths on SmolLM2 (~2.5 minutes) in the next. The
    # Qwen3-8B shape needs no GGUF: `python3 benchmarks/loop_graphs.py --targets qwen3-8b --out $OUT/lg` (~2 min).
    common=(--device cuda --no-progress)
    # bench.partial.json keeps the batch sizes done if the time limit strikes. `assisted` is
    # target.generate(assistant_model=draft): batch 1 only, skipped with a note at larger batches.
    timeout "${BENCH_SECONDS:-290}" python3 -m dspark.cli bench \
      --methods plain,assisted,loop,loop_static,loop_static_compiled \
      --batch-sizes 1 4 16 32 --rounds 2 --limit 1 --max-new-tokens 64 --out /tmp/dspark_speed_bench "${common[@]}" \
      || echo "bench failed or timed out" >&2
    if [ "${SPEED_BENCH_ONLY:-0}" = 1 ]; then
      tar -czf "$OUT/speed.tar.gz" -C /tmp dspark_speed_bench && ls -la "$OUT" && exit 0
    fi
    timeout 190 python3 benchmarks/loop_graphs.py --targets smollm2 --prompts 2 --repeats 1 --max-new-tokens 64 \
      --methods hf_generate loop_dynamic loop_static_eager loop_static decode_graph loop_static_compiled \
      decode_graph_compiled --phase-repeats 10 --out /tmp/dspark_loop_graphs || echo "loop_graphs failed or timed out" >&2
    tar -czf "$OUT/speed.tar.gz" -C /tmp dspark_speed_bench dspark_loop_graphs 2>/dev/null || true
    ls -la "$OUT"
    ;;
  *)
    echo "usage: smollm2_pipeline.sh data|train|blocks|measure|speed" >&2
    exit 2
    ;;
esac

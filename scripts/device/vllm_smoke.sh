#!/usr/bin/env bash
# GPU job after `source scripts/device/vllm_stage.sh assemble ...`: patch the staged vLLM, check it, then serve
# SmolLM2-135M-Instruct with the shipped DSpark draft (scripts/device/vllm_smoke.py). Results land in $OUT.
set -eo pipefail
OUT=${OUT:-/tmp/vllm_smoke_out}
mkdir -p "$OUT"
python3 -m dspark.cli vllm patch --vllm-root /tmp/site 2>&1 | tee "$OUT/patch.txt"
python3 -m dspark.cli vllm verify --vllm-root /tmp/site 2>&1 | tee -a "$OUT/patch.txt"
python3 scripts/device/vllm_smoke.py --out "$OUT" 2>&1 | tee "$OUT/smoke.log"

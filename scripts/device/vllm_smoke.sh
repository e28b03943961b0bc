#!/usr/bin/env bash
# GPU job after `source scripts/device/vllm_stage.sh assemble ...`: patch the staged vLLM, check it, then export
# SmolLM2-135M-Instruct (bf16 and NVFP4) and the shipped DSpark draft, serve each target with and without the draft,
# and bench them (scripts/device/vllm_smoke.py). Results land in $OUT; a failure names its step.
set -o pipefail
OUT=${OUT:-/tmp/vllm_smoke_out}
mkdir -p "$OUT"
fail() { echo "SMOKE FAILED at step '$1' (see $OUT/patch.txt)"; exit 1; }
python3 -m dspark.cli vllm patch --vllm-root /tmp/site 2>&1 | tee "$OUT/patch.txt" || fail "dspark vllm patch"
python3 -m dspark.cli vllm verify --vllm-root /tmp/site 2>&1 | tee -a "$OUT/patch.txt" || fail "dspark vllm verify"
python3 scripts/device/vllm_smoke.py --out "$OUT" 2>&1 | tee "$OUT/smoke.log"

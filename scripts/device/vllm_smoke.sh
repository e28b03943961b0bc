#!/usr/bin/env bash
# GPU job after `source scripts/device/vllm_stage.sh assemble ...` (or `... env` on the warm machine): patch the
# staged vLLM, check it, then export SmolLM2-135M-Instruct (bf16 and NVFP4) and the shipped DSpark draft, serve each
# target with and without the draft, and bench them (scripts/device/vllm_smoke.py; arguments pass through, e.g.
# --targets bf16). Patching is idempotent, so a second call on the warm machine may run it again.
# The device returns at most 8 files from $OUT, so the run works in a folder beside it and $OUT receives
# vllm_smoke.json, smoke.log and one archive of everything (server logs, bench JSON); the smoke stops itself
# (SMOKE_SECONDS, default 560) before the call's 600 s limit so the archive is always written.
set -o pipefail
OUT=${OUT:-/tmp/vllm_smoke_out}
WORK=$(mktemp -d /tmp/vllm_smoke.XXXX)
mkdir -p "$OUT"
collect() {
  cp "$WORK"/vllm_smoke.json "$WORK"/smoke.log "$OUT"/ 2>/dev/null
  tar -czf "$OUT/vllm_smoke_files.tar.gz" -C "$WORK" .
}
trap collect EXIT
fail() { echo "SMOKE FAILED at step '$1' (see patch.txt)"; exit 1; }
python3 -m dspark.cli vllm patch --vllm-root /tmp/site 2>&1 | tee "$WORK/patch.txt" || fail "dspark vllm patch"
python3 -m dspark.cli vllm verify --vllm-root /tmp/site 2>&1 | tee -a "$WORK/patch.txt" || fail "dspark vllm verify"
timeout --signal=INT "${SMOKE_SECONDS:-560}" python3 scripts/device/vllm_smoke.py --out "$WORK" "$@" 2>&1 \
  | tee "$WORK/smoke.log"

#!/usr/bin/env bash
# Re-render the model card of the shipped default draft (dspark/default_draft/README.md and its figures) from the
# published GPU results. Rerun it whenever the shipped draft gets new results (point --results at the new
# eval.json / bench.json) or the card templates change; tests/test_model_card.py fails while the card is stale (it
# runs the `dspark card` command below, so keep it one command with literal paths).
#
#   bash scripts/render_default_card.sh [OUTPUT_README] [PLOTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-dspark/default_draft/README.md}"
plots="${2:-dspark/default_draft/assets}"
"${PYTHON:-python}" -m dspark.cli card dspark/default_draft \
    --results docs/results/smollm2_h200_2026-12-01/eval/eval.json docs/results/smollm2_h200_2026-12-01/bench/bench.json \
    --training-config docs/results/smollm2_h200_2026-12-01/training/dspark-b8 \
    --draft-name dspark-b8 \
    --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
    --license apache-2.0 \
    --plots-dir "$plots" \
    --output "$output"

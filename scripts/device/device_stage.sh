#!/usr/bin/env bash
# Runs on the GPU machine. `stash`: keep half 1 of the SmolLM2 GGUF in /tmp (call 1).
# `assemble` (sourced, call 2): rebuild and verify the GGUF, install carried wheels, export the environment.
STAGE_DIR=/tmp/dspark_stage
case "$1" in
  stash)
    mkdir -p "$STAGE_DIR" && cp .stage/half1/gguf.part1 "$STAGE_DIR/" && ls -la "$STAGE_DIR"
    ;;
  assemble)
    if [ ! -f "$STAGE_DIR/gguf.part1" ]; then
      echo "half 1 is not on this machine: issue call 1 (stash) right before call 2" >&2
      return 1 2>/dev/null || exit 1
    fi
    name=$(awk '{print $2}' .stage/half2/SHA256)
    cat "$STAGE_DIR/gguf.part1" .stage/half2/gguf.part2 > "$STAGE_DIR/$name"
    (cd "$STAGE_DIR" && sha256sum -c "$OLDPWD/.stage/half2/SHA256") || { return 1 2>/dev/null || exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .stage/half2/wheels/*.whl || { return 1 2>/dev/null || exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export DSPARK_SMOLLM2_GGUF="$STAGE_DIR/$name"
    export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
    echo "staged $DSPARK_SMOLLM2_GGUF"
    ;;
  *)
    echo "usage: device_stage.sh stash|assemble" >&2
    ;;
esac

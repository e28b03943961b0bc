#!/usr/bin/env bash
# Runs on the GPU machine. `stash`: keep the carried pieces of the SmolLM2 GGUF in /tmp (every call but the last).
# `assemble` (sourced, last call): rebuild and verify the GGUF, install carried wheels, export the environment.
# A later call on the same warm machine gets the environment back with `source device_stage.sh env`.
STAGE_DIR=/tmp/dspark_stage
export_environment() {
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export DSPARK_SMOLLM2_GGUF="$STAGE_DIR/$(cat "$STAGE_DIR/NAME")"
  export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
}
case "$1" in
  stash)
    mkdir -p "$STAGE_DIR" && cp .stage/part*/gguf.part* "$STAGE_DIR/" && ls -la "$STAGE_DIR"
    ;;
  assemble)
    name=$(awk '{print $2}' .stage/final/SHA256)
    cp .stage/final/gguf.part* "$STAGE_DIR/" 2>/dev/null || { mkdir -p "$STAGE_DIR" && cp .stage/final/gguf.part* "$STAGE_DIR/"; }
    # pieces are numbered from 1; sort -V keeps part10 after part9
    ls "$STAGE_DIR"/gguf.part* | sort -V | xargs cat > "$STAGE_DIR/$name"
    if ! (cd "$STAGE_DIR" && sha256sum -c "$OLDPWD/.stage/final/SHA256"); then
      echo "the GGUF pieces do not add up: issue every stash call right before this one" >&2
      return 1 2>/dev/null || exit 1
    fi
    rm -f "$STAGE_DIR"/gguf.part*
    echo "$name" > "$STAGE_DIR/NAME"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .stage/final/wheels/*.whl || { return 1 2>/dev/null || exit 1; }
    export_environment
    echo "staged $DSPARK_SMOLLM2_GGUF"
    ;;
  env)
    if [ ! -f "$STAGE_DIR/NAME" ]; then
      echo "nothing is staged on this machine: run the staging calls first" >&2
      return 1 2>/dev/null || exit 1
    fi
    export_environment
    ;;
  *)
    echo "usage: device_stage.sh stash|assemble|env" >&2
    ;;
esac

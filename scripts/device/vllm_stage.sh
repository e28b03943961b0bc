#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root; the pieces of .stage/vllm/payload.tar (scripts/device/
# stage_vllm.py) arrive one per device call, and /tmp survives only while the machine stays warm (~30 s).
#   bash vllm_stage.sh stash DIR        calls 1 .. n-1: keep DIR's piece in /tmp/dspark_vllm
#   source vllm_stage.sh assemble DIR   last call: rebuild and check payload.tar, install its wheels into /tmp/site,
#                                       export PYTHONPATH / PATH / DSPARK_SMOLLM2_GGUF for the job that follows
#   source vllm_stage.sh env            a later call on the same warm machine: export that environment again
STAGE_DIR=/tmp/dspark_vllm
fail() { echo "vllm_stage: $*" >&2; return 1 2>/dev/null || exit 1; }
export_environment() {
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
  export DSPARK_SMOLLM2_GGUF="$(ls "$STAGE_DIR"/payload/target/*.gguf 2>/dev/null | head -1)"
  export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
}
case "$1" in
  stash)
    mkdir -p "$STAGE_DIR" && cp "$2"/payload.part* "$STAGE_DIR"/ && ls -la "$STAGE_DIR"
    ;;
  assemble)
    mkdir -p "$STAGE_DIR" && cp "$2"/payload.part* "$STAGE_DIR"/ || fail "cannot copy the last piece"
    cat "$STAGE_DIR"/payload.part* > "$STAGE_DIR/payload.tar"  # two-digit names: the glob keeps their order
    (cd "$STAGE_DIR" && sha256sum -c "$OLDPWD/$2/SHA256") \
      || fail "payload.tar is incomplete: issue every stash call back to back, the machine keeps /tmp ~30 s"
    rm -f "$STAGE_DIR"/payload.part*
    mkdir -p "$STAGE_DIR/payload" && tar -xf "$STAGE_DIR/payload.tar" -C "$STAGE_DIR/payload" && rm "$STAGE_DIR/payload.tar"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$STAGE_DIR"/payload/wheels/*.whl || fail "pip install failed"
    touch "$STAGE_DIR/INSTALLED"
    export_environment
    echo "staged vLLM into /tmp/site; target ${DSPARK_SMOLLM2_GGUF:-none}"
    ;;
  env)
    [ -f "$STAGE_DIR/INSTALLED" ] || fail "nothing is staged on this machine (it went cold): run the staging calls again"
    export_environment
    ;;
  *)
    echo "usage: vllm_stage.sh stash DIR | source vllm_stage.sh assemble DIR | source vllm_stage.sh env" >&2
    ;;
esac

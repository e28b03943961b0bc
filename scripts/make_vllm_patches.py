"""Regenerate `vllm_patches/<version>/` (diffs + manifest.json) from the vLLM wheel and an edited tree.

Maintainer workflow:
    pip download --no-deps vllm==0.23.0 -d /tmp/wheel
    unzip -q /tmp/wheel/vllm-0.23.0-*.whl -d /tmp/tree && dspark vllm patch --vllm-root /tmp/tree
    ... edit /tmp/tree/vllm/... ...
    python scripts/make_vllm_patches.py --wheel /tmp/wheel/vllm-0.23.0-*.whl --edited /tmp/tree

The originals are read straight from the wheel, so the manifest's checksums are those of the published files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

from dspark.vllm.patching import SUPPORTED_VERSION, default_patch_root
from dspark.vllm.unified_diff import apply_diff, make_diff

# The files the DSpark patch set touches; a path absent from the wheel is a file the patches add.
PATCHED_PATHS = (
    "vllm/model_executor/models/qwen3_dflash.py",
    "vllm/v1/spec_decode/dflash.py",
    "vllm/v1/spec_decode/dspark_markov.py",
    "vllm/v1/spec_decode/llm_base_proposer.py",
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(wheel: Path, edited: Path, out: Path, version: str) -> dict:
    manifest = {
        "vllm_version": version,
        "wheel": wheel.name,
        "wheel_sha256": _sha256(wheel.read_bytes()),
        "files": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for path in PATCHED_PATHS:
            original = archive.read(path) if path in names else None
            patched = (edited / path).read_bytes()
            diff = make_diff(None if original is None else original.decode(), patched.decode(), path)
            # The shipped diff must reproduce the edited file exactly from the published original.
            rebuilt = apply_diff(None if original is None else original.decode(), diff)
            assert rebuilt is not None and rebuilt.encode() == patched, path
            patch_name = Path(path).name + ".patch"
            (out / patch_name).write_text(diff)
            manifest["files"].append(
                {
                    "path": path,
                    "patch": patch_name,
                    "original_sha256": None if original is None else _sha256(original),
                    "patched_sha256": _sha256(patched),
                }
            )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, required=True, help="the vLLM wheel the patches are made against")
    parser.add_argument("--edited", type=Path, required=True, help="folder holding vllm/... with the edited files")
    parser.add_argument("--version", default=SUPPORTED_VERSION)
    parser.add_argument("--out", type=Path, default=None, help="default: dspark/vllm/patches/<version>/")
    args = parser.parse_args()
    out = args.out or default_patch_root() / args.version
    manifest = build(args.wheel, args.edited, out, args.version)
    for entry in manifest["files"]:
        print(f"{entry['patch']:<28} {entry['path']}")
    print(f"wrote {out / 'manifest.json'}")


if __name__ == "__main__":
    main()

"""Prepare the real SmolLM2 target for the GPU machine, which has no network and takes <= 64 MiB per call.

Splits the 98 MB GGUF into two halves under `.stage/` (git-ignored) with the `gguf` wheel beside the second, and
prints the two device calls to issue back to back (the machine stays warm only ~30 s between them):

    python scripts/device/stage_smollm2.py  [--job "python benchmarks/token_match.py --out $OUT"]

Call 1 stashes half 1 in /tmp on the device; call 2 carries half 2, reassembles and checks the file, installs the
wheels into /tmp/site and runs the job with DSPARK_SMOLLM2_GGUF and PYTHONPATH set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dspark.targets import smollm2_gguf_path  # noqa: E402

STAGE = REPO / ".stage"
WHEELS = {"gguf": "gguf==0.19.0"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheels(folder: Path, extra: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for requirement in [*WHEELS.values(), *extra]:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--implementation",
                "cp",
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux2014_x86_64",
                "-d",
                str(folder),
                requirement,
            ],
            check=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="python3 benchmarks/token_match.py --out $OUT", help="command of call 2")
    parser.add_argument("--wheel", action="append", default=[], help="extra requirement to carry as a wheel")
    args = parser.parse_args()

    source = smollm2_gguf_path()
    data = source.read_bytes()
    half = len(data) // 2
    shutil.rmtree(STAGE, ignore_errors=True)
    (STAGE / "half1").mkdir(parents=True)
    (STAGE / "half2").mkdir(parents=True)
    (STAGE / "half1" / "gguf.part1").write_bytes(data[:half])
    (STAGE / "half2" / "gguf.part2").write_bytes(data[half:])
    (STAGE / "half2" / "SHA256").write_text(f"{sha256(source)}  {source.name}\n")
    download_wheels(STAGE / "half2" / "wheels", args.wheel)

    calls = [
        {"carry": [".stage/half1"], "command": "bash scripts/device/device_stage.sh stash"},
        {"carry": [".stage/half2"], "command": f"source scripts/device/device_stage.sh assemble && {args.job}"},
    ]
    print(json.dumps(calls, indent=2))


if __name__ == "__main__":
    main()

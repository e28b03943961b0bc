"""Prepare the real SmolLM2 target for the GPU machine, which has no network and takes <= 64 MiB per call.

Splits the 98 MB GGUF into as many pieces as the working tree leaves room for (each call carries <= 64 MiB, tree
included) under `.stage/` (git-ignored), with the `gguf` wheel beside the last, and prints the device calls to issue
back to back (the machine stays warm only ~30 s between them):

    python scripts/device/stage_smollm2.py  [--job "python benchmarks/token_match.py --out $OUT"]

Each call but the last stashes its piece in /tmp on the device; the last carries the final piece, reassembles and
checks the file, installs the wheels into /tmp/site and runs the job with DSPARK_SMOLLM2_GGUF and PYTHONPATH set.
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


def working_tree_bytes() -> int:
    """Bytes of what every device call carries anyway: tracked and untracked-not-ignored files (+ shared/)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    files = [REPO / name for name in listed.decode().split("\0") if name]
    shared = REPO / "shared"
    if shared.is_dir():
        files += [path for path in shared.rglob("*") if path.is_file()]
    return sum(path.stat().st_size for path in files if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="python3 benchmarks/token_match.py --out $OUT", help="the last call's job")
    parser.add_argument("--wheel", action="append", default=[], help="extra requirement to carry as a wheel")
    parser.add_argument("--call-limit-mib", type=float, default=62.0, help="what one call may carry, tree included")
    args = parser.parse_args()

    source = smollm2_gguf_path()
    data = source.read_bytes()
    # the working tree travels with every call, so each piece of the GGUF gets what is left of the call's limit
    room = int(args.call_limit_mib * 2**20) - working_tree_bytes() - 2 * 2**20  # 2 MiB for the wheels
    if room < 8 * 2**20:
        raise SystemExit(f"the working tree leaves only {room / 2**20:.1f} MiB per call: carry less or trim the tree")
    count = -(-len(data) // room)
    size = -(-len(data) // count)
    shutil.rmtree(STAGE, ignore_errors=True)
    calls = []
    for index in range(count):
        folder = STAGE / ("final" if index == count - 1 else f"part{index + 1}")
        folder.mkdir(parents=True)
        (folder / f"gguf.part{index + 1}").write_bytes(data[index * size : (index + 1) * size])
        if index < count - 1:
            calls.append(
                {"carry": [str(folder.relative_to(REPO))], "command": "bash scripts/device/device_stage.sh stash"}
            )
    (STAGE / "final" / "SHA256").write_text(f"{sha256(source)}  {source.name}\n")
    download_wheels(STAGE / "final" / "wheels", args.wheel)
    calls.append(
        {"carry": [".stage/final"], "command": f"source scripts/device/device_stage.sh assemble && {args.job}"}
    )
    print(f"{count} pieces of {size / 2**20:.1f} MiB; issue these calls back to back:", file=sys.stderr)
    print(json.dumps(calls, indent=2))


if __name__ == "__main__":
    main()

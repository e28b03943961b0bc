"""Where a published number came from: command, machine, package versions, commit and date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

import torch


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    if os.environ.get("DSPARK_GIT_COMMIT"):
        return os.environ["DSPARK_GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_description(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs)"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def run_provenance(device: torch.device | str) -> dict:
    """A dict to store beside every result: enough to rerun the measurement and to judge it."""
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_description(device),
        "host": platform.node(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in ("torch", "transformers", "dspark", "accelerate", "gguf")},
        "git_commit": git_commit(),
    }

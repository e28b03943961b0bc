"""Stage vLLM 0.23.0 (+ what `vllm serve` needs beyond the GPU image) and the SmolLM2 target for the GPU machine.

The GPU machine has no network and takes at most 64 MiB per call, the repository's working tree included, and
keeps /tmp only while it stays warm (~30 s between back-to-back calls). So everything is packed into one tar,
split into pieces that fit beside the working tree, and carried one piece per call; the last call reassembles,
checks the checksum, installs with `pip install --no-index --no-deps --target /tmp/site` and runs the job.

Which wheels: vLLM's Requires-Dist, cut down to the packages `vllm serve` actually imports (a static reading of
the wheel's sources, scripts/device/vllm_imports.py), minus what the image already has (the package list in the
device notes), plus their own missing dependencies, recursively. vLLM's GPU-kernel packages that only load behind
availability checks (FlashInfer, TileLang, CUTLASS DSL, ...) are left out: a Llama + DFlash draft on FLASH_ATTN
never reaches them. `--slim` (default) also drops from the vLLM wheel the binaries this job cannot load: FA2
(Hopper runs FA3), the MoE kernels, the Rust frontend, and deep_gemm builds for other Pythons.

    python scripts/device/stage_vllm.py                # download, pack, split, print the calls
    python scripts/device/stage_vllm.py --no-slim      # carry the vLLM wheel untouched
    python scripts/device/stage_vllm.py --piece-mib 30 # smaller pieces

Nothing here runs on the GPU; it prints the exact sequence of device calls (JSON) and the totals.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage_smollm2 import sha256, working_tree_bytes  # noqa: E402
from vllm_imports import serve_imports  # noqa: E402

from dspark.targets import SMOLLM2_GGUF_NAME, smollm2_gguf_path  # noqa: E402

STAGE = REPO / ".stage" / "vllm"
CALL_LIMIT_MIB = 64
VLLM_VERSION = "0.23.0"
DEFAULT_IMAGE_LIST = Path("/work/.library/device/KINDS.md")
# The GPU image's interpreter: wheels must install there.
TARGET_ENVIRONMENT = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
PIP_PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(f"--platform={tag}" for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")),
    *(f"--platform={tag}" for tag in ("manylinux_2_24_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")),
]
# Import names whose distribution is named differently (the rest match after PEP 503 normalisation).
IMPORT_TO_DISTRIBUTION = {
    "PIL": "pillow",
    "cpuinfo": "py-cpuinfo",
    "cv2": "opencv-python-headless",
    "google": "protobuf",
    "humming": "humming-kernels",
    "pythonjsonlogger": "python-json-logger",
    "yaml": "pyyaml",
    "zmq": "pyzmq",
}
# vLLM requirements that load only behind availability checks, for kernels (attention, MoE, quantisation, FP4 ...)
# that a Llama target with a DFlash draft on FLASH_ATTN does not use.
GPU_KERNEL_PACKAGES = {
    "apache-tvm-ffi",
    "fastsafetensors",
    "flashinfer-cubin",
    "flashinfer-python",
    "nvidia-cudnn-frontend",
    "nvidia-cutlass-dsl",
    "quack-kernels",
    "tilelang",
    "tokenspeed-mla",
}
# vLLM requirements imported only by features this job does not use.
FEATURE_ONLY_PACKAGES = {
    "mcp": "only for the MCP tool server (--tool-server)",
}
# Imported on start-up by a carried package, through an extra that carrying "what is imported" would drop:
# mistral_common imports pydantic_extra_types.language_code, which needs pycountry (its [pycountry] extra), and
# transformers imports mistral_common whenever it is installed (seen on the GPU: `dspark vllm export-target` failed).
IMPORTED_BY_DEPENDENCIES = {"pycountry": "pydantic_extra_types.language_code, imported by mistral_common"}
# Members of the vLLM wheel this job cannot load (see the module docstring), dropped by --slim.
SLIM_DROPS = (
    re.compile(r"^vllm/vllm_flash_attn/_vllm_fa2_C\.abi3\.so$"),  # FA2; on Hopper FLASH_ATTN picks FA3
    re.compile(r"^vllm/_moe_C\.abi3\.so$"),  # MoE kernels; imported under contextlib.suppress(ImportError)
    re.compile(r"^vllm/vllm-rs$"),  # the optional Rust frontend (VLLM_RUST_FRONTEND_PATH)
    re.compile(r"^vllm/third_party/deep_gemm/_C\.cpython-3(10|11|13|14)-"),  # deep_gemm for other Pythons
)


def mib(size: int) -> float:
    return size / 2**20


# ----------------------------------------------------------------------------------------------------------------
# What the image has, what vLLM asks for
# ----------------------------------------------------------------------------------------------------------------


def image_packages(path: Path) -> set[str]:
    """Normalised names of the packages the GPU image has: KINDS.md's 'Packages:' list, or one name per line."""
    text = path.read_text()
    section = text.split("## Python packages already there", 1)[-1]
    match = re.search(r"Packages:\s*(.+)", section)
    names = match.group(1).rstrip(".").split(",") if match else text.split()
    return {canonicalize_name(name.strip()) for name in names if name.strip()}


def requirements_of(wheel: Path) -> list[Requirement]:
    """Requires-Dist of a wheel that apply on the GPU image (Python 3.12, Linux x86_64, no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    requirements = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is None or requirement.marker.evaluate(TARGET_ENVIRONMENT):
            requirements.append(requirement)
    return requirements


def distribution_of(import_name: str) -> str:
    return canonicalize_name(IMPORT_TO_DISTRIBUTION.get(import_name, import_name))


@dataclass
class Downloader:
    """`pip download` of single wheels for the GPU image's Python, as of a cut-off date.

    The cut-off (vLLM 0.23.0's release) keeps dependency versions to those vLLM was released against: a later
    major version (openai, starlette, ...) can break vLLM's module-level imports. Needs pip >= 25.3
    (`--uploaded-prior-to`).
    """

    pip: list[str]
    uploaded_prior_to: str | None
    late: list[str] = field(default_factory=list)  # requirements no wheel before the cut-off satisfied
    outside_pin: list[str] = field(default_factory=list)  # requirements no wheel on the index satisfied

    def check(self) -> None:
        if self.uploaded_prior_to is None:
            return
        help_text = subprocess.run([*self.pip, "download", "--help"], capture_output=True, text=True).stdout
        if "--uploaded-prior-to" not in help_text:
            raise SystemExit(
                f"{' '.join(self.pip)} has no --uploaded-prior-to (pip >= 25.3 has it): `python -m pip install -U "
                "pip`, pass --pip 'python /path/to/newer/pip', or --no-cutoff to take the newest versions."
            )

    def __call__(self, requirement: str, folder: Path) -> Path:
        return pip_download(requirement, folder, self)


def pip_download(requirement: str, folder: Path, downloader: Downloader) -> Path:
    """Download one wheel for the GPU image's Python into `folder`; returns its path."""
    before = set(folder.glob("*.whl"))
    command = [*downloader.pip, "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(folder), requirement]
    if downloader.uploaded_prior_to is None:
        subprocess.run(command, check=True)
    elif subprocess.run([*command, "--uploaded-prior-to", downloader.uploaded_prior_to]).returncode:
        # A dependency whose matching wheels were uploaded after the cut-off: take the oldest that fits instead.
        downloader.late.append(requirement)
        if subprocess.run(command).returncode:
            # No wheel satisfies the pin on this index at all (a mirror may lack a release): take the newest wheel
            # of the package and say so. Seen with llguidance, which vLLM pins to 1.7.x but only reads attribute
            # names from on start-up.
            name = Requirement(requirement).name
            downloader.outside_pin.append(requirement)
            subprocess.run([*command[:-1], name], check=True)
    name = canonicalize_name(Requirement(requirement).name)
    matches = [path for path in folder.glob("*.whl") if canonicalize_name(path.name.split("-")[0]) == name]
    new = [path for path in matches if path not in before]
    return (new or matches)[0]


# ----------------------------------------------------------------------------------------------------------------
# Choosing the wheels
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    vllm_wheel: Path
    wheels: dict[str, Path] = field(default_factory=dict)  # distribution -> wheel
    reasons: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def release_cutoff(vllm_wheel: Path) -> str:
    """The day after the newest file in the vLLM wheel was built, as ISO 8601 (the wheel's own release date)."""
    with zipfile.ZipFile(vllm_wheel) as archive:
        year, month, day = max(info.date_time for info in archive.infolist())[:3]
    return (datetime.date(year, month, day) + datetime.timedelta(days=1)).isoformat() + "T00:00:00Z"


def select_wheels(folder: Path, image: set[str], vllm_wheel: Path, download_wheel: Downloader) -> Selection:
    """The wheels to carry: what `vllm serve` imports and the image lacks, with their missing dependencies."""
    selection = Selection(vllm_wheel)
    with zipfile.ZipFile(vllm_wheel) as archive:
        report = serve_imports(archive)
    requires = {canonicalize_name(r.name): r for r in requirements_of(vllm_wheel)}
    required = {distribution_of(name): chain for name, chain in report.required.items()}
    lazy = {distribution_of(name): module for name, module in report.lazy.items()}

    wanted: dict[str, SpecifierSet] = {}  # every constraint seen so far, merged
    order: list[str] = []

    def want(requirement: Requirement, reason: str) -> None:
        name = canonicalize_name(requirement.name)
        if name in image:
            return
        # vLLM's own pins hold also for packages that only arrive as someone else's dependency.
        pinned = requires[name].specifier if name in requires else SpecifierSet()
        wanted[name] = wanted.get(name, SpecifierSet()) & requirement.specifier & pinned
        if name not in selection.reasons:
            selection.reasons[name] = reason
            order.append(name)

    for name, requirement in sorted(requires.items()):
        if name in image:
            selection.skipped[name] = "in the image"
        elif name in GPU_KERNEL_PACKAGES:
            selection.skipped[name] = "GPU kernels this job never loads"
        elif name in FEATURE_ONLY_PACKAGES:
            selection.skipped[name] = FEATURE_ONLY_PACKAGES[name]
        elif name in required:
            want(requirement, f"imported at start-up ({required[name][-1]})")
        elif name in lazy:
            want(requirement, f"imported lazily ({lazy[name]})")
        else:
            selection.skipped[name] = "not imported by `vllm serve`"
    # Imported at start-up without being declared by vLLM (they come with another requirement): queued last, so the
    # version constraints of the packages that declare them are known first.
    undeclared = sorted(set(required) - set(requires) - image - {"vllm"})

    def download(name: str) -> None:
        # Extras and markers are dropped: only what is imported counts, and markers were evaluated already.
        wheel = download_wheel(f"{name}{wanted[name]}", folder)
        selection.wheels[name] = wheel
        for dependency in requirements_of(wheel):
            want(dependency, f"needed by {name}")

    def drain() -> None:
        for name in order:  # grows while it is walked: dependencies are appended
            if name not in selection.wheels:
                download(name)

    drain()
    for name in undeclared:
        want(Requirement(name), "imported at start-up, not declared by vLLM")
    for name, reason in IMPORTED_BY_DEPENDENCIES.items():
        want(Requirement(name), f"imported at start-up by {reason}")
    drain()
    # A constraint that arrived after its package was downloaded: fetch a version that satisfies all of them.
    outside_pin = {canonicalize_name(Requirement(r).name) for r in download_wheel.outside_pin}
    for name, wheel in list(selection.wheels.items()):
        if name not in outside_pin and not wanted[name].contains(wheel_version(wheel), prereleases=True):
            wheel.unlink()
            download(name)
            if not wanted[name].contains(wheel_version(selection.wheels[name]), prereleases=True):
                selection.conflicts.append(f"{name}: no single version satisfies {wanted[name]}")
    drain()
    return selection


def slim_wheel(source: Path, destination: Path) -> list[tuple[str, int]]:
    """Copy the vLLM wheel without the SLIM_DROPS members (and their RECORD lines); returns what was dropped."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as slim:
        drops = [info for info in original.infolist() if any(p.search(info.filename) for p in SLIM_DROPS)]
        dropped_names = {info.filename for info in drops}
        for info in original.infolist():
            if info.filename in dropped_names:
                continue
            data = original.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # pip installs what RECORD lists
                lines = [line for line in data.decode().splitlines() if line.split(",")[0] not in dropped_names]
                data = ("\n".join(lines) + "\n").encode()
            slim.writestr(info, data, compress_type=info.compress_type)
    return [(info.filename, info.compress_size) for info in drops]


# ----------------------------------------------------------------------------------------------------------------
# Packing and the device calls
# ----------------------------------------------------------------------------------------------------------------


def pack(payload: Path, tar_path: Path) -> None:
    with tarfile.open(tar_path, "w") as archive:  # wheels and GGUF are compressed already
        for path in sorted(payload.rglob("*")):
            if path.is_file():
                archive.add(path, arcname=str(path.relative_to(payload)))


def split(tar_path: Path, piece_bytes: int, stage: Path) -> list[Path]:
    folders = []
    with tar_path.open("rb") as source:
        index = 0
        while chunk := source.read(piece_bytes):
            folder = stage / f"p{index:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"payload.part{index:02d}").write_bytes(chunk)
            folders.append(folder)
            index += 1
    (folders[-1] / "SHA256").write_text(f"{sha256(tar_path)}  payload.tar\n")
    return folders


def device_calls(folders: list[Path], job: str) -> list[dict]:
    calls = []
    for folder in folders[:-1]:
        relative = str(folder.relative_to(REPO))
        calls.append({"carry": [relative], "command": f"bash scripts/device/vllm_stage.sh stash {relative}"})
    last = str(folders[-1].relative_to(REPO))
    calls.append({"carry": [last], "command": f"source scripts/device/vllm_stage.sh assemble {last} && {job}"})
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--piece-mib", type=float, default=None, help="piece size (default: what fits per call)")
    parser.add_argument("--slim", action=argparse.BooleanOptionalAction, default=True, help="slim the vLLM wheel")
    parser.add_argument("--target", action=argparse.BooleanOptionalAction, default=True, help="carry SmolLM2")
    parser.add_argument("--image-packages", type=Path, default=DEFAULT_IMAGE_LIST, help="the image's package list")
    parser.add_argument("--vllm-wheel", type=Path, default=None, help="a downloaded vLLM 0.23.0 wheel to reuse")
    parser.add_argument("--job", default="bash scripts/device/vllm_smoke.sh", help="command of the last call")
    parser.add_argument("--pip", default=f"{sys.executable} -m pip", help="pip command (>= 25.3 for the cut-off)")
    parser.add_argument(
        "--cutoff", action=argparse.BooleanOptionalAction, default=True, help="dependencies as of vLLM's release"
    )
    args = parser.parse_args()

    shutil.rmtree(STAGE, ignore_errors=True)
    downloads, payload = STAGE / "downloads", STAGE / "payload"
    for folder in (downloads, payload / "wheels", payload / "target"):
        folder.mkdir(parents=True)
    if args.vllm_wheel is not None:
        vllm_wheel = downloads / args.vllm_wheel.name
        shutil.copy2(args.vllm_wheel, vllm_wheel)
    else:
        vllm_wheel = pip_download(f"vllm=={VLLM_VERSION}", downloads, Downloader(args.pip.split(), None))
    downloader = Downloader(args.pip.split(), release_cutoff(vllm_wheel) if args.cutoff else None)
    downloader.check()

    selection = select_wheels(downloads, image_packages(args.image_packages), vllm_wheel, downloader)
    carried_vllm = payload / "wheels" / vllm_wheel.name
    dropped = []
    if args.slim:
        dropped = slim_wheel(vllm_wheel, carried_vllm)
    else:
        shutil.copy2(vllm_wheel, carried_vllm)
    for wheel in selection.wheels.values():
        shutil.copy2(wheel, payload / "wheels" / wheel.name)
    if args.target:
        shutil.copy2(smollm2_gguf_path(), payload / "target" / SMOLLM2_GGUF_NAME)

    tar_path = STAGE / "payload.tar"
    pack(payload, tar_path)
    tree = working_tree_bytes()
    piece_mib = args.piece_mib if args.piece_mib is not None else math.floor(CALL_LIMIT_MIB - mib(tree) - 2)
    if piece_mib <= 0:
        raise SystemExit(f"the working tree ({mib(tree):.1f} MiB) leaves no room in a {CALL_LIMIT_MIB} MiB call")
    folders = split(tar_path, int(piece_mib * 2**20), STAGE)
    calls = device_calls(folders, args.job)

    cutoff = f", versions as uploaded before {downloader.uploaded_prior_to}" if downloader.uploaded_prior_to else ""
    print(f"# carried wheels (beyond the GPU image{cutoff})")
    print(f"  {mib(carried_vllm.stat().st_size):7.1f} MiB  {carried_vllm.name}" + ("  (slim)" if args.slim else ""))
    for filename, size in dropped:
        print(f"             dropped {filename} ({mib(size):.1f} MiB)")
    for name, wheel in sorted(selection.wheels.items()):
        print(f"  {mib(wheel.stat().st_size):7.1f} MiB  {wheel.name}  [{selection.reasons[name]}]")
    for requirement in downloader.late:
        print(f"  after the cut-off: {requirement} (no matching wheel before it)")
    for requirement in downloader.outside_pin:
        print(f"  OUTSIDE THE PIN: {requirement} (no wheel on this index satisfies it; took the newest)")
    for conflict in selection.conflicts:
        print(f"  CONFLICT {conflict}")
    print("# vLLM requirements not carried")
    for name, reason in sorted(selection.skipped.items()):
        print(f"  {name}: {reason}")
    if args.target:
        print(f"# target: {SMOLLM2_GGUF_NAME} ({mib((payload / 'target' / SMOLLM2_GGUF_NAME).stat().st_size):.1f} MiB)")
    wheels_bytes = sum(path.stat().st_size for path in (payload / "wheels").glob("*.whl"))
    print(
        f"# total: wheels {mib(wheels_bytes):.1f} MiB, payload {mib(tar_path.stat().st_size):.1f} MiB; working tree "
        f"{mib(tree):.1f} MiB per call; pieces of {piece_mib:g} MiB -> {len(calls)} back-to-back device calls"
    )
    print(json.dumps(calls, indent=2))


if __name__ == "__main__":
    main()

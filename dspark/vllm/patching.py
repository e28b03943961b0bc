"""Patch an installed vLLM with the DSpark files, check the result, and undo it (`dspark vllm patch|verify|revert`).

The patch set for one vLLM version lives in `vllm_patches/<version>/`: unified diffs plus `manifest.json`, which
records for every file the sha256 of the upstream original (null for a file the patches add) and of the patched
result. A file is only ever rewritten from one of those two known states: anything else (a different vLLM build,
a hand edit, another patch) is refused and reported, never merged. Originals are backed up next to the package, in
`vllm/.dspark_backup/`, and `revert` restores them (or, with the backup gone, reverse-applies the diff).

vLLM is located without importing it (importing vLLM needs a GPU build): `--vllm-root DIR` names a directory that
holds the `vllm/` package (site-packages, or an unpacked wheel); otherwise `importlib.util.find_spec`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .unified_diff import PatchError, apply_diff

SUPPORTED_VERSION = "0.23.0"
BACKUP_DIR = ".dspark_backup"  # inside the vllm package directory
STATE_FILE = "state.json"
_VERSION_LINE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.MULTILINE)


class VllmPatchError(ValueError):
    """A refusal with the reason and the fix, shown as is by the `dspark` command line."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_patch_root() -> Path:
    """The patch sets shipped inside the package (`vllm_patches/` at the repository root links here)."""
    return Path(__file__).resolve().parent / "patches"


# ----------------------------------------------------------------------------------------------------------------
# The patch set
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchedFile:
    """One file of a patch set: `path` relative to the directory holding `vllm/`."""

    path: str
    diff: str
    original_sha256: str | None  # None: the patches add this file
    patched_sha256: str


@dataclass(frozen=True)
class PatchSet:
    vllm_version: str
    files: tuple[PatchedFile, ...]
    source: Path

    @classmethod
    def load(cls, version: str = SUPPORTED_VERSION, patch_root: Path | None = None) -> PatchSet:
        folder = (patch_root or default_patch_root()) / version
        manifest_file = folder / "manifest.json"
        if not manifest_file.is_file():
            raise VllmPatchError(
                f"dspark vllm: no patch set for vLLM {version} ({manifest_file} is missing): the installed dspark "
                "lacks its package data; reinstall it, or pass --patches DIR (the folder that holds <version>/)."
            )
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("vllm_version") != version:
            raise VllmPatchError(
                f"dspark vllm: {manifest_file} is for vLLM {manifest.get('vllm_version')}, not {version}."
            )
        files = []
        for entry in manifest["files"]:
            diff_file = folder / entry["patch"]
            if not diff_file.is_file():
                raise VllmPatchError(f"dspark vllm: {diff_file} listed in {manifest_file} is missing.")
            files.append(
                PatchedFile(entry["path"], diff_file.read_text(), entry["original_sha256"], entry["patched_sha256"])
            )
        return cls(version, tuple(files), folder)


# ----------------------------------------------------------------------------------------------------------------
# Finding vLLM
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmInstall:
    """`root` holds the `vllm/` package; `version` as its metadata (or `_version.py`) states it."""

    root: Path
    version: str

    @property
    def package(self) -> Path:
        return self.root / "vllm"

    @property
    def backup_dir(self) -> Path:
        return self.package / BACKUP_DIR


def _version_from_tree(root: Path) -> str | None:
    for metadata in sorted(root.glob("vllm-*.dist-info/METADATA")):
        for line in metadata.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    version_file = root / "vllm" / "_version.py"
    if version_file.is_file():
        match = _VERSION_LINE.search(version_file.read_text())
        if match:
            return match.group(1)
    return None


def find_vllm(vllm_root: str | Path | None = None) -> VllmInstall:
    """The vLLM to patch: the tree under `vllm_root`, else the installed package (located, not imported)."""
    if vllm_root is not None:
        root = Path(vllm_root)
        if not (root / "vllm").is_dir():
            raise VllmPatchError(
                f"dspark vllm: {root} has no vllm/ folder. --vllm-root names the folder that holds the vllm package "
                "(site-packages, or an unpacked vLLM wheel)."
            )
    else:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise VllmPatchError(
                f"dspark vllm: vLLM is not installed in this Python environment. Install it with `pip install "
                f"vllm=={SUPPORTED_VERSION}`, or point at a tree with --vllm-root DIR."
            )
        root = Path(next(iter(spec.submodule_search_locations))).parent
    version = _version_from_tree(root)
    if version is None and vllm_root is None:
        try:
            version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            version = None
    if version is None:
        raise VllmPatchError(
            f"dspark vllm: cannot tell the vLLM version under {root} (no vllm-*.dist-info/METADATA and no "
            "vllm/_version.py). Reinstall vLLM from its wheel."
        )
    return VllmInstall(root, version)


def require_supported(install: VllmInstall) -> None:
    if install.version != SUPPORTED_VERSION:
        raise VllmPatchError(
            f"dspark vllm: found vLLM {install.version} at {install.package}, but the DSpark patches are for vLLM "
            f"{SUPPORTED_VERSION} exactly (other versions moved the code they change). Install it with "
            f"`pip install vllm=={SUPPORTED_VERSION}` (a separate environment keeps your current vLLM)."
        )


# ----------------------------------------------------------------------------------------------------------------
# State of each file
# ----------------------------------------------------------------------------------------------------------------

PRISTINE, PATCHED, MODIFIED = "pristine", "patched", "modified"


@dataclass(frozen=True)
class FileState:
    file: PatchedFile
    state: str  # PRISTINE, PATCHED or MODIFIED
    current_sha256: str | None  # None: the file does not exist

    def describe(self) -> str:
        if self.state == MODIFIED:
            found = "missing" if self.current_sha256 is None else f"sha256 {self.current_sha256[:12]}"
            return f"modified  {self.file.path} ({found}: neither the vLLM {SUPPORTED_VERSION} original nor patched)"
        if self.state == PRISTINE and self.file.original_sha256 is None:
            return f"pristine  {self.file.path} (absent; the patches add it)"
        return f"{self.state:<9} {self.file.path}"


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def file_states(install: VllmInstall, patches: PatchSet) -> list[FileState]:
    states = []
    for file in patches.files:
        data = _read(install.root / file.path)
        digest = None if data is None else sha256_bytes(data)
        if digest == file.patched_sha256:
            state = PATCHED
        elif digest == file.original_sha256:  # both None: a file the patches add, not there yet
            state = PRISTINE
        else:
            state = MODIFIED
        states.append(FileState(file, state, digest))
    return states


def _refuse_modified(states: list[FileState], action: str) -> None:
    modified = [state for state in states if state.state == MODIFIED]
    if modified:
        listing = "\n  ".join(state.describe() for state in modified)
        raise VllmPatchError(
            f"dspark vllm: refusing to {action}: these files are not in a state the patch set knows:\n  {listing}\n"
            f"Reinstall vLLM {SUPPORTED_VERSION} (`pip install --force-reinstall --no-deps vllm=={SUPPORTED_VERSION}`) "
            "and patch again."
        )


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes | None) -> None:
    """Replace `path` with `data` (None: delete it) so a crash never leaves half a file; drops its stale bytecode."""
    if data is None:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.chmod(temporary, mode)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    # Python revalidates .pyc files by source mtime and size; removing them makes that certain.
    for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        cached.unlink(missing_ok=True)


def _apply(file: PatchedFile, original: bytes | None, reverse: bool = False) -> bytes | None:
    text = None if original is None else original.decode("utf-8")
    try:
        result = apply_diff(text, file.diff, reverse=reverse)
    except PatchError as error:
        raise VllmPatchError(f"dspark vllm: the diff for {file.path} does not apply: {error}") from error
    return None if result is None else result.encode("utf-8")


@dataclass
class Report:
    """What an action did, one line per file, for the command line."""

    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def patch(install: VllmInstall, patches: PatchSet) -> Report:
    """Patch every pristine file (already patched ones are left alone); all or nothing."""
    require_supported(install)
    states = file_states(install, patches)
    _refuse_modified(states, "patch")
    planned: list[tuple[PatchedFile, bytes | None, bytes]] = []
    for state in states:
        if state.state != PRISTINE:
            continue
        original = _read(install.root / state.file.path)
        result = _apply(state.file, original)
        if result is None or sha256_bytes(result) != state.file.patched_sha256:
            raise VllmPatchError(
                f"dspark vllm: patching {state.file.path} gave unexpected bytes (checksum differs from the manifest). "
                "The patch set is damaged; restore it from the dspark checkout."
            )
        planned.append((state.file, original, result))

    written: list[tuple[PatchedFile, bytes | None]] = []
    try:
        for file, original, result in planned:
            if original is not None:
                backup = install.backup_dir / file.path
                backup.parent.mkdir(parents=True, exist_ok=True)
                backup.write_bytes(original)
            _write_atomic(install.root / file.path, result)
            written.append((file, original))
    except OSError as error:
        for file, original in reversed(written):
            _write_atomic(install.root / file.path, original)
        raise VllmPatchError(
            f"dspark vllm: could not write into {install.root} ({error}); nothing was changed."
        ) from error
    if planned:
        state_file = install.backup_dir / STATE_FILE
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"vllm_version": install.version, "patch_set": str(patches.source)}, indent=2))
    lines = [f"vLLM {install.version} at {install.package}"]
    for state in states:
        action = "patched" if state.state == PRISTINE else "already patched"
        lines.append(f"  {action:<16} {state.file.path}")
    return Report(lines)


def verify(install: VllmInstall, patches: PatchSet) -> tuple[bool, Report]:
    """(every file patched?, one line per file)."""
    states = file_states(install, patches)
    lines = [f"vLLM {install.version} at {install.package}"]
    if install.version != SUPPORTED_VERSION:
        lines.append(f"  wrong version: the patches are for vLLM {SUPPORTED_VERSION}")
    lines += [f"  {state.describe()}" for state in states]
    complete = install.version == SUPPORTED_VERSION and all(state.state == PATCHED for state in states)
    if complete:
        lines.append("all files patched: DSpark drafting is available (method 'dflash').")
    elif all(state.state == PRISTINE for state in states):
        lines.append("not patched: run `dspark vllm patch`.")
    else:
        lines.append("inconsistent: run `dspark vllm revert`, then `dspark vllm patch` (or reinstall vLLM).")
    return complete, Report(lines)


def revert(install: VllmInstall, patches: PatchSet) -> Report:
    """Restore every patched file to the upstream original (backup first, reverse diff otherwise)."""
    states = file_states(install, patches)
    _refuse_modified(states, "revert")
    lines = [f"vLLM {install.version} at {install.package}"]
    for state in states:
        file = state.file
        target = install.root / file.path
        if state.state == PRISTINE:
            lines.append(f"  {'already original':<16} {file.path}")
            continue
        backup = _read(install.backup_dir / file.path)
        if file.original_sha256 is None:
            original = None
        elif backup is not None and sha256_bytes(backup) == file.original_sha256:
            original = backup
        else:
            original = _apply(file, target.read_bytes(), reverse=True)
            if original is None or sha256_bytes(original) != file.original_sha256:
                raise VllmPatchError(
                    f"dspark vllm: cannot restore {file.path}: no intact backup and the reverse diff does not give "
                    "the original. Reinstall vLLM "
                    f"(`pip install --force-reinstall --no-deps vllm=={SUPPORTED_VERSION}`)."
                )
        _write_atomic(target, original)
        lines.append(f"  {'restored' if original is not None else 'removed':<16} {file.path}")
    if install.backup_dir.is_dir():
        shutil.rmtree(install.backup_dir)
    return Report(lines)


__all__ = [
    "MODIFIED",
    "PATCHED",
    "PRISTINE",
    "SUPPORTED_VERSION",
    "FileState",
    "PatchSet",
    "PatchedFile",
    "VllmInstall",
    "VllmPatchError",
    "file_states",
    "find_vllm",
    "patch",
    "require_supported",
    "revert",
    "verify",
]

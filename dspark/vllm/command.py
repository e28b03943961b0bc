"""`dspark vllm patch|verify|revert|export|export-target`: serve DSpark drafts (and their target) in vLLM 0.23.0."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import patching
from .export import export_for_vllm
from .target_export import export_target, load_target_for_export

COMMAND = "vllm"
HELP = "patch vLLM 0.23.0 for DSpark drafts (patch / verify / revert) and export a draft or target it can serve"


def _add_install_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vllm-root",
        type=Path,
        default=None,
        help="folder holding the vllm/ package to act on (default: the installed vLLM, found without importing it)",
    )
    parser.add_argument(
        "--patches",
        type=Path,
        default=None,
        help="folder holding <version>/manifest.json and the diffs (default: the patch sets shipped in the package)",
    )


def add_draft_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `dspark vllm export` (and its spelling `dspark export --vllm`)."""
    parser.add_argument("source", help="draft checkpoint folder")
    parser.add_argument("destination", help="folder to write (created; must be empty unless --force)")
    parser.add_argument("--target", default="TARGET", help="target model name shown in the serve command")
    parser.add_argument("--force", action="store_true", help="write into a non-empty DESTINATION")


def export_draft(args: argparse.Namespace) -> int:
    result = export_for_vllm(args.source, args.destination, overwrite=args.force)
    print(f"wrote {result.destination}")
    for note in result.notes:
        print(f"  note: {note}")
    print("serve it (after `dspark vllm patch`):")
    print(f"  {result.serve_command(args.target)}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="vllm_action", required=True)
    for name, text in (
        ("patch", "apply the DSpark patches (backs up the originals; refuses unknown file contents)"),
        ("verify", "report, per file, whether it is original, patched or modified; exit 0 only when all patched"),
        ("revert", "restore the original vLLM files"),
    ):
        _add_install_arguments(actions.add_parser(name, help=text, description=text))
    export = actions.add_parser(
        "export",
        help="write a draft as a checkpoint vLLM 0.23 serves with method 'dflash'",
        description="write a draft (any layout `dspark convert` reads) as a checkpoint vLLM 0.23 serves",
    )
    add_draft_export_arguments(export)
    target = actions.add_parser(
        "export-target",
        help="write the target as a bf16 or NVFP4 (ModelOpt W4A16_NVFP4) HF checkpoint vLLM 0.23 serves",
        description="write the target as an HF checkpoint vLLM 0.23 serves: bf16, or with --nvfp4 its decoder "
        "linear layers as ModelOpt NVFP4 weight-only (group 16, FP8 group scales, FP32 global scale)",
    )
    target.add_argument("destination", help="folder to write (created; must be empty unless --force)")
    target.add_argument("--target", default="smollm2", help="'smollm2' (the GGUF target) or an HF folder / repo id")
    target.add_argument("--nvfp4", action="store_true", help="quantize the decoder's linear layers to NVFP4 (W4A16)")
    target.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="more modules to keep in bf16 (names, substrings or globs, as ModelOpt's exclude_modules); "
        "lm_head always is",
    )
    target.add_argument(
        "--no-marlin-check",
        dest="marlin_check",
        action="store_false",
        help="also quantize layers whose shape vLLM's Marlin FP4 GEMM (the Hopper kernel) cannot tile",
    )
    target.add_argument("--force", action="store_true", help="write into a non-empty DESTINATION")


def _export_target(args: argparse.Namespace) -> int:
    model, tokenizer, eos = load_target_for_export(args.target)
    result = export_target(
        model,
        tokenizer,
        args.destination,
        eos_token_id=eos,
        nvfp4_weights=args.nvfp4,
        exclude=args.exclude,
        marlin_shapes_only=args.marlin_check,
        overwrite=args.force,
    )
    kind = f"NVFP4 W4A16 ({len(result.quantized)} linear modules quantized)" if args.nvfp4 else "bf16"
    print(f"wrote {result.destination} ({kind})")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"serve it: {result.serve_command()}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.vllm_action == "export-target":
        return _export_target(args)
    if args.vllm_action == "export":
        return export_draft(args)
    install = patching.find_vllm(args.vllm_root)
    if args.vllm_action == "patch":
        patching.require_supported(install)  # before reading the patch set: the clearer message
    patches = patching.PatchSet.load(patching.SUPPORTED_VERSION, args.patches)
    if args.vllm_action == "patch":
        print(patching.patch(install, patches))
        return 0
    if args.vllm_action == "revert":
        print(patching.revert(install, patches))
        return 0
    complete, report = patching.verify(install, patches)
    print(report)
    return 0 if complete else 1


__all__ = ["COMMAND", "HELP", "add_arguments", "add_draft_export_arguments", "export_draft", "run"]

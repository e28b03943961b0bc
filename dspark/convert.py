"""Import upstream DFlash/DSpark draft checkpoints into the dspark format, and export them back (`dspark convert`).

Formats read (auto-detected from config.json, or forced):
  * "dspark"       this package: `DSparkDraftModel.save_pretrained` (model_type "dspark").
  * "zlab-dflash"  z-lab DFlash: model_type "qwen3", architectures ["DFlashDraftModel"], `dflash_config` holding
                   `mask_token_id` / `target_layer_ids`; no embed_tokens / lm_head. DFlash slot convention.
  * "deepspec"     DeepSeek DeepSpec DSpark: a copy of the target's Qwen3 config plus flat DSpark fields,
                   architectures ["Qwen3DSparkModel"]; ships embed_tokens and lm_head. DSpark slot convention.
  * "torchspec"    TorchSpec exports (model_type "qwen3_dspark", or "qwen3" after its convert script, or its DFlash
                   model_type "dflash"): `target_hidden_size`, `target_num_hidden_layers`, and internal key names
                   (`context_proj`, `context_norm`, `final_norm`, `midlayer`); embed_tokens but no lm_head.
Every layout may carry a vLLM-style `model.` prefix on its keys. Sharded checkpoints (`*.index.json`) are read.

Formats written: "dspark" (native), "zlab-dflash", "deepspec".

Every problem is raised as a ValueError or FileNotFoundError that names the file, the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .configuration_dspark import DSparkConfig
from .modeling_dspark import DSparkDraftModel, rope_inverse_frequencies

COMMAND = "convert"
HELP = "import an upstream DFlash/DSpark draft checkpoint (z-lab, DeepSpec, TorchSpec) or export one back"

IMPORT_FORMATS = ("dspark", "zlab-dflash", "deepspec", "torchspec")
EXPORT_FORMATS = ("dspark", "zlab-dflash", "deepspec")
FORMAT_NAMES = {
    "dspark": "dspark (this package)",
    "zlab-dflash": "z-lab DFlash",
    "deepspec": "DeepSeek DeepSpec DSpark",
    "torchspec": "TorchSpec DSpark/DFlash export",
}

# TorchSpec's internal module names and the names every serving stack uses (TorchSpec keymap.py).
TORCHSPEC_RENAMES = (
    ("context_proj.", "fc."),
    ("context_norm.", "hidden_norm."),
    ("final_norm.", "norm."),
    ("midlayer.", "layers.0."),
)
_MIDLAYERS = re.compile(r"^midlayers\.(\d+)\.")
# Non-persistent RoPE buffers that some exporters write anyway: derived from the config, safe to drop.
_IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
_VOCAB_MAP_KEYS = ("d2t", "t2d")

# Config fields that define what a draft computes; a round trip through any format must keep them.
SEMANTIC_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "rope_parameters",
    "layer_types",
    "block_size",
    "target_layer_ids",
    "target_hidden_size",
    "num_target_layers",
    "mask_token_id",
    "sample_from_anchor",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
    "confidence_threshold",
    "confidence_stop",
    "has_embed_tokens",
    "has_lm_head",
)


def _fail(source: Path | str, message: str) -> ValueError:
    return ValueError(f"dspark convert: {source}: {message}")


def _missing(source: Path | str, message: str) -> FileNotFoundError:
    return FileNotFoundError(f"dspark convert: {source}: {message}")


def _sample(names, limit: int = 6) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Reading config.json and the weights
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_dir(path: str | Path) -> Path:
    folder = Path(path)
    if folder.is_file() and folder.name == "config.json":
        folder = folder.parent
    if not folder.exists():
        raise _missing(folder, "no such directory. Pass the folder that holds config.json and the weights.")
    if not folder.is_dir():
        raise _fail(folder, "is a file, not a checkpoint folder. Pass the folder that holds config.json.")
    return folder


def read_config(path: str | Path) -> dict:
    """The raw config.json of a checkpoint folder, as a dict."""
    folder = _checkpoint_dir(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise _missing(
            folder, "no config.json. A draft checkpoint needs its config.json next to the weights; re-download it."
        )
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _fail(config_file, f"is not valid JSON ({error}). Re-download the checkpoint.") from error
    if not isinstance(raw, dict):
        raise _fail(config_file, "must hold a JSON object. Re-download the checkpoint.")
    return raw


def _read_safetensors(file: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            available = set(handle.keys())
            wanted = sorted(available) if keys is None else keys
            absent = [key for key in wanted if key not in available]
            if absent:
                raise _fail(
                    file,
                    f"the shard index lists tensors this file does not hold: {_sample(absent)}. "
                    "The index and the shards come from different saves; re-download the checkpoint.",
                )
            return {key: handle.get_tensor(key) for key in wanted}
    except SafetensorError as error:
        raise _fail(
            file, f"the safetensors file is corrupt or truncated ({error}). Re-download or re-export it."
        ) from error


def _read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged archive
        raise _fail(file, f"cannot read this PyTorch weights file ({error}). Re-download or re-export it.") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise _fail(file, "does not hold a flat state dict of tensors. Re-export it with save_pretrained.")
    return state


def _read_index(index_file: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names it holds, from a `*.index.json`."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise _fail(
            index_file, f"is not a valid shard index (needs a 'weight_map' object; {error!r}). Re-download it."
        ) from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise _fail(index_file, "has an empty 'weight_map'. Re-download the checkpoint.")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    return shards


def _read_sharded(index_file: Path, safetensors_shards: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in _read_index(index_file).items():
        shard_file = index_file.parent / shard
        if not shard_file.is_file():
            raise _missing(
                index_file.parent,
                f"shard {shard} listed in {index_file.name} is missing. Download every shard of the checkpoint.",
            )
        if safetensors_shards:
            tensors.update(_read_safetensors(shard_file, keys))
            continue
        state = _read_torch_bin(shard_file)
        absent = [key for key in keys if key not in state]
        if absent:
            raise _fail(
                shard_file,
                f"the shard index lists tensors this file does not hold: {_sample(absent)}. Re-download the "
                "checkpoint.",
            )
        tensors.update({key: state[key] for key in keys})
    return tensors


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, with their stored names (single file or sharded, safetensors or .bin)."""
    folder = _checkpoint_dir(path)
    if (folder / "model.safetensors.index.json").is_file():
        return _read_sharded(folder / "model.safetensors.index.json", True)
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors")
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        tensors: dict[str, torch.Tensor] = {}
        for file in loose:
            part = _read_safetensors(file)
            clash = set(part) & set(tensors)
            if clash:
                raise _fail(
                    folder,
                    f"tensors {_sample(clash)} appear in more than one .safetensors file and there is no "
                    "model.safetensors.index.json to say which is current. Remove the stale files.",
                )
            tensors.update(part)
        return tensors
    if (folder / "pytorch_model.bin.index.json").is_file():
        return _read_sharded(folder / "pytorch_model.bin.index.json", False)
    if (folder / "pytorch_model.bin").is_file():
        return _read_torch_bin(folder / "pytorch_model.bin")
    raise _missing(
        folder,
        "no weights found (looked for model.safetensors, model.safetensors.index.json with its shards, other "
        "*.safetensors files, pytorch_model.bin). Download the weights next to config.json.",
    )


# ----------------------------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------------------------

_LOOKED_FOR = (
    "model_type 'dspark' (this package); "
    "architectures ['DFlashDraftModel'] with model_type 'qwen3' or a 'dflash_config' (z-lab DFlash); "
    "architectures ['Qwen3DSparkModel'] (DeepSeek DeepSpec DSpark); "
    "model_type 'qwen3_dspark' or 'dflash', or a 'target_num_hidden_layers' field (TorchSpec)"
)


def _detect(raw: dict, source: Path | str) -> str | None:
    architectures = raw.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    model_type = raw.get("model_type")
    nested = raw.get("dflash_config") if isinstance(raw.get("dflash_config"), dict) else {}
    if any("DFlash2" in name for name in architectures) or any(
        name in nested or name in raw for name in ("conv_kernel_size", "selector_rank")
    ):
        raise _fail(
            source,
            "this is a DFlash2 draft (grouped causal convolutions and a candidate selector), which the dspark "
            "draft model does not implement. Use z-lab's own dflash package for DFlash2 drafts.",
        )
    if "speculators_config" in raw:
        raise _fail(
            source,
            "this is a vLLM 'speculators' checkpoint, which is not supported. Convert the original z-lab, "
            "DeepSpec or TorchSpec checkpoint instead.",
        )
    if model_type == "dspark" or "DSparkDraftModel" in architectures:
        return "dspark"
    torchspec_marks = model_type in ("qwen3_dspark", "dflash") or any(
        name in raw for name in ("target_num_hidden_layers", "_torchspec_version")
    )
    if "Qwen3DSparkModel" in architectures:
        return "torchspec" if torchspec_marks else "deepspec"
    if "DFlashDraftModel" in architectures or nested:
        return "torchspec" if torchspec_marks and not nested else "zlab-dflash"
    if model_type == "qwen3_dspark":
        return "torchspec"
    if any("DSpark" in name for name in architectures):
        raise _fail(
            source,
            f"architectures {architectures} is a DSpark variant this converter does not know (only the Qwen3 "
            "backbone is supported, e.g. not DeepSpec's Gemma4 drafts).",
        )
    return None


def detect_format(path: str | Path) -> str:
    """The layout of the checkpoint in `path`: one of IMPORT_FORMATS, or a ValueError listing what was looked for."""
    raw = read_config(path)
    found = _detect(raw, path)
    if found is None:
        raise _fail(
            path,
            f"unknown checkpoint format (config.json has model_type={raw.get('model_type')!r}, "
            f"architectures={raw.get('architectures')!r}). Looked for: {_LOOKED_FOR}. "
            f"If you know the layout, force it with --from {{{','.join(IMPORT_FORMATS)}}}.",
        )
    return found


# ----------------------------------------------------------------------------------------------------------------
# Upstream state dict -> our names
# ----------------------------------------------------------------------------------------------------------------


def normalize_keys(tensors: dict[str, torch.Tensor], source: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map upstream key names to ours: strip a `model.` prefix, apply TorchSpec's renames, drop RoPE buffers."""
    present = [key for key in _VOCAB_MAP_KEYS if key in tensors or f"model.{key}" in tensors]
    if present:
        raise _fail(
            source,
            f"the checkpoint holds {present}: its vocabulary is pruned to a draft vocabulary, which the dspark draft "
            "model does not support (its lm_head and Markov head must span the target vocabulary). Export the "
            "draft without vocabulary pruning.",
        )
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        name = key[len("model.") :] if key.startswith("model.") else key
        if _IGNORED_KEY.search(name):
            continue
        for old, new in TORCHSPEC_RENAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        name = _MIDLAYERS.sub(r"layers.\1.", name)
        if name in renamed:
            raise _fail(
                source,
                f"tensors {origin[name]!r} and {key!r} both map to {name!r}: the checkpoint mixes two layouts. "
                "Remove the stale tensor.",
            )
        renamed[name] = tensor
        origin[name] = key
    return renamed


# ----------------------------------------------------------------------------------------------------------------
# Upstream config -> DSparkConfig
# ----------------------------------------------------------------------------------------------------------------


def _field(raw: dict, name: str, default=None):
    """A config field; values in a nested `dflash_config` win over top-level copies (z-lab)."""
    nested = raw.get("dflash_config")
    if isinstance(nested, dict) and nested.get(name) is not None:
        return nested[name]
    value = raw.get(name)
    return default if value is None else value


def torchspec_layer_ids(num_captured: int, target_depth: int) -> list[int]:
    """TorchSpec's default target layers when a config omits them: evenly spaced from layer 1 to depth - 3."""
    if num_captured == 1:
        return [target_depth // 2]
    span = target_depth - 4
    return [int(round(1 + i * span / (num_captured - 1))) for i in range(num_captured)]


def _rope_parameters(raw: dict, head_dim: int, source: Path | str) -> dict:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(value, dict) for value in params.values()):
        # Per-layer-type RoPE (transformers 5 for mixed models): the draft's layers use the full-attention entry.
        params = params.get("full_attention") or next(iter(params.values()))
    if isinstance(params, dict) and params:
        params = dict(params)
    else:
        params = dict(raw.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        theta = raw.get("rope_theta")
        if theta is None:
            raise _fail(
                source,
                "config.json has no rope_theta (neither top-level nor in rope_parameters). Add the target's "
                "rope_theta to config.json (Qwen3: 1000000.0).",
            )
        params["rope_theta"] = theta
    try:
        rope_inverse_frequencies(params, head_dim)
    except (KeyError, ValueError, TypeError) as error:
        raise _fail(source, f"unsupported RoPE settings {params}: {error}") from error
    return params


def _torchspec_rope(raw: dict, notes: list[str]) -> dict:
    """TorchSpec's draft RoPE is plain rotate-half RoPE with base `rope_theta` (10000 when absent); it ignores
    any rope_scaling copied from the target, so the import must too."""
    scaling = raw.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        notes.append(f"ignored rope_scaling {scaling}: TorchSpec trains its drafts with unscaled RoPE.")
    return {"rope_type": "default", "rope_theta": float(raw.get("rope_theta") or 10000.0)}


def _markov_type(raw: dict, source: Path | str) -> str:
    kind = str(_field(raw, "markov_head_type", "vanilla")).lower()
    if kind == "classical":  # early TorchSpec name of DeepSpec's vanilla head
        kind = "vanilla"
    if kind not in ("vanilla", "gated"):
        raise _fail(
            source,
            f"markov_head_type={kind!r} is not supported (supported: 'vanilla', 'gated'; DeepSpec's 'rnn' head is "
            "not implemented by the dspark draft model).",
        )
    return kind


def _as_int(raw_value, name: str, source: Path | str) -> int:
    if isinstance(raw_value, bool) or not isinstance(raw_value, int):
        raise _fail(source, f"config.json field {name}={raw_value!r} must be an integer.")
    return raw_value


def _config_kwargs(
    raw: dict, fmt: str, tensors: dict[str, torch.Tensor], source: Path | str, overrides: dict, notes: list[str]
) -> dict:
    """DSparkConfig arguments for an upstream (non-native) config.json, its normalized tensors and user overrides."""
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    required += ["mask_token_id"]
    absent = [name for name in required if _field(raw, name) is None]
    if absent:
        where = " (in dflash_config or top-level)" if fmt == "zlab-dflash" else ""
        raise _fail(
            source,
            f"config.json lacks {absent}{where}; a {FORMAT_NAMES[fmt]} config needs them. Re-download config.json "
            "from the checkpoint's repository.",
        )
    hidden = _as_int(_field(raw, "hidden_size"), "hidden_size", source)
    heads = _as_int(_field(raw, "num_attention_heads"), "num_attention_heads", source)
    num_layers = _as_int(_field(raw, "num_hidden_layers"), "num_hidden_layers", source)
    head_dim = _field(raw, "head_dim") or hidden // heads

    if fmt == "torchspec":
        target_depth = _field(raw, "target_num_hidden_layers")
        captured = _field(raw, "num_target_layers")  # TorchSpec: how many target layers feed the draft
    else:
        target_depth = _field(raw, "num_target_layers")  # z-lab / DeepSpec: the target's depth
        captured = None
    layer_ids = _field(raw, "target_layer_ids")
    if layer_ids is None and fmt == "torchspec" and captured and target_depth:
        layer_ids = torchspec_layer_ids(int(captured), int(target_depth))
    if layer_ids is None:
        raise _fail(
            source,
            "config.json has no target_layer_ids (z-lab keeps them in dflash_config). Add the target layers the "
            'draft was trained on, e.g. "target_layer_ids": [1, 9, 17, 25, 33] for Qwen3-8B.',
        )
    layer_ids = [int(i) for i in layer_ids]

    block_size = overrides.get("block_size", _field(raw, "block_size"))
    if block_size is None:
        raise _fail(
            source,
            "config.json has no block_size (TorchSpec keeps it in the training config). Pass the block size the "
            "draft was trained with: `dspark convert SRC DST --block-size N` (block_size=N in Python).",
        )

    target_hidden = _field(raw, "target_hidden_size")
    fc = tensors.get("fc.weight")
    if target_hidden is None:
        width = fc.shape[1] if fc is not None and fc.dim() == 2 else None
        target_hidden = width // len(layer_ids) if width and width % len(layer_ids) == 0 else hidden

    layer_types = _field(raw, "layer_types")
    if not layer_types or (len(layer_types) != num_layers and set(layer_types) == {"full_attention"}):
        layer_types = ["full_attention"] * num_layers

    markov_rank = int(_field(raw, "markov_rank", 0) or 0)
    enable_confidence = bool(_field(raw, "enable_confidence_head", _field(raw, "confidence_head", False)))
    with_markov = _field(raw, "confidence_head_with_markov")
    proj = tensors.get("confidence_head.proj.weight")
    if with_markov is None and proj is not None:
        # DeepSpec writes the field only when the head exists; read the choice off the head's input width.
        with_markov = bool(markov_rank and proj.shape[-1] == hidden + markov_rank)
    elif with_markov is None:
        # Inert without a confidence head; keep DSparkConfig's default there so round trips stay exact.
        with_markov = bool(markov_rank) if enable_confidence else True
    draft_vocab = _field(raw, "draft_vocab_size")
    vocab_size = _as_int(_field(raw, "vocab_size"), "vocab_size", source)
    if draft_vocab is not None and draft_vocab != vocab_size:
        raise _fail(
            source,
            f"draft_vocab_size={draft_vocab} differs from vocab_size={vocab_size}: the draft was trained with a "
            "pruned vocabulary, which the dspark draft model does not support. Export it without pruning.",
        )

    # Slot convention by origin: DeepSpec and TorchSpec's DSpark drafts are anchor-first, DFlash drafts are not.
    dspark_origin = "Qwen3DSparkModel" in (raw.get("architectures") or []) or raw.get("model_type") == "qwen3_dspark"
    default_anchor = fmt == "deepspec" or (fmt == "torchspec" and dspark_origin)
    rope = _torchspec_rope(raw, notes) if fmt == "torchspec" else _rope_parameters(raw, head_dim, source)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_as_int(_field(raw, "intermediate_size"), "intermediate_size", source),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=_field(raw, "num_key_value_heads", heads),
        head_dim=head_dim,
        hidden_act=_field(raw, "hidden_act", "silu"),
        rms_norm_eps=float(_field(raw, "rms_norm_eps", 1e-6)),
        attention_bias=bool(_field(raw, "attention_bias", False)),
        rope_parameters=rope,
        max_position_embeddings=_field(raw, "max_position_embeddings", 32768),
        initializer_range=_field(raw, "initializer_range", 0.02),
        layer_types=layer_types,
        sliding_window=_field(raw, "sliding_window"),
        block_size=block_size,
        target_layer_ids=layer_ids,
        target_hidden_size=target_hidden,
        num_target_layers=target_depth,
        mask_token_id=_field(raw, "mask_token_id"),
        sample_from_anchor=bool(_field(raw, "sample_from_anchor", default_anchor)),
        markov_rank=markov_rank,
        markov_head_type=_markov_type(raw, source),
        enable_confidence_head=enable_confidence,
        confidence_head_with_markov=bool(with_markov),
        confidence_threshold=float(_field(raw, "confidence_threshold", 0.0)),
        confidence_stop=_field(raw, "confidence_stop", "position"),
        has_embed_tokens="embed_tokens.weight" in tensors,
        has_lm_head="lm_head.weight" in tensors,
        tie_word_embeddings=False,
    )
    for name in ("input_embedding_scale", "output_multiplier"):
        value = _field(raw, name)
        if value is not None and float(value) != 1.0:
            raise _fail(source, f"{name}={value} is not supported by the dspark draft model (it assumes 1.0).")
    if _field(raw, "final_logit_softcapping") is not None:
        raise _fail(source, "final_logit_softcapping is not supported by the dspark draft model (Qwen3 drafts only).")
    kwargs.update(overrides)
    return kwargs


def _build_config(
    raw: dict, fmt: str, tensors: dict, source: Path | str, overrides: dict, notes: list[str]
) -> DSparkConfig:
    try:
        if fmt == "dspark":
            merged = {**raw, **overrides}
            merged.pop("model_type", None)
            return DSparkConfig.from_dict(merged)
        return DSparkConfig(**_config_kwargs(raw, fmt, tensors, source, overrides, notes))
    except ValueError as error:
        if str(error).startswith("dspark convert:"):
            raise
        raise _fail(source, f"config.json describes an invalid draft: {error}") from error
    except TypeError as error:
        raise _fail(source, f"config.json has a field of the wrong type: {error}") from error


# ----------------------------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------------------------


def _build_model(config: DSparkConfig, tensors: dict[str, torch.Tensor], fmt: str, source) -> DSparkDraftModel:
    with torch.device("meta"):
        model = DSparkDraftModel(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_sample(unexpected)}")
        hint = ""
        if any(name.startswith("markov_head.") for name in missing | unexpected):
            hint = f" Check markov_rank / markov_head_type in config.json (markov_rank={config.markov_rank})."
        elif any(name.startswith("confidence_head.") for name in missing | unexpected):
            hint = " Check enable_confidence_head / confidence_head_with_markov in config.json."
        raise _fail(
            source,
            f"the weights do not match config.json read as {FORMAT_NAMES[fmt]} ({'; '.join(parts)}).{hint} "
            "Check that config.json belongs to these weights, or force the layout with --from.",
        )
    wrong = [
        f"{name}: expected {list(expected[name])}, got {list(tensor.shape)}"
        for name, tensor in sorted(tensors.items())
        if tuple(tensor.shape) != expected[name]
    ]
    if wrong:
        shown = "; ".join(wrong[:6]) + (f"; (+{len(wrong) - 6} more)" if len(wrong) > 6 else "")
        raise _fail(
            source,
            f"tensor shapes do not match config.json ({shown}). config.json and the weights belong to different "
            "drafts (check hidden_size, heads, head_dim, intermediate_size, target_layer_ids, vocab_size).",
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


@dataclass
class ImportedDraft:
    draft: DSparkDraftModel
    source: Path
    format: str
    notes: list[str] = field(default_factory=list)


def _overrides(block_size: int | None, sample_from_anchor: bool | None) -> dict:
    overrides = {}
    if block_size is not None:
        overrides["block_size"] = int(block_size)
    if sample_from_anchor is not None:
        overrides["sample_from_anchor"] = bool(sample_from_anchor)
    return overrides


def import_checkpoint(
    path: str | Path, fmt: str = "auto", block_size: int | None = None, sample_from_anchor: bool | None = None
) -> ImportedDraft:
    """Read a checkpoint of any supported layout; returns the draft, the layout read and notes for the user."""
    source = _checkpoint_dir(path)
    raw = read_config(source)
    if fmt == "auto":
        fmt = detect_format(source)
    elif fmt not in IMPORT_FORMATS:
        raise ValueError(f"dspark convert: unknown source format {fmt!r}; choose one of {IMPORT_FORMATS} or 'auto'.")
    tensors = normalize_keys(read_weights(source), source)
    notes: list[str] = []
    config = _build_config(raw, fmt, tensors, source, _overrides(block_size, sample_from_anchor), notes)
    draft = _build_model(config, tensors, fmt, source)
    if fmt == "zlab-dflash" and "sliding_attention" in config.layer_types and raw.get("is_causal") is not False:
        notes.append(
            "the draft has sliding-window layers and config.json does not set is_causal=false: newer z-lab code makes "
            "such layers causal inside the block, dspark attends bidirectionally on every layer. Compare acceptance "
            "with z-lab's runtime before relying on it."
        )
    return ImportedDraft(draft, source, fmt, notes)


def load_checkpoint(
    path: str | Path, fmt: str = "auto", block_size: int | None = None, sample_from_anchor: bool | None = None
) -> DSparkDraftModel:
    """A `DSparkDraftModel` (eval mode, stored dtype) from a checkpoint of any supported layout."""
    return import_checkpoint(path, fmt, block_size, sample_from_anchor).draft


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def _dtype_name(draft: DSparkDraftModel) -> str:
    return str(draft.fc.weight.dtype).removeprefix("torch.")


def _qwen3_fields(config: DSparkConfig) -> dict:
    """The standard Qwen3 config fields both upstream formats carry (RoPE in legacy and transformers-5 spelling)."""
    rope = dict(config.rope_parameters)
    theta = rope.pop("rope_theta")
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": dict(config.rope_parameters),
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "layer_types": list(config.layer_types),
        "sliding_window": config.sliding_window,
        "use_sliding_window": "sliding_attention" in config.layer_types,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": False,
    }


def _runtime_fields(config: DSparkConfig) -> dict:
    """dspark-only drafting settings, written as extra fields (ignored upstream) only when not the defaults."""
    extra = {}
    if config.confidence_threshold:
        extra["confidence_threshold"] = config.confidence_threshold
    if config.confidence_stop != "position":
        extra["confidence_stop"] = config.confidence_stop
    return extra


def _backbone_tensors(draft: DSparkDraftModel, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in draft.state_dict().items()
        if not name.startswith(skip_prefixes)
    }


def _zlab_export(draft: DSparkDraftModel) -> tuple[dict, dict, list[str]]:
    config = draft.config
    refusals = []
    if config.markov_rank > 0:
        refusals.append(f"it has a Markov head (markov_rank={config.markov_rank})")
    if config.sample_from_anchor:
        refusals.append("it uses the DSpark slot convention (sample_from_anchor=True: slot 0 drafts)")
    if config.enable_confidence_head:
        refusals.append("it has a confidence head")
    if config.target_hidden_size != config.hidden_size:
        refusals.append(f"its target width {config.target_hidden_size} differs from its hidden size")
    if refusals:
        raise ValueError(
            "dspark convert: cannot export to zlab-dflash: " + "; ".join(refusals) + ". z-lab DFlash drafts are a "
            "plain backbone whose slots 1.. predict their own position; they cannot express a Markov head, a "
            "confidence head or anchor-first drafting. Export with --to deepspec (or keep --to dspark)."
        )
    raw = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "block_size": config.block_size,
        **({"num_target_layers": config.num_target_layers} if config.num_target_layers is not None else {}),
        "dflash_config": {"mask_token_id": config.mask_token_id, "target_layer_ids": list(config.target_layer_ids)},
        **_qwen3_fields(config),
        **_runtime_fields(config),
        "torch_dtype": _dtype_name(draft),
    }
    notes = [
        "no auto_map written: to load it with z-lab's remote code, copy z-lab's dflash.py next to config.json and "
        'add "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}.'
    ]
    dropped = [name for name in ("embed_tokens", "lm_head") if getattr(config, f"has_{name}")]
    if dropped:
        notes.append(
            f"{' and '.join(dropped)} not written: z-lab drafts borrow them from the target, so the exported draft "
            "is the same only if they were copies of the target's."
        )
    return raw, _backbone_tensors(draft, ("embed_tokens.", "lm_head.")), notes


def _deepspec_export(draft: DSparkDraftModel) -> tuple[dict, dict, list[str]]:
    config = draft.config
    if config.target_hidden_size != config.hidden_size:
        raise ValueError(
            f"dspark convert: cannot export to deepspec: the target width {config.target_hidden_size} differs from "
            f"the draft's hidden size {config.hidden_size}, and DeepSpec sizes fc as len(target_layer_ids) x "
            "hidden_size. Keep --to dspark."
        )
    raw = {
        "architectures": ["Qwen3DSparkModel"],
        "model_type": "qwen3",
        **_qwen3_fields(config),
        **({"num_target_layers": config.num_target_layers} if config.num_target_layers is not None else {}),
        "block_size": config.block_size,
        "mask_token_id": config.mask_token_id,
        "target_layer_ids": list(config.target_layer_ids),
        "num_anchors": getattr(config, "num_anchors", 512),
        "enable_confidence_head": config.enable_confidence_head,
        "confidence_head_with_markov": config.confidence_head_with_markov,
        "markov_rank": config.markov_rank,
        "markov_head_type": config.markov_head_type,
        "sample_from_anchor": config.sample_from_anchor,
        **_runtime_fields(config),
        "torch_dtype": _dtype_name(draft),
    }
    notes = []
    absent = [name for name in ("embed_tokens", "lm_head") if not getattr(config, f"has_{name}")]
    if absent:
        notes.append(
            f"{' and '.join(absent)} not written: this draft borrows {'them' if len(absent) > 1 else 'it'} from the "
            "target. vLLM shares the target's when absent; DeepSpec's own Qwen3DSparkModel expects both, so copy "
            "the target's embed_tokens.weight / lm_head.weight into model.safetensors to load it there."
        )
    if not config.sample_from_anchor:
        notes.append(
            "wrote sample_from_anchor=false (DFlash slot convention): vLLM honours the field, DeepSpec's own code "
            "always drafts anchor-first."
        )
    return raw, _backbone_tensors(draft), notes


def _export_payload(draft: DSparkDraftModel, fmt: str) -> tuple[dict, dict, list[str]] | None:
    """(config.json dict, tensors, notes) for an upstream layout, None for dspark; refuses what `fmt` cannot hold."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"dspark convert: unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}.")
    if fmt == "dspark":
        return None
    return _zlab_export(draft) if fmt == "zlab-dflash" else _deepspec_export(draft)


def _write(draft: DSparkDraftModel, out: Path, payload: tuple[dict, dict, list[str]] | None) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    if payload is None:
        draft.save_pretrained(out)
        return []
    raw, tensors, notes = payload
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return notes


def export_checkpoint(draft: DSparkDraftModel, out_dir: str | Path, fmt: str = "dspark") -> list[str]:
    """Write `draft` to `out_dir` in layout `fmt` (one of EXPORT_FORMATS); returns notes for the user."""
    return _write(draft, Path(out_dir), _export_payload(draft, fmt))


# ----------------------------------------------------------------------------------------------------------------
# convert = import + export (+ read back)
# ----------------------------------------------------------------------------------------------------------------

_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _prepare_destination(source: Path, destination: Path, overwrite: bool) -> None:
    if destination.exists() and destination.resolve() == source.resolve():
        raise ValueError(f"dspark convert: the destination {destination} is the source folder; choose a new folder.")
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"dspark convert: the destination {destination} is a file; choose a folder.")
    if destination.is_dir() and any(destination.iterdir()):
        if not overwrite:
            raise ValueError(
                f"dspark convert: the destination {destination} is not empty; choose a new folder or pass --force "
                "to overwrite its checkpoint files."
            )
        for pattern in _WEIGHT_PATTERNS:  # stale shards would be read back together with the new weights
            for stale in destination.glob(pattern):
                stale.unlink()


def _verify(draft: DSparkDraftModel, destination: Path, fmt: str) -> None:
    """Read the written checkpoint back and check it holds the same draft (tensors and config semantics)."""
    reread = load_checkpoint(destination, fmt)
    # z-lab drafts cannot carry embed_tokens / lm_head: those are dropped on purpose (and said so in a note).
    dropped = ("embed_tokens.", "lm_head.") if fmt == "zlab-dflash" else ()
    checked = [name for name in SEMANTIC_FIELDS if not (dropped and name in ("has_embed_tokens", "has_lm_head"))]
    ours = {name: tensor for name, tensor in draft.state_dict().items() if not name.startswith(dropped)}
    theirs = reread.state_dict()
    differing = [name for name in ours if name not in theirs or not torch.equal(ours[name], theirs[name])]
    differing += sorted(set(theirs) - set(ours))
    fields = [name for name in checked if getattr(draft.config, name) != getattr(reread.config, name)]
    if differing or fields:
        raise ValueError(
            f"dspark convert: the checkpoint written to {destination} does not read back as the same draft "
            f"(tensors: {_sample(differing) or '-'}; config fields: {fields or '-'}). This is a bug in dspark "
            "convert; please report it."
        )


@dataclass
class ConversionResult:
    source: Path
    destination: Path
    source_format: str
    target_format: str
    draft: DSparkDraftModel
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        config = self.draft.config
        convention = (
            "DSpark (sample_from_anchor=True: every slot drafts)"
            if config.sample_from_anchor
            else "DFlash (sample_from_anchor=False: slots 1.. draft)"
        )
        markov = f"{config.markov_head_type} rank {config.markov_rank}" if config.markov_rank else "none"
        confidence = (
            ("yes, with Markov features" if config.confidence_head_with_markov else "yes")
            if config.enable_confidence_head
            else "none"
        )
        depth = f"a {config.num_target_layers}-layer target" if config.num_target_layers else "the target"
        lines = [
            f"converted {FORMAT_NAMES[self.source_format]} -> {FORMAT_NAMES[self.target_format]}",
            f"  source       {self.source}",
            f"  written      {self.destination}",
            f"  layers       {config.num_hidden_layers} draft layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, head_dim {config.head_dim}",
            f"  target       layers {list(config.target_layer_ids)} of {depth} (width {config.target_hidden_size}), "
            f"vocab {config.vocab_size}, mask token {config.mask_token_id}",
            f"  block        block_size {config.block_size}, {convention}: {config.num_draft_tokens} drafted "
            "tokens per round",
            f"  heads        Markov {markov}; confidence {confidence}; "
            f"embed_tokens {'own' if config.has_embed_tokens else 'from the target'}; "
            f"lm_head {'own' if config.has_lm_head else 'from the target'}",
            f"  dtype        {_dtype_name(self.draft)}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def convert(
    src: str | Path,
    dst: str | Path,
    from_fmt: str = "auto",
    to_fmt: str = "dspark",
    block_size: int | None = None,
    sample_from_anchor: bool | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> ConversionResult:
    """Read the checkpoint in `src` (layout `from_fmt`, auto-detected by default) and write it to `dst` as `to_fmt`.

    `block_size` / `sample_from_anchor` override what config.json says (TorchSpec configs lack block_size). With
    `verify`, the written checkpoint is read back and compared tensor by tensor.
    """
    if to_fmt not in EXPORT_FORMATS:
        raise ValueError(f"dspark convert: unknown export format {to_fmt!r}; choose one of {EXPORT_FORMATS}.")
    if from_fmt != "auto" and from_fmt not in IMPORT_FORMATS:
        raise ValueError(f"dspark convert: unknown source format {from_fmt!r}; choose one of {IMPORT_FORMATS}.")
    imported = import_checkpoint(src, from_fmt, block_size, sample_from_anchor)
    payload = _export_payload(imported.draft, to_fmt)  # refuses before the destination is touched
    destination = Path(dst)
    _prepare_destination(imported.source, destination, overwrite)
    notes = imported.notes + _write(imported.draft, destination, payload)
    if verify:
        _verify(imported.draft, destination, to_fmt)
    return ConversionResult(imported.source, destination, imported.format, to_fmt, imported.draft, notes)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint folder to read (config.json + weights)")
    parser.add_argument("destination", help="folder to write (created; must be empty unless --force)")
    parser.add_argument(
        "--from",
        dest="from_format",
        choices=("auto", *IMPORT_FORMATS),
        default="auto",
        help="layout of SOURCE (default: detected from config.json)",
    )
    parser.add_argument(
        "--to", dest="to_format", choices=EXPORT_FORMATS, default="dspark", help="layout to write (default: dspark)"
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="block size the draft was trained with, if config.json lacks it"
    )
    parser.add_argument(
        "--slot-convention",
        choices=("auto", "dspark", "dflash"),
        default="auto",
        help="override the slot convention: dspark = every slot drafts (sample_from_anchor=True), "
        "dflash = slots 1.. draft (default: from the source format)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite checkpoint files in a non-empty DESTINATION")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the written checkpoint back")


def run(args: argparse.Namespace) -> int:
    anchor = {"auto": None, "dspark": True, "dflash": False}[args.slot_convention]
    result = convert(
        args.source,
        args.destination,
        from_fmt=args.from_format,
        to_fmt=args.to_format,
        block_size=args.block_size,
        sample_from_anchor=anchor,
        overwrite=args.force,
        verify=not args.no_verify,
    )
    print(result.summary())
    return 0


__all__ = [
    "EXPORT_FORMATS",
    "IMPORT_FORMATS",
    "ConversionResult",
    "ImportedDraft",
    "convert",
    "detect_format",
    "export_checkpoint",
    "import_checkpoint",
    "load_checkpoint",
    "normalize_keys",
    "read_config",
    "read_weights",
]

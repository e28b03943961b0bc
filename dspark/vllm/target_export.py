"""Write the target as an HF checkpoint that vLLM 0.23.0 serves: bf16, or NVFP4 W4A16 (`dspark vllm export-target`).

bf16: the weights as the model holds them, cast to bfloat16, with a config.json cleaned of the GGUF loader's
`quantization_config` (vLLM would otherwise take the checkpoint for a GGUF one), the tokenizer files, and a
generation_config whose eos/pad are the real end-of-turn token (SmolLM2's GGUF names <|im_start|> instead, see
dspark/targets.py).

NVFP4 (`--nvfp4`): the same folder, with every linear layer of the decoder layers stored as ModelOpt NVFP4
(dspark/vllm/nvfp4.py) and config.json carrying

    "quantization_config": {"quant_method": "modelopt", "quant_algo": "W4A16_NVFP4", "group_size": 16,
                            "kv_cache_scheme": null, "ignore": [modules kept in bf16]}

Why this form, from the vLLM 0.23.0 sources:
- `ModelOptNvFp4Config.__init__` (quantization/modelopt.py) maps quant_algo "W4A16_NVFP4" to
  `ModelOptNvFp4W4A16LinearMethod`: weight-only FP4 through the Marlin GEMM, which is also the only NVFP4 kernel
  Hopper has (W4A4 "NVFP4" falls back to Marlin there too and would need calibrated input scales for nothing).
- transformers_utils/config.py takes `quantization_config` from config.json (hf_quant_config.json only when it is
  absent). `ModelArchConfigConvertor._normalize_quantization_config` rewrites configs that name
  `producer: modelopt` and raises "Unknown ModelOpt quant algo" for anything but FP8*/NVFP4, so the W4A16 config
  must not carry `producer`; without it, `ModelOptNvFp4Config.override_quantization_method` reads `quant_algo`
  (quant_method starts with "modelopt", "NVFP4" in the algo) and picks "modelopt_fp4", and
  `ModelOptQuantConfigBase.from_config` reads the flat form: quant_algo, group_size, kv_cache_scheme, `ignore`.
- `create_weights` registers per layer `weight` uint8 [out, in/2], `weight_scale` float8_e4m3fn [out, in/16],
  `weight_scale_2` float32 [shards] and a placeholder `input_scale` it discards, so none is written. Scalars load
  into the per-shard slots (`PerTensorScaleParameter._load_into_shard_id`, `_is_1d_and_scalar`).
- `process_weights_after_loading` keeps `weight_scale_2.max()` of a fused layer's shards (q/k/v -> qkv_proj,
  gate/up -> gate_up_proj, llama.py `stacked_params_mapping`), so those shards share one global scale here.
- `is_layer_excluded` -> `is_layer_skipped` with the model's packed_modules_mapping: a fused layer is left in bf16
  only if all its shards are in `ignore` (else it raises), so exclusions are made per fused group.
- The tied lm_head is a `ParallelLMHead`, which `get_quant_method` would quantize: "lm_head" is always ignored
  (llama.py skips lm_head weights when tie_word_embeddings; the embedding is never quantized).
- On Hopper the Marlin kernel tiles K x N by (128|64) x (128|64|256) (csrc/quantization/marlin/marlin.cu); a fused
  layer it cannot tile fails at run time, so by default such layers stay bf16 and are listed in `ignore`. For
  SmolLM2-135M (hidden 576) that is qkv_proj (576 -> 960) and o_proj (576 -> 576); gate_up (576 -> 3072) and
  down (1536 -> 576) are quantized.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import nvfp4

QUANT_ALGO = "W4A16_NVFP4"
ALWAYS_IGNORED = ("lm_head",)
# vLLM's fused layers and the checkpoint modules each one loads (llama.py / qwen2.py stacked_params_mapping).
FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
DECODER_LINEAR = re.compile(r"^(?P<layer>model\.layers\.\d+\.(?:self_attn|mlp))\.(?P<proj>\w+_proj)\.weight$")
# Config keys that describe how this process loaded the model, not the model.
_LOADER_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")


@dataclass
class TargetExport:
    """What was written."""

    destination: Path
    quantized: list[str] = field(default_factory=list)  # checkpoint module names stored as NVFP4
    ignored: list[str] = field(default_factory=list)  # linear modules kept in bf16 (quantization_config.ignore)
    notes: list[str] = field(default_factory=list)

    def serve_command(self) -> str:
        return f"vllm serve {self.destination} --dtype bfloat16"


@dataclass
class LinearGroup:
    """Checkpoint linear modules that vLLM runs as one layer: a fused group, or a single projection."""

    modules: list[str]  # e.g. ["model.layers.0.self_attn.q_proj", ...k_proj, ...v_proj]
    in_features: int
    out_features: int  # summed over the group


def linear_groups(state_dict: dict[str, torch.Tensor]) -> list[LinearGroup]:
    """The decoder layers' linear modules grouped as vLLM fuses them, in checkpoint order."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        match = DECODER_LINEAR.match(name)
        if match:
            by_layer.setdefault(match["layer"], {})[match["proj"]] = tensor
    groups = []
    for layer, projections in by_layer.items():
        remaining = dict(projections)
        for shards in FUSED_GROUPS.values():
            if all(shard in remaining for shard in shards):
                weights = [remaining.pop(shard) for shard in shards]
                groups.append(
                    LinearGroup(
                        [f"{layer}.{shard}" for shard in shards],
                        weights[0].shape[1],
                        sum(weight.shape[0] for weight in weights),
                    )
                )
        for proj, weight in remaining.items():
            groups.append(LinearGroup([f"{layer}.{proj}"], weight.shape[1], weight.shape[0]))
    return groups


def _excluded(module: str, patterns: list[str]) -> bool:
    """ModelOpt-style exclusion: an exact name, a substring or a glob (what `is_layer_excluded` accepts)."""
    return any(module == p or p in module or fnmatch.fnmatch(module, p) for p in patterns)


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor], exclude: list[str], marlin_shapes_only: bool = True
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """bf16 state dict -> (NVFP4 state dict, quantized modules, ignored linear modules, notes).

    Each group vLLM fuses is quantized against one global scale (the largest of its shards' own)."""
    out = dict(state_dict)
    quantized, ignored, notes = [], [], []
    untileable = []
    for group in linear_groups(state_dict):
        if any(_excluded(module, exclude) for module in group.modules):
            ignored += group.modules  # all shards or none: vLLM refuses a partly quantized fused layer
            continue
        if group.in_features % nvfp4.GROUP_SIZE:
            ignored += group.modules
            notes.append(f"{group.modules[0]}: in_features {group.in_features} not divisible by 16; kept bf16")
            continue
        if marlin_shapes_only and not nvfp4.marlin_can_tile(group.in_features, group.out_features):
            ignored += group.modules
            untileable.append(f"{group.in_features}->{group.out_features}")
            continue
        weights = [state_dict[f"{module}.weight"].float() for module in group.modules]
        shared = nvfp4.global_scale_for(max(weight.abs().max() for weight in weights))
        for module, weight in zip(group.modules, weights, strict=True):
            packed = nvfp4.quantize(weight, shared)
            out[f"{module}.weight"] = packed.weight
            out[f"{module}.weight_scale"] = packed.weight_scale
            out[f"{module}.weight_scale_2"] = packed.weight_scale_2
            quantized.append(module)
    if untileable:
        shapes = ", ".join(sorted(set(untileable)))
        notes.append(
            f"kept {len(untileable)} layers bf16 whose shape ({shapes}) vLLM's Marlin FP4 GEMM cannot tile "
            "(Hopper's only NVFP4 kernel); pass --no-marlin-check to quantize them for Blackwell's FP4 kernels"
        )
    return out, quantized, ignored, notes


def dequantize_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An NVFP4 checkpoint's tensors -> dense weights (as vLLM's kernels see them), for loading into transformers."""
    dense = {}
    for name, tensor in state_dict.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        scale_name = name.removesuffix(".weight") + ".weight_scale"
        if name.endswith(".weight") and scale_name in state_dict:
            dense[name] = nvfp4.dequantize(tensor, state_dict[scale_name], state_dict[scale_name + "_2"], dtype)
        else:
            dense[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return dense


def hf_config_dict(model, eos_token_id: int | None, pad_token_id: int | None, bos_token_id: int | None) -> dict:
    """config.json for the exported folder: the model's config, bf16, without the loader's traces."""
    config = model.config.to_dict()
    for key in _LOADER_KEYS:
        config.pop(key, None)
    config["dtype"] = "bfloat16"
    # GGUF-loaded configs carry no architectures; vLLM picks the model class from this list.
    config["architectures"] = [type(model).__name__]
    for key, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id)):
        if value is not None:
            config[key] = value
    return config


def bf16_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors in bf16, without the tied lm_head (transformers and vLLM both re-tie it)."""
    tensors = {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def load_target_for_export(name: str):
    """(model in float32, tokenizer, eos id) for `smollm2` or an HF folder / repo id."""
    if name == "smollm2":
        from ..targets import SMOLLM2_END_OF_TURN_ID, load_smollm2

        model, tokenizer = load_smollm2(dtype=torch.float32)  # float32: the GGUF dequantizes exactly there
        return model, tokenizer, SMOLLM2_END_OF_TURN_ID
    from ..pair import load_target

    model, tokenizer = load_target(name, device="cpu", dtype=torch.float32)
    eos = model.generation_config.eos_token_id
    return model, tokenizer, eos[0] if isinstance(eos, list) else eos


def export_target(
    model,
    tokenizer,
    destination: str | Path,
    eos_token_id: int | None = None,
    nvfp4_weights: bool = False,
    exclude: list[str] | None = None,
    marlin_shapes_only: bool = True,
    overwrite: bool = False,
) -> TargetExport:
    """Write `model` (+ `tokenizer`) to `destination` as a bf16 or NVFP4 W4A16 checkpoint for vLLM 0.23.0."""
    out = Path(destination)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"dspark vllm export-target: {out} is not empty; choose a new folder or pass --force.")
    out.mkdir(parents=True, exist_ok=True)
    tensors = bf16_state_dict(model)
    pad = eos_token_id if eos_token_id is not None else model.generation_config.pad_token_id
    config = hf_config_dict(model, eos_token_id, pad, model.generation_config.bos_token_id)
    result = TargetExport(out)
    if nvfp4_weights:
        patterns = [*ALWAYS_IGNORED, *(exclude or [])]
        tensors, result.quantized, ignored, result.notes = quantize_state_dict(tensors, patterns, marlin_shapes_only)
        result.ignored = [*ALWAYS_IGNORED, *ignored]
        config["quantization_config"] = {
            "quant_method": "modelopt",
            "quant_algo": QUANT_ALGO,
            "group_size": nvfp4.GROUP_SIZE,
            "kv_cache_scheme": None,
            "ignore": result.ignored,
        }
        if not result.quantized:
            result.notes.append("no layer was quantized (all excluded or untileable)")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = model.generation_config
    if eos_token_id is not None:
        generation.eos_token_id = eos_token_id
        generation.pad_token_id = pad
    generation.save_pretrained(out)
    if tokenizer is not None:
        if eos_token_id is not None:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(out)
    else:
        result.notes.append("no tokenizer found; add the tokenizer files before serving")
    return result


def load_exported(folder: str | Path, dtype: torch.dtype = torch.float32):
    """An exported folder (bf16 or NVFP4) as a transformers model; NVFP4 weights are dequantized exactly as vLLM's
    kernels read them, so this model computes what the served one does up to the GEMM's rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("quantization_config", None)  # transformers has no ModelOpt quantizer; the weights arrive dense
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dequantize_state_dict(load_file(str(folder / "model.safetensors")), dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


__all__ = [
    "QUANT_ALGO",
    "LinearGroup",
    "TargetExport",
    "dequantize_state_dict",
    "export_target",
    "linear_groups",
    "load_exported",
    "load_target_for_export",
    "quantize_state_dict",
]

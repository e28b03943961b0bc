"""Write a draft as a checkpoint that (patched) vLLM 0.23.0 serves with `method: "dflash"` (`dspark vllm export`).

vLLM 0.23 has no DSpark method, so the checkpoint poses as a DFlash draft: `architectures: ["DFlashDraftModel"]`
(which vLLM maps to `qwen3_dflash.DFlashQwen3ForCausalLM`), a Qwen3 `model_type`, and a `dflash_config` that holds
the DFlash fields plus the DSpark ones the patched files read:

    mask_token_id, target_layer_ids   stock DFlash (vLLM adds 1 to each id: its index 0 is the embedding output, so
                                      id i reads the output of decoder layer i, like HF's hidden_states[i + 1])
    sample_from_anchor                DSpark slot convention: every slot drafts (dflash.py patch)
    markov_rank, markov_head_type     the Markov head (qwen3_dflash.py patch), weights `markov_head.*`
    enable_confidence_head, confidence_head_with_markov, confidence_threshold, confidence_stop
                                      the confidence head, weights `confidence_head.*`, and the early stop
    markov_top_n, markov_top_n_truncate
                                      bias only the N best base logits (0 = the whole vocabulary)

A draft without DSpark heads in the DFlash slot convention gets none of the DSpark keys, so it loads exactly like a
stock z-lab DFlash checkpoint. Weight names are the draft's own (`layers.*`, `fc`, `hidden_norm`, `norm`), which
vLLM's `load_weights` prefixes with `model.` and stacks into qkv_proj / gate_up_proj itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..configuration_dspark import DSparkConfig
from ..convert import _dtype_name, _qwen3_fields, load_checkpoint
from ..modeling_dspark import DSparkDraftModel

ARCHITECTURE = "DFlashDraftModel"
SUPPORTED_ACTIVATION = "silu"  # vLLM's Qwen3 MLP is SiluAndMul


@dataclass
class VllmExport:
    """What was written and how to serve it."""

    destination: Path
    num_speculative_tokens: int
    notes: list[str] = field(default_factory=list)

    def serve_command(self, target: str = "TARGET") -> str:
        config = {
            "method": "dflash",
            "model": str(self.destination),
            "num_speculative_tokens": self.num_speculative_tokens,
            "attention_backend": "FLASH_ATTN",
        }
        return f"vllm serve {target} --speculative-config '{json.dumps(config)}'"


def _refusals(config: DSparkConfig) -> list[str]:
    refusals = []
    if "sliding_attention" in config.layer_types:
        refusals.append(
            "it has sliding-window layers; vLLM 0.23's DFlash draft attends over the full context, which would "
            "change what it proposes"
        )
    if config.hidden_act != SUPPORTED_ACTIVATION:
        refusals.append(f"its MLP uses {config.hidden_act!r}; vLLM's Qwen3 draft MLP is fixed to silu")
    last = None if config.num_target_layers is None else config.num_target_layers - 1
    if last is not None and last in config.target_layer_ids:
        refusals.append(
            f"it reads the target's last layer ({last}), which HF hands over after the final norm but vLLM before "
            "it; retrain with target_layer_ids below the last layer"
        )
    return refusals


def ordered_layer_ids(target_layer_ids: list[int]) -> tuple[list[int], list[list[int]]]:
    """vLLM concatenates the target's layers in increasing depth, each once; the draft's fc reads them in config
    order, repeats allowed. Returns the sorted distinct ids and, per id, the positions of its copies in the config."""
    distinct = sorted(set(target_layer_ids))
    return distinct, [[index for index, i in enumerate(target_layer_ids) if i == layer] for layer in distinct]


def reorder_fc(weight: torch.Tensor, target_layer_ids: list[int], width: int) -> torch.Tensor:
    """fc.weight [H, n * width] for the config's layer order -> [H, m * width] for vLLM's sorted distinct order.

    A layer read twice feeds fc through two column blocks; vLLM supplies it once, so the blocks are summed
    (fc(cat[h, h]) = (W_a + W_b) h exactly)."""
    _, positions = ordered_layer_ids(target_layer_ids)
    blocks = weight.split(width, dim=1)
    return torch.cat([sum(blocks[p] for p in group) for group in positions], dim=1).contiguous()


def vllm_config_dict(draft: DSparkDraftModel) -> dict:
    """The config.json vLLM 0.23 reads for this draft."""
    config = draft.config
    distinct, _ = ordered_layer_ids(list(config.target_layer_ids))
    dflash_config: dict = {"mask_token_id": config.mask_token_id, "target_layer_ids": distinct}
    if config.sample_from_anchor:
        dflash_config["sample_from_anchor"] = True
    if config.markov_rank > 0:
        dflash_config.update(
            markov_rank=config.markov_rank,
            markov_head_type=config.markov_head_type,
            markov_top_n=0,
            markov_top_n_truncate=False,
        )
    if config.enable_confidence_head:
        dflash_config.update(
            enable_confidence_head=True,
            confidence_head_with_markov=config.confidence_head_with_markov,
            confidence_threshold=config.confidence_threshold,
            confidence_stop=config.confidence_stop,
        )
    raw = {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        **_qwen3_fields(config),
        "block_size": config.block_size,
        "target_hidden_size": config.target_hidden_size,
        "dflash_config": dflash_config,
        "torch_dtype": _dtype_name(draft),
    }
    if config.num_target_layers is not None:
        raw["num_target_layers"] = config.num_target_layers
    return raw


def vllm_state_dict(draft: DSparkDraftModel) -> dict[str, torch.Tensor]:
    """The draft's tensors under the names the patched qwen3_dflash.py loads (fc reordered for vLLM)."""
    config = draft.config
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in draft.state_dict().items()}
    tensors["fc.weight"] = reorder_fc(tensors["fc.weight"], list(config.target_layer_ids), config.target_hidden_size)
    return tensors


def export_for_vllm(
    source: str | Path | DSparkDraftModel, destination: str | Path, overwrite: bool = False
) -> VllmExport:
    """Write `source` (a draft, or a checkpoint folder of any layout `dspark convert` reads) for vLLM 0.23.0."""
    draft = source if isinstance(source, DSparkDraftModel) else load_checkpoint(source)
    config = draft.config
    refusals = _refusals(config)
    if refusals:
        raise ValueError("dspark vllm export: cannot serve this draft in vLLM 0.23: " + "; ".join(refusals) + ".")
    out = Path(destination)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"dspark vllm export: {out} is not empty; choose a new folder or pass --force.")
    out.mkdir(parents=True, exist_ok=True)
    save_file(vllm_state_dict(draft), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(vllm_config_dict(draft), indent=2) + "\n")

    notes = []
    if config.num_target_layers is None:
        notes.append(
            "the config does not record the target's depth, so it could not be checked that target_layer_ids avoid "
            "the last layer (vLLM reads it before the final norm, HF after)."
        )
    if sorted(config.target_layer_ids) != list(config.target_layer_ids) or len(set(config.target_layer_ids)) != len(
        config.target_layer_ids
    ):
        notes.append("target_layer_ids reordered to vLLM's increasing depth; fc columns moved to match.")
    if config.markov_rank > 0 or config.enable_confidence_head or config.sample_from_anchor:
        notes.append("needs the patched vLLM 0.23.0 (`dspark vllm patch`); a stock vLLM ignores the DSpark parts.")
    if config.confidence_threshold > 0:
        notes.append("the confidence stop needs `--no-async-scheduling` in vLLM 0.23.")
    tokens = config.num_draft_tokens
    convention = "every slot drafts" if config.sample_from_anchor else "slots 1.. draft"
    notes.append(f"block_size {config.block_size}, {convention}: serve with num_speculative_tokens={tokens}.")
    return VllmExport(out, tokens, notes)


__all__ = ["VllmExport", "export_for_vllm", "ordered_layer_ids", "reorder_fc", "vllm_config_dict", "vllm_state_dict"]

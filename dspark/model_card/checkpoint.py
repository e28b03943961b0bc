"""What a draft checkpoint is, read from its folder without building the model: its config and its stored weights.

The parameter count comes from the safetensors headers (names, dtypes and shapes), so describing a draft costs a few
kilobytes of reading, not loading tensors.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..configuration_dspark import DSparkConfig

# Labels for the first component of a weight name; anything else is shown under its own name.
COMPONENT_LABELS = {
    "layers": "draft decoder layers",
    "fc": "target-feature projection (`fc`)",
    "hidden_norm": "target-feature norm",
    "norm": "final norm",
    "markov_head": "Markov head",
    "confidence_head": "confidence head",
    "embed_tokens": "own token embedding",
    "lm_head": "own `lm_head`",
}
HEADER_LENGTH_BYTES = 8  # safetensors: little-endian u64 header length, then the JSON header


@dataclass
class DraftFacts:
    """A DSpark checkpoint folder: its config, and per component the parameters it stores."""

    path: Path
    config: DSparkConfig
    parameters_by_component: dict[str, int]
    stored_dtypes: list[str]
    weight_bytes: int
    weight_files: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(self.parameters_by_component.values())

    @property
    def max_tokens_per_round(self) -> int:
        """Drafted tokens that can all be accepted, plus the target's own bonus token."""
        return self.config.num_draft_tokens + 1

    @property
    def borrowed(self) -> list[str]:
        """What the draft takes from the target at run time instead of storing it."""
        parts = []
        if not self.config.has_embed_tokens:
            parts.append("token embedding")
        if not self.config.has_lm_head:
            parts.append("`lm_head`")
        return parts


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of one safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        if len(prefix) != HEADER_LENGTH_BYTES:
            raise ValueError(f"dspark card: {path} is not a safetensors file (too short).")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"dspark card: {path} has no readable safetensors header ({error}).") from None
    header.pop("__metadata__", None)
    return header


def weight_files(folder: Path) -> list[Path]:
    """The shards named by the index when there is one (so stray files are not counted), else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"dspark card: {index} names shards that are not in the folder: {missing}.")
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def read_draft_config(folder: Path) -> DSparkConfig:
    """The folder's DSparkConfig; a clear error when the folder is not a DSpark draft."""
    if not folder.exists():
        raise FileNotFoundError(f"dspark card: checkpoint folder {folder} does not exist.")
    if not folder.is_dir():
        raise FileNotFoundError(f"dspark card: {folder} is not a folder; pass the draft's checkpoint folder.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"dspark card: {folder} has no config.json; pass a folder written by `save_pretrained` (a DSpark draft)."
        )
    try:
        values = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"dspark card: {config_path} is not valid JSON ({error}).") from None
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type != DSparkConfig.model_type:
        raise ValueError(
            f"dspark card: {folder} is not a DSpark draft (config.json has model_type={model_type!r}, expected "
            f"{DSparkConfig.model_type!r}). Upstream DFlash / DeepSpec checkpoints: run `dspark convert SRC DST` first."
        )
    return DSparkConfig.from_dict(values)


def describe_draft(folder: str | Path) -> DraftFacts:
    """Config and stored parameters of the DSpark draft in `folder`."""
    folder = Path(folder)
    config = read_draft_config(folder)
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"dspark card: {folder} holds no *.safetensors weights.")
    by_component: dict[str, int] = {}
    dtypes: set[str] = set()
    for path in files:
        for name, tensor in read_safetensors_header(path).items():
            component = name.split(".", 1)[0]
            by_component[component] = by_component.get(component, 0) + math.prod(tensor["shape"])
            dtypes.add(tensor["dtype"])
    return DraftFacts(
        path=folder,
        config=config,
        parameters_by_component=dict(sorted(by_component.items(), key=lambda item: -item[1])),
        stored_dtypes=sorted(dtypes),
        weight_bytes=sum(path.stat().st_size for path in files),
        weight_files=[path.name for path in files],
    )


def component_label(component: str) -> str:
    return COMPONENT_LABELS.get(component, f"`{component}`")

"""Training configuration: one YAML or TOML file, every field overridable from the command line.

dspark train --config train.yaml --learning-rate 3e-4 --num-anchors 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = ""
    output_dir: str = "runs/dspark"
    heldout_fraction: float = 0.05
    max_length: int = 1024
    drop_long_prompts: bool = False
    # target and draft
    target: str = "smollm2"
    target_dtype: str = "auto"
    init_from: str = ""
    num_hidden_layers: int = 1
    block_size: int = 8
    sample_from_anchor: bool = True
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    num_target_features: int = 5
    target_layer_ids: list[int] = field(default_factory=list)
    # objective
    num_anchors: int = 64
    attention: str = "auto"  # packed blocks: flex (FlexAttention, default on CUDA) or dense (bool mask, CPU default)
    ce_weight: float = 0.1
    tv_weight: float = 0.9
    confidence_weight: float = 1.0
    decay_gamma: float = 4.0
    # optimisation
    learning_rate: float = 6e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.04
    min_lr_fraction: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int = 0
    time_budget_minutes: float = 0.0
    mixed_precision: str = "auto"
    seed: int = 0
    # bookkeeping
    log_every: int = 10
    eval_every: int = 200
    eval_sequences: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    stop_after_steps: int = 0
    progress: bool = True

    def validate(self) -> None:
        problems = []
        if not self.data_dir:
            problems.append("data_dir is required (folders written by `dspark data respond`, joined with commas)")
        for name in ("max_length", "block_size", "num_anchors", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2:
            problems.append("block_size must be >= 2")
        if not 0 <= self.heldout_fraction < 1:
            problems.append(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.decay_gamma <= 0:
            problems.append(f"decay_gamma must be > 0, got {self.decay_gamma}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be auto|no|bf16|fp16, got {self.mixed_precision!r}")
        if self.attention not in ("auto", "dense", "flex"):
            problems.append(f"attention must be auto|dense|flex, got {self.attention!r}")
        if self.markov_head_type not in ("vanilla", "gated"):
            problems.append(f"markov_head_type must be vanilla|gated, got {self.markov_head_type!r}")
        if problems:
            raise ValueError("dspark train: invalid configuration:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_settings_mapping(path: Path, who: str) -> dict:
    """The mapping in a .yaml/.yml/.toml/.json file; `who` (the command) prefixes the clear errors."""
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"{who}: config file {path} must end in .yaml, .yml, .toml or .json.")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{who}: cannot parse the config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{who}: config file {path} must hold a mapping of field names to values.")
    return values


def read_config_file(path: str | Path) -> dict:
    """Fields from a .yaml/.yml/.toml/.json file (unknown fields are an error, so typos do not pass silently)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dspark train: config file {path} does not exist.")
    values = read_settings_mapping(path, "dspark train")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"dspark train: unknown config fields in {path}: {', '.join(unknown)}.")
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` option per config field; omitted options keep the file's (or the default) value."""
    parser.add_argument("--config", help="YAML/TOML/JSON file with training fields")
    for item in dataclasses.fields(TrainConfig):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if isinstance(default, bool):
            parser.add_argument(_flag(item.name), type=_parse_bool, default=None, metavar="BOOL")
        elif isinstance(default, list):
            parser.add_argument(_flag(item.name), type=int, nargs="+", default=None)
        else:
            parser.add_argument(_flag(item.name), type=type(default), default=None)


def config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the config file, then command-line options."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    for item in dataclasses.fields(TrainConfig):
        given = getattr(args, item.name, None)
        if given is not None:
            values[item.name] = given
    config = TrainConfig(**values)
    config.validate()
    return config

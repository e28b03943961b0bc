"""NVFP4 weight quantization in pure torch, in the on-disk layout of a ModelOpt checkpoint that vLLM 0.23.0 loads.

A weight W [out, in] is cut into groups of 16 consecutive inputs. Each element is stored as a 4-bit E2M1 float
(sign, 2 exponent bits, 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), each group has an FP8-E4M3 scale,
and the tensor has one FP32 global scale:

    W[o, i] ~= e2m1(code[o, i]) * float(weight_scale[o, i // 16]) * weight_scale_2

This is the rule of vLLM 0.23.0's `dequantize_to_dtype` (vllm/model_executor/layers/quantization/utils/
nvfp4_emulation_utils.py: `out = tensor_f32 * (tensor_sf * global_scale)`, fed `weight_global_scale`, which
`ModelOptNvFp4LinearMethod.process_weights_after_loading` sets to `weight_scale_2.max()` without reciprocation; the
W4A16 method's docstring: "Marlin expects the global scale in the same form ModelOpt stores (amax/2688)").

ModelOpt's recipe, followed here: weight_scale_2 = amax(|W|) / (6 * 448), so the largest group scale lands on the
FP8 maximum 448; a group's scale is amax(group) / 6 / weight_scale_2, rounded to FP8; the elements are
W / (scale * weight_scale_2) rounded to the nearest E2M1 value, ties to the even code (the thresholds of vLLM's
`cast_to_fp4`). Two codes share a byte, the even input index in the low nibble (`break_fp4_bytes` stacks
(low, high) per byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# Magnitude of each 3-bit code; bit 3 of a nibble is the sign (vLLM's kE2M1ToFloat table).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes: a value exactly on one goes to the even code below or above it.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

# Marlin FP4 (vLLM's weight-only kernel on Hopper/Ampere) tiles a GEMM with (thread_k, thread_n) taken from these
# lists (csrc/quantization/marlin/marlin.cu: small_batch_thread_configs, large_batch_thread_configs); a layer whose
# (in, out) fits no entry fails at run time with "Invalid thread config".
MARLIN_SMALL_BATCH_TILES = ((128, 128), (64, 128), (128, 64))
MARLIN_LARGE_BATCH_TILES = ((64, 256), (64, 128), (128, 64))


@dataclass
class NvFp4Tensor:
    """One quantized weight.

    weight          uint8 [out, in / 2]           two E2M1 codes per byte, even input index in the low nibble
    weight_scale    float8_e4m3fn [out, in / 16]  per-group scale, row-major (unswizzled, as ModelOpt writes it)
    weight_scale_2  float32 []                    per-tensor global scale
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] values the kernels compute with."""
        return dequantize(self.weight, self.weight_scale, self.weight_scale_2, dtype)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (any shape) -> float32 values."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8).bool(), -magnitude, magnitude)


def e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """float values already scaled into [-6, 6] (larger magnitudes saturate) -> uint8 codes 0..15.

    Nearest magnitude with ties to the even code, which is what vLLM's `cast_to_fp4` thresholds do (0.25 -> 0,
    0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). Zero and -0 both encode as code 0.
    """
    magnitude = values.abs().float()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=values.device)
    # searchsorted(right=False) counts the midpoints strictly below: a tie stays on the lower code ...
    code = torch.searchsorted(midpoints, magnitude.contiguous(), right=False)
    # ... which is right when the lower code is even; ties whose lower code is odd round up to the even one.
    on_midpoint = (code < len(_E2M1_MIDPOINTS)) & (midpoints[code.clamp(max=len(_E2M1_MIDPOINTS) - 1)] == magnitude)
    code = code + (on_midpoint & (code % 2 == 1)).long()
    sign = ((values < 0) & (code > 0)).to(torch.uint8) << 3
    return code.to(torch.uint8) | sign


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, cols] (cols even) -> bytes [rows, cols / 2]; code 2j in the low nibble of byte j."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bytes [rows, cols / 2] -> uint8 codes [rows, cols], the inverse of `pack_nibbles`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def global_scale_for(amax: torch.Tensor | float) -> torch.Tensor:
    """FP32 weight_scale_2 for a tensor (or a fused group of tensors) whose largest magnitude is `amax`.

    ModelOpt's amax / (6 * 448); an all-zero weight gets 1 so that nothing divides by zero."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def quantize(weight: torch.Tensor, weight_scale_2: torch.Tensor | None = None) -> NvFp4Tensor:
    """[out, in] float weight (in % 16 == 0) -> NvFp4Tensor.

    `weight_scale_2` defaults to this tensor's own global scale; pass a shared one for the shards of a layer that
    vLLM fuses (q/k/v, gate/up): its loader keeps only the largest of the shards' scales, so the shards must have
    been quantized against that same value."""
    if weight.ndim != 2 or weight.shape[1] % GROUP_SIZE:
        raise ValueError(
            f"NVFP4 needs a 2-D weight with in_features divisible by {GROUP_SIZE}, got {tuple(weight.shape)}"
        )
    w = weight.detach().float()
    rows, cols = w.shape
    if weight_scale_2 is None:
        weight_scale_2 = global_scale_for(w.abs().max())
    # A copy: shards saved side by side must not share storage (safetensors refuses aliased tensors).
    weight_scale_2 = torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(()).clone()
    groups = w.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    group_amax = groups.abs().amax(dim=-1)
    # Clamp before the cast: a shared global scale can leave a shard's groups below, never above, 448.
    block_scale = (group_amax / E2M1_MAX / weight_scale_2).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    step = block_scale.float() * weight_scale_2
    # A group whose scale rounds to zero holds (near-)zeros only: its codes are zero.
    scaled = torch.where(step[..., None] > 0, groups / step[..., None].clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    codes = e2m1_encode(scaled.clamp(-E2M1_MAX, E2M1_MAX)).reshape(rows, cols)
    return NvFp4Tensor(pack_nibbles(codes), block_scale, weight_scale_2)


def dequantize(
    packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [out, in / 2], float8 [out, in / 16], float32 scalar -> [out, in] in `dtype` (computed in float32)."""
    values = e2m1_decode(unpack_nibbles(packed))
    rows, cols = values.shape
    scale = weight_scale.float() * weight_scale_2.float()
    return (values.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE) * scale[..., None]).reshape(rows, cols).to(dtype)


def marlin_can_tile(in_features: int, out_features: int) -> bool:
    """Whether vLLM's Marlin FP4 GEMM has a tile for a (fused) layer of this shape at every batch size."""

    def fits(tiles: tuple[tuple[int, int], ...]) -> bool:
        return any(in_features % k == 0 and out_features % n == 0 for k, n in tiles)

    return fits(MARLIN_SMALL_BATCH_TILES) and fits(MARLIN_LARGE_BATCH_TILES)


__all__ = [
    "E2M1_MAGNITUDES",
    "GROUP_SIZE",
    "NvFp4Tensor",
    "dequantize",
    "e2m1_decode",
    "e2m1_encode",
    "global_scale_for",
    "marlin_can_tile",
    "pack_nibbles",
    "quantize",
    "unpack_nibbles",
]

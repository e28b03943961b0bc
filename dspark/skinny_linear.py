"""The target's projections over a verify block (a few rows) as weight-streaming Triton kernels.

A verify step multiplies Q = N + 1 rows per sequence (9 at block 8) by every weight matrix of the target, so its cost
is streaming the weights once from memory. cuBLAS's kernels for such skinny products stream the large projections at
~75% of copy bandwidth and the narrow ones (k/v: 1024 outputs on a Qwen3-8B shape) at ~35% (verify_profile on an
H200, docs/results/README.md), which leaves a compiled verify at 1.8x its roofline.

`stream_weights_kernel` computes out^T = W x^T, a tile of BLOCK_OUT weight rows per program: the weight rows take the
matrix unit's long side and the block's rows (padded to 16) its short side. Where the output tiles alone would leave
SMs idle, programs also split the input features, and `sum_splits_kernel` adds their float32 partial sums. The MLP's
gate and up projections run in one launch, SiLU(gate) * up in the epilogue, so the MLP's activation costs no kernel.

`SkinnyProjections.installed()` routes the target's `nn.Linear` layers and its SiLU-gated MLPs through the kernels
for the duration of a verify step (the static loop's `skinny_kernels=True`); every other call of the target keeps
its own forwards. A product of more than MAX_ROWS rows (a large batch) keeps cuBLAS, which wins once the product is
no longer skinny.

Shapes: M rows of x (batch x block), K input features, N output features; the weight is [N, K] as in nn.Linear.
"""

from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass

import torch
from torch import nn

from .installed_forwards import installed_forwards

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are optional: CPU installs need no Triton
    triton = None

MAX_ROWS = 64  # above this, the product is no longer weight-bound enough for these kernels (cuBLAS is used)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (the CPU tests; it must be set before Triton's import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def stream_weights_kernel(
        x_ptr,
        weight_ptr,
        up_weight_ptr,
        bias_ptr,
        out_ptr,
        rows,
        out_features,
        in_features,
        x_row_stride,
        weight_row_stride,
        splits,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
        BLOCK_IN: tl.constexpr,
        PARTIAL: tl.constexpr,
        GATED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        EVEN: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One BLOCK_OUT-wide tile of outputs over one split of the input features.

        Not PARTIAL (one split): writes the finished output [M, N] (gated: SiLU(x Wg^T) * (x Wu^T)). PARTIAL:
        float32 partial sums into out [splits, M, N] (gated: [splits, M, 2N], gate then up) for `sum_splits_kernel`.
        EVEN: N is a multiple of BLOCK_OUT and K of BLOCK_IN * splits, so the weight loads need no mask.
        """
        tile = tl.program_id(0)
        split = tl.program_id(1)
        outs = tile * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        tokens = tl.arange(0, BLOCK_ROWS)
        span = tl.cdiv(tl.cdiv(in_features, BLOCK_IN), splits) * BLOCK_IN  # a whole number of BLOCK_IN per split
        start = split * span
        stop = tl.minimum(start + span, in_features)
        acc = tl.zeros((BLOCK_OUT, BLOCK_ROWS), dtype=tl.float32)
        up_acc = tl.zeros((BLOCK_OUT, BLOCK_ROWS), dtype=tl.float32)
        for offset in range(start, stop, BLOCK_IN):
            ins = offset + tl.arange(0, BLOCK_IN)
            x_mask = (tokens[:, None] < rows) & (ins[None, :] < in_features)
            x_tile = tl.load(x_ptr + tokens[:, None] * x_row_stride + ins[None, :], mask=x_mask, other=0.0)
            w_offsets = outs[:, None] * weight_row_stride + ins[None, :]
            w_mask = (outs[:, None] < out_features) & (ins[None, :] < in_features)
            if EVEN:
                w_tile = tl.load(weight_ptr + w_offsets)
            else:
                w_tile = tl.load(weight_ptr + w_offsets, mask=w_mask, other=0.0)
            if IEEE:  # float32 weights: no TF32 rounding
                acc = tl.dot(w_tile, tl.trans(x_tile), acc, input_precision="ieee")
            else:
                acc = tl.dot(w_tile, tl.trans(x_tile), acc)
            if GATED:
                if EVEN:
                    u_tile = tl.load(up_weight_ptr + w_offsets)
                else:
                    u_tile = tl.load(up_weight_ptr + w_offsets, mask=w_mask, other=0.0)
                if IEEE:
                    up_acc = tl.dot(u_tile, tl.trans(x_tile), up_acc, input_precision="ieee")
                else:
                    up_acc = tl.dot(u_tile, tl.trans(x_tile), up_acc)
        out_mask = (tokens[None, :] < rows) & (outs[:, None] < out_features)
        if not PARTIAL:
            value = acc
            if GATED:
                value = acc * tl.sigmoid(acc) * up_acc
            if HAS_BIAS:
                value += tl.load(bias_ptr + outs, mask=outs < out_features, other=0.0).to(tl.float32)[:, None]
            out_offsets = tokens[None, :] * out_features + outs[:, None]
            tl.store(out_ptr + out_offsets, value.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            width = 2 * out_features if GATED else out_features
            partial = out_ptr + split * rows * width + tokens[None, :] * width + outs[:, None]
            tl.store(partial, acc, mask=out_mask)
            if GATED:
                tl.store(partial + out_features, up_acc, mask=out_mask)

    @triton.jit
    def sum_splits_kernel(
        partial_ptr, bias_ptr, out_ptr, size, out_features, SPLITS: tl.constexpr, GATED: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """out [M, N] = the sum of the splits' partials [SPLITS, M, N] (gated: SiLU of the gate half times the up
        half of [SPLITS, M, 2N]), plus the bias."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = index < size
        row = index // out_features
        column = index % out_features
        width = 2 * out_features if GATED else out_features
        at = row * width + column
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        up_total = tl.zeros((BLOCK,), dtype=tl.float32)
        for split in tl.static_range(SPLITS):
            total += tl.load(partial_ptr + split * size * (2 if GATED else 1) + at, mask=mask, other=0.0)
            if GATED:
                up_total += tl.load(partial_ptr + split * size * 2 + at + out_features, mask=mask, other=0.0)
        if GATED:
            total = total * tl.sigmoid(total) * up_total
        if HAS_BIAS:
            total += tl.load(bias_ptr + column, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + index, total.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and the input-feature split of one product shape."""

    block_rows: int
    block_out: int
    block_in: int
    splits: int
    warps: int = 4
    stages: int = 4


# What a launch aims for: enough programs that every SM streams weights through the whole kernel (programs per SM),
# and splits no shorter than MIN_STEPS_PER_SPLIT tiles of BLOCK_IN (each split pays its pipeline's fill).
PROGRAMS_PER_SM = 2
MIN_STEPS_PER_SPLIT = 4


@functools.cache
def plan_launch(rows: int, out_features: int, in_features: int, processors: int, gated: bool = False) -> LaunchPlan:
    """Tiles and splits for x [rows, in_features] times a weight [out_features, in_features] on `processors` SMs."""
    block_rows = max(16, triton.next_power_of_2(rows))
    block_out = 64
    block_in = 128 if block_rows <= 16 and not gated else 64
    tiles = triton.cdiv(out_features, block_out)
    steps = triton.cdiv(in_features, block_in)
    splits = 1
    while tiles * splits < PROGRAMS_PER_SM * processors and steps // (2 * splits) >= MIN_STEPS_PER_SPLIT:
        splits *= 2
    return LaunchPlan(block_rows, block_out, block_in, splits)


def processor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any count exercises the split logic


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    up_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    plan: LaunchPlan | None = None,
) -> torch.Tensor:
    """x [M, K] (rows contiguous) -> [M, N] through the kernels: x W^T + bias, or SiLU(x W^T) * (x U^T) when
    `up_weight` is given. `plan` overrides `plan_launch` (the tuning benchmark)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    gated = up_weight is not None
    if plan is None:
        plan = plan_launch(rows, out_features, in_features, processor_count(x.device), gated)
    out = x.new_empty(rows, out_features)
    even = out_features % plan.block_out == 0 and in_features % (plan.block_in * plan.splits) == 0
    if plan.splits == 1:
        target = out
    else:
        width = (2 if gated else 1) * out_features
        target = torch.empty(plan.splits, rows, width, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, plan.block_out), plan.splits)
    stream_weights_kernel[grid](
        x,
        weight,
        up_weight if gated else weight,
        bias if bias is not None else weight,
        target,
        rows,
        out_features,
        in_features,
        x.stride(0),
        weight.stride(0),
        plan.splits,
        BLOCK_ROWS=plan.block_rows,
        BLOCK_OUT=plan.block_out,
        BLOCK_IN=plan.block_in,
        PARTIAL=plan.splits > 1,
        GATED=gated,
        HAS_BIAS=bias is not None and plan.splits == 1,
        EVEN=even,
        IEEE=weight.dtype == torch.float32,
        num_warps=plan.warps,
        num_stages=plan.stages,
    )
    if plan.splits > 1:
        size, block = rows * out_features, 1024
        sum_splits_kernel[(triton.cdiv(size, block),)](
            target,
            bias if bias is not None else target,
            out,
            size,
            out_features,
            SPLITS=plan.splits,
            GATED=gated,
            HAS_BIAS=bias is not None,
            BLOCK=block,
        )
    return out


# One opaque op for torch.compile: dynamo traces the call, inductor launches the kernels as they are (graph-safe).
@torch.library.custom_op("dspark::skinny_linear", mutates_args=())
def skinny_linear_op(
    x: torch.Tensor, weight: torch.Tensor, up_weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    return launch(x, weight, up_weight, bias)


@skinny_linear_op.register_fake
def _(x, weight, up_weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] (or SiLU(F.linear(x, weight)) * F.linear(x, up_weight) when
    `up_weight` is given) through the kernels; returns [..., N]."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return skinny_linear_op(flat, weight, up_weight, bias).view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Routing a target's projections through the kernels
# ----------------------------------------------------------------------------------------------------------------


def skinny_kernel_problem(target: nn.Module) -> str | None:
    """Why the kernels cannot run this target's projections (None: they can)."""
    if triton is None:
        return "Triton is not installed (pip install triton; it comes with torch's CUDA builds)"
    if target.device.type != "cuda" and not interpreting():
        return f"the kernels run on CUDA GPUs; the target is on {target.device}"
    if target.dtype not in KERNEL_DTYPES and not interpreting():
        return f"the kernels stream bf16 or fp16 weights; the target is {target.dtype}"
    return None


def is_gated_silu_mlp(module: nn.Module) -> bool:
    """down(SiLU(gate(x)) * up(x)) with bias-free projections: the MLP of Llama, Qwen2/3 and Qwen3.5 (and their
    MoE models' shared experts), recognised by its parts."""
    parts = dict(module.named_children())
    if set(parts) != {"gate_proj", "up_proj", "down_proj", "act_fn"} or not type(module).__name__.endswith("MLP"):
        return False
    projections = [parts["gate_proj"], parts["up_proj"], parts["down_proj"]]
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in projections):
        return False
    return isinstance(parts["act_fn"], nn.SiLU) or type(parts["act_fn"]).__name__ == "SiLUActivation"


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // x.shape[-1] > MAX_ROWS:
        return nn.functional.linear(x, module.weight, module.bias)
    return skinny_linear(x, module.weight, module.bias)


def _gated_mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // x.shape[-1] > MAX_ROWS:
        return type(module).forward(module, x)
    hidden = skinny_linear(x, module.gate_proj.weight, up_weight=module.up_proj.weight)
    return _linear_forward(module.down_proj, hidden)


def routed_modules(target: nn.Module) -> tuple[list[nn.Module], list[nn.Linear]]:
    """The gated MLPs (one gate-up launch each, then their down projection) and the other linear layers that
    `SkinnyProjections` routes through the kernels."""
    mlps = {name: module for name, module in target.named_modules() if is_gated_silu_mlp(module)}
    inside_mlp = {f"{name}.{part}" for name in mlps for part in ("gate_proj", "up_proj")}
    linears = [
        module
        for name, module in target.named_modules()
        if isinstance(module, nn.Linear) and name not in inside_mlp and module.weight.stride(-1) == 1
    ]
    return list(mlps.values()), linears


class SkinnyProjections:
    """A target's nn.Linear layers (and gated MLPs, as one gate-up launch) routed through the kernels while
    `installed()`."""

    def __init__(self, target: nn.Module):
        problem = skinny_kernel_problem(target)
        if problem is not None:
            raise ValueError(f"dspark: skinny_kernels=True cannot run here: {problem}. Use skinny_kernels=False.")
        mlps, linears = routed_modules(target)
        # One bound forward per module, made once (see `installed_forwards`).
        self.forwards = {module: types.MethodType(_gated_mlp_forward, module) for module in mlps}
        self.forwards.update({module: types.MethodType(_linear_forward, module) for module in linears})

    def installed(self):
        """Route the modules' forwards through the kernels for the duration (re-entrant)."""
        return installed_forwards(self.forwards)

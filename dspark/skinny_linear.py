"""The target's projections over a verify block (a few rows) as weight-streaming Triton kernels.

A verify step multiplies Q = N + 1 rows per sequence (9 at block 8) by every weight matrix of the target, so its cost
is streaming the weights once from memory. On a Qwen3-8B shape, cuBLAS's kernels for such skinny products stream the
MLP's weights at ~80% of copy bandwidth, the 4096-wide attention projections at ~58% and the 1024-wide k and v ones at
~28%: each launch pays a few microseconds of ramp-up (benchmarks/skinny_linear.py on an H200).

`stream_weights_kernel` computes out^T = W x^T, a tile of BLOCK_OUT weight rows per program: the weight rows take the
matrix unit's long side and the block's rows (padded to 16) its short side. Where the output tiles alone would leave
most SMs idle, programs also split the input features, and `sum_splits_kernel` adds their float32 partial sums. Fewer
launches: the MLP's gate and up projections run as one (SiLU(gate) * up in its epilogue, so the activation costs no
kernel either), and so do the projections a module applies to one input (q, k and v; a Gated DeltaNet layer's four
input projections), each weight read where it lies (no concatenated copy).

`SkinnyProjections.installed()` routes the target's linear layers through the kernels for the duration of a verify
step (the static loop's `skinny_kernels=True`); every other call of the target keeps its own forwards. A product of
more rows than MAX_ROWS allows (a large batch) keeps cuBLAS, which wins once the product is no longer skinny.

Shapes: M rows of x (batch x block), K input features, N output features; a weight is [N, K] as in nn.Linear.
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
# Programmatic dependent launch (Hopper and later), for benchmarks/skinny_linear.py --chain only: in this form (launch
# the successor at once, wait before any load) it measured slower on an H200 (116 against 105 us per layer).
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# Most rows a product runs through the kernels with (more keep cuBLAS): measured on an H200 (Qwen3-8B shapes), one
# projection beat cuBLAS at 1-16 rows and lost at 36; a launch that replaces several GEMMs (q/k/v, gate-up with the
# activation) still won at 36 rows (batch 4 at block 8).
MAX_ROWS = {"single": 16, "grouped": 36}
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (the CPU tests; it must be set before Triton's import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def stream_weights_kernel(
        x_ptr,
        w0_ptr,
        w1_ptr,
        w2_ptr,
        w3_ptr,
        bias_ptr,
        out_ptr,
        rows,
        n0,
        n1,
        n2,
        n3,
        in_features,
        x_row_stride,
        splits,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
        BLOCK_IN: tl.constexpr,
        SEGMENTS: tl.constexpr,
        PARTIAL: tl.constexpr,
        GATED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        EVEN: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """One BLOCK_OUT-wide tile of one segment's outputs over one split of the input features.

        Segments: up to four weights [n_s, K] (contiguous) of one input, whose outputs lie side by side in
        out [M, n0 + n1 + ...] (a group such as q, k and v: one launch). GATED: two weights of equal width, both
        computed by each program; the output [M, n0] is SiLU(x W0^T) * (x W1^T).
        Not PARTIAL (one split): writes the finished output. PARTIAL: float32 partial sums of every segment side by
        side (gated: gate then up) into out [splits, M, n0 + n1 + ...] for `sum_splits_kernel`.
        EVEN: every n_s is a multiple of BLOCK_OUT and K of BLOCK_IN * splits, so the weight loads need no mask.
        """
        if PDL:  # launched early: let the next kernel launch too, then wait for the previous one's writes
            gdc_launch_dependents()
            gdc_wait()
        tile = tl.program_id(0)
        split = tl.program_id(1)
        width = n0 + n1 + n2 + n3  # the partial sums' row width (and the output's, unless gated)
        weight_ptr, features, first, local = w0_ptr, n0, 0, tile
        if SEGMENTS > 1 and not GATED:
            ends = tl.cdiv(n0, BLOCK_OUT)
            if tile >= ends:
                weight_ptr, features, first, local = w1_ptr, n1, n0, tile - ends
                ends += tl.cdiv(n1, BLOCK_OUT)
                if SEGMENTS > 2 and tile >= ends:
                    weight_ptr, features, first, local = w2_ptr, n2, n0 + n1, tile - ends
                    ends += tl.cdiv(n2, BLOCK_OUT)
                    if SEGMENTS > 3 and tile >= ends:
                        weight_ptr, features, first, local = w3_ptr, n3, n0 + n1 + n2, tile - ends
        outs = local * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        tokens = tl.arange(0, BLOCK_ROWS)
        span = tl.cdiv(tl.cdiv(in_features, BLOCK_IN), splits) * BLOCK_IN  # a whole number of BLOCK_IN per split
        start = split * span
        stop = tl.minimum(start + span, in_features)
        precision: tl.constexpr = "ieee" if IEEE else "tf32"  # float32 weights: no TF32 rounding (tf32: the default)
        acc = tl.zeros((BLOCK_OUT, BLOCK_ROWS), dtype=tl.float32)
        up_acc = tl.zeros((BLOCK_OUT, BLOCK_ROWS), dtype=tl.float32)
        for offset in range(start, stop, BLOCK_IN):
            ins = offset + tl.arange(0, BLOCK_IN)
            x_mask = (tokens[:, None] < rows) & (ins[None, :] < in_features)
            x_tile = tl.load(x_ptr + tokens[:, None] * x_row_stride + ins[None, :], mask=x_mask, other=0.0)
            w_offsets = outs[:, None] * in_features + ins[None, :]
            w_mask = None if EVEN else (outs[:, None] < features) & (ins[None, :] < in_features)
            w_other = None if EVEN else 0.0
            w_tile = tl.load(weight_ptr + w_offsets, mask=w_mask, other=w_other)
            acc = tl.dot(w_tile, tl.trans(x_tile), acc, input_precision=precision)
            if GATED:
                u_tile = tl.load(w1_ptr + w_offsets, mask=w_mask, other=w_other)
                up_acc = tl.dot(u_tile, tl.trans(x_tile), up_acc, input_precision=precision)
        out_mask = (tokens[None, :] < rows) & (outs[:, None] < features)
        columns = first + outs
        if not PARTIAL:
            value = acc
            if GATED:
                value = acc * tl.sigmoid(acc) * up_acc
                width = n0
            if HAS_BIAS:
                value += tl.load(bias_ptr + columns, mask=outs < features, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + tokens[None, :] * width + columns[:, None], value.to(out_ptr.dtype.element_ty), out_mask)
        else:
            partial = out_ptr + split * rows * width + tokens[None, :] * width + columns[:, None]
            tl.store(partial, acc, mask=out_mask)
            if GATED:
                tl.store(partial + n0, up_acc, mask=out_mask)

    @triton.jit
    def sum_splits_kernel(
        partial_ptr, bias_ptr, out_ptr, size, out_width, partial_width, SPLITS: tl.constexpr,
        GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """out [M, W] = the sum of the splits' partials [SPLITS, M, W'] (gated: W' = 2W, SiLU of the gate half
        times the up half), plus the bias [W]."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = index < size
        column = index % out_width
        at = (index // out_width) * partial_width + column
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        up_total = tl.zeros((BLOCK,), dtype=tl.float32)
        split_stride = (size // out_width) * partial_width  # one split's partial sums
        for split in tl.static_range(SPLITS):
            total += tl.load(partial_ptr + split * split_stride + at, mask=mask, other=0.0)
            if GATED:  # the up half follows the gate half of each row
                up_total += tl.load(partial_ptr + split * split_stride + at + out_width, mask=mask, other=0.0)
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


# A product with fewer output tiles than processors / NARROW_DIVISOR (a 1024-wide k or v projection) leaves most SMs
# idle: its input features are split until the programs cover every SM, keeping at least MIN_STEPS_PER_SPLIT tiles
# of BLOCK_IN per split. Wider products do better unsplit (no partial sums to add). Measured by
# benchmarks/skinny_linear.py on an H200, 9 rows (docs/results/skinny_linear_h200_2026-12-02).
NARROW_DIVISOR = 4
MIN_STEPS_PER_SPLIT = 2


@functools.cache
def plan_launch(
    rows: int, widths: tuple[int, ...], in_features: int, gated: bool, processors: int, shared_memory: int
) -> LaunchPlan:
    """Tiles and splits for x [rows, in_features] times 16-bit weights [w, in_features] (w in `widths`, side by side,
    or a gated pair) on a GPU of `processors` SMs and `shared_memory` bytes per program."""
    block_rows = max(16, triton.next_power_of_2(rows))
    block_out = 64
    tiles = sum(triton.cdiv(width, block_out) for width in (widths[:1] if gated else widths))
    if gated:  # two weight tiles per pipeline stage: larger ones run out of shared memory
        block_in = 64
    elif block_rows == 16 and in_features >= 2048 and tiles <= 4 * processors:
        block_in = 256
    else:
        block_in = 128
    # a deeper pipeline paid off for single long-K tiles (o and down projections: 2-3% faster), not for groups
    stages = 5 if block_in == 256 and len(widths) == 1 else 4
    # GPUs with less shared memory than an H200's 227 KiB (an A100: 163 KiB): fewer stages, then narrower K tiles
    while pipeline_bytes(block_rows, block_out, block_in, stages, gated) > shared_memory:
        if stages > 3 or block_in == 32:
            stages -= 1
        else:
            block_in //= 2
    steps = triton.cdiv(in_features, block_in)
    splits = 1
    if tiles < processors // NARROW_DIVISOR:
        while tiles * splits < processors and steps // (2 * splits) >= MIN_STEPS_PER_SPLIT:
            splits *= 2
    return LaunchPlan(block_rows, block_out, block_in, splits, stages=stages)


def pipeline_bytes(block_rows: int, block_out: int, block_in: int, stages: int, gated: bool) -> int:
    """Shared memory of the software pipeline: per stage, the 16-bit weight tile(s) and the input tile. Exactly what
    Triton reported as required for each of the tiles that did not fit on the H200 (the sweep's errors in
    docs/results/skinny_linear_h200_2026-12-02/first_plans)."""
    return stages * ((2 if gated else 1) * block_out + block_rows) * block_in * 2


@functools.cache
def device_limits(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory bytes a program may use): Triton's own reading of the GPU; for the interpreter, an H200's
    SM count and no shared-memory limit that matters."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = triton.runtime.driver.active.utils.get_device_properties(index)
        return properties["multiprocessor_count"], properties["max_shared_mem"]
    return 8, 1 << 30  # the interpreter: a small count exercises the split logic


def launch(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bias: torch.Tensor | None = None,
    gated: bool = False,
    plan: LaunchPlan | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """x [M, K] (rows contiguous) times 1-4 contiguous weights [n_s, K]: their outputs side by side [M, sum n_s]
    plus `bias` [sum n_s]; or, `gated` (two weights of equal width), SiLU(x W0^T) * (x W1^T) [M, n0].
    `plan` overrides `plan_launch` (the tuning benchmark). `pdl` launches it with programmatic dependent launch
    (the chain experiment of the benchmark; not used by the loop)."""
    rows, in_features = x.shape
    widths = [weight.shape[0] for weight in weights]
    if any(w.dtype != x.dtype or w.shape[1] != in_features or not w.is_contiguous() for w in weights):
        shapes = [(tuple(w.shape), w.dtype, "contiguous" if w.is_contiguous() else "strided") for w in weights]
        raise ValueError(f"dspark: skinny kernels: input {tuple(x.shape)} {x.dtype} does not fit the weights {shapes}")
    if plan is None:
        plan = plan_launch(rows, tuple(widths), in_features, gated, *device_limits(x.device))
    out = x.new_empty(rows, widths[0] if gated else sum(widths))
    counted = widths[:1] if gated else widths
    even = all(w % plan.block_out == 0 for w in widths) and in_features % (plan.block_in * plan.splits) == 0
    if plan.splits == 1:
        target = out
    else:
        target = torch.empty(plan.splits, rows, sum(widths), dtype=torch.float32, device=x.device)
    pointers = (weights + weights[:1] * 4)[:4]
    sizes = (widths + [0] * 4)[:4]
    grid = (sum(triton.cdiv(w, plan.block_out) for w in counted), plan.splits)
    stream_weights_kernel[grid](
        x,
        *pointers,
        bias if bias is not None else weights[0],
        target,
        rows,
        *sizes,
        in_features,
        x.stride(0),
        plan.splits,
        BLOCK_ROWS=plan.block_rows,
        BLOCK_OUT=plan.block_out,
        BLOCK_IN=plan.block_in,
        SEGMENTS=len(weights),
        PARTIAL=plan.splits > 1,
        GATED=gated,
        HAS_BIAS=bias is not None and plan.splits == 1,
        EVEN=even,
        IEEE=weights[0].dtype == torch.float32,
        PDL=pdl,
        num_warps=plan.warps,
        num_stages=plan.stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    if plan.splits > 1:
        size, block = out.numel(), 1024
        sum_splits_kernel[(triton.cdiv(size, block),)](
            target,
            bias if bias is not None else target,
            out,
            size,
            out.shape[1],
            sum(widths),
            SPLITS=plan.splits,
            GATED=gated,
            HAS_BIAS=bias is not None,
            BLOCK=block,
        )
    return out


# One opaque op for torch.compile: dynamo traces the call, inductor launches the kernels as they are (graph-safe).
@torch.library.custom_op("dspark::skinny_linear", mutates_args=())
def skinny_linear_op(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, gated: bool
) -> torch.Tensor:
    return launch(x, weights, bias, gated)


@skinny_linear_op.register_fake
def _(x, weights, bias, gated):
    return x.new_empty(x.shape[0], weights[0].shape[0] if gated else sum(w.shape[0] for w in weights))


def skinny_linear(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None = None, gated: bool = False
) -> torch.Tensor:
    """`launch` for x [..., K] (any leading shape); returns [..., N]."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = skinny_linear_op(flat, weights, bias, gated)
    return out.view(*x.shape[:-1], out.shape[-1])


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


# Projections that one module applies to one input, launched together (whichever is called first computes all).
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"))


def is_gated_silu_mlp(module: nn.Module) -> bool:
    """down(SiLU(gate(x)) * up(x)) with bias-free projections: the MLP of Llama, Qwen2/3 and Qwen3.5 (and their
    MoE models' shared experts), recognised by its parts."""
    parts = dict(module.named_children())
    if set(parts) != {"gate_proj", "up_proj", "down_proj", "act_fn"} or not type(module).__name__.endswith("MLP"):
        return False
    projections = [parts["gate_proj"], parts["up_proj"], parts["down_proj"]]
    if not all(routable(p) and p.bias is None for p in projections):
        return False
    return isinstance(parts["act_fn"], nn.SiLU) or type(parts["act_fn"]).__name__ == "SiLUActivation"


def routable(module: nn.Module) -> bool:
    """A plain nn.Linear with float weights: subclasses (quantized layers such as bitsandbytes' Linear4bit, whose
    weights are packed integers) keep their own forward."""
    return type(module) is nn.Linear and module.weight.is_floating_point() and module.weight.is_contiguous()


def is_small(x: torch.Tensor, kind: str = "single") -> bool:
    """Few enough rows for the kernels (a large batch's verify block keeps cuBLAS)."""
    return x.numel() // x.shape[-1] <= MAX_ROWS[kind]


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not is_small(x):
        return nn.functional.linear(x, module.weight, module.bias)
    return skinny_linear(x, [module.weight], module.bias)


def _gated_mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not is_small(x, "grouped"):
        return type(module).forward(module, x)
    hidden = skinny_linear(x, [module.gate_proj.weight, module.up_proj.weight], gated=True)
    return _linear_forward(module.down_proj, hidden)


class ProjectionGroup:
    """Projections of one input (q, k and v) computed by one launch: the first member called with an input computes
    every member's output; the others, called with the same input, take theirs. A member called with another input
    computes the group again, so any call order is exact."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.widths = [linear.out_features for linear in linears]
        biases = [linear.bias for linear in linears]
        self.bias = None  # the members' biases side by side (missing ones zero), made once
        if any(bias is not None for bias in biases):
            self.bias = torch.cat([
                bias.detach() if bias is not None else linear.weight.new_zeros(linear.out_features)
                for bias, linear in zip(biases, linears)
            ])  # fmt: skip
        self.input, self.outputs, self.waiting = None, None, 0
        # one callable per member, made once (see `installed_forwards`)
        self.forwards = [functools.partial(self.project, index) for index in range(len(linears))]

    def project(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if not is_small(x, "grouped"):
            return nn.functional.linear(x, self.linears[index].weight, self.linears[index].bias)
        if self.input is not x:
            out = skinny_linear(x, [linear.weight for linear in self.linears], self.bias)
            self.input, self.outputs, self.waiting = x, out.split(self.widths, dim=-1), len(self.linears)
        output = self.outputs[index]
        self.waiting -= 1
        if self.waiting == 0:  # every member took its output: hold no tensor between calls
            self.input, self.outputs = None, None
        return output


def routed_modules(target: nn.Module) -> tuple[list[nn.Module], list[list[nn.Linear]], list[nn.Linear]]:
    """What `SkinnyProjections` routes through the kernels: gated MLPs (one gate-up launch each, then their down
    projection), projection groups (one launch each) and the other linear layers (one launch each)."""
    mlps, groups, taken = [], [], set()
    for module in target.modules():
        if is_gated_silu_mlp(module):
            mlps.append(module)
            taken.update([module.gate_proj, module.up_proj])
        for names in PROJECTION_GROUPS:
            members = [getattr(module, name, None) for name in names]
            if all(routable(m) for m in members) and len({m.in_features for m in members}) == 1:
                groups.append(members)
                taken.update(members)
    linears = [module for module in target.modules() if routable(module) and module not in taken]
    return mlps, groups, linears


class SkinnyProjections:
    """A target's linear layers routed through the kernels while `installed()`: gated MLPs as one gate-up launch,
    projection groups as one launch, the rest one launch each."""

    def __init__(self, target: nn.Module):
        problem = skinny_kernel_problem(target)
        if problem is not None:
            raise ValueError(f"dspark: skinny_kernels=True cannot run here: {problem}. Use skinny_kernels=False.")
        mlps, groups, linears = routed_modules(target)
        # One callable per module, made once (see `installed_forwards`).
        self.forwards = {module: types.MethodType(_gated_mlp_forward, module) for module in mlps}
        self.forwards.update({module: types.MethodType(_linear_forward, module) for module in linears})
        for members in groups:
            self.forwards.update(zip(members, ProjectionGroup(members).forwards))

    def installed(self):
        """Route the modules' forwards through the kernels for the duration (re-entrant)."""
        return installed_forwards(self.forwards)

"""Prefetching the next projection's weights into the GPU's L2 cache while other kernels compute: an experiment of
benchmarks/skinny_linear.py --prefetch, which measured no gain (not used by the loop).

Between a verify step's projections run kernels that read little memory (norms, rotary, the cache write, attention):
on a Qwen3-8B shape about a third of the step, during which the memory bus idles. A prefetch launched on a side
stream right after one projection loads (the leading columns of) the next projection's weights into L2 meanwhile, so
that projection then reads them from the cache. It is only a cache hint: the products compute the same values with
or without it.

Measured on an H200 (docs/results/verify_attention_h200_2026-12-02/prefetch): a Qwen3-8B layer's four launches with
idle gaps of 20, 4 and 7 us took 139.7 us per layer without prefetches and 139.2-150.5 with them (budgets of 8-64
MiB): a weight-streaming kernel of this size is bound by its ramp-up and tail more than by where its bytes come from,
and larger prefetches only compete with the next kernel for memory bandwidth.

`prefetch_rows_kernel` issues, for every weight row, bulk L2 prefetches of the row's first `lead_bytes` (Hopper's
cp.async.bulk.prefetch.L2: one instruction per chunk of up to 16 KiB), or on older GPUs one prefetch per 128-byte
line. The leading columns of every row, not the first rows: a weight-streaming kernel walks all its tiles' rows
together along the input features, so the first bytes it needs are the first columns of every row.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional, as for dspark.skinny_linear
    triton = None

BULK_CHUNK = 16384  # bytes per bulk prefetch instruction
LINE = 128  # bytes per L2 line (one prefetch each without bulk prefetches)

if triton is not None:

    @triton.jit
    def prefetch_rows_kernel(weight_ptr, rows, row_bytes, lead_bytes, chunks_per_row, BLOCK: tl.constexpr,
                             CHUNK: tl.constexpr, BULK: tl.constexpr):  # fmt: skip
        """Prefetch bytes [0, lead_bytes) of each of `rows` rows of `row_bytes` bytes at weight_ptr (a byte
        pointer), CHUNK bytes per instruction."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        total = rows * chunks_per_row
        index = tl.minimum(index, total - 1)  # the last chunk again rather than a mask: a hint, not a write
        row = index // chunks_per_row
        offset = (index % chunks_per_row) * CHUNK
        address = weight_ptr + row.to(tl.int64) * row_bytes + offset
        if BULK:
            size = tl.minimum(lead_bytes - offset, CHUNK).to(tl.int32)
            tl.inline_asm_elementwise(
                "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
                "=r,l,r",
                [address, size],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        else:
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
                "=r,l",
                [address],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )


def bulk_prefetch_supported(device: torch.device) -> bool:
    """cp.async.bulk.prefetch is Hopper's (compute capability 9.0) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def prefetch_leading_columns(weight: torch.Tensor, lead_bytes: int | None = None) -> None:
    """Launch prefetches of the first `lead_bytes` (rounded down to 16 bytes; None: all) of every row of a contiguous
    2-d CUDA weight into L2, on the current stream."""
    rows, row_bytes = weight.shape[0], weight.shape[1] * weight.element_size()
    lead = row_bytes if lead_bytes is None else min(row_bytes, lead_bytes) // 16 * 16
    if lead <= 0:
        return
    bulk = bulk_prefetch_supported(weight.device)
    chunk = BULK_CHUNK if bulk else LINE
    chunks_per_row = triton.cdiv(lead, chunk)
    block = 128
    grid = (triton.cdiv(rows * chunks_per_row, block),)
    prefetch_rows_kernel[grid](
        weight.view(torch.uint8), rows, row_bytes, lead, chunks_per_row, BLOCK=block, CHUNK=chunk, BULK=bulk
    )


def lead_bytes_for(weights: list[torch.Tensor], budget_bytes: int) -> int:
    """The leading bytes per row that spread `budget_bytes` over all rows of `weights` (equal row lengths)."""
    rows = sum(weight.shape[0] for weight in weights)
    return budget_bytes // rows


class SideStreamPrefetcher:
    """Prefetches on a side stream that starts after the work the current stream has launched so far; `join()` makes
    the current stream wait for them (required before a CUDA graph capture ends)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.pending = False

    def prefetch(self, weights: list[torch.Tensor], budget_bytes: int | None = None) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        lead = None if budget_bytes is None else lead_bytes_for(weights, budget_bytes)
        with torch.cuda.stream(self.stream):
            for weight in weights:
                prefetch_leading_columns(weight, lead)
        self.pending = True

    def join(self) -> None:
        if self.pending:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.pending = False

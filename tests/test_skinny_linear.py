"""The verify step's projections through weight-streaming Triton kernels (`skinny_kernels=True`).

On a CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET), in float32 and float16: the
interpreter's bf16 matrix product is broken (it multiplies the raw bits), and the kernel's code does not depend on
which 16-bit type it streams. The GPU benchmark (benchmarks/skinny_linear.py) checks bf16 against cuBLAS.
"""

import pytest
import torch
from test_static_loop import StaticOracle, plain_greedy, prompt
from tiny_models import tiny_draft, tiny_llama, tiny_qwen3, tiny_qwen35
from transformers import LlamaConfig, LlamaForCausalLM

import dspark.skinny_linear as skinny
from dspark.speculative import speculative_generate

pytest.importorskip("triton")


def reference(x, weight, bias=None, up_weight=None):
    x, weight = x.double(), weight.double()
    if up_weight is not None:
        return torch.nn.functional.silu(x @ weight.T) * (x @ up_weight.double().T)
    return x @ weight.T + (0 if bias is None else bias.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize(
    "rows, out_features, in_features", [(9, 128, 512), (1, 200, 300), (16, 96, 1024), (40, 64, 192)]
)
def test_kernels_compute_the_projection_for_every_split_and_ragged_shapes(rows, out_features, in_features, splits, dtype):
    """Plain, with bias, and gated (SiLU(x Wg^T) * x Wu^T), whether the input features are split over programs or
    not, with output and input widths that are and are not multiples of the tiles (masked loads)."""
    generator = torch.Generator().manual_seed(rows + out_features)
    x, weight, up_weight = (
        torch.randn(*shape, generator=generator).to(dtype)
        for shape in [(rows, in_features), (out_features, in_features), (out_features, in_features)]
    )
    weight, up_weight = weight / in_features**0.5, up_weight / in_features**0.5
    bias = torch.randn(out_features, generator=generator).to(dtype)
    plan = skinny.LaunchPlan(block_rows=max(16, 1 << (rows - 1).bit_length()), block_out=64, block_in=64, splits=splits)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    for arguments in [(weight, None, None), (weight, None, bias), (weight, up_weight, None)]:
        out = skinny.launch(x, *arguments, plan=plan)
        assert out.dtype == dtype and out.shape == (rows, out_features)
        expected = reference(x, arguments[0], arguments[2], arguments[1])
        torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_narrow_outputs_split_the_input_features_and_wide_ones_do_not():
    """A 1024-wide projection on 132 SMs has 16 output tiles: its input features are split until the programs fill
    the GPU, never into splits shorter than MIN_STEPS_PER_SPLIT tiles; a vocabulary-wide one needs no split."""
    narrow = skinny.plan_launch(9, 1024, 4096, 132)
    assert narrow.splits > 1
    assert 4096 // (narrow.block_in * narrow.splits) >= skinny.MIN_STEPS_PER_SPLIT
    assert skinny.plan_launch(9, 151936, 4096, 132).splits == 1
    assert skinny.plan_launch(9, 1024, 512, 132).splits == 1  # too short to split at all
    assert skinny.plan_launch(40, 4096, 4096, 132).block_rows == 64


def counting_launches(monkeypatch) -> list[tuple[int, int, bool]]:
    launches = []
    launch = skinny.launch

    def counted(x, weight, up_weight, bias, plan=None):
        launches.append((x.shape[0], weight.shape[0], up_weight is not None))
        return launch(x, weight, up_weight, bias, plan)

    monkeypatch.setattr(skinny, "launch", counted)
    return launches


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_qwen3, tiny_qwen35], ids=["llama", "qwen3", "qwen3.5-hybrid"])
def test_greedy_output_with_the_kernels_equals_plain_generate(make_target, monkeypatch):
    """Rows of different prompt lengths, a rigged draft accepted in part: the same tokens as the target's own greedy
    decoding, with every projection of the verify step through the kernels (the MLPs' gate and up as one gated
    launch; the hybrid's Gated DeltaNet projections too) and the prefill through the target's own layers."""
    target = make_target(seed=31)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    ids = prompt(9, seed=7)
    expected = plain_greedy(target, ids, 16)
    StaticOracle(draft, expected, ids.shape[1], wrong_every=3)
    launches = counting_launches(monkeypatch)
    out = speculative_generate(
        target, draft, ids, max_new_tokens=16, static_cache=True, skinny_kernels=True, return_stats=True
    )
    assert out.generated[0] == expected
    assert out.stats["mean_acceptance_length"] > 1.5
    queries = draft.config.num_draft_tokens + 1
    assert launches and {rows for rows, _, _ in launches} == {queries}, "only verify blocks run through the kernels"
    layers = target.config.num_hidden_layers
    gated = [launch for launch in launches if launch[2]]
    rounds = len(out.stats["per_row"][0]["acceptance_lengths"])
    assert len(gated) == layers * rounds, "one gate-up launch per MLP and round"
    assert (queries, target.config.vocab_size, False) in launches, "the output head too"
    untouched = [m for m in target.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__]
    assert not untouched, "the kernels are installed during the verify step only"


def test_a_batch_with_the_kernels_equals_row_by_row_greedy():
    target = tiny_llama(seed=32)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    rows = [prompt(length, seed=length) for length in (7, 3)]
    ids = torch.cat([torch.nn.functional.pad(row, (7 - row.shape[1], 0)) for row in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(row), (7 - row.shape[1], 0)) for row in rows])
    out = speculative_generate(target, draft, ids, mask, max_new_tokens=10, static_cache=True, skinny_kernels=True)
    for index, row in enumerate(rows):
        assert out[index, 7:].tolist() == plain_greedy(target, row, 10)


def test_an_mlp_with_another_activation_keeps_separate_projections(monkeypatch):
    """Only SiLU-gated MLPs fuse gate and up (the epilogue computes SiLU); a GELU one runs three plain launches."""
    torch.manual_seed(33)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="gelu", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    target = LlamaForCausalLM(config).eval()
    draft = tiny_draft(target, block_size=2)
    launches = counting_launches(monkeypatch)
    ids = prompt(6, seed=4, vocab=96)
    out = speculative_generate(target, draft, ids, max_new_tokens=6, static_cache=True, skinny_kernels=True)
    assert out[0, 6:].tolist() == plain_greedy(target, ids, 6)
    assert launches and not any(gated for _, _, gated in launches)


def test_large_products_keep_cublas(monkeypatch):
    """More rows than MAX_ROWS (a large batch's verify block): nn.Linear's own product, same output."""
    monkeypatch.setattr(skinny, "MAX_ROWS", 4)  # a verify block here: 5 rows
    launches = counting_launches(monkeypatch)
    target = tiny_llama(seed=34)
    draft = tiny_draft(target, block_size=4)
    ids = prompt(5, seed=8)
    out = speculative_generate(target, draft, ids, max_new_tokens=5, static_cache=True, skinny_kernels=True)
    assert out[0, 5:].tolist() == plain_greedy(target, ids, 5)
    assert not launches


def test_the_kernels_are_refused_with_the_reason_and_the_way_out(monkeypatch):
    target = tiny_llama(seed=35)
    draft = tiny_draft(target)
    with pytest.raises(ValueError, match="skinny_kernels=True needs static_cache=True"):
        speculative_generate(target, draft, prompt(4), max_new_tokens=4, skinny_kernels=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as for a user: no interpreter, a CPU target
    with pytest.raises(ValueError, match="run on CUDA GPUs; the target is on cpu.*skinny_kernels=False"):
        speculative_generate(target, draft, prompt(4), max_new_tokens=4, static_cache=True, skinny_kernels=True)
    monkeypatch.setattr(skinny, "triton", None)
    assert "Triton is not installed" in skinny.skinny_kernel_problem(target)

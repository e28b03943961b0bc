"""The verify step's projections (and attention: tests/test_verify_attention.py) through our Triton kernels
(`skinny_kernels=True`).

On a CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET), in float32 and float16: the
interpreter's bf16 matrix product is broken (it multiplies the raw bits), and the kernel's code does not depend on
which 16-bit type it streams. The GPU benchmark (benchmarks/skinny_linear.py) checks bf16 against cuBLAS.
"""

import os

import pytest
import torch
from test_static_loop import StaticOracle, plain_greedy, prompt
from tiny_models import tiny_draft, tiny_llama, tiny_qwen3, tiny_qwen35, tiny_qwen35_moe, tiny_qwen35_multimodal
from transformers import LlamaConfig, LlamaForCausalLM

import dspark.skinny_linear as skinny
import dspark.verify_attention as verify_attention
from dspark.speculative import speculative_generate

if os.environ.get("CI"):
    import triton  # noqa: F401  (CI installs it: a missing Triton must fail there, not skip these tests)
pytest.importorskip("triton")


def reference(x, weights, bias=None, gated=False):
    outs = [x.double() @ weight.double().T for weight in weights]
    if gated:
        return torch.nn.functional.silu(outs[0]) * outs[1]
    return torch.cat(outs, dim=-1) + (0 if bias is None else bias.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize(
    "rows, out_features, in_features", [(9, 128, 512), (1, 200, 300), (16, 96, 1024), (40, 64, 192)]
)
def test_kernels_compute_the_projection_for_every_split_and_ragged_shapes(
    rows, out_features, in_features, splits, dtype
):
    """One weight, with and without bias; a group of three of different widths side by side (q, k, v); a gated pair
    (SiLU(x Wg^T) * x Wu^T); whether the input features are split over programs or not, with output and input widths
    that are and are not multiples of the tiles (masked loads)."""
    generator = torch.Generator().manual_seed(rows + out_features)

    def random(*shape):
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.5).to(dtype)

    x = random(rows, in_features) * in_features**0.5
    weight, up_weight = random(out_features, in_features), random(out_features, in_features)
    group = [weight, random(out_features // 2, in_features), random(24, in_features)]
    bias = random(out_features)
    group_bias = random(sum(w.shape[0] for w in group))
    plan = skinny.LaunchPlan(block_rows=max(16, 1 << (rows - 1).bit_length()), block_out=64, block_in=64, splits=splits)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    cases = [
        ([weight], None, False),
        ([weight], bias, False),
        (group, group_bias, False),
        ([weight, up_weight], None, True),
    ]
    for weights, case_bias, gated in cases:
        out = skinny.launch(x, weights, case_bias, gated, plan=plan)
        expected = reference(x, weights, case_bias, gated)
        assert out.dtype == dtype and out.shape == expected.shape
        torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


H200 = (132, 232448)  # SMs and shared memory per program, as Triton reads them there
A100 = (108, 166912)


def test_narrow_outputs_split_the_input_features_and_wide_ones_do_not():
    """A 1024-wide projection on 132 SMs has 16 output tiles: its input features are split until the programs cover
    the SMs, never into splits shorter than MIN_STEPS_PER_SPLIT tiles; 4096-wide ones, q/k/v together and the
    vocabulary-wide head need no split; gated pairs keep tiles that fit two weights in shared memory."""
    narrow = skinny.plan_launch(9, (1024,), 4096, False, *H200)
    assert narrow.splits > 1
    assert 4096 // (narrow.block_in * narrow.splits) >= skinny.MIN_STEPS_PER_SPLIT
    for widths in [(4096,), (4096, 1024, 1024), (151936,)]:
        assert skinny.plan_launch(9, widths, 4096, False, *H200).splits == 1
    assert skinny.plan_launch(9, (1024,), 256, False, *H200).splits == 1  # too short to split at all
    assert skinny.plan_launch(40, (4096,), 4096, False, *H200).block_rows == 64
    assert skinny.plan_launch(9, (12288, 12288), 4096, True, *H200).block_in == 64


@pytest.mark.parametrize("limits", [H200, A100, (108, 48 * 1024)], ids=["h200", "a100", "48k"])
@pytest.mark.parametrize("rows", [1, 9, 36])
@pytest.mark.parametrize("widths, gated", [((4096,), False), ((4096, 1024, 1024), False), ((12288, 12288), True)])
def test_every_plan_fits_the_gpus_shared_memory(limits, rows, widths, gated):
    """The pipeline's buffers (what Triton reported as required for tiles that did not fit) stay within the GPU's
    shared memory: an A100 gets fewer stages than an H200 for the same product, a 48 KiB GPU narrower tiles."""
    plan = skinny.plan_launch(rows, widths, 4096, gated, *limits)
    used = skinny.pipeline_bytes(plan.block_rows, plan.block_out, plan.block_in, plan.stages, gated)
    assert used <= limits[1]
    assert plan.stages >= 1 and plan.block_in >= 32
    if (rows, widths, gated) == (9, (4096,), False):
        assert (plan.stages, plan.block_in) == {H200: (5, 256), A100: (4, 256), (108, 48 * 1024): (3, 64)}[limits]


def test_the_shared_memory_estimate_is_what_triton_required_on_the_h200():
    """Tiles the H200 sweep could not run, with the bytes Triton asked for (skinny_linear_h200_2026-12-02/first_plans),
    and the shipped 64x256 tile at 5 stages, which ran."""
    required = {(64, 256, 4, True): 294912, (128, 128, 4, True): 278528, (128, 256, 4, False): 294912}
    required[(64, 256, 6, False)] = 245760
    for (block_out, block_in, stages, gated), bytes_required in required.items():
        assert skinny.pipeline_bytes(16, block_out, block_in, stages, gated) == bytes_required
    assert skinny.pipeline_bytes(16, 64, 256, 5, gated=False) <= H200[1]


def counting_launches(monkeypatch) -> list[tuple[int, tuple[int, ...], bool]]:
    launches = []
    launch = skinny.launch

    def counted(x, weights, bias=None, gated=False, plan=None):
        launches.append((x.shape[0], tuple(w.shape[0] for w in weights), gated))
        return launch(x, weights, bias, gated, plan)

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
    attention_calls = []
    attention = verify_attention.attention
    monkeypatch.setattr(
        verify_attention, "attention", lambda q, *rest: attention_calls.append(q.shape) or attention(q, *rest)
    )
    out = speculative_generate(
        target, draft, ids, max_new_tokens=16, static_cache=True, skinny_kernels=True, return_stats=True
    )
    assert out.generated[0] == expected
    assert out.stats["mean_acceptance_length"] > 1.5
    queries = draft.config.num_draft_tokens + 1
    assert launches and {rows for rows, _, _ in launches} == {queries}, "only verify blocks run through the kernels"
    config, rounds = target.config, len(out.stats["per_row"][0]["acceptance_lengths"])
    gated = [launch for launch in launches if launch[2]]
    assert len(gated) == config.num_hidden_layers * rounds, "one gate-up launch per MLP and round"
    assert (queries, (config.vocab_size,), False) in launches, "the output head too"
    grouped = [widths for _, widths, gated_pair in launches if len(widths) > 1 and not gated_pair]
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    assert len(grouped) == len(kinds) * rounds, "one launch per round for each layer's q/k/v (or in_proj group)"
    attention_layers = sum(kind == "full_attention" for kind in kinds)
    assert len(attention_calls) == attention_layers * rounds, "the attention kernel in every attention layer"
    assert {shape[2] for shape in attention_calls} == {queries}
    untouched = [m for m in target.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__]
    assert not untouched, "the kernels are installed during the verify step only"


def test_a_projection_group_is_exact_in_any_call_order_and_with_different_inputs(monkeypatch):
    """The first member called with an input launches the whole group and the others take their part; a member given
    another input launches again; once every member took its output the group holds no tensor."""
    torch.manual_seed(36)
    q, k, v = (torch.nn.Linear(64, width, bias=width != 32) for width in (64, 32, 48))
    group = skinny.ProjectionGroup([q, k, v])
    launches = counting_launches(monkeypatch)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        for index in (1, 0, 2):  # k first
            torch.testing.assert_close(group.forwards[index](x), [q, k, v][index](x), atol=1e-5, rtol=1e-5)
        assert len(launches) == 1 and group.input is None and group.outputs is None
        for index, y in enumerate(torch.randn(3, 1, 4, 64)):  # each member its own input
            torch.testing.assert_close(group.forwards[index](y), [q, k, v][index](y), atol=1e-5, rtol=1e-5)
    assert len(launches) == 4


@pytest.mark.parametrize("make_target", [tiny_qwen3, tiny_qwen35], ids=["qwen3", "qwen3.5-hybrid"])
def test_compiled_steps_with_the_kernels_emit_what_the_eager_steps_emit(make_target):
    """torch.compile traces the installed forwards (the kernels are one opaque op; the projection groups' hand-over
    is Python state dynamo follows): the same tokens as the eager kernels, and a second call compiles nothing."""
    target = make_target(seed=37)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    ids = prompt(7, seed=9)
    runs = [
        speculative_generate(
            target, draft, ids, max_new_tokens=10, static_cache=True, skinny_kernels=True, compile_steps=compiled
        )
        for compiled in (False, True)
    ]
    assert torch.equal(runs[1], runs[0])
    assert runs[0][0, 7:].tolist() == plain_greedy(target, ids, 10)
    traced = torch._dynamo.utils.counters["stats"]["calls_captured"]
    again = speculative_generate(
        target, draft, ids, max_new_tokens=10, static_cache=True, skinny_kernels=True, compile_steps=True
    )
    assert torch.equal(again, runs[0])
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == traced


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
    """More rows than MAX_ROWS allows (a large batch's verify block): nn.Linear's own product, same output."""
    monkeypatch.setattr(skinny, "MAX_ROWS", {"single": 4, "grouped": 4})  # a verify block here: 5 rows
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
    with pytest.raises(ValueError, match="input .*float32 does not fit the weights"):
        skinny.launch(torch.randn(2, 8), [torch.randn(4, 8, dtype=torch.float16)])
    monkeypatch.setattr(skinny, "triton", None)
    assert "Triton is not installed" in skinny.skinny_kernel_problem(target)


def test_dspark_generate_takes_the_kernels_on_the_static_path_only(capsys):
    from dspark.cli import main
    from dspark.generate_command import resolve_method

    assert resolve_method("auto", False, tiny_llama(seed=38), skinny_kernels=True) == "loop_static"
    assert main(["generate", "hello", "--method", "loop", "--skinny-kernels"]) == 2
    assert "--skinny-kernels needs --method loop_static" in capsys.readouterr().err


@pytest.mark.parametrize("make_target", [tiny_qwen35_moe, tiny_qwen35_multimodal], ids=["qwen3.5-moe", "multimodal"])
def test_moe_and_multimodal_hybrids_with_the_kernels_equal_plain_greedy(make_target):
    """The MoE's experts (fused expert weights, not linear layers) keep their own code, its shared expert's MLP runs
    through the kernels; inside the image-text wrapper only the language model's layers are called."""
    target = make_target(seed=39)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    ids = prompt(6, seed=10)
    out = speculative_generate(target, draft, ids, max_new_tokens=8, static_cache=True, skinny_kernels=True)
    assert out[0, 6:].tolist() == plain_greedy(target, ids, 8)


def test_subclasses_of_linear_keep_their_own_forward():
    """A quantized layer subclasses nn.Linear with packed weights: routing it through the kernels would read them
    as floats, so only plain nn.Linear modules are routed."""

    class Packed(torch.nn.Linear):
        pass

    target = tiny_llama(seed=40)
    target.model.layers[0].mlp.down_proj.__class__ = Packed
    target.model.layers[1].self_attn.k_proj.__class__ = Packed
    mlps, groups, linears = skinny.routed_modules(target)
    routed = {id(m) for m in linears} | {id(m) for group in groups for m in group}
    assert id(target.model.layers[0].mlp.down_proj) not in routed
    assert len(groups) == len(target.model.layers) - 1, "the layer with a packed k_proj keeps separate launches"
    assert id(target.model.layers[1].self_attn.q_proj) in routed

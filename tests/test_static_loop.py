"""The static-shape loop (`static_cache=True`): fixed shapes, cache entries overwritten after rejections.

Batches (left padding, rows accepting different amounts, rows stopping at different times) are tested beside the
dynamic loop in test_speculative_loop.py, with the same tests.

Random drafts accept almost nothing, so most tests rig the draft (`StaticOracle`) to propose the target's true greedy
continuation with a fixed pattern of wrong slots: rounds then accept 0 .. N tokens, which is what exercises the
overwriting of rejected cache entries and the per-round position bookkeeping.
"""

import pytest
import torch
from tiny_models import tiny_draft, tiny_llama, tiny_qwen3, tiny_qwen35
from transformers import LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM

import dspark.speculative as dynamic_loop
import dspark.static_loop as static_loop
from dspark.cuda_graphs import GraphedStep
from dspark.modeling_dspark import confidence_stop_lengths
from dspark.speculative import sampling_processors, speculative_generate


def prompt(length: int, seed: int = 0, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def plain_greedy(target, ids: torch.Tensor, max_new_tokens: int, eos: int | None = None) -> list[int]:
    out = target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    return out[0, ids.shape[1] :].tolist()


class StaticOracle:
    """Makes the draft propose the true continuation, wrong where (round + slot) % wrong_every == 0, and records the
    draft's hidden states of every round.

    The static loop keeps no Python-side state per round, so by default the oracle reads the anchor's position from
    the runner's device counter: slot j predicts generated token number (position - P + 1) + j.
    """

    def __init__(self, draft, continuation: list[int], prompt_length: int, wrong_every: int, produced=None):
        self.calls = 0
        self.hidden: list[torch.Tensor] = []
        vocab = draft.config.vocab_size
        if produced is None:

            def produced():
                runner = list(static_loop._RUNNERS[draft].values())[-1]  # the newest setting is the one running
                return int(runner.buffers.length) - prompt_length + 1

        def block_logits(draft_hidden):
            produced_count = produced()
            logits = torch.zeros(1, draft_hidden.shape[1], vocab)
            if produced_count < 1:
                return logits  # the runner preparing its steps on zeroed counters: not a round
            self.calls += 1
            self.hidden.append(draft_hidden.clone())
            for slot in range(draft_hidden.shape[1]):
                index = produced_count + slot
                truth = continuation[index] if index < len(continuation) else 0
                wrong = (self.calls + slot) % wrong_every == 0
                logits[0, slot, (truth + 1) % vocab if wrong else truth] = 30.0
            return logits

        draft.block_logits = block_logits


@pytest.mark.parametrize(
    "make_target, draft_kwargs",
    [
        (tiny_llama, {"block_size": 2, "markov_rank": 4}),
        (tiny_qwen3, {"block_size": 5, "markov_rank": 4, "enable_confidence_head": True, "confidence_threshold": 0.5}),
        (tiny_llama, {"block_size": 4, "sample_from_anchor": False}),
    ],
    ids=["llama-block2-markov", "qwen3-block5-confidence-stop", "llama-block4-dflash-slots"],
)
def test_static_greedy_equals_plain_generate_and_dynamic_loop(make_target, draft_kwargs):
    target = make_target(seed=2)
    draft = tiny_draft(target, **draft_kwargs)
    ids = prompt(9, seed=3)
    expected = plain_greedy(target, ids, 30)
    StaticOracle(draft, expected, ids.shape[1], wrong_every=3)
    static = speculative_generate(target, draft, ids, max_new_tokens=30, static_cache=True, return_stats=True)
    assert static.generated[0] == expected
    assert static.stats["mean_acceptance_length"] > 1.5, "the rigged draft must be accepted, partly"
    lengths = static.stats["per_row"][0]["acceptance_lengths"]
    assert len(set(lengths[:-1])) > 1, "rounds must advance by different amounts"
    dynamic = speculative_generate(target, draft, ids, max_new_tokens=30)
    assert torch.equal(static.sequences, dynamic)


@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_static_draft_step_sees_what_the_dynamic_draft_step_sees(sample_from_anchor, monkeypatch):
    """The draft's hidden states per round equal the dynamic loop's: same context entries, positions and masks."""
    target = tiny_qwen3(seed=12)
    draft = tiny_draft(target, block_size=4, markov_rank=4, sample_from_anchor=sample_from_anchor)
    ids = prompt(7, seed=9)
    continuation = plain_greedy(target, ids, 24)
    static = StaticOracle(draft, continuation, ids.shape[1], wrong_every=3)
    speculative_generate(target, draft, ids, max_new_tokens=24, static_cache=True)
    states = []
    original_round = dynamic_loop.draft_round

    def draft_round(draft_model, state, processors, do_sample):
        states.append(state)
        return original_round(draft_model, state, processors, do_sample)

    monkeypatch.setattr(dynamic_loop, "draft_round", draft_round)
    dynamic = StaticOracle(draft, continuation, ids.shape[1], 3, produced=lambda: len(states[-1].generated[0]))
    speculative_generate(target, draft, ids, max_new_tokens=24)
    assert len(static.hidden) == len(dynamic.hidden) > 3
    for round_index, (ours, theirs) in enumerate(zip(static.hidden, dynamic.hidden)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=f"round {round_index}")


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 6, 7])
def test_budget_boundaries(max_new_tokens):
    # block 4 (N = 4): budgets just below, at and past one full round after the prefill's token
    target = tiny_llama(seed=4)
    draft = tiny_draft(target, block_size=4)
    ids = prompt(5, seed=1)
    continuation = plain_greedy(target, ids, max_new_tokens)
    StaticOracle(draft, continuation, ids.shape[1], wrong_every=100)  # accepts every slot: rounds end on the budget
    out = speculative_generate(target, draft, ids, max_new_tokens=max_new_tokens, static_cache=True)
    assert out[0, ids.shape[1] :].tolist() == continuation


def test_stop_token_inside_an_accepted_block():
    target = tiny_qwen3(seed=6)
    draft = tiny_draft(target, block_size=6, markov_rank=4)
    ids = prompt(4, seed=2)
    continuation = plain_greedy(target, ids, 40)
    stop = continuation[9]
    expected = plain_greedy(target, ids, 40, eos=stop)
    assert len(expected) < 40
    StaticOracle(draft, continuation, ids.shape[1], wrong_every=5)
    out = speculative_generate(
        target, draft, ids, max_new_tokens=40, eos_token_id=stop, static_cache=True, return_stats=True
    )
    assert out.generated[0] == expected


def test_runner_is_reused_across_prompts_and_regrown_for_longer_ones():
    target = tiny_llama(seed=7)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    short, longer = prompt(12, seed=4), prompt(5, seed=5)
    for ids in (short, longer):  # the second call reuses the first's cache, with stale entries past its prompt
        assert speculative_generate(target, draft, ids, max_new_tokens=20, static_cache=True)[
            0, ids.shape[1] :
        ].tolist() == (plain_greedy(target, ids, 20))
    (runner,) = static_loop._RUNNERS[draft].values()
    long_prompt = prompt(200, seed=6)
    out = speculative_generate(target, draft, long_prompt, max_new_tokens=10, static_cache=True)
    (regrown,) = static_loop._RUNNERS[draft].values()
    assert regrown is not runner and regrown.max_len > runner.max_len
    assert out[0, 200:].tolist() == plain_greedy(target, long_prompt, 10)


def test_left_padded_single_row_and_eager_attention():
    target = tiny_llama(seed=8)
    target.set_attn_implementation("eager")  # the additive-mask branch
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    ids = prompt(6, seed=7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    out = speculative_generate(target, draft, padded, mask, max_new_tokens=15, static_cache=True)
    assert torch.equal(out[:, :9], padded)
    assert out[0, 9:].tolist() == plain_greedy(target, ids, 15)


def test_sampling_statistics_add_up_and_events_match_the_output():
    torch.manual_seed(0)
    target = tiny_qwen3(seed=9)
    draft = tiny_draft(target, block_size=4, markov_rank=4, enable_confidence_head=True, confidence_threshold=0.4)
    ids = prompt(6, seed=8)
    StaticOracle(draft, plain_greedy(target, ids, 40), ids.shape[1], wrong_every=4)
    events = []
    out = speculative_generate(
        target,
        draft,
        ids,
        max_new_tokens=40,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        static_cache=True,
        return_stats=True,
        on_round=events.append,
        generator=torch.Generator().manual_seed(1),
    )
    generated, stats = out.generated[0], out.stats
    row = stats["per_row"][0]
    assert len(generated) == 40 and 1 + sum(row["acceptance_lengths"]) == 40
    assert row["accepted"] + stats["rounds"] >= len(generated) - 1, "accepted + one bonus/correction per round"
    assert [token for event in events for token in event.emitted] == generated
    assert events[0].first and all(not event.first for event in events[1:])
    for event in events[1:-1]:
        assert event.emitted == [*event.accepted, event.next_token]
        assert 1 <= len(event.accepted) + len(event.rejected) <= draft.config.num_draft_tokens


@pytest.mark.parametrize("lengths", [(5,), (5, 2, 8)], ids=["one-row", "left-padded-batch"])
def test_sampling_draws_what_the_dynamic_loop_draws_from_the_same_seeds(lengths):
    """Both loops consume random numbers in the same order (prefill token, N draft slots, then verification from
    `generator`), so equal seeds give equal samples unless q or p differ: a check that the static path verifies
    against the same draft q and target p, which the lossless guarantee rests on (tested statistically for the
    dynamic loop in test_speculative_loop.py)."""
    target = tiny_llama(seed=13, vocab_size=32)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    width = max(lengths)
    ids = torch.cat([prompt(width, seed=10 + row, vocab=32) for row in range(len(lengths))])
    mask = torch.stack([(torch.arange(width) >= width - length).long() for length in lengths])
    outputs = []
    for static in (True, False):
        torch.manual_seed(3)
        out = speculative_generate(
            target,
            draft,
            ids,
            mask,
            max_new_tokens=40,
            do_sample=True,
            temperature=1.2,
            top_p=0.95,
            static_cache=static,
            return_stats=True,
            generator=torch.Generator().manual_seed(4),
        )
        outputs.append(out)
    assert outputs[0].generated == outputs[1].generated
    assert outputs[0].stats["per_row"] == outputs[1].stats["per_row"]
    assert outputs[0].stats["accepted"] > 3, "needs accepted drafts to compare rejection sampling"


@pytest.mark.parametrize("make_target", [tiny_qwen3, tiny_qwen35], ids=["qwen3", "qwen3.5-hybrid"])
@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_fewer_drafted_tokens_and_plain_decoding_on_the_static_path(draft_tokens, make_target):
    """draft_tokens=0 is plain decoding through the static (graph) path: one target forward per token."""
    target = make_target(seed=14)
    draft = tiny_draft(target, block_size=5, markov_rank=4)
    ids = prompt(6, seed=11)
    expected = plain_greedy(target, ids, 12)
    StaticOracle(draft, expected, ids.shape[1], wrong_every=100)
    ones = torch.ones_like(ids)
    none = LogitsProcessorList()
    generated, acceptance, _ = static_loop.generate_static(
        target, draft, ids, ones, 12, False, none, set(), None, False, ("g",), draft_tokens=draft_tokens
    )
    assert generated == [expected]
    lengths = acceptance.rows[0].acceptance_lengths
    # every round but the budget-cut last one emits all verified drafts plus the target's token
    assert sum(lengths) == 11 and all(length == draft_tokens + 1 for length in lengths[:-1])
    # called directly (not through speculative_generate): no autograd state may leak into the captured buffers
    (runner,) = static_loop._RUNNERS[draft].values()
    assert not any(buffer.requires_grad for buffer in vars(runner.buffers).values())
    torch.manual_seed(0)
    sampled, _, _ = static_loop.generate_static(
        target,
        draft,
        ids,
        ones,
        12,
        True,
        sampling_processors(True, 0.8, 10, None),
        set(),
        None,
        False,
        ("t",),
        draft_tokens=draft_tokens,
    )
    assert len(sampled[0]) == 12


@pytest.mark.parametrize("rule", ["position", "survival"])
def test_stopping_after_the_whole_block_gives_the_lengths_of_stopping_while_drafting(rule):
    target = tiny_llama(seed=10)
    draft = tiny_draft(
        target, block_size=6, markov_rank=4, enable_confidence_head=True, confidence_threshold=0.5, confidence_stop=rule
    )
    torch.nn.init.normal_(draft.confidence_head.proj.weight, std=2.0)  # spread the confidences around 0.5
    hidden = torch.randn(
        16, draft.config.num_draft_tokens, draft.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    anchors = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(1))

    def greedy(logits):
        return logits, logits.argmax(-1)

    reference = draft.draft_block(hidden, anchors, greedy)
    full = draft.draft_block(hidden, anchors, greedy, confidence_threshold=0.0)
    lengths = confidence_stop_lengths(full.confidence, draft.config.confidence_threshold, rule)
    assert torch.equal(lengths, reference.lengths)
    assert len(set(lengths.tolist())) > 1, "the test must cover rows that stop at different slots"


def test_unsupported_settings_are_refused_with_the_way_out():
    target = tiny_llama(seed=11)
    draft = tiny_draft(target)
    ids = prompt(4)
    with pytest.raises(ValueError, match="needs a CUDA target"):
        speculative_generate(target, draft, ids, static_cache=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs static_cache=True"):
        speculative_generate(target, draft, ids, cuda_graphs=True)
    config = tiny_qwen3().config
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 8, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    sliding = Qwen3ForCausalLM(Qwen3Config(**config.to_dict())).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        speculative_generate(sliding, tiny_draft(sliding), ids, max_new_tokens=4, static_cache=True)


def test_a_target_spread_over_devices_or_offloaded_is_refused_with_the_way_out(tmp_path):
    from accelerate import dispatch_model

    target = dispatch_model(tiny_llama(seed=11), device_map={"model": "cpu", "lm_head": "disk"}, offload_dir=tmp_path)
    with pytest.raises(ValueError, match=r"one device.*\['cpu', 'disk'\].*static_cache=False"):
        speculative_generate(target, tiny_draft(target), prompt(4), max_new_tokens=4, static_cache=True)


def test_a_step_whose_capture_fails_warns_once_and_runs_eagerly():
    # On a machine without CUDA the capture itself fails, which exercises the same fallback as an uncapturable op.
    if torch.cuda.is_available():
        pytest.skip("needs a capture failure; on CUDA this step would be captured")
    calls = []
    step = GraphedStep(lambda: calls.append(1), use_graph=True, name="test step")
    with pytest.warns(UserWarning, match="capture of the test step failed"):
        step()
    step()
    assert len(calls) == 2 and step.graph is None and step.failure


def test_a_row_that_finished_first_stays_inside_the_caches_while_the_others_run():
    """A row that ends with a fully accepted block has moved past its budget; it keeps verifying (fixed shapes) while
    slower rows finish, so the caches must hold those extra writes. The prompt width puts prompt + budget + one block
    exactly at the 128-entry bucket, where a cache sized for one row alone would overflow."""
    target = tiny_llama(seed=21)
    draft = tiny_draft(target, block_size=5, markov_rank=4)
    count = draft.config.num_draft_tokens
    max_new_tokens = 2 + 4 * (count + 1)  # row 0's last round starts one token before its budget, then accepts all
    ids = torch.cat([prompt(30, seed=1), prompt(30, seed=2)])
    width = 128 - max_new_tokens - (count + 1)
    ids = torch.cat([ids] * 4, dim=1)[:, :width]
    # the truth runs on past the budget, so row 0's last block is accepted whole
    truth = [plain_greedy(target, ids[row : row + 1], max_new_tokens + 2 * count) for row in range(2)]
    expected = [tokens[:max_new_tokens] for tokens in truth]
    vocab = draft.config.vocab_size

    def block_logits(draft_hidden):  # row 0: always the truth (fast); row 1: always wrong (one token per round)
        runner = list(static_loop._RUNNERS[draft].values())[-1]
        produced = (runner.buffers.length - width + 1).tolist()
        logits = torch.zeros(2, draft_hidden.shape[1], vocab)
        if min(produced) < 1:
            return logits  # the runner preparing its steps on zeroed counters: not a round
        for slot in range(draft_hidden.shape[1]):
            logits[0, slot, truth[0][min(produced[0] + slot, len(truth[0]) - 1)]] = 30.0
            logits[1, slot, (truth[1][min(produced[1] + slot, len(truth[1]) - 1)] + 1) % vocab] = 30.0
        return logits

    draft.block_logits = block_logits
    out = speculative_generate(target, draft, ids, max_new_tokens=max_new_tokens, static_cache=True, return_stats=True)
    assert out.generated == expected
    rows = out.stats["per_row"]
    assert max(rows[0]["acceptance_lengths"]) == count + 1 and max(rows[1]["acceptance_lengths"]) == 1


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_qwen35], ids=["llama", "qwen3.5-hybrid"])
def test_compiled_steps_emit_what_the_eager_steps_emit(make_target):
    """compile_steps=True runs the draft and verify steps through torch.compile (inductor, also on CPU): the same
    tokens and the same per-row acceptance as the uncompiled static path, with rows of different prompt lengths
    (hybrid targets: our Gated DeltaNet forward and its commit compiled inside the layers)."""
    target = make_target(seed=22)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    ids = torch.cat([prompt(9, seed=5), prompt(9, seed=6)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    runs = [
        speculative_generate(
            target, draft, ids, mask, max_new_tokens=24, static_cache=True, compile_steps=compiled, return_stats=True
        )
        for compiled in (False, True)
    ]
    assert runs[1].generated == runs[0].generated
    assert runs[1].stats["per_row"] == runs[0].stats["per_row"]
    compiled_runner = [runner for runner in static_loop._RUNNERS[draft].values() if runner.compile_steps]
    assert len(compiled_runner) == 1
    # A compiled plain-decoding runner beside it must not make dynamo trace the speculative runner's steps again.
    static_loop.generate_static(
        target, draft, ids, mask, 8, False, LogitsProcessorList(), set(), None, False, ("g",), draft_tokens=0,
        compile_steps=True,
    )  # fmt: skip
    traced = torch._dynamo.utils.counters["stats"]["calls_captured"]
    again = speculative_generate(target, draft, ids, mask, max_new_tokens=24, static_cache=True, compile_steps=True)
    assert torch.equal(again, runs[0].sequences)
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == traced


def test_compiling_needs_the_static_path():
    target = tiny_llama(seed=23)
    with pytest.raises(ValueError, match="compile_steps=True needs static_cache=True"):
        speculative_generate(target, tiny_draft(target), prompt(4), max_new_tokens=4, compile_steps=True)


def test_only_the_most_recently_used_settings_keep_their_caches():
    target = tiny_llama(seed=24)
    draft = tiny_draft(target, block_size=3)
    ids = prompt(5, seed=7)
    cap = static_loop.MAX_RUNNERS_PER_DRAFT
    # batch 1 is used again before the cap is reached, so batch 2 is the least recently used when batch cap + 1 comes
    for batch in (1, 2, *range(3, cap + 1), 1, cap + 1):
        speculative_generate(target, draft, ids.repeat(batch, 1), max_new_tokens=3, static_cache=True)
    batches = [runner.batch for runner in static_loop._RUNNERS[draft].values()]
    assert batches == [*range(3, cap + 1), 1, cap + 1]


def test_a_new_runner_prepares_both_steps_even_if_its_first_generation_stops_after_one_round():
    """The draft step first runs in round two; a warm-up that stops after one round would leave its compilation
    (or graph capture) to a later, timed call. The runner prepares both steps when it is made."""
    target = tiny_llama(seed=25)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    ids = prompt(6, seed=8)
    one_round = speculative_generate(target, draft, ids, max_new_tokens=2, static_cache=True, compile_steps=True)
    traced = torch._dynamo.utils.counters["stats"]["calls_captured"]
    longer = speculative_generate(target, draft, ids, max_new_tokens=12, static_cache=True, compile_steps=True)
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == traced
    assert torch.equal(longer[:, : one_round.shape[1]], one_round)
    assert len(static_loop._RUNNERS[draft]) == 1


def test_dynamos_compile_limits_are_raised_only_while_a_runner_prepares():
    """Each compiled runner adds a compilation per decoder layer; past dynamo's defaults it would silently fall back to
    eager code. The limits are raised for the preparation only, then put back."""
    config = torch._dynamo.config
    before = (config.recompile_limit, config.accumulated_recompile_limit)
    with static_loop.recompile_limit(256):
        assert config.recompile_limit >= 256 and config.accumulated_recompile_limit >= 16 * 256
    assert (config.recompile_limit, config.accumulated_recompile_limit) == before


def test_dspark_generate_picks_the_static_path_on_a_gpu_only_or_when_asked_to_compile():
    from dspark.generate_command import resolve_method

    target = tiny_llama(seed=25)  # on the CPU, where the eager loop is as fast and needs no capture
    assert resolve_method("auto", False, target) == "loop"
    assert resolve_method("auto", True, target) == "loop_static"
    assert [resolve_method(method, False, target) for method in ("loop", "loop_static", "assisted")] == [
        "loop",
        "loop_static",
        "assisted",
    ]

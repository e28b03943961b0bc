"""The package's own loop: batched, left-padded, per-row acceptance; greedy exact and sampling lossless."""

import pytest
import torch
from scipy.stats import chisquare
from tiny_models import tiny_draft, tiny_llama, tiny_qwen3, tiny_qwen35, tiny_qwen35_moe, tiny_qwen35_multimodal

import dspark
import dspark.speculative as loop
import dspark.static_loop as static_loop
from dspark.gated_deltanet_states import GatedDeltaNetBlockState
from dspark.speculative import speculative_generate


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = row
        mask[index, width - len(row) :] = 1
    return ids, mask


def plain_greedy(target, row: torch.Tensor, max_new_tokens: int, eos: int | None = None) -> list[int]:
    out = target.generate(row[None], max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    return out[0, len(row) :].tolist()


class Oracle:
    """Makes a draft propose each row's true plain-greedy continuation, wrong on a fixed pattern of slots.

    The dynamic loop's state says how many tokens each row produced; the static loop keeps no Python-side state per
    round, so there (`static_width`: the padded prompt width) the count comes from the runner's device counters.
    """

    def __init__(self, draft, continuations: list[list[int]], wrong_every: int, monkeypatch, static_width=None):
        self.continuations = continuations
        self.wrong_every = wrong_every
        self.produced: list[int] = []
        self.calls = 0
        original_round = loop.draft_round

        def draft_round(draft_model, state, processors, do_sample):
            self.produced = [len(tokens) for tokens in state.generated]
            return original_round(draft_model, state, processors, do_sample)

        def produced_by_static_rows() -> list[int]:
            runner = list(static_loop._RUNNERS[draft].values())[-1]  # the newest setting is the one running
            return (runner.buffers.length - static_width + 1).tolist()

        monkeypatch.setattr(loop, "draft_round", draft_round)
        vocab = draft.config.vocab_size

        def block_logits(draft_hidden):
            if static_width is not None:
                self.produced = produced_by_static_rows()
                if min(self.produced) < 1:  # the runner preparing its steps on zeroed counters: not a round
                    return torch.zeros(*draft_hidden.shape[:2], vocab)
            self.calls += 1
            batch, slots, _ = draft_hidden.shape
            logits = torch.zeros(batch, slots, vocab)
            for row in range(batch):
                for slot in range(slots):
                    index = self.produced[row] + slot
                    truth = self.continuations[row][index] if index < len(self.continuations[row]) else 0
                    wrong = (self.calls + row + slot) % self.wrong_every == 0
                    logits[row, slot, (truth + 1) % vocab if wrong else truth] = 30.0
            return logits

        draft.block_logits = block_logits


@pytest.mark.parametrize("make_target", [tiny_llama, tiny_qwen3])
@pytest.mark.parametrize(
    "draft_kwargs",
    [
        {},
        {"markov_rank": 8},
        {"markov_rank": 8, "markov_head_type": "gated", "enable_confidence_head": True, "confidence_threshold": 0.5},
        {"sample_from_anchor": False},
    ],
    ids=["dflash-backbone", "markov", "gated-markov-confidence", "dflash-slots"],
)
@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_batched_greedy_output_equals_row_by_row_plain_greedy(make_target, draft_kwargs, static_cache):
    target = make_target(seed=2)
    draft = tiny_draft(target, **draft_kwargs)
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, target.config.vocab_size, (length,), generator=generator) for length in (3, 11, 1, 6)]
    ids, mask = left_padded(rows)
    out = speculative_generate(
        target, draft, ids, mask, max_new_tokens=20, return_stats=True, static_cache=static_cache
    )
    for index, row in enumerate(rows):
        assert out.generated[index] == plain_greedy(target, row, 20), f"row {index}"
    assert out.sequences.shape == (4, ids.shape[1] + 20)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_rows_accept_different_amounts_and_stop_at_different_times(sample_from_anchor, static_cache, monkeypatch):
    target = tiny_llama(seed=3)
    draft = tiny_draft(target, block_size=5, markov_rank=4, sample_from_anchor=sample_from_anchor)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 128, (length,), generator=generator) for length in (4, 9, 2)]
    continuations = [plain_greedy(target, row, 40) for row in rows]
    # a stop token that the second row emits early; the others run to the budget or stop later
    stop = continuations[1][7]
    expected = [plain_greedy(target, row, 40, eos=stop) for row in rows]
    assert len({len(tokens) for tokens in expected}) > 1, "rows must end at different times"
    ids, mask = left_padded(rows)
    Oracle(draft, continuations, 4, monkeypatch, static_width=ids.shape[1] if static_cache else None)
    out = speculative_generate(
        target, draft, ids, mask, max_new_tokens=40, eos_token_id=stop, return_stats=True, static_cache=static_cache
    )
    assert out.generated == expected
    lengths = [row["acceptance_lengths"] for row in out.stats["per_row"]]
    assert out.stats["mean_acceptance_length"] > 2.0, "the rigged draft must be accepted"
    assert any(length > 1 for row in lengths for length in row)
    assert len({tuple(row) for row in lengths}) > 1, "rows must advance by different amounts"


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_statistics_add_up_to_the_generated_tokens(static_cache, monkeypatch):
    target = tiny_qwen3(seed=5)
    draft = tiny_draft(target, block_size=4, markov_rank=4, enable_confidence_head=True)
    rows = [torch.randint(0, 160, (length,), generator=torch.Generator().manual_seed(length)) for length in (5, 8)]
    ids, mask = left_padded(rows)
    continuations = [plain_greedy(target, row, 30) for row in rows]
    Oracle(draft, continuations, 3, monkeypatch, static_width=ids.shape[1] if static_cache else None)
    out = speculative_generate(
        target, draft, ids, mask, max_new_tokens=30, return_stats=True, static_cache=static_cache
    )
    stats = out.stats
    for row, generated in zip(stats["per_row"], out.generated):
        # one token from the prefill, then each round's accepted drafts plus the target's bonus token
        assert 1 + sum(row["acceptance_lengths"]) == len(generated) == 30
        untruncated = row["acceptance_lengths"][:-1]
        assert all(1 <= length <= draft.config.num_draft_tokens + 1 for length in untruncated)
    assert stats["accepted"] + stats["rounds"] >= sum(len(g) for g in out.generated) - len(rows)
    assert sum(stats["acceptance_length_histogram"]) == stats["rounds"]
    per_position = stats["per_position_acceptance"]
    assert per_position[0] is not None and 0 < per_position[0] <= 1
    assert set(stats["seconds"]) >= {"prefill", "draft", "verify", "rollback", "commit", "total"}
    assert stats["seconds"]["rollback"] == 0.0  # attention-only: rejected entries are masked, nothing replayed


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_round_events_rebuild_each_rows_output_and_mark_accepted_rejected_and_bonus(static_cache, monkeypatch):
    target = tiny_llama(seed=4)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    rows = [torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(length)) for length in (3, 7)]
    continuations = [plain_greedy(target, row, 25) for row in rows]
    events = []
    ids, mask = left_padded(rows)
    Oracle(draft, continuations, 7, monkeypatch, static_width=ids.shape[1] if static_cache else None)
    out = speculative_generate(
        target, draft, ids, mask, 25, return_stats=True, on_round=events.append, static_cache=static_cache
    )
    for index, stats in enumerate(out.stats["per_row"]):
        mine = [event for event in events if event.row == index]
        assert mine[0].first and mine[0].emitted == [continuations[index][0]]
        assert [token for event in mine for token in event.emitted] == out.generated[index]
        rounds = mine[1:]
        assert [len(event.emitted) for event in rounds] == stats["acceptance_lengths"]
        for event in rounds[:-1]:  # the last round may be cut by the budget
            assert event.emitted == [*event.accepted, event.next_token]
            assert event.bonus == (len(event.accepted) == draft.config.num_draft_tokens)
            if event.rejected:
                assert event.rejected[0] != event.next_token  # the target replaced the first rejected token
    assert any(event.rejected for event in events) and any(event.bonus for event in events)


def test_prompt_of_equal_lengths_needs_no_mask_and_returns_a_tensor():
    target = tiny_llama(seed=4)
    draft = tiny_draft(target)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    out = speculative_generate(target, draft, ids, max_new_tokens=9)
    assert torch.equal(out, target.generate(ids, max_new_tokens=9, do_sample=False))
    assert torch.equal(draft.speculative_generate(target, ids, max_new_tokens=9), out)
    assert dspark.speculative_generate is speculative_generate


def exact_continuation_distribution(
    target, prompt: torch.Tensor, length: int, temperature: float, top_k: int | None
) -> torch.Tensor:
    """The target's exact joint distribution of its next `length` sampled tokens: a tensor [V] * length."""
    processors = loop.sampling_processors(True, temperature, top_k, None)
    vocab = target.config.vocab_size
    joint = torch.ones(())
    prefixes = prompt[None]  # every continuation so far, in row-major order of `joint`
    with torch.no_grad():
        for _ in range(length):
            logits = target(prefixes).logits[:, -1].float()
            empty = torch.zeros(prefixes.shape[0], 0, dtype=torch.long)
            step = torch.softmax(processors(empty, logits), -1)  # [prefixes, V]
            joint = joint[..., None] * step.view(*joint.shape, vocab)
            follow = torch.arange(vocab).repeat(prefixes.shape[0])[:, None]
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), follow], dim=1)
    return joint


def sample_continuations(
    target, draft, prompt, samples: int, length: int, temperature: float, top_k: int | None, static_cache=False
) -> torch.Tensor:
    """Counts [V] * length of the first `length` tokens our loop samples, in batches of 500 copies of the prompt."""
    counts = torch.zeros([target.config.vocab_size] * length)
    batch = 500
    for _ in range(0, samples, batch):
        ids = prompt[None].repeat(batch, 1)
        out = speculative_generate(
            target, draft, ids, max_new_tokens=length, do_sample=True, temperature=temperature, top_k=top_k,
            static_cache=static_cache,
        )  # fmt: skip
        tokens = out[:, prompt.shape[0] : prompt.shape[0] + length]
        counts.index_put_(tuple(tokens.T), torch.ones(batch), accumulate=True)
    return counts


def goodness_of_fit(counts: torch.Tensor, exact: torch.Tensor) -> float:
    expected = (exact * counts.sum()).flatten()
    observed = counts.flatten()
    impossible = exact.flatten() == 0
    assert observed[impossible].sum() == 0, "sampled a pair the target gives zero probability"
    big = expected >= 5
    small = ~big & ~impossible
    merged_expected = torch.cat([expected[big], expected[small].sum()[None]])
    merged_observed = torch.cat([observed[big], observed[small].sum()[None]])
    if merged_expected[-1] == 0:
        merged_expected, merged_observed = merged_expected[:-1], merged_observed[:-1]
    merged_expected = merged_expected * merged_observed.sum() / merged_expected.sum()
    return float(chisquare(merged_observed.numpy(), merged_expected.numpy()).pvalue)


@pytest.mark.parametrize("temperature, top_k", [(0.9, None), (1.3, 6)])
def test_speculative_sampling_reproduces_the_targets_distribution(temperature, top_k):
    target = tiny_llama(seed=6, vocab_size=16)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    exact = exact_continuation_distribution(target, prompt, 2, temperature, top_k)
    torch.manual_seed(0)
    counts = sample_continuations(target, draft, prompt, 4000, 2, temperature, top_k)
    assert goodness_of_fit(counts, exact) > 1e-3


def test_a_draft_that_misreports_q_is_caught_by_the_same_test(monkeypatch):
    target = tiny_llama(seed=6, vocab_size=16)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    torch.nn.init.normal_(draft.markov_head.markov_w1.weight, std=1.0)  # a strong Markov correction
    torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=1.5)
    original = draft.draft_block

    def misreporting_draft_block(draft_hidden, anchor_ids, choose_token, **kwargs):
        block = original(draft_hidden, anchor_ids, choose_token, **kwargs)
        block.q_logits = draft.block_logits(draft_hidden)[:, : block.tokens.shape[1]] / 0.9  # no Markov bias
        return block

    monkeypatch.setattr(draft, "draft_block", misreporting_draft_block)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    exact = exact_continuation_distribution(target, prompt, 2, 0.9, None)
    torch.manual_seed(0)
    counts = sample_continuations(target, draft, prompt, 4000, 2, 0.9, None)
    assert goodness_of_fit(counts, exact) < 1e-6


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hybrid_target_greedy_matches_plain_generate_after_partial_acceptances(seed, static_cache, monkeypatch):
    target = tiny_qwen35(seed=seed)
    draft = tiny_draft(target, block_size=5, markov_rank=4)
    prompt = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(seed))
    expected = plain_greedy(target, prompt, 30)
    Oracle(draft, [expected], wrong_every=3, monkeypatch=monkeypatch, static_width=7 if static_cache else None)
    out = speculative_generate(
        target, draft, prompt[None], max_new_tokens=30, return_stats=True, static_cache=static_cache
    )
    assert out.generated == [expected]
    lengths = out.stats["per_row"][0]["acceptance_lengths"]
    assert max(lengths) > 1 and min(lengths[:-1]) < draft.config.num_draft_tokens + 1, "needs partial acceptances"


def test_hybrid_target_skips_the_replay_when_the_whole_block_is_kept(monkeypatch):
    """A fully accepted block leaves the recurrent state where a replay would: one target forward per such round."""
    target = tiny_qwen35(seed=2)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    prompt = torch.randint(0, 128, (6,), generator=torch.Generator().manual_seed(2))
    expected = plain_greedy(target, prompt, 30)
    Oracle(draft, [expected], wrong_every=4, monkeypatch=monkeypatch)  # some rounds all right, some with a wrong slot
    forwards = []
    original_forward = target.forward
    monkeypatch.setattr(target, "forward", lambda *a, **k: forwards.append(1) or original_forward(*a, **k))
    out = speculative_generate(target, draft, prompt[None], max_new_tokens=30, return_stats=True)
    assert out.generated == [expected]
    lengths = out.stats["per_row"][0]["acceptance_lengths"]
    full = sum(length == draft.config.num_draft_tokens + 1 for length in lengths)
    assert 0 < full < len(lengths), "needs rounds with and without a fully accepted block"
    # the prefill, one verify per round, and a replay only after rounds that rejected something
    assert len(forwards) == 1 + len(lengths) + (len(lengths) - full)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_hybrid_target_batches_rows_of_different_lengths(static_cache):
    target = tiny_qwen35(seed=4)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 128, (length,), generator=generator) for length in (2, 9, 5)]
    ids, mask = left_padded(rows)
    out = speculative_generate(
        target, draft, ids, mask, max_new_tokens=12, return_stats=True, static_cache=static_cache
    )
    assert out.generated == [plain_greedy(target, row, 12) for row in rows]
    assert len(out.stats["per_row"]) == 3


def hybrid_three_token_fit(static_cache: bool = False) -> float:
    """Chi-square p-value of the first three tokens our loop samples (5,000 rows, batches of 500) against a tiny
    hybrid target's exact distribution. The third token is sampled from a recurrent state rolled back after a
    partially accepted block. The target's output head is scaled up so its distribution depends visibly on that
    state (a random tiny model is otherwise nearly uniform whatever came before)."""
    target = tiny_qwen35(seed=6, vocab_size=8)
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    draft = tiny_draft(target, block_size=3, markov_rank=4)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    exact = exact_continuation_distribution(target, prompt, 3, 0.9, None)
    torch.manual_seed(0)
    counts = sample_continuations(target, draft, prompt, 5000, 3, 0.9, None, static_cache=static_cache)
    return goodness_of_fit(counts, exact)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_hybrid_target_sampling_reproduces_the_targets_distribution(static_cache):
    assert hybrid_three_token_fit(static_cache) > 1e-3


def test_hybrid_target_sampling_test_detects_a_recurrent_state_that_is_not_rolled_back(monkeypatch):
    """Negative control: keeping the verify forward's state (all Q tokens folded in) for every row must fail."""
    monkeypatch.setattr(loop, "roll_back_recurrent_states", lambda *args: None)
    assert hybrid_three_token_fit() < 1e-6


def test_static_hybrid_sampling_test_detects_a_commit_that_ignores_the_kept_count(monkeypatch):
    """Negative control of the static path: every row that kept anything commits the state after the whole block."""
    original_commit = GatedDeltaNetBlockState.commit

    def commit_whole_block(self):
        self.kept.copy_(torch.where(self.kept > 0, self.block_decay.shape[2], 0))
        original_commit(self)

    monkeypatch.setattr(GatedDeltaNetBlockState, "commit", commit_whole_block)
    assert hybrid_three_token_fit(static_cache=True) < 1e-6


def test_hybrid_batch_replays_once_per_kept_length_not_once_per_row(monkeypatch):
    """Rows of a hybrid batch that kept the same number of tokens share one replay forward; the output still equals
    row-by-row plain greedy."""
    target = tiny_qwen35(seed=5)
    draft = tiny_draft(target, block_size=5, markov_rank=4)
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 128, (length,), generator=generator) for length in (6, 3, 8, 4)]
    expected = [plain_greedy(target, row, 20) for row in rows]
    # wrong slots depend on (round + row + slot) parity: rows 0 and 2 keep one length, rows 1 and 3 another
    Oracle(draft, expected, wrong_every=2, monkeypatch=monkeypatch)
    batch_sizes = []
    original_forward = target.forward

    def counting_forward(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(target, "forward", counting_forward)
    ids, mask = left_padded(rows)
    out = speculative_generate(target, draft, ids, mask, max_new_tokens=20, return_stats=True)
    assert out.generated == expected
    assert out.stats["seconds"]["rollback"] > 0
    replays = [size for size in batch_sizes[1:] if size < len(rows)]  # the prefill and verifies run all 4 rows
    assert replays and max(replays) == 2, "rows with the same kept length share a replay"
    rounds = len(batch_sizes) - 1 - len(replays)
    assert len(replays) <= rounds * 2 < rounds * len(rows)


def test_static_hybrid_batch_runs_one_target_forward_per_round_however_much_each_row_kept(monkeypatch):
    """On the static path a hybrid batch needs no replay: rows that kept different numbers of tokens each commit their
    own recurrent state inside the next verify forward; the output still equals row-by-row plain greedy."""
    target = tiny_qwen35(seed=5)
    draft = tiny_draft(target, block_size=5, markov_rank=4)
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 128, (length,), generator=generator) for length in (6, 3, 8, 4)]
    expected = [plain_greedy(target, row, 20) for row in rows]
    ids, mask = left_padded(rows)
    Oracle(draft, expected, wrong_every=2, monkeypatch=monkeypatch, static_width=ids.shape[1])
    forwards = []
    original_forward = target.forward
    monkeypatch.setattr(target, "forward", lambda *a, **k: forwards.append(1) or original_forward(*a, **k))
    out = speculative_generate(target, draft, ids, mask, max_new_tokens=20, return_stats=True, static_cache=True)
    assert out.generated == expected
    per_row = [row["acceptance_lengths"] for row in out.stats["per_row"]]
    assert any(len(set(lengths)) > 1 for lengths in zip(*per_row)), "rows must keep different lengths in a round"
    rounds = max(len(lengths) for lengths in per_row)  # the longest-running row's rounds: the loop's iterations
    assert len(forwards) == 1 + rounds and out.stats["seconds"]["rollback"] == 0


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_qwen35_inside_its_image_text_wrapper_matches_plain_generate(static_cache):
    target = tiny_qwen35_multimodal(seed=2)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    prompt = torch.randint(0, 100, (7,), generator=torch.Generator().manual_seed(2))
    out = speculative_generate(target, draft, prompt[None], max_new_tokens=12, static_cache=static_cache)
    assert out[0, 7:].tolist() == plain_greedy(target, prompt, 12)


def test_static_path_runs_qwen35_moe_hybrids_too():
    target = tiny_qwen35_moe(seed=3)
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    generator = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 128, (length,), generator=generator) for length in (5, 8)]
    ids, mask = left_padded(rows)
    out = speculative_generate(target, draft, ids, mask, max_new_tokens=16, static_cache=True)
    assert [out[row, ids.shape[1] :].tolist() for row in range(2)] == [plain_greedy(target, row, 16) for row in rows]


def test_right_padded_prompts_are_refused():
    target = tiny_llama()
    draft = tiny_draft(target)
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match=r"left-padded"):
        speculative_generate(target, draft, ids, mask, max_new_tokens=3)

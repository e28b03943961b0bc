"""Speculative sampling with a DSpark draft draws from exactly the target's own sampling distribution.

The target has a 16-token vocabulary, so the exact joint distribution of its first three sampled tokens (16^3 cells,
with the logits processors generate applies) can be computed by brute force. Assisted samples are then compared with
it by a chi-square goodness-of-fit test. Three tokens, out of four generated, are measured because of how the rounds
fall: in Path A the first round verifies a one-token placeholder during the prefill, so a real drafted block starts at
new token 2 or 3 and its second slot (the first one whose Markov bias comes from a drafted token) lands on token 3;
in Path B the prefill drafts nothing and the first block covers tokens 2-5. With only two new tokens neither path
would ever verify a drafted block.

A random draft is rarely accepted, and then q hardly matters: the target's residual resamples almost everything. So
the Path A drafts are rigged to be close to the target (their base logits are the target's own), which makes the
test sensitive to the q they report. A negative control (a draft that samples from its Markov-corrected logits but
reports the uncorrected ones as q) must fail the same test, which shows the test can see a lossy draft.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from scipy.stats import chisquare
from tiny_models import tiny_draft, tiny_llama
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

VOCAB = 16
PROMPT = torch.tensor([[3, 7, 1, 12, 5]])
MEASURED = 3  # joint distribution of the first MEASURED new tokens
MAX_NEW_TOKENS = 4
SAMPLES = 600  # per test; the negative control fails with p < 1e-20 at this size
P_VALUE_FLOOR = 1e-3
LOSSY_P_VALUE = 1e-6

# generate kwargs, and the processors generate builds from them, in generate's order (penalties, then warpers)
SAMPLING = {
    "temperature": ({"temperature": 0.9}, [TemperatureLogitsWarper(0.9)]),
    "top_k_repetition_penalty": (
        {"top_k": 6, "repetition_penalty": 1.3},
        [RepetitionPenaltyLogitsProcessor(1.3), TopKLogitsWarper(6)],
    ),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and a second thread only contends with parallel jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    # two layers: the draft reads both, the last one through the post-norm convention; every sample is a full
    # generate call, so a shallow target keeps the test fast
    model = tiny_llama(seed=0, vocab_size=VOCAB, num_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.5)  # a peaked target: more well-filled cells, so a sharper test
    return model


@pytest.fixture(scope="module")
def reference(target):
    """Exact joint distributions [V] * MEASURED, per sampling configuration."""
    return {name: exact_joint(target, PROMPT, LogitsProcessorList(procs)) for name, (_, procs) in SAMPLING.items()}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def exact_joint(target, prompt: torch.Tensor, processors: LogitsProcessorList, tokens: int = MEASURED) -> torch.Tensor:
    """p(x1, ..., x_tokens) [V] * tokens (float64): one batched forward per depth over every prefix."""
    sequences = prompt.clone()
    log_joint = torch.zeros(1, dtype=torch.float64)
    for _ in range(tokens):
        logits = target(sequences).logits[:, -1].float()
        scores = processors(sequences, logits)
        log_joint = (log_joint[:, None] + torch.log_softmax(scores.double(), dim=-1)).reshape(-1)
        next_tokens = torch.arange(VOCAB).repeat(sequences.shape[0])[:, None]
        sequences = torch.cat([sequences.repeat_interleave(VOCAB, dim=0), next_tokens], dim=1)
    return log_joint.exp().reshape([VOCAB] * tokens)


@torch.no_grad()
def sample_counts(target, samples: int, seed: int, **generate_kwargs) -> torch.Tensor:
    """Counts [V] * MEASURED of the first MEASURED new tokens over `samples` seeded generate calls."""
    torch.manual_seed(seed)
    counts = torch.zeros([VOCAB] * MEASURED, dtype=torch.float64)
    start = PROMPT.shape[1]
    for _ in range(samples):
        output = target.generate(PROMPT, do_sample=True, max_new_tokens=MAX_NEW_TOKENS, **generate_kwargs)
        assert output.shape[1] == start + MAX_NEW_TOKENS
        counts[tuple(output[0, start : start + MEASURED].tolist())] += 1
    return counts


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness of fit of `counts` to `probabilities` (both [V] * depth).

    Cells expected fewer than `min_expected` times are merged along the prefix tree: into their parent prefix, then
    its parent, and finally into one remainder cell. (test_speculative_loop.goodness_of_fit lumps every small cell
    into one remainder; on these samples that loses most of the power, e.g. p = 1e-15 instead of 1e-51 for the
    negative control.) A sample the target gives zero probability (e.g. outside its top-k) gives p = 0.
    """
    if bool(((probabilities == 0) & (counts > 0)).any()):
        return 0.0
    total = counts.sum()
    expected = probabilities / probabilities.sum() * total
    observed_cells, expected_cells = [], []
    observed_left, expected_left = counts, expected
    while True:
        keep = expected_left >= min_expected
        observed_cells.append(observed_left[keep])
        expected_cells.append(expected_left[keep])
        observed_left = torch.where(keep, 0.0, observed_left)
        expected_left = torch.where(keep, 0.0, expected_left)
        if observed_left.dim() == 0:
            break
        observed_left, expected_left = observed_left.sum(-1), expected_left.sum(-1)
    observed = torch.cat([cell.reshape(-1) for cell in observed_cells] + [observed_left.reshape(1)])
    expected = torch.cat([cell.reshape(-1) for cell in expected_cells] + [expected_left.reshape(1)])
    if expected[-1] < min_expected:  # fold a small remainder into the smallest kept cell
        smallest = int(expected[:-1].argmin())
        observed[smallest] += observed[-1]
        expected[smallest] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    assert len(expected) >= 20, f"only {len(expected)} cells: the test would have little power"
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


@contextlib.contextmanager
def counting_forwards(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


class Rounds:
    """Wraps a Path-A draft's `generate` (instance attribute) to record every drafting round.

    rounds: (input length, requested max_new_tokens, proposed, real block) per round; a round that is not a real
    block proposed the one-token placeholder. `input_ids` is the sequence of the round being drafted, set before the
    draft runs (a rigged `block_logits` reads it).
    """

    def __init__(self, draft):
        self.rounds: list[tuple[int, int, int, bool]] = []
        self.input_ids: torch.Tensor | None = None
        self._real = True
        original_generate = draft.generate
        original_placeholder = draft._placeholder_candidate

        @functools.wraps(original_generate)
        def generate(input_ids=None, *args, **kwargs):
            self.input_ids, self._real = input_ids, True
            output = original_generate(input_ids, *args, **kwargs)
            proposed = output.sequences.shape[1] - input_ids.shape[1]
            self.rounds.append((input_ids.shape[1], kwargs["max_new_tokens"], proposed, self._real))
            return output

        def placeholder(input_ids):
            self._real = False
            return original_placeholder(input_ids)

        draft.generate = generate
        draft._placeholder_candidate = placeholder

    def real_blocks(self) -> list[tuple[int, int]]:
        """(proposed, accepted) of every real block; a sample's last round ends at prompt + MAX_NEW_TOKENS."""
        final = PROMPT.shape[1] + MAX_NEW_TOKENS
        blocks = []
        for index, (length, _, proposed, real) in enumerate(self.rounds):
            following = self.rounds[index + 1][0] if index + 1 < len(self.rounds) else final
            next_length = following if following > length else final  # a shorter one starts the next sample
            if real:
                blocks.append((proposed, next_length - length - 1))
        return blocks


def rig_near_target(target, draft) -> Rounds:
    """Base logits of slot j = the target's own logits at position L + j, along the target's argmax continuation.

    The draft's Markov head (if any) still corrects them. Without one, the first slot's q is exactly the target's p
    and is always accepted; later slots are right whenever the earlier samples followed the argmax. The logits come
    from a private copy of the target, so they add no forwards of the target itself.
    """
    oracle = copy.deepcopy(target)
    rounds = Rounds(draft)

    @torch.no_grad()
    def block_logits(draft_hidden):
        sequence = rounds.input_ids
        logits = []
        for _ in range(draft_hidden.shape[1]):
            logits.append(oracle(sequence).logits[:, -1].float())
            sequence = torch.cat([sequence, logits[-1].argmax(-1, keepdim=True)], dim=1)
        return torch.stack(logits, dim=1)

    draft.block_logits = block_logits
    return rounds


def make_draft(target, kind: str, sample_from_anchor: bool):
    """kind: "oracle" (near target, no Markov head), "near_markov", "near_gated_confidence" or "random_markov"."""
    overrides = {"sample_from_anchor": sample_from_anchor}
    if kind == "near_gated_confidence":
        overrides |= {"markov_head_type": "gated", "enable_confidence_head": True, "confidence_threshold": 0.5}
    draft = tiny_draft(target, block_size=4, markov_rank=0 if kind == "oracle" else 4, **overrides)
    if draft.markov_head is not None:  # a Markov head that moves q well away from the base logits
        torch.manual_seed(7)
        with torch.no_grad():
            draft.markov_head.markov_w1.weight.normal_(0.0, 1.0)
            draft.markov_head.markov_w2.weight.normal_(0.0, 2.0 if kind == "random_markov" else 1.0)
    if draft.confidence_head is not None:
        with torch.no_grad():  # confidence driven by the previous drafted token: blocks stop at varying slots
            draft.confidence_head.proj.weight.zero_()
            draft.confidence_head.proj.weight[:, draft.config.hidden_size :].normal_(0.0, 1.0)
    rounds = rig_near_target(target, draft) if kind != "random_markov" else Rounds(draft)
    return draft, rounds


def report_q_without_markov(draft) -> None:
    """Make the draft lossy: it samples from the Markov-corrected logits but reports the uncorrected ones as q."""
    original = draft.draft_block

    def draft_block(draft_hidden, anchor_ids, choose_token, *args, **options):
        base = draft.block_logits(draft_hidden)
        reported = []

        def lossy_choose(corrected):
            reported.append(choose_token.processors(choose_token.sequence, base[:, len(reported)].clone()))
            _, token = choose_token(corrected)
            return reported[-1], token

        return original(draft_hidden, anchor_ids, lossy_choose, *args, **options)

    draft.draft_block = draft_block


# ----------------------------------------------------------------------------------------------------------------
# The reference distribution is the one plain generate samples from
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", SAMPLING)
def test_reference_processors_reproduce_the_scores_of_plain_generate(target, sampling):
    kwargs, processors = SAMPLING[sampling]
    processors = LogitsProcessorList(processors)
    start = PROMPT.shape[1]
    for seed in range(4):
        torch.manual_seed(seed)
        output = target.generate(
            PROMPT,
            do_sample=True,
            max_new_tokens=MEASURED,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        with torch.no_grad():
            for step, scores in enumerate(output.scores):
                prefix = output.sequences[:, : start + step]
                expected = processors(prefix, target(prefix).logits[:, -1].float())
                torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_plain_sampling_fits_the_reference_distribution(target, reference):
    kwargs, _ = SAMPLING["temperature"]
    counts = sample_counts(target, SAMPLES, seed=0, **kwargs)
    assert chi_square_p_value(counts, reference["temperature"]) > P_VALUE_FLOOR


# ----------------------------------------------------------------------------------------------------------------
# Speculative sampling is lossless
# ----------------------------------------------------------------------------------------------------------------


def case(path: str, draft_kind: str, sample_from_anchor: bool, sampling: str, slow: bool = False):
    slots = "anchor" if sample_from_anchor else "dflash_slots"
    return pytest.param(
        path,
        draft_kind,
        sample_from_anchor,
        sampling,
        id=f"path{path}-{draft_kind}-{slots}-{sampling}",
        marks=[pytest.mark.slow] if slow else [],
    )


# By default: the oracle (the rig lines up, exact first-slot acceptance), both Markov head types near the target
# (the reported q is used: a q missing the Markov bias, the processors, or off by one slot fails one of them), both
# slot conventions, both sampling configurations, and Path B.
CASES = [
    case("A", "oracle", True, "temperature"),
    case("A", "near_markov", True, "temperature"),
    case("A", "near_gated_confidence", False, "top_k_repetition_penalty"),
    case("B", "random_markov", False, "top_k_repetition_penalty"),
    case("A", "random_markov", True, "temperature", slow=True),
    case("A", "random_markov", True, "top_k_repetition_penalty", slow=True),
    case("B", "random_markov", True, "temperature", slow=True),
]


@pytest.mark.parametrize(("path", "draft_kind", "sample_from_anchor", "sampling"), CASES)
def test_speculative_sampling_reproduces_the_target_distribution(
    target, reference, path, draft_kind, sample_from_anchor, sampling
):
    kwargs, _ = SAMPLING[sampling]
    draft, rounds = make_draft(target, draft_kind, sample_from_anchor)
    kwargs = {**kwargs, "assistant_model": draft}
    if path == "B":
        kwargs["speculation_type"] = "dflash"

    with counting_forwards(target) as forwards:
        counts = sample_counts(target, SAMPLES, seed=1, **kwargs)
    p_value = chi_square_p_value(counts, reference[sampling])
    assert p_value > P_VALUE_FLOOR, f"assisted samples do not follow the target distribution (p = {p_value:.2e})"

    tokens = SAMPLES * MAX_NEW_TOKENS
    if path == "B":
        assert len(forwards) < 0.99 * tokens, "drafted tokens were hardly ever accepted"
        return
    blocks = rounds.real_blocks()
    assert len(blocks) > SAMPLES / 2, "few real blocks were drafted"
    first_accepted = sum(accepted >= 1 for _, accepted in blocks) / len(blocks)
    if draft_kind == "oracle":
        # q of the first slot is exactly p, so it is always accepted: this also checks that the rig lines up
        assert first_accepted == 1.0, f"only {first_accepted:.0%} of the oracle's first slots were accepted"
        assert any(accepted > 1 for _, accepted in blocks)
        assert len(forwards) < 0.6 * tokens, f"{len(forwards)} target forwards for {tokens} tokens: little accepted"
    elif draft_kind.startswith("near"):
        assert first_accepted > 0.5, f"only {first_accepted:.0%} of the near-target draft's first slots accepted"
        assert len(forwards) < 0.85 * tokens, f"{len(forwards)} target forwards for {tokens} tokens: little accepted"
    else:
        assert len(forwards) < tokens, "no drafted token was ever accepted"
    if draft_kind == "near_gated_confidence":
        drafted = [(budget, proposed) for _, budget, proposed, real in rounds.rounds if real and budget > 1]
        assert sum(proposed < budget for budget, proposed in drafted) > 0.2 * len(drafted), "blocks were not cut short"


@pytest.mark.parametrize(
    ("draft_kind", "sample_from_anchor", "sampling"),
    [
        ("near_gated_confidence", False, "top_k_repetition_penalty"),
        pytest.param("near_markov", True, "temperature", marks=pytest.mark.slow),
    ],
    ids=["near_gated_confidence-dflash_slots-top_k_repetition_penalty", "near_markov-anchor-temperature"],
)
def test_a_draft_reporting_the_wrong_q_fails_the_same_test(target, reference, draft_kind, sample_from_anchor, sampling):
    """Negative control: the same draft, sampling from its Markov-corrected logits but reporting the uncorrected q."""
    kwargs, _ = SAMPLING[sampling]
    draft, _ = make_draft(target, draft_kind, sample_from_anchor)
    report_q_without_markov(draft)
    counts = sample_counts(target, SAMPLES, seed=1, assistant_model=draft, **kwargs)
    p_value = chi_square_p_value(counts, reference[sampling])
    assert p_value < LOSSY_P_VALUE, f"a lossy draft passed the test (p = {p_value:.2e})"

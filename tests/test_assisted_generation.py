"""Greedy assisted generation with a DSpark draft gives exactly the target's own greedy output.

Path A: `draft = DSparkDraftModel.from_target(target)` then `target.generate(ids, assistant_model=draft)`: the draft's
own `generate` drafts (Markov head, confidence stop, logits processors) from features tapped off the target.
Path B: `target.generate(ids, assistant_model=draft, speculation_type="dflash")`: transformers' built-in DFlash
generator calls the draft's `forward`.

An untrained draft is almost always rejected, so most tests also use a draft "rigged to be right": its logits are
peaked on the target's true greedy continuation (with a fixed fraction of positions deliberately wrong), so that
long prefixes are accepted and verification must still reject the wrong ones.

The full matrix (every path x head set x slot convention x target) runs with --runslow; by default each test runs a
subset that still covers every path, head set, slot convention and target at least once.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from greedy_check import assert_greedy_equal
from tiny_models import tiny_draft, tiny_llama, tiny_qwen3
from torch import nn

from dspark.modeling_dspark import CapturedFeatures

TARGETS = {"llama": tiny_llama, "qwen3": tiny_qwen3}

HEADS = {
    "dflash": {},
    "markov": {"markov_rank": 4},
    "gated_markov": {"markov_rank": 4, "markov_head_type": "gated"},
    "markov_confidence": {"markov_rank": 4, "enable_confidence_head": True, "confidence_threshold": 0.5},
}

# (seed, prompt length, max_new_tokens)
LONG = 30
CASES = [(0, 1, LONG), (1, 20, 7), (2, 6, 1), (3, 13, LONG)]

PEAK = 30.0


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and a second thread only contends with parallel jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_prompt(seed: int, length: int, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size - 1, (1, length), generator=generator)


def make_draft(target, heads: str = "markov", sample_from_anchor: bool = True, seed: int = 1, **overrides):
    draft = tiny_draft(target, seed=seed, sample_from_anchor=sample_from_anchor, **{**HEADS[heads], **overrides})
    if draft.confidence_head is not None:
        # A fresh confidence head says ~0.5 everywhere. Make it depend on the previous drafted token only (through its
        # Markov embedding), so the 0.5 threshold cuts blocks at varying slots.
        torch.manual_seed(seed + 100)
        with torch.no_grad():
            draft.markov_head.markov_w1.weight.normal_(0.0, 1.0)
            draft.confidence_head.proj.weight.zero_()
            draft.confidence_head.proj.weight[:, draft.config.hidden_size :].normal_(0.0, 1.0)
    return draft


def param(*values, fast: bool, id: str):
    """A pytest.param that runs by default when `fast`, else only with --runslow."""
    return pytest.param(*values, id=id, marks=[] if fast else [pytest.mark.slow])


@functools.cache
def reference_target(name: str):
    """A private instance of a tiny target, used only for plain generate (the tests' own targets get hooks)."""
    return TARGETS[name]()


@functools.cache
def _plain_greedy(name: str, seed: int, length: int, max_new_tokens: int, options: tuple) -> torch.Tensor:
    target = reference_target(name)
    return generate(
        target, make_prompt(seed, length, target.config.vocab_size), max_new_tokens=max_new_tokens, **dict(options)
    )


def plain_greedy(name: str, seed: int, length: int, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Plain greedy output of target `name` for `make_prompt(seed, length)`, computed once per session."""
    return _plain_greedy(name, seed, length, max_new_tokens, tuple(sorted(kwargs.items())))


@torch.no_grad()
def generate(target, prompt, draft=None, path: str = "A", **kwargs) -> torch.Tensor:
    kwargs.setdefault("do_sample", False)
    if draft is not None:
        kwargs["assistant_model"] = draft
        if path == "B":
            kwargs["speculation_type"] = "dflash"
    return target.generate(prompt, **kwargs)


@contextlib.contextmanager
def counting_forwards(target):
    """Counts forwards of the target's decoder (verification forwards and any feature recompute)."""
    calls = []
    handle = target.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


class Oracle:
    """Adds +PEAK to the logit of the target's true greedy token at each drafted position.

    A fixed random fraction `corrupt_rate` of the positions is peaked on a wrong token instead, so verification has
    something to reject. Positions past the known continuation are left alone.
    """

    def __init__(self, expected: torch.Tensor, vocab_size: int, corrupt_rate: float = 0.0, seed: int = 0):
        self.expected = expected[0]
        self.vocab_size = vocab_size
        generator = torch.Generator().manual_seed(seed)
        self.corrupt = torch.rand(self.expected.shape[0], generator=generator) < corrupt_rate

    def token(self, position: int) -> int:
        true = int(self.expected[position])
        if self.corrupt[position]:
            return (true + 1 + position % (self.vocab_size - 1)) % self.vocab_size  # never the true token
        return true

    def rig(self, logits: torch.Tensor, first_position: int) -> torch.Tensor:
        """logits [1, n, V] for absolute positions first_position .. first_position + n - 1."""
        logits = logits.clone()
        for slot in range(logits.shape[1]):
            position = first_position + slot
            if position < self.expected.shape[0]:
                logits[:, slot, self.token(position)] += PEAK
        return logits


class PathARecorder:
    """Wraps a Path-A draft's `generate` and `draft_block` (instance attributes) to record every drafting round.

    rounds: (input length, requested max_new_tokens, proposed candidates) per `draft.generate` call.
    candidates: the candidate tokens of every `draft.generate` call.
    blocks: (input_ids, draft_hidden) per real (non-placeholder) block.
    With `oracle` set, the draft's `block_logits` is rigged: slot j of the round with sequence length L drafts the
    token at absolute position L + j.
    """

    def __init__(self, draft, oracle: Oracle | None = None):
        self.draft = draft
        self.oracle = oracle
        self.rounds: list[tuple[int, int, int]] = []
        self.candidates: list[list[int]] = []
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._input_ids: torch.Tensor | None = None
        original_generate = draft.generate
        original_draft_block = draft.draft_block
        original_block_logits = draft.block_logits

        @functools.wraps(original_generate)
        def generate(input_ids=None, *args, **kwargs):
            self._input_ids = input_ids
            output = original_generate(input_ids, *args, **kwargs)
            proposed = output.sequences.shape[1] - input_ids.shape[1]
            self.rounds.append((input_ids.shape[1], kwargs.get("max_new_tokens"), proposed))
            self.candidates.append(output.sequences[0, input_ids.shape[1] :].tolist())
            return output

        @functools.wraps(original_draft_block)
        def draft_block(draft_hidden, *args, **kwargs):
            self.blocks.append((self._input_ids.clone(), draft_hidden.detach().clone()))
            return original_draft_block(draft_hidden, *args, **kwargs)

        @functools.wraps(original_block_logits)
        def block_logits(draft_hidden):
            logits = original_block_logits(draft_hidden)
            if self.oracle is None:
                return logits
            return self.oracle.rig(logits, self._input_ids.shape[1])

        draft.generate = generate
        draft.draft_block = draft_block
        draft.block_logits = block_logits
        draft._test_recorder = self

    @classmethod
    def of(cls, draft) -> PathARecorder:
        """The recorder already wrapping `draft`, or a new one."""
        return getattr(draft, "_test_recorder", None) or cls(draft)

    def accepted_per_round(self, final_length: int) -> list[tuple[int, int]]:
        """(proposed, accepted) for every round, from the sequence lengths seen by consecutive rounds."""
        lengths = [length for length, _, _ in self.rounds] + [final_length]
        return [(proposed, lengths[i + 1] - lengths[i] - 1) for i, (_, _, proposed) in enumerate(self.rounds)]


@contextlib.contextmanager
def rigged_path_b(target, draft, oracle: Oracle):
    """Rig transformers' DFlash generator: it computes the draft logits with `target.get_output_embeddings()`.

    The draft's `forward` records the anchor position (the first block position) and the output head the generator
    picks up adds the oracle's peaks there. The target's own forward uses `lm_head` directly, so verification is
    untouched.
    """
    original_forward = draft.forward
    lm_head = target.get_output_embeddings()
    state = {}

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        state["anchor"] = int(kwargs["position_ids"][0, -draft.config.block_size])
        return original_forward(*args, **kwargs)

    class OracleHead(nn.Module):
        weight = lm_head.weight  # the generator reads the head's device and dtype from it

        def forward(self, hidden):
            # hidden = last_hidden_state[:, 1:]: entry i predicts position anchor + 1 + i in either slot convention
            return oracle.rig(lm_head(hidden), state["anchor"] + 1)

    head = OracleHead()
    draft.forward = forward
    target.get_output_embeddings = lambda: head
    try:
        yield
    finally:
        del draft.forward
        del target.get_output_embeddings


def run_rigged(target, draft, prompt, expected, path, corrupt_rate, seed=0, **kwargs):
    """Generate with an oracle-rigged draft; returns (output, decoder forwards, recorder or None)."""
    oracle = Oracle(expected, target.config.vocab_size, corrupt_rate, seed)
    recorder = None
    if path == "A":
        recorder = PathARecorder.of(draft)
        recorder.oracle = oracle
        recorder.rounds.clear()
        recorder.candidates.clear()
        context = contextlib.nullcontext()
    else:
        context = rigged_path_b(target, draft, oracle)
    with context, counting_forwards(target) as forwards:
        output = generate(target, prompt, draft, path, **kwargs)
    return output, len(forwards), recorder


def hook_counts(model: nn.Module) -> dict[tuple[str, str], int]:
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    counts = {}
    for name, module in model.named_modules():
        for kind in kinds:
            if len(getattr(module, kind, {})):
                counts[(name, kind)] = len(getattr(module, kind))
    return counts


def dspark_hooks(model: nn.Module) -> list[str]:
    """Hooks anywhere in `model` whose function comes from the dspark package."""
    found = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks"):
            for hook in getattr(module, kind).values():
                source = getattr(getattr(hook, "__func__", hook), "__module__", "") or ""
                if "dspark" in source:
                    found.append(f"{name or '<target>'}.{kind}: {hook}")
    return found


def reference_draft_hidden(target, draft, input_ids: torch.Tensor) -> torch.Tensor:
    """Draft hidden states of a block anchored at the last token, from a full recompute of the target features."""
    length = input_ids.shape[1]
    context = draft.recompute_target_features(target, input_ids[:, :-1]) if length > 1 else None
    positions = torch.arange(length - 1 + draft.config.block_size)[None]
    return draft(draft.embed_block(input_ids[:, -1]), context, position_ids=positions).draft_hidden_states


def assert_blocks_match_full_recompute(target, draft, recorder: PathARecorder) -> None:
    assert recorder.blocks, "no real block was drafted"
    with torch.no_grad():
        for input_ids, draft_hidden in recorder.blocks:
            reference = reference_draft_hidden(target, draft, input_ids)
            torch.testing.assert_close(draft_hidden, reference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Greedy equality: untrained draft
# ----------------------------------------------------------------------------------------------------------------

PATH_A_VARIANTS = [(heads, anchor) for heads in HEADS for anchor in (True, False)]
PATH_B_VARIANTS = [(heads, anchor) for heads in ("dflash", "markov_confidence") for anchor in (True, False)]
VARIANTS = [("A", *v) for v in PATH_A_VARIANTS] + [("B", *v) for v in PATH_B_VARIANTS]


def variant_params(fast: set[tuple[str, str, bool, str]]) -> list:
    """Every (path, heads, sample_from_anchor, target) combination; those outside `fast` only with --runslow."""
    return [
        param(
            path,
            heads,
            anchor,
            target_name,
            fast=(path, heads, anchor, target_name) in fast,
            id=f"path{path}-{heads}-{'anchor' if anchor else 'dflash_slots'}-{target_name}",
        )
        for path, heads, anchor in VARIANTS
        for target_name in TARGETS
    ]


# An untrained draft is almost always rejected: these runs exercise the real backbone in the loop, the placeholder
# round and rejection; the rigged tests below cover acceptance for every variant.
UNTRAINED_FAST = {
    ("A", "gated_markov", True, "llama"),
    ("A", "markov_confidence", False, "qwen3"),
    ("B", "dflash", False, "llama"),
    ("B", "markov_confidence", True, "qwen3"),
}


@pytest.mark.parametrize(("path", "heads", "sample_from_anchor", "target_name"), variant_params(UNTRAINED_FAST))
def test_greedy_output_matches_target_without_draft(path, heads, sample_from_anchor, target_name):
    target = TARGETS[target_name]()
    draft = make_draft(target, heads, sample_from_anchor)
    for seed, length, max_new_tokens in CASES:
        prompt = make_prompt(seed, length, target.config.vocab_size)
        expected = plain_greedy(target_name, seed, length, max_new_tokens)
        actual = generate(target, prompt, draft, path, max_new_tokens=max_new_tokens)
        assert actual.shape[1] == length + max_new_tokens
        assert_greedy_equal(target, expected, actual, length)


# ----------------------------------------------------------------------------------------------------------------
# Greedy equality: a draft rigged to be (mostly) right, so that long prefixes are accepted
# ----------------------------------------------------------------------------------------------------------------

# every head set in Path A, both slot conventions in both paths, both targets in both paths
RIGGED_FAST = {
    ("A", "dflash", True, "llama"),
    ("A", "markov", False, "qwen3"),
    ("A", "gated_markov", True, "qwen3"),
    ("A", "markov_confidence", False, "llama"),
    ("B", "dflash", True, "llama"),
    ("B", "dflash", False, "qwen3"),
    ("B", "markov_confidence", True, "qwen3"),
}


@pytest.mark.parametrize("corrupt_rate", [0.0, 0.3], ids=["oracle", "oracle_30pct_wrong"])
@pytest.mark.parametrize(("path", "heads", "sample_from_anchor", "target_name"), variant_params(RIGGED_FAST))
def test_draft_rigged_to_be_right_is_accepted_and_output_stays_greedy(
    path, heads, sample_from_anchor, target_name, corrupt_rate
):
    target = TARGETS[target_name]()
    draft = make_draft(target, heads, sample_from_anchor)
    proposals = draft.config.num_draft_tokens
    assert proposals == draft.config.block_size - (0 if sample_from_anchor else 1)
    rejected_any = False
    for seed, length, max_new_tokens in CASES:
        prompt = make_prompt(seed, length, target.config.vocab_size)
        expected = plain_greedy(target_name, seed, length, max_new_tokens)
        actual, forwards, recorder = run_rigged(
            target, draft, prompt, expected, path, corrupt_rate, seed, max_new_tokens=max_new_tokens
        )
        assert_greedy_equal(target, expected, actual, length)
        if max_new_tokens == LONG:
            # plain greedy needs LONG forwards; a right draft needs about LONG / (accepted + 1)
            limit = 0.4 if corrupt_rate == 0 and heads != "markov_confidence" else 0.7
            assert forwards <= limit * max_new_tokens, f"{forwards} target forwards for {max_new_tokens} tokens"
        if path == "B" and corrupt_rate == 0 and torch.equal(actual, expected):
            # a pure prefill, then every round accepts all its proposals plus the bonus token: any misalignment
            # between the draft's slots and the positions they predict costs extra forwards
            assert forwards == 1 + math.ceil((max_new_tokens - 1) / (proposals + 1)), f"{forwards} target forwards"
        if recorder is not None:
            rounds = recorder.accepted_per_round(actual.shape[1])
            rejected_any |= any(accepted < proposed for proposed, accepted in rounds[1:])
            if corrupt_rate == 0 and heads != "markov_confidence":
                # the first round is the one-token placeholder; every later block is drafted in full
                for (_, budget, proposed), (_, accepted) in zip(recorder.rounds[1:], rounds[1:], strict=True):
                    assert proposed == min(budget, proposals)
                    assert accepted == proposed or actual.shape[1] == length + max_new_tokens
    if path == "A" and corrupt_rate > 0:
        assert rejected_any, "the wrong tokens were never rejected: the rigging did not take effect"


# ----------------------------------------------------------------------------------------------------------------
# Confidence early stop
# ----------------------------------------------------------------------------------------------------------------


def test_confidence_threshold_shortens_blocks_at_varying_slots():
    target = tiny_llama()
    draft = make_draft(target, "markov_confidence", block_size=6)
    prompt = make_prompt(4, 9, target.config.vocab_size)
    expected = generate(target, prompt, max_new_tokens=40)
    actual, _, recorder = run_rigged(target, draft, prompt, expected, "A", corrupt_rate=0.0, max_new_tokens=40)
    assert_greedy_equal(target, expected, actual, prompt.shape[1])
    full = [min(budget, draft.config.num_draft_tokens) for _, budget, _ in recorder.rounds[1:]]
    proposed = [count for _, _, count in recorder.rounds[1:]]
    assert all(1 <= p <= f for p, f in zip(proposed, full, strict=True))
    assert sum(p < f for p, f in zip(proposed, full, strict=True)) >= 3, f"blocks were not cut short: {proposed}"
    assert len(set(proposed)) >= 2, f"the stop slot never varied: {proposed}"


@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_survival_rule_stops_every_block_where_the_confidence_product_falls_below_the_threshold(sample_from_anchor):
    target = tiny_qwen3()
    draft = make_draft(target, "markov_confidence", sample_from_anchor, block_size=6, confidence_stop="survival")
    # constant confidence 0.8: survival 0.8, 0.64, 0.512, 0.41 -> stop before slot 3 with threshold 0.5
    nn.init.zeros_(draft.confidence_head.proj.weight)
    nn.init.constant_(draft.confidence_head.proj.bias, math.log(0.8 / 0.2))
    prompt = make_prompt(5, 4, target.config.vocab_size)
    expected = generate(target, prompt, max_new_tokens=30)
    actual, forwards, recorder = run_rigged(target, draft, prompt, expected, "A", corrupt_rate=0.0, max_new_tokens=30)
    assert_greedy_equal(target, expected, actual, prompt.shape[1])
    assert [count for _, _, count in recorder.rounds[1:]] == [min(3, budget) for _, budget, _ in recorder.rounds[1:]]
    assert forwards <= 30 / 3


# ----------------------------------------------------------------------------------------------------------------
# Logits processors with greedy decoding
# ----------------------------------------------------------------------------------------------------------------


def eos_from_plain_output(target_name: str, seed: int, length: int) -> int:
    """A token that plain greedy produces around the middle of 40 new tokens and not before."""
    output = plain_greedy(target_name, seed, length, 40)[0, length:].tolist()
    for index in range(8, len(output)):
        if output[index] not in output[:index]:
            return output[index]
    pytest.fail("no token of the plain greedy output is new after position 8")


PROCESSORS = ["repetition_penalty", "no_repeat_ngram_size", "eos_token_id"]


def processor_params() -> list:
    """By default every processor through both paths with the rigged draft, the target alternating."""
    params = []
    for index, processor in enumerate(PROCESSORS):
        for path_index, path in enumerate(("A", "B")):
            for draft_kind in ("rigged", "random"):
                for target_index, target_name in enumerate(TARGETS):
                    fast = draft_kind == "rigged" and (index + path_index) % 2 == target_index
                    params.append(
                        param(
                            target_name,
                            processor,
                            path,
                            draft_kind,
                            fast=fast,
                            id=f"{target_name}-{processor}-{path}-{draft_kind}",
                        )
                    )
    return params


@pytest.mark.parametrize(("target_name", "processor", "path", "draft_kind"), processor_params())
def test_greedy_with_logits_processors_matches_target(target_name, processor, path, draft_kind):
    target = TARGETS[target_name]()
    draft = make_draft(target, "markov", sample_from_anchor=path == "A")
    stops_proposed = []
    for seed, length in ((6, 3), (7, 11)):
        prompt = make_prompt(seed, length, target.config.vocab_size)
        if processor == "eos_token_id":
            eos = eos_from_plain_output(target_name, seed, length)
            kwargs = {"eos_token_id": eos, "pad_token_id": eos}
        else:
            kwargs = {processor: {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}[processor]}
        expected = plain_greedy(target_name, seed, length, 40, **kwargs)
        assert not torch.equal(expected, plain_greedy(target_name, seed, length, 40)), "the processor changes nothing"
        if processor == "eos_token_id":
            assert expected.shape[1] < length + 40 and int(expected[0, -1]) == eos
        if draft_kind == "random":
            actual = generate(target, prompt, draft, path, max_new_tokens=40, **kwargs)
        else:
            actual, forwards, recorder = run_rigged(
                target, draft, prompt, expected, path, 0.2, seed, max_new_tokens=40, **kwargs
            )
            assert forwards < 0.7 * (expected.shape[1] - length) + 1
            if recorder is not None and processor == "eos_token_id":
                # transformers 5.17 runs past a stop token accepted mid-block: candidates end at their first one
                assert all(eos not in block[:-1] for block in recorder.candidates)
                stops_proposed.append(any(block[-1:] == [eos] for block in recorder.candidates))
        assert_greedy_equal(target, expected, actual, length)
        assert actual.shape == expected.shape
    if draft_kind == "rigged" and path == "A" and processor == "eos_token_id":
        assert any(stops_proposed), "the rigged draft never proposed the stop token: the cut above went untested"


# ----------------------------------------------------------------------------------------------------------------
# Nothing stays attached to the target; no stale state across calls
# ----------------------------------------------------------------------------------------------------------------


def test_path_a_leaves_no_hooks_on_the_target():
    target = tiny_llama()
    draft = make_draft(target, "markov_confidence")
    before = hook_counts(target)
    assert before == {}
    for seed, length, max_new_tokens in CASES:
        prompt = make_prompt(seed, length, target.config.vocab_size)
        expected = plain_greedy("llama", seed, length, max_new_tokens)
        actual, _, _ = run_rigged(target, draft, prompt, expected, "A", 0.3, seed, max_new_tokens=max_new_tokens)
        assert_greedy_equal(target, expected, actual, length)
        assert hook_counts(target) == before, "Path A left hooks on the target"
        assert not draft._tap.armed
    # A prompt extending the previous output makes the draft recompute features through the target's decoder with
    # output_hidden_states, which may install transformers' own (permanent) capture hooks; none of ours may remain.
    extended = torch.cat([actual, make_prompt(9, 3, target.config.vocab_size)], dim=1)
    assert_greedy_equal(
        target, generate(target, extended, max_new_tokens=7), generate(target, extended, draft, max_new_tokens=7), 0
    )
    assert dspark_hooks(target) == []
    assert not draft._tap.armed
    # positive control: an armed tap is seen by the check
    draft._arm_tap(target)
    assert len(dspark_hooks(target)) >= 3
    draft._tap.disarm()
    assert dspark_hooks(target) == []


def test_binding_attaches_nothing_to_the_target():
    target = tiny_qwen3()
    make_draft(target, "markov").bind_target(target)
    assert hook_counts(target) == {}


@pytest.mark.parametrize("path", ["A", "B"])
def test_repeated_generate_calls_on_one_bound_draft_give_fresh_results(path):
    target = tiny_llama()
    draft = make_draft(target, "markov")
    recorder = PathARecorder.of(draft) if path == "A" else None
    vocab = target.config.vocab_size
    first = make_prompt(10, 8, vocab)
    second = make_prompt(11, 5, vocab)
    previous = None
    for step, prompt in enumerate([first, second, first, first, "extend", "same_as_output"]):
        if prompt == "extend":
            prompt = torch.cat([previous, make_prompt(12, 4, vocab)], dim=1)
        elif prompt == "same_as_output":
            prompt = previous
        expected = generate(target, prompt, max_new_tokens=12)
        oracle = Oracle(expected, vocab, corrupt_rate=0.3, seed=step)
        if recorder is not None:
            recorder.oracle = oracle
            actual = generate(target, prompt, draft, path, max_new_tokens=12)
        else:
            with rigged_path_b(target, draft, oracle):
                actual = generate(target, prompt, draft, path, max_new_tokens=12)
        assert_greedy_equal(target, expected, actual, prompt.shape[1])
        previous = actual
    if recorder is not None:
        # every block was drafted from exactly the context a fresh draft would rebuild from scratch
        assert_blocks_match_full_recompute(target, draft, recorder)


@pytest.mark.parametrize("prompt_length", [1, 2, 9])
def test_the_same_prompt_twice_on_one_bound_draft(prompt_length):
    """In the second call the draft's context cache runs one position past the new context [0, L - 1)."""
    target = tiny_llama()
    draft = make_draft(target, "markov")
    recorder = PathARecorder.of(draft)
    prompt = make_prompt(13, prompt_length, target.config.vocab_size)
    expected = generate(target, prompt, max_new_tokens=3)
    for _ in range(3):
        assert_greedy_equal(target, expected, generate(target, prompt, draft, max_new_tokens=3), prompt_length)
    assert_blocks_match_full_recompute(target, draft, recorder)


@pytest.mark.parametrize(
    ("target_name", "sample_from_anchor"),
    [
        param("llama", True, fast=True, id="llama-anchor"),
        param("qwen3", False, fast=True, id="qwen3-dflash_slots"),
        param("llama", False, fast=False, id="llama-dflash_slots"),
        param("qwen3", True, fast=False, id="qwen3-anchor"),
    ],
)
def test_captured_features_equal_a_full_recompute(target_name, sample_from_anchor, monkeypatch):
    target = TARGETS[target_name]()
    draft = make_draft(target, "markov_confidence", sample_from_anchor)
    taken = []
    original_take = CapturedFeatures.take

    def take(self, begin, end, input_ids):
        features = original_take(self, begin, end, input_ids)
        taken.append((begin, end, input_ids.clone(), None if features is None else features.clone()))
        return features

    monkeypatch.setattr(CapturedFeatures, "take", take)
    prompt = make_prompt(14, 10, target.config.vocab_size)
    expected = plain_greedy(target_name, 14, 10, LONG)
    actual, forwards, recorder = run_rigged(target, draft, prompt, expected, "A", 0.3, max_new_tokens=LONG)
    assert_greedy_equal(target, expected, actual, prompt.shape[1])

    # every round after the first took exactly the new context [cached, L - 1) from the last verification forward
    used = [(begin, end, ids, features) for begin, end, ids, features in taken if features is not None]
    assert len(used) == len(taken) == len(recorder.rounds) - 1, "a capture did not line up: features were recomputed"
    # one verification forward per round, plus one plain forward when a single token was left to generate
    assert len(recorder.rounds) <= forwards <= len(recorder.rounds) + 1, "the target ran extra forwards"
    covered = 0
    with torch.no_grad():
        for begin, end, ids, features in used:
            assert begin == covered and end == ids.shape[1] - 1
            reference = draft.recompute_target_features(target, ids[:, :end])[:, begin:end]
            torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-4)
            covered = end
    # at the last round the draft's context cache holds exactly positions [0, L - 1)
    last_length = recorder.rounds[-1][0]
    assert draft._cached_ids.shape[1] == last_length - 1 == draft._draft_cache.get_seq_length()
    assert torch.equal(draft._cached_ids, actual[:, : last_length - 1])
    assert_blocks_match_full_recompute(target, draft, recorder)

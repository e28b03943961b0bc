"""One demo request: the same prompt decoded speculatively (streamed round by round), then plainly, then compared.

The two runs take turns rather than run at once, so each is timed alone on the same hardware and the speedup is
measured on the same prompt in the same session. The speculative run is the package's own loop
(`speculative_generate` with `on_round`); the plain run is the target's own `generate`. Nothing here imports gradio:
the handlers yield plain data (`DemoUpdate`) that the page renders, so they can be tested without a browser.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace

import torch
from transformers.generation.streamers import BaseStreamer

from ..speculative import RoundEvent, SpeculativeOutput, speculative_generate
from .background import stream_in_background
from .rounds_html import RoundView

CHAT = "chat"
RAW = "raw"
MODES = (CHAT, RAW)


class DemoInputError(ValueError):
    """A request the demo refuses; the message is meant for the person who sent it."""


@dataclass(frozen=True)
class DemoLimits:
    """Per-request caps, so one user cannot occupy the (single, queued) worker for long."""

    max_prompt_tokens: int = 512
    max_new_tokens: int = 256


@dataclass(frozen=True)
class GenerationSettings:
    mode: str = CHAT
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class RunStats:
    """Live numbers of one run; `seconds` is the time from its start to its latest token (to its end once done)."""

    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0  # draft-verify rounds (speculative only)
    round_tokens: int = 0  # tokens emitted by those rounds (the first token comes from the prompt pass)
    done: bool = False

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None

    @property
    def acceptance_length(self) -> float | None:
        """Tokens per round, the target's own token included: the loop's `mean_acceptance_length`."""
        return self.round_tokens / self.rounds if self.rounds else None


@dataclass(frozen=True)
class Comparison:
    speedup: float | None  # speculative tokens/s over plain tokens/s
    identical: bool | None  # greedy only: did both runs produce the same tokens


@dataclass
class DemoUpdate:
    """Everything the page shows at one moment; `phase` is `speculative`, `plain` or `done`."""

    phase: str
    speculative: RunStats
    speculative_html: str
    speculative_text: str
    plain: RunStats
    plain_text: str
    speculative_tokens: list[int] = field(default_factory=list)
    plain_tokens: list[int] = field(default_factory=list)
    speculative_loop_stats: dict = field(default_factory=dict)  # the loop's own statistics, once it has finished
    comparison: Comparison | None = None
    notices: list[str] = field(default_factory=list)  # warnings for the user, on the first update only

    def snapshot(self) -> DemoUpdate:
        """A copy that later progress does not change (the handler keeps updating its own)."""
        return replace(
            self,
            speculative=replace(self.speculative),
            plain=replace(self.plain),
            speculative_tokens=list(self.speculative_tokens),
            plain_tokens=list(self.plain_tokens),
            speculative_loop_stats=dict(self.speculative_loop_stats),
            notices=list(self.notices),
        )


class _PlainTokenForwarder(BaseStreamer):
    """Hands each token `generate` produces to `emit`, with the time since `started`."""

    def __init__(self, emit, started: float):
        self.emit = emit
        self.started = started
        self.saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.saw_prompt:  # generate() first hands over the prompt
            self.saw_prompt = True
            return
        self.emit((time.perf_counter() - self.started, value.flatten().tolist()))

    def end(self) -> None:
        pass


class DemoSession:
    """A loaded target + draft and the limits every request is held to."""

    def __init__(self, target, tokenizer, draft, limits: DemoLimits | None = None):
        if tokenizer is None:
            raise ValueError("dspark demo: the target has no tokenizer; give a target path that ships one.")
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.limits = limits or DemoLimits()

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    def prompt_ids(self, prompt: str, mode: str) -> torch.Tensor:
        """[1, P] ids: the chat template around one user message, or the raw text to continue."""
        if mode == CHAT:
            if not self.has_chat_template:
                raise DemoInputError("This target has no chat template; switch to raw mode.")
            from ..targets import chat_prompt

            ids = chat_prompt(self.tokenizer, prompt)
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        return ids.to(self.target.device)

    def check(self, prompt: str, settings: GenerationSettings) -> tuple[torch.Tensor, list[str]]:
        """The prompt's ids and any warnings; raises `DemoInputError` for a request the demo refuses."""
        if not prompt or not prompt.strip():
            raise DemoInputError("Type a prompt first.")
        if settings.mode not in MODES:
            raise DemoInputError(f"Unknown mode {settings.mode!r}; use one of {', '.join(MODES)}.")
        if not 1 <= settings.max_new_tokens <= self.limits.max_new_tokens:
            raise DemoInputError(
                f"Max new tokens must be between 1 and {self.limits.max_new_tokens} in this demo "
                f"(asked for {settings.max_new_tokens})."
            )
        if settings.temperature < 0:
            raise DemoInputError("Temperature must be >= 0 (0 = greedy).")
        if not 0 < settings.top_p <= 1:
            raise DemoInputError("Top-p must be in (0, 1].")
        ids = self.prompt_ids(prompt, settings.mode)
        if ids.shape[1] > self.limits.max_prompt_tokens:
            raise DemoInputError(
                f"The prompt is {ids.shape[1]} tokens long; this demo accepts at most {self.limits.max_prompt_tokens}. "
                "Please shorten it."
            )
        notices = []
        if settings.greedy and settings.top_p < 1:
            notices.append("Top-p only applies when sampling (temperature > 0); greedy decoding ignores it.")
        return ids, notices

    def compare(self, prompt: str, settings: GenerationSettings) -> Iterator[DemoUpdate]:
        """Stream the speculative run, then the plain run, then the comparison, as a sequence of `DemoUpdate`s."""
        ids, notices = self.check(prompt, settings)
        view = RoundView(self.tokenizer)
        update = DemoUpdate(
            phase="speculative",
            speculative=RunStats(),
            speculative_html=view.html(),
            speculative_text="",
            plain=RunStats(),
            plain_text="",
            notices=notices,
        )
        yield update.snapshot()  # clears the page at once, and carries the warnings
        update.notices = []
        yield from self._speculative_run(ids, settings, view, update)
        update.phase = "plain"
        yield from self._plain_run(ids, settings, update)
        speculative_rate = update.speculative.tokens_per_second
        plain_rate = update.plain.tokens_per_second
        update.comparison = Comparison(
            speedup=speculative_rate / plain_rate if speculative_rate and plain_rate else None,
            identical=update.speculative_tokens == update.plain_tokens if settings.greedy else None,
        )
        update.phase = "done"
        yield update.snapshot()

    def _speculative_run(
        self, ids: torch.Tensor, settings: GenerationSettings, view: RoundView, update: DemoUpdate
    ) -> Generator[DemoUpdate, None, None]:
        stats = update.speculative

        def work(emit) -> tuple[SpeculativeOutput, float]:
            torch.manual_seed(settings.seed)
            started = time.perf_counter()
            output = speculative_generate(
                self.target,
                self.draft,
                ids,
                max_new_tokens=settings.max_new_tokens,
                return_stats=True,
                on_round=lambda event: emit((time.perf_counter() - started, event)),
                **self._loop_sampling(settings),
            )
            return output, time.perf_counter() - started

        batches = stream_in_background(work)
        while True:
            try:
                batch: list[tuple[float, RoundEvent]] = next(batches)
            except StopIteration as finished:
                output, seconds = finished.value
                break
            for elapsed, event in batch:
                view.add(event)
                update.speculative_tokens.extend(event.emitted)
                stats.tokens += len(event.emitted)
                stats.seconds = elapsed
                if not event.first:
                    stats.rounds += 1
                    stats.round_tokens += len(event.emitted)
            update.speculative_html = view.html()
            update.speculative_text = self.decode(update.speculative_tokens)
            yield update.snapshot()
        update.speculative_tokens = output.generated[0]
        update.speculative_text = self.decode(update.speculative_tokens)
        update.speculative = replace(stats, tokens=len(output.generated[0]), seconds=seconds, done=True)
        update.speculative_loop_stats = output.stats

    def _plain_run(
        self, ids: torch.Tensor, settings: GenerationSettings, update: DemoUpdate
    ) -> Generator[DemoUpdate, None, None]:
        # In a worker thread like the speculative run: both are then timed under the same threading (CPU thread
        # pools are per calling thread, and an oversubscribed machine treats them differently).
        def work(emit) -> tuple[list[int], float]:
            torch.manual_seed(settings.seed)
            started = time.perf_counter()
            sequences = self.target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=settings.max_new_tokens,
                streamer=_PlainTokenForwarder(emit, started),
                **self._generate_sampling(settings),
            )
            return sequences[0, ids.shape[1] :].tolist(), time.perf_counter() - started

        batches = stream_in_background(work)
        while True:
            try:
                batch: list[tuple[float, list[int]]] = next(batches)
            except StopIteration as finished:
                tokens, seconds = finished.value
                break
            for elapsed, new_tokens in batch:
                update.plain_tokens.extend(new_tokens)
                update.plain.tokens += len(new_tokens)
                update.plain.seconds = elapsed
            update.plain_text = self.decode(update.plain_tokens)
            yield update.snapshot()
        update.plain_tokens = tokens
        update.plain_text = self.decode(tokens)
        update.plain = RunStats(tokens=len(tokens), seconds=seconds, done=True)

    def decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text.rstrip("\ufffd")  # an incomplete multi-byte character: it completes with the next token

    @staticmethod
    def _loop_sampling(settings: GenerationSettings) -> dict:
        if settings.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}

    @staticmethod
    def _generate_sampling(settings: GenerationSettings) -> dict:
        """The loop's settings for `generate`, with the processors the loop does not apply switched off, so that a
        target's generation config (a top-k, a repetition penalty) cannot make the two runs decode differently."""
        if settings.greedy:
            return {"do_sample": False, "repetition_penalty": 1.0}
        return {
            "do_sample": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": 0,
            "repetition_penalty": 1.0,
        }

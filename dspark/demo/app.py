"""The Gradio page: prompt and settings, plain and speculative decoding side by side, rounds in colour, live numbers.

Gradio is optional (`pip install "dspark[demo]"`); it is imported only when a page is built. One request runs at a
time (`default_concurrency_limit=1`: the runs are timed, and two at once would share the cores) and the queue is
bounded, so a crowd waits or is told the demo is busy instead of slowing everybody down. Errors reach the user as a
short message (`gr.Error`); tracebacks go to the server log only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .. import pair
from .handlers import CHAT, MODES, DemoInputError, DemoLimits, DemoSession, DemoUpdate, GenerationSettings
from .rounds_html import legend_html
from .stats_html import comparison_html, run_stats_html

logger = logging.getLogger(__name__)

EXAMPLES = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Explain photosynthesis in two sentences.",
    "List three tips for a good night's sleep.",
]
DEFAULT_NEW_TOKENS = 64
# Characters, checked in the browser before anything reaches the server; the token limit is checked on the server.
CHARACTERS_PER_TOKEN_ALLOWANCE = 8
ERROR_MESSAGE_CHARACTERS = 300


class GradioMissingError(ImportError):
    """Gradio is not installed."""


def require_gradio():
    try:
        import gradio
    except ImportError as error:
        raise GradioMissingError(
            'The dspark demo needs Gradio 5 or newer: pip install "dspark[demo]" (or pip install "gradio>=5").'
        ) from error
    return gradio


@dataclass(frozen=True)
class PageOptions:
    target_name: str = pair.DEFAULT_TARGET
    draft_name: str = pair.DEFAULT_DRAFT
    max_queue: int = 16  # requests allowed to wait; more are turned away with "queue is full"


def render(update: DemoUpdate) -> tuple[str, str, str, str, str]:
    """(plain text, plain stats, speculative rounds, speculative stats, comparison) for the page's outputs."""
    return (
        update.plain_text,
        run_stats_html(update.plain, speculative=False, started=update.phase != "speculative"),
        update.speculative_html,
        run_stats_html(update.speculative, speculative=True),
        comparison_html(update.comparison, update.speculative, update.plain),
    )


def describe_pair(options: PageOptions, session: DemoSession) -> str:
    target = "SmolLM2-135M-Instruct" if options.target_name == pair.DEFAULT_TARGET else options.target_name
    draft = "dspark default (shipped)" if options.draft_name == pair.DEFAULT_DRAFT else options.draft_name
    device = session.target.device
    return f"Target **{target}**, draft **{draft}**, on `{device}` ({str(session.target.dtype).replace('torch.', '')})."


def build_demo(session: DemoSession, options: PageOptions | None = None):
    """The `gr.Blocks` page for a loaded session, queued (one request at a time, bounded queue)."""
    gr = require_gradio()
    options = options or PageOptions()
    limits = session.limits

    def respond(prompt: str, mode: str, temperature: float, top_p: float, max_new_tokens: float, seed: float):
        settings = GenerationSettings(
            mode=mode,
            temperature=float(temperature),
            top_p=float(top_p),
            max_new_tokens=int(max_new_tokens),
            seed=int(seed or 0),
        )
        try:
            for update in session.compare(prompt, settings):
                for notice in update.notices:
                    gr.Warning(notice)
                yield render(update)
        except DemoInputError as error:
            raise gr.Error(str(error)) from None
        except Exception as error:  # anything else: a short message for the user, the traceback for the log
            logger.exception("dspark demo: generation failed")
            message = f"{type(error).__name__}: {error}"[:ERROR_MESSAGE_CHARACTERS]
            raise gr.Error(f"Generation failed ({message}). Try a shorter prompt or fewer tokens.") from None

    modes = [mode for mode in MODES if mode != CHAT or session.has_chat_template]
    with gr.Blocks(title="DSpark speculative decoding") as demo:
        gr.Markdown(
            "# DSpark speculative decoding\n"
            f"{describe_pair(options, session)} The same prompt is decoded twice, taking turns so each run is timed "
            "alone: speculatively with the draft (each round in colour), then plainly by the target. At temperature "
            "0 both give the same text; the speedup is measured on your prompt, here and now."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=4,
                    max_length=limits.max_prompt_tokens * CHARACTERS_PER_TOKEN_ALLOWANCE,
                    placeholder="Ask something, or (raw mode) give text to continue.",
                    elem_id="prompt",
                )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column(scale=2):
                mode = gr.Radio(
                    modes,
                    value=modes[0],
                    label="Mode",
                    info="chat: the target's chat template around your message; raw: continue the text as is",
                    elem_id="mode",
                )
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature", info="0 = greedy")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", info="used when sampling")
                max_new_tokens = gr.Slider(
                    1,
                    limits.max_new_tokens,
                    value=min(DEFAULT_NEW_TOKENS, limits.max_new_tokens),
                    step=1,
                    label="Max new tokens",
                    elem_id="max-new-tokens",
                )
                seed = gr.Number(value=0, precision=0, label="Seed (sampling)")
        gr.HTML(legend_html())
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("### Plain decoding (target alone)")
                plain_text = gr.Textbox(label="Answer", lines=10, interactive=False, elem_id="plain-output")
                plain_stats = gr.HTML(elem_id="plain-stats")
            with gr.Column():
                gr.Markdown("### Speculative decoding (DSpark draft + target)")
                speculative_view = gr.HTML(elem_id="speculative-output")
                speculative_stats = gr.HTML(elem_id="speculative-stats")
        comparison = gr.HTML(comparison_html(None), elem_id="comparison")
        gr.Examples(EXAMPLES, inputs=[prompt])

        event = generate.click(
            respond,
            inputs=[prompt, mode, temperature, top_p, max_new_tokens, seed],
            outputs=[plain_text, plain_stats, speculative_view, speculative_stats, comparison],
        )
        stop.click(None, cancels=[event])
    return demo.queue(default_concurrency_limit=1, max_size=options.max_queue)


def demo_from_environment():
    """The page for a Hugging Face Space (or `python demo/app.py`), configured by environment variables."""
    environment = os.environ.get
    options = PageOptions(
        target_name=environment("DSPARK_DEMO_TARGET", pair.DEFAULT_TARGET),
        draft_name=environment("DSPARK_DEMO_DRAFT", pair.DEFAULT_DRAFT),
        max_queue=int(environment("DSPARK_DEMO_MAX_QUEUE", "16")),
    )
    limits = DemoLimits(
        max_prompt_tokens=int(environment("DSPARK_DEMO_MAX_PROMPT_TOKENS", str(DemoLimits.max_prompt_tokens))),
        max_new_tokens=int(environment("DSPARK_DEMO_MAX_NEW_TOKENS", str(DemoLimits.max_new_tokens))),
    )
    from .models import load_session

    require_gradio()  # before minutes of model loading
    session = load_session(
        options.target_name,
        options.draft_name,
        device=environment("DSPARK_DEMO_DEVICE", "cpu"),
        dtype=environment("DSPARK_DEMO_DTYPE", "auto"),
        limits=limits,
    )
    return build_demo(session, options)

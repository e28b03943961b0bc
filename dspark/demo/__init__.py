"""The Gradio demo: plain decoding and DSpark speculative decoding side by side, each round shown in colour.

`handlers` streams both runs for one prompt (no gradio needed, so it is testable without a browser; `background`
turns the loop's callbacks into a stream), `rounds_html` and `stats_html` turn what the loop reports into HTML,
`models` loads and warms up a target + draft, `app` builds the Gradio page, and `command` is `dspark demo`. The
Hugging Face Space entry point is `demo/app.py` at the repository root.
"""

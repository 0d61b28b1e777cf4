"""The chat page of ``python -m chatstream_asgi serve``, driven in headless Chromium.

Needs Debian's ``chromium`` package (``apt-get install chromium``: ``/usr/bin/chromium``) and the
``playwright`` Python package; Playwright's own browser download is never used. Screenshots go to
``artifacts/screenshots/`` (gitignored).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from servers import Server, free_port

from chatstream_asgi.web.app import PAGE_CSP

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
WATCHDOG_MS = 15_000

if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium: install Debian's chromium package", allow_module_level=True)
pytest.importorskip("playwright", reason="the browser tests drive Chromium through the playwright package")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def serve(*options: str) -> Server:
    """The CLI server with the mock engine, ready."""
    port = free_port()
    command = [sys.executable, "-m", "chatstream_asgi", "serve", "--engine", "mock", "--port", str(port), *options]
    server = Server(command, port, {})
    try:
        server.wait_ready("/get_load")
    except BaseException:
        server.stop()
        raise
    return server


def completions(url: str, state: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf'^chatstream_completions_total{{state="{state}"}} (\S+)$', text, re.MULTILINE)
    assert match, text
    return float(match[1])


def wait_completions(url: str, state: str, count: int) -> None:
    """Poll ``/metrics`` until ``state`` was counted ``count`` times (fails after the watchdog)."""
    deadline = time.monotonic() + WATCHDOG_MS / 1000
    while (seen := completions(url, state)) < count:
        assert time.monotonic() < deadline, f"{state}: {seen} after the watchdog, expected {count}"
        time.sleep(0.05)
    assert seen == count


def reply_text(page: Page) -> str:
    return page.locator(".msg.assistant").last.text_content() or ""


def wait_reply_grows(page: Page, beyond: int = 0) -> int:
    """Wait until the last reply is longer than ``beyond`` characters; its length."""
    page.wait_for_function(
        "n => { const r = document.querySelectorAll('.msg.assistant'); return r.length && r[r.length - 1]"
        ".textContent.length > n; }",
        arg=beyond,
        timeout=WATCHDOG_MS,
    )
    return len(reply_text(page))


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_stream_stop_queue_and_busy(browser: Browser) -> None:
    """Tokens stream in; a second tab waits in line; a third is told politely the server is busy;
    Stop aborts the fetch and the server records the client leaving mid-stream."""
    server = serve(
        "--mock-type", "long", "--mock-time-per-token", "0.05", "--max-new-tokens", "400",
        "--concurrency", "1", "--queue", "1",
    )  # fmt: skip
    contexts = [browser.new_context() for _ in range(3)]  # three visitors, three sessions
    try:
        first, second, third = (context.new_page() for context in contexts)
        for page in (first, second, third):
            page.goto(server.url + "/")
        assert first.title() == "chatstream-asgi"

        send(first, "Tell me a story")
        first.wait_for_selector(".msg.user >> text=Tell me a story")
        length = wait_reply_grows(first)
        wait_reply_grows(first, length)  # it keeps growing: the reply streams
        assert first.is_enabled("#stop") and first.is_disabled("#send")

        send(second, "Me next")
        second.wait_for_selector("#status >> text=/number 1 in line/", timeout=WATCHDOG_MS)

        send(third, "And me")
        third.wait_for_selector("#status >> text=/server is busy right now/", timeout=WATCHDOG_MS)
        assert third.input_value("#input") == "And me"  # kept for another try
        assert third.locator(".msg").count() == 0
        screenshot(first, "streaming")
        screenshot(second, "queued")
        screenshot(third, "busy")

        first.click("#stop")
        first.wait_for_selector(".msg.assistant.stopped", timeout=WATCHDOG_MS)
        assert first.text_content("#status") == "Stopped."
        assert first.is_enabled("#send") and first.is_disabled("#stop")
        wait_completions(server.url, "client_disconnected_while_streaming", 1)

        wait_reply_grows(second)  # the freed slot went to the waiting tab
        second.click("#stop")
        wait_completions(server.url, "client_disconnected_while_streaming", 2)
        assert completions(server.url, "success") == 0
        screenshot(first, "stopped")
    finally:
        for context in contexts:
            context.close()
        server.stop()


def test_multi_round_regenerate_and_clear(browser: Browser) -> None:
    """Two rounds in one session, Regenerate replaces the last reply, Clear forgets the conversation."""
    server = serve("--mock-type", "round", "--mock-time-per-token", "0.005")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url + "/")
        assert page.is_disabled("#regenerate")

        send(page, "Hello")
        page.wait_for_selector("#send:enabled", timeout=WATCHDOG_MS)
        send(page, "How are you?")
        page.wait_for_selector(".msg.assistant >> nth=1", timeout=WATCHDOG_MS)
        page.wait_for_selector("#send:enabled", timeout=WATCHDOG_MS)
        replies = page.locator(".msg.assistant").all_text_contents()
        assert len(replies) == 2 and all(replies) and replies[0] != replies[1]

        page.click("#regenerate")
        page.wait_for_function(
            "old => { const r = document.querySelectorAll('.msg.assistant'); return !document.querySelector"
            "('#send').disabled && r[r.length - 1].textContent && r[r.length - 1].textContent !== old; }",
            arg=replies[1],
            timeout=WATCHDOG_MS,
        )
        assert page.locator(".msg.assistant").count() == 2
        regenerated = reply_text(page)
        prompt = page.evaluate("fetch('get_prompt').then(r => r.json())")
        assert [(m["role"], m["content"]) for m in prompt["messages"]] == [
            ("user", "Hello"),
            ("assistant", replies[0]),
            ("user", "How are you?"),
            ("assistant", regenerated),
        ]
        screenshot(page, "regenerated")

        page.click("#clear")
        page.wait_for_selector("#status >> text=Conversation cleared.", timeout=WATCHDOG_MS)
        assert page.locator(".msg").count() == 0
        assert page.is_disabled("#regenerate")
        assert page.evaluate("fetch('get_prompt').then(r => r.json())")["messages"] == []
        assert completions(server.url, "success") == 3
    finally:
        context.close()
        server.stop()


def test_page_needs_nothing_from_elsewhere() -> None:
    """The page and its script come from the server itself, under a same-origin content policy."""
    server = serve()
    try:
        page = httpx.get(server.url + "/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == PAGE_CSP
        assert "default-src 'self'" in PAGE_CSP and "unsafe" not in PAGE_CSP
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
        assert "<style" not in page.text and " style=" not in page.text  # no inline style: the CSP would block it
        script = httpx.get(server.url + "/static/chatstream.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert httpx.get(server.url + "/static/chatstream.css").headers["content-type"].startswith("text/css")
    finally:
        server.stop()


def load_label(page: Page, pattern: str) -> str:
    """Wait until the load gauges' accessible label matches ``pattern``; the label."""
    page.wait_for_function(
        "p => new RegExp(p).test(document.getElementById('load').getAttribute('aria-label'))",
        arg=pattern,
        timeout=WATCHDOG_MS,
    )
    return page.get_attribute("#load", "aria-label") or ""


def test_model_hint_and_load_gauges(browser: Browser) -> None:
    """An empty page names the model and offers a hint and suggestions; the gauges follow the server's load:
    streams running, the queue, and tokens/s while a reply streams; Clear brings the hint back."""
    server = serve(
        "--mock-type", "long", "--mock-time-per-token", "0.02", "--max-new-tokens", "400",
        "--concurrency", "2", "--queue", "2",
    )  # fmt: skip
    contexts = [browser.new_context(viewport={"width": 1000, "height": 640}) for _ in range(3)]
    try:
        first, second, third = (context.new_page() for context in contexts)
        for page in (first, second, third):
            page.goto(server.url + "/")
        first.wait_for_selector("#model >> text=mock", timeout=WATCHDOG_MS)
        assert first.is_visible("#hint")
        assert first.text_content("#hint-model") == "mock"
        assert "press Enter" in (first.text_content("#hint") or "")
        assert load_label(first, "0 of 2 streams, 0 of 2 waiting, 0 tokens/s") == (
            "Server load: 0 of 2 streams, 0 of 2 waiting, 0 tokens/s"
        )
        assert first.get_attribute("[data-gauge=streams] .arc", "stroke-dasharray") == "0.0 100"
        screenshot(first, "empty")

        first.click(".suggestions button >> text=What is the capital of France?")
        first.wait_for_selector(".msg.user >> text=What is the capital of France?")
        assert first.is_hidden("#hint")
        wait_reply_grows(first)
        label = load_label(first, r"1 of 2 streams, 0 of 2 waiting, [1-9]\d* tokens/s")
        assert int(label.split(", ")[-1].split()[0]) > 0
        assert first.get_attribute("[data-gauge=streams] .arc", "stroke-dasharray") == "50.0 100"

        send(second, "Me too")
        wait_reply_grows(second)
        send(third, "And me")
        third.wait_for_selector("#status >> text=/number 1 in line/", timeout=WATCHDOG_MS)
        load_label(first, "2 of 2 streams, 1 of 2 waiting")
        assert "full" in (first.get_attribute("[data-gauge=streams] .arc", "class") or "")
        assert first.get_attribute("[data-gauge=queue] .arc", "stroke-dasharray") == "50.0 100"
        assert first.locator("#rate-line").get_attribute("points")
        screenshot(first, "load")

        for page in (first, second, third):
            page.click("#stop")
        first.click("#clear")
        first.wait_for_selector("#hint", state="visible", timeout=WATCHDOG_MS)
        load_label(first, "0 of 2 streams, 0 of 2 waiting")
        screenshot(first, "cleared")
    finally:
        for context in contexts:
            context.close()
        server.stop()

"""The browser chat page (``rtagent/server/static``), driven in a real headless Chromium by Playwright.

A real uvicorn server runs on a loopback port in a thread, with a scripted model, so the page sees
exactly the frames a person's browser would. Debian's ``chromium`` is the browser (``playwright
install`` downloads builds of its own, which this project cannot); ``scripts/system-deps`` installs
it. Screenshots land in ``artifacts/`` for a person to look at.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from agents import Agent, GuardrailFunctionOutput, RunContextWrapper, function_tool, input_guardrail
from agents.tool import FunctionTool
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

import rtagent
from rtagent._history import NOT_ANSWERED
from rtagent.server._app import create_app
from rtagent.server._websocket import WebSocketProtocol
from rtagent.testing import ScriptedModel, Step, call, reply, tool_calls

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000  # generous: a loaded CI machine may be slow, and every wait ends on a condition
LONG_REPLY = " ".join(f"word{i}" for i in range(400))  # 20 s at 50 ms a word: Stop always comes first
ATLAS = "Paris: 2,102,650 inhabitants (2023 census), 105.4 km², 20 arrondissements."
MARKDOWN_REPLY = (
    "The **2.1 million** figure is the city proper; the metro area has about 12 million.\n\n"
    "```\ndensity = 2_102_650 / 105.4  # ≈ 19,950 per km²\n```\n"
    "Use `lookup` again for any other city."
)
TICKED = re.compile(r"^(0\.[3-9]|[1-9]\d*\.\d)s$")  # an elapsed time of 0.3 s or more
HOSTILE = "Look: <img src=x onerror=window.__pwned=1> and <script>window.__pwned=1</script> done."


def find_chromium() -> str | None:
    """Debian's chromium, installed by ``scripts/system-deps`` when missing and we may."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run([ROOT / "scripts" / "system-deps"], check=False, timeout=600)
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else None


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        pytest.skip(f"no {CHROMIUM}, and scripts/system-deps could not install it (it needs root and apt)")
    browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
    yield browser
    browser.close()


@contextmanager
def serving(
    steps: Sequence[Step], tools: Sequence[FunctionTool], db: Path, token: str | None = None, **agent: Any
) -> Iterator[tuple[str, ScriptedModel]]:
    """uvicorn on a random loopback port, in a thread: the sync Playwright API owns the test's thread.
    ``agent``: more of the agent's fields (handoffs, guardrails); the one model runs every agent."""
    model = ScriptedModel(steps)
    helper = Agent(name="helper", tools=list(tools), **agent)
    app = create_app(helper, model=model, db_path=db, token=token)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", ws=WebSocketProtocol, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/", model
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition()``: it watches another thread's state, which has no event to wait on."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def console_errors() -> list[str]:
    """The page's script errors and console errors (a CSP violation is one): it must run clean."""
    return []


@pytest.fixture
def page(browser: Browser, console_errors: list[str]) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    assert console_errors == []


def gated_lookup(gate: threading.Event) -> FunctionTool:
    @function_tool
    async def lookup(query: str) -> str:
        """Look a city up."""
        rtagent.progress("searching the atlas", 0.4)
        await asyncio.to_thread(gate.wait, 30)  # runs until the test has seen it running
        return ATLAS

    return lookup


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def test_a_reply_streams_shows_its_tool_stops_and_reloads(page: Page, tmp_path: Path) -> None:
    gate = threading.Event()
    steps = [
        tool_calls(call("lookup", {"query": "Paris"})),
        reply(LONG_REPLY, delay=0.05),
        reply(MARKDOWN_REPLY, delay=0.005),
    ]
    try:
        with serving(steps, [gated_lookup(gate)], tmp_path / "threads.db") as (url, model):
            page.goto(url)
            expect(page.locator("#status")).to_have_text("online")
            send(page, "How big is Paris?")
            expect(page.locator(".msg.user")).to_have_text("How big is Paris?")
            expect(page.locator("#stop")).to_be_visible()

            # The tool shows while it runs: its name, its progress, and elapsed seconds that tick.
            tool = page.locator(".tool.running")
            expect(tool).to_contain_text("using lookup…")
            expect(tool).to_contain_text("searching the atlas")
            expect(tool.locator("progress")).to_have_attribute("value", "0.4")
            expect(tool.locator(".tool-meta")).to_have_text(TICKED)
            screenshot(page, "page-tool-running.png")
            gate.set()
            done = page.locator(".tool.done")
            expect(done).to_contain_text("lookup")
            expect(done.locator(".tool-out")).to_have_text(ATLAS)
            expect(done.locator(".tool-meta")).to_have_text(re.compile(r"^\d+\.\d+s$"))

            # Text streams: part of the reply is on screen while the rest is still to come.
            text = page.locator(".turn .text").first
            expect(text).to_contain_text("word5 ")
            partial = text.text_content() or ""
            assert LONG_REPLY.startswith(partial)
            assert len(partial) < len(LONG_REPLY)
            expect(page.locator("#stop")).to_be_visible()
            expect(page.locator("#input")).to_be_editable()  # a new message may interrupt the reply

            page.locator("#stop").click()
            expect(page.locator(".turn .badge.interrupted")).to_be_visible()
            expect(page.locator("#stop")).to_be_hidden()
            wait_for(lambda: model.streams[-1].outcome == "closed")  # the model stopped generating
            seen = text.text_content() or ""
            assert LONG_REPLY.startswith(seen)
            assert len(seen) < len(LONG_REPLY)

            send(page, "And the density?")
            expect(page.locator(".turn").nth(1).locator("strong")).to_have_text("2.1 million")
            expect(page.locator("#stop")).to_be_hidden()
            expect(text).to_have_text(seen)  # a whole later reply on, the cut one has not grown

            # A reload draws the conversation from the server: the cut reply, marked, and the tool.
            page.reload()
            expect(page.locator(".msg.user")).to_have_count(2)
            first = page.locator(".turn").first
            expect(first.locator(".tool")).to_contain_text(ATLAS)
            expect(first.locator(".text")).to_have_text(seen)
            expect(first.locator(".badge.interrupted")).to_be_visible()
            expect(page.locator(".turn").nth(1).locator("pre")).to_contain_text("density = 2_102_650")
            screenshot(page, "page-desktop.png")
            page.set_viewport_size({"width": 375, "height": 740})
            screenshot(page, "page-mobile.png")
    finally:
        gate.set()  # a failed test must not leave the tool's thread waiting


def test_a_cached_tool_result_says_cached_instead_of_its_time(page: Page, tmp_path: Path) -> None:
    @function_tool
    async def lookup(query: str) -> str:
        """Look a city up."""
        return ATLAS

    rtagent.configure_cache()
    ask = [tool_calls(call("lookup", {"query": "Paris"})), reply("Paris is big.")]
    with serving(ask * 2, [rtagent.cached(lookup)], tmp_path / "threads.db") as (url, _):
        page.goto(url)
        expect(page.locator("#status")).to_have_text("online")
        send(page, "How big is Paris?")
        ran = page.locator(".tool.done").nth(0)
        expect(ran.locator(".tool-meta")).to_have_text(re.compile(r"^\d+\.\d+s$"))
        expect(page.locator("#stop")).to_be_hidden()
        send(page, "How big is Paris, again?")
        cached = page.locator(".tool.done").nth(1)
        expect(cached.locator(".tool-meta")).to_have_text("cached")
        expect(cached.locator(".tool-out")).to_have_text(ATLAS)
        screenshot(page, "page-tool-cached.png")


def test_a_reload_mid_reply_shows_the_text_so_far_and_the_reply_goes_on_live(
    page: Page, tmp_path: Path
) -> None:
    words = " ".join(f"word{i}" for i in range(120))  # 6 s at 50 ms a word
    with serving([reply(words, delay=0.05)], [], tmp_path / "threads.db") as (url, model):
        page.goto(url)
        expect(page.locator("#status")).to_have_text("online")
        send(page, "Tell me a long story.")
        text = page.locator(".turn .text").first
        expect(text).to_contain_text("word10 ")
        page.reload()
        # At once: the question, and the reply up to where it had got (replayed from the run log).
        expect(page.locator(".msg.user")).to_have_text("Tell me a long story.")
        expect(text).to_contain_text("word10 ", timeout=2_000)
        shown = text.text_content() or ""
        assert words.startswith(shown)
        during = model.streams[-1].outcome
        assert during == "streaming", "the reload must not have cut the reply"
        expect(page.locator("#stop")).to_be_visible()
        screenshot(page, "page-reloaded-mid-reply.png")
        # Then it goes on, live, to its end: uncut, nothing twice.
        expect(text).to_have_text(words, timeout=TIMEOUT_MS)
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator(".turn .badge.interrupted")).to_have_count(0)
        expect(page.locator(".turn")).to_have_count(1)
        assert model.streams[-1].outcome == "completed"


def test_model_output_is_shown_as_text_and_never_runs(page: Page, tmp_path: Path) -> None:
    with serving([reply(HOSTILE, delay=0.005)], [], tmp_path / "threads.db") as (url, _):
        page.goto(url)
        expect(page.locator("#status")).to_have_text("online")
        # Shift+Enter adds a line, Enter sends.
        page.locator("#input").type("first line")
        page.locator("#input").press("Shift+Enter")
        page.locator("#input").type("second line")
        page.locator("#input").press("Enter")
        expect(page.locator(".msg.user")).to_have_text("first line\nsecond line")
        expect(page.locator("#input")).to_have_value("")

        for seen in ("live", "reloaded"):
            if seen == "reloaded":
                # Not after the last check: a reload racing the server's shutdown logs a
                # connection error in the page, which the console check would blame on it.
                page.reload()
            reply_text = page.locator(".turn .text").first
            expect(reply_text).to_have_text(HOSTILE)
            assert page.locator(".turn img, .turn script").count() == 0
            assert page.evaluate("typeof window.__pwned") == "undefined"


def test_a_new_conversation_and_a_dropped_socket(page: Page, tmp_path: Path) -> None:
    with serving([reply("first answer"), reply("second answer")], [], tmp_path / "threads.db") as (url, _):
        page.goto(url)
        expect(page.locator("#status")).to_have_text("online")
        send(page, "hello")
        expect(page.locator(".turn .text")).to_have_text("first answer")
        old = page.evaluate("localStorage.getItem('rtagent.thread')")

        page.locator("#new").click()
        expect(page.locator(".msg")).to_have_count(0)
        expect(page.locator("#empty")).to_be_visible()
        assert page.evaluate("localStorage.getItem('rtagent.thread')") is None

        # The page reconnects by itself when its socket drops, and keeps working.
        page.evaluate("socket.close()")
        expect(page.locator("#status")).to_have_text("reconnecting…")
        expect(page.locator("#status")).to_have_text("online")
        send(page, "still there?")
        expect(page.locator(".turn .text")).to_have_text("second answer")
        assert page.evaluate("localStorage.getItem('rtagent.thread')") not in (None, old)


def test_a_server_with_a_token_asks_for_it_once(
    page: Page, console_errors: list[str], tmp_path: Path
) -> None:
    with serving([reply("one"), reply("two")], [], tmp_path / "threads.db", token="s3cret") as (url, _):
        page.goto(url)  # its socket is refused, and the page asks for the token
        page.locator("#token").fill("s3cret")
        page.locator("#token").press("Enter")
        expect(page.locator("#status")).to_have_text("online")
        send(page, "hi")
        expect(page.locator(".turn .text")).to_have_text("one")
        page.reload()  # the token is remembered
        expect(page.locator(".turn .text")).to_have_text("one")
        expect(page.locator("#token-dialog")).to_be_hidden()
        # The browser logs the refusals the page answered with its dialog, and only those.
        assert console_errors
        refusals = ("401", "Authentication failed")
        assert all(any(r in error for r in refusals) for error in console_errors), console_errors
        console_errors.clear()


def gated_refund(gate: threading.Event, refunds: list[str]) -> FunctionTool:
    @function_tool(needs_approval=True)
    async def refund(order: str) -> str:
        """Refund an order."""
        await asyncio.to_thread(gate.wait, 30)  # runs until the test has seen it running
        refunds.append(order)
        return f"refunded order {order}"

    return refund


def test_a_call_waits_for_approval_and_approve_runs_it_once_reject_never(page: Page, tmp_path: Path) -> None:
    gate, refunds = threading.Event(), list[str]()
    steps = [
        tool_calls(call("refund", {"order": "42"}), text="Let me refund that. "),
        reply("Refunded order 42.", delay=0.005),
        tool_calls(call("refund", {"order": "7"})),
        reply("OK, order 7 stays as it is.", delay=0.005),
    ]
    try:
        with serving(steps, [gated_refund(gate, refunds)], tmp_path / "threads.db") as (url, model):
            page.goto(url)
            expect(page.locator("#status")).to_have_text("online")
            send(page, "Refund order 42.")
            card = page.locator(".tool")
            expect(card).to_have_class("tool waiting")
            expect(card.locator(".tool-out")).to_have_text("waiting for approval")
            expect(page.locator("#stop")).to_be_hidden()  # the run has ended, paused

            # The server still knows the run is paused: a reload asks again, on the same card.
            page.reload()
            expect(card.locator(".tool-label")).to_have_text("refund")
            expect(card.locator(".tool-body pre")).to_have_text('{\n  "order": "42"\n}')
            group = card.get_by_role("group", name='Approve refund({"order":"42"})?')
            approve = group.get_by_role("button", name="Approve")
            expect(approve).to_be_visible()
            expect(group.get_by_role("button", name="Reject")).to_be_visible()
            screenshot(page, "page-approval-waiting.png")

            # By keyboard: Tab goes from the header through the card's line to Approve; Enter presses it.
            page.locator("#new").focus()
            page.keyboard.press("Tab")
            page.keyboard.press("Tab")
            expect(approve).to_be_focused()
            page.keyboard.press("Enter")
            expect(card).to_have_class("tool running")  # the same card runs it, not a second one
            expect(card.locator(".tool-label")).to_have_text("using refund…")
            expect(card.locator(".badge")).to_have_text("approved")
            expect(page.locator(".tool")).to_have_count(1)
            expect(card.locator(".approve")).to_be_disabled()
            expect(card.locator("button:enabled")).to_have_count(0)
            gate.set()
            expect(card).to_have_class("tool done")
            expect(card.locator(".tool-out")).to_have_text("refunded order 42")
            expect(card.locator(".badge")).to_have_text("approved")
            expect(page.locator(".turn .text").last).to_have_text("Refunded order 42.")
            expect(page.locator("#stop")).to_be_hidden()
            assert refunds == ["42"]
            screenshot(page, "page-approval-approved.png")

            send(page, "Refund order 7 as well.")
            waiting = page.locator(".tool.waiting")
            waiting.get_by_role("button", name="Reject").click()
            rejected = page.locator(".tool.rejected")
            expect(rejected.locator(".tool-out")).to_have_text("rejected")
            expect(rejected.locator("button:enabled")).to_have_count(0)
            expect(page.locator(".turn .text").last).to_have_text("OK, order 7 stays as it is.")
            expect(page.locator(".tool")).to_have_count(2)
            expect(page.locator("#input")).to_be_focused()  # the buttons folded away: typing goes on
            screenshot(page, "page-approval-rejected.png")
            assert refunds == ["42"]
            assert [s.outcome for s in model.streams] == ["completed"] * 4
    finally:
        gate.set()  # a failed test must not leave the tool's thread waiting


def test_a_message_sent_instead_of_an_answer_closes_the_call_unrun(page: Page, tmp_path: Path) -> None:
    gate, refunds = threading.Event(), list[str]()
    gate.set()  # open: the call must not run, and if it did, it would end rather than hang
    steps = [tool_calls(call("refund", {"order": "9"})), reply("Fine, nothing refunded.", delay=0.005)]
    with serving(steps, [gated_refund(gate, refunds)], tmp_path / "threads.db") as (url, model):
        page.goto(url)
        expect(page.locator("#status")).to_have_text("online")
        send(page, "Refund order 9.")
        expect(page.locator(".tool.waiting button")).to_have_count(2)
        send(page, "Never mind.")  # the composer works while a call waits
        closed = page.locator(".tool.unrun")
        expect(closed.locator(".tool-out")).to_have_text("not run")
        expect(closed.locator("button")).to_have_count(0)
        expect(page.locator(".turn .text").last).to_have_text("Fine, nothing refunded.")
        screenshot(page, "page-approval-not-run.png")
        assert refunds == []
        assert any(item.get("output") == NOT_ANSWERED for item in model.calls[-1].input)


@input_guardrail
async def no_card_numbers(
    _context: RunContextWrapper[Any], _agent: Agent[Any], message: Any
) -> GuardrailFunctionOutput:
    found = re.search(r"\d{4} \d{4} \d{4} \d{4}", str(message)) is not None
    return GuardrailFunctionOutput(output_info="a card number", tripwire_triggered=found)


def test_a_handoff_says_who_answers_and_a_guardrail_stops_the_reply(page: Page, tmp_path: Path) -> None:
    steps = [
        tool_calls(call("transfer_to_billing", {})),
        reply("Your last invoice is paid."),
        reply(LONG_REPLY, delay=0.05),
    ]
    billing = Agent(name="billing")
    with serving(
        steps, [], tmp_path / "threads.db", handoffs=[billing], input_guardrails=[no_card_numbers]
    ) as (url, _):
        page.goto(url)
        send(page, "Is my invoice paid?")
        expect(page.locator(".agent")).to_have_text("billing is answering")
        expect(page.locator(".turn .text").last).to_have_text("Your last invoice is paid.")
        send(page, "my card is 4111 1111 1111 1111")
        expect(page.locator(".notice.error")).to_contain_text("no_card_numbers")
        screenshot(page, "page-handoff-and-guardrail.png")

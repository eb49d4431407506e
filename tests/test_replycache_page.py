"""The chat page marks a reply the reply cache served (in Debian's chromium, as in test_page)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from agents import Agent
from playwright.sync_api import Page, expect
from test_page import browser, console_errors, page, playwright, screenshot, send, wait_for

from rtagent.cache._replies import ReplyCache
from rtagent.server._app import create_app
from rtagent.server._websocket import WebSocketProtocol
from rtagent.testing import ScriptedModel, reply

__all__ = ["browser", "console_errors", "page", "playwright"]  # the fixtures this module uses


@contextmanager
def serving(db: Path) -> Iterator[str]:
    model = ScriptedModel([reply("We ship within two days.", chunks=4)])
    app = create_app(Agent(name="shop"), model=model, db_path=db, reply_cache=ReplyCache())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws=WebSocketProtocol))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_a_cached_reply_is_marked_on_the_page(page: Page, tmp_path: Path) -> None:
    with serving(tmp_path / "threads.db") as url:
        page.goto(url)
        expect(page.locator("#status")).to_have_text("online")
        send(page, "When do you ship?")
        expect(page.locator(".turn .text")).to_have_text("We ship within two days.")
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator(".badge.cached")).to_have_count(0)
        page.locator("#new").click()  # another conversation, the same first message
        expect(page.locator("#status")).to_have_text("online")
        send(page, "When do you ship?")
        expect(page.locator(".turn .text")).to_have_text("We ship within two days.")
        expect(page.locator(".turn .badge.cached")).to_be_visible()
        screenshot(page, "page-cached-reply.png")

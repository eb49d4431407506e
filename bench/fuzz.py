"""Property-based fuzzing of a real ``rtagent serve``: every endpoint and WebSocket command, with
hypothesis-generated input, must never make the server fail.

The server runs as a subprocess (``tests/agents/fast.py``, a scripted agent that answers at once,
so thousands of turns take seconds), on a free loopback port with a fresh database, rate limit off,
its stderr in a log file. Hypothesis draws ``--requests`` requests (10,000 by default) from one
seed; ``--concurrency`` clients send them at once:

- ``POST /agui`` and ``POST /``: ``RunAgentInput`` bodies, valid-ish (user messages whose keywords
  pick the agent's script: tools, a failing tool, a failing model, a slow reply) and malformed
  (fields missing or of the wrong type, unknown fields, free-form ``state``, huge strings, any
  unicode, lone surrogates as ``\\ud800`` escapes or as bytes that are not UTF-8, deep nesting,
  JSON that is not an object, bytes that are not JSON); some streams are abandoned half-read;
- ``WS /ws/{thread}``: sessions of 1-6 frames: ``send`` and ``stop`` commands, valid and not,
  malformed JSON, binary frames, text frames that are not UTF-8, deep nesting, frames too large;
  a session either reads until the server goes quiet or walks away at once;
- the thread endpoints (stop, messages, delete), ``/healthz``, ``/metrics``, the page, its static
  files (and paths that try to leave the folder), unknown paths and methods; thread ids from a
  small shared pool (so requests meet on the same conversations) and odd ones (path characters,
  unicode, too long).

Most requests look like the page's own (``Host`` the server, ``Origin`` absent or the server's,
``Content-Type: application/json``); some are hostile, and must get a 4xx: a foreign ``Origin``
(another site, or ``null``) on a request that changes something (a POST, a DELETE, a WebSocket), a
foreign ``Host`` on anything but ``/healthz`` (DNS rebinding: a page on evil.example whose name
now points to 127.0.0.1 sends its own name and origin), or a JSON POST sent as one of the content
types a cross-site form may send without a preflight. Others are merely unusual (``Host:
localhost``, no content type, ``application/xml``) and need only not fail.

Zero counts, each a failure (the process exits 1 if any is not zero):

- ``responses_5xx``: statuses >= 500, WebSocket handshakes included;
- ``tracebacks_in_log``: "Traceback" in the server's log, shutdown included;
- ``unreadable_threads``: of every valid thread id used, after the run, ``GET
  /threads/{id}/messages`` answers neither 200 with AG-UI messages nor 404 ``unknown_thread``
  (a thread that was deleted, or never had a turn);
- ``ws_abnormal_closes``: WebSocket connections that ended without a close frame, or with 1011,
  and handshakes broken off without an answer;
- ``hostile_accepted``: hostile requests answered with anything but a 4xx;
- ``server_error_events``: ``RUN_ERROR`` events with code ``server_error`` (a bug of the server's,
  sent in a stream that had started);
- ``sse_unfinished``: 200 streams read to their end that had no ``RUN_FINISHED`` or ``RUN_ERROR``;
- ``dropped``: HTTP connections closed without a response, and requests that timed out;
- ``turns_stuck``: turns ``/healthz`` still counts 10 s after the last request.

Reported, not counted as failures: ``endpoints_missed`` (of ``ENDPOINTS``, those no request reached:
possible in a short run, hypothesis drawing unevenly), ``errors_not_json`` (4xx answers whose body
is not the ``{"error", "message"}`` JSON every refusal should have), ``resent`` (requests sent once
more when their kept-alive connection broke before any answer, as browsers do: uvicorn closes a
connection whose request raised), ``hostile_accepted_by_kind``, ``tracebacks`` (by exception and the
deepest frame of rtagent's code) and ``log_errors`` (the log's ERROR lines), and ``examples``: the
first few requests of each kind of failure.

Run: ``.venv/bin/python bench/fuzz.py`` (``--requests N``, ``--seed S`` to replay a run,
``--concurrency C``, ``--log PATH`` to keep the server's log). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from ag_ui.core import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from ports import free_port
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "tests" / "agents" / "fast.py"
EVIL_ORIGIN = "https://evil.example"
EVIL_HOST = "evil.example"
# The content types a cross-site <form> (or a fetch without a preflight) may send: a JSON API that
# takes them lets any site drive it.
SIMPLE_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x")
KEYWORDS = ("tool", "broken", "fail", "slow", "hello")  # what picks the fast agent's script
MESSAGES = TypeAdapter(list[Message])
IDLE_S = 0.3  # a lingering WebSocket session ends once the server has sent nothing for this long
TIMEOUT_S = 30.0
MAX_EXAMPLES = 5  # failures kept for the report, of each kind
ENDINGS = ("RUN_FINISHED", "RUN_ERROR")  # a stream's last event
ENDPOINTS = (  # what the report counts requests under; "other": unknown paths and methods
    "POST /agui",
    "POST /",
    "WS /ws/{thread}",
    "POST /threads/{id}/stop",
    "GET /threads/{id}/messages",
    "DELETE /threads/{id}",
    "GET /healthz",
    "GET /metrics",
    "GET /",
    "GET /static",
    "other",
)


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blob:
    """Bytes kept as (piece, repeat) pairs, so a megabyte body costs a few bytes until it is sent."""

    pieces: tuple[tuple[bytes, int], ...]

    def render(self) -> bytes:
        return b"".join(piece * times for piece, times in self.pieces)

    def size(self) -> int:
        return sum(len(piece) * times for piece, times in self.pieces)

    def head(self, n: int = 160) -> str:
        out = bytearray()
        for piece, times in self.pieces:
            for _ in range(times):
                out += piece
                if len(out) >= n:
                    return out[:n].decode("utf-8", "backslashreplace") + "..."
        return out.decode("utf-8", "backslashreplace")


def blob(data: bytes | str) -> Blob:
    return Blob(((data.encode() if isinstance(data, str) else data, 1),))


@dataclass(frozen=True, slots=True)
class Http:
    endpoint: str  # what the report counts it under, e.g. "POST /agui"
    method: str
    path: str  # percent-encoded as it goes on the wire
    headers: tuple[tuple[str, str], ...]
    body: Blob | None
    hostile: str  # why it must be refused with a 4xx; "": it need not be
    threads: tuple[str, ...]  # the valid thread ids it may have touched
    abandon: bool = False  # a stream read for its first bytes only, then hung up on

    def describe(self) -> dict[str, Any]:
        body = None if self.body is None else {"bytes": self.body.size(), "head": self.body.head()}
        return {"method": self.method, "path": self.path[:200], "headers": dict(self.headers), "body": body}


@dataclass(frozen=True, slots=True)
class Frame:
    data: Blob
    text: bool  # a text frame (whatever its bytes), else a binary one


@dataclass(frozen=True, slots=True)
class Ws:
    path: str
    origin: str | None
    host: str | None  # a foreign Host header, else the server's own
    frames: tuple[Frame, ...]
    linger: bool  # read until the server goes quiet, else close at once
    hostile: str
    threads: tuple[str, ...]
    endpoint: str = "WS /ws/{thread}"

    def describe(self) -> dict[str, Any]:
        frames = [{"text": f.text, "bytes": f.data.size(), "head": f.data.head(100)} for f in self.frames]
        return {"path": self.path[:200], "origin": self.origin, "host": self.host, "frames": frames}


Request = Http | Ws


# -- strategies -----------------------------------------------------------------------------------

SURROGATES = st.characters(categories=["Cs"])
# Mostly ordinary text, sometimes with lone surrogates in it (json.dumps writes them as \udXXX).
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.one_of(st.characters(), SURROGATES), max_size=20),
    st.sampled_from(["", " ", "\n", "\x00", "\u202e", "\ufeff", "\U0001f600", "\ud800", "\udfff"]),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def message_text(draw: st.DrawFn) -> str:
    """A user's words: a keyword of the agent's script among any text (a third of them with lone
    surrogates, which a fixed server refuses: the rest still run turns)."""
    return f"{draw(TEXT)} {draw(st.sampled_from(KEYWORDS))} {draw(st.text(max_size=40))}"


def user_content() -> st.SearchStrategy[Any]:
    text_part = st.builds(lambda t: {"type": "text", "text": t}, message_text())
    image = {"type": "image", "source": {"type": "url", "value": "https://example.com/a.png"}}
    return st.one_of(message_text(), st.lists(st.one_of(text_part, st.just(image)), min_size=1, max_size=3))


@st.composite
def earlier_message(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message of the conversation so far, as the page re-sends it."""
    role = draw(st.sampled_from(["user", "assistant", "system"]))
    content = draw(user_content() if role == "user" else TEXT)
    return {"id": draw(st.text(min_size=1, max_size=10)), "role": role, "content": content}


@st.composite
def message(draw: st.DrawFn) -> Any:
    """A message, often malformed: a wrong id, odd content, an unknown role, not an object."""
    role = draw(st.sampled_from(["user", "user", "user", "assistant", "system", "developer", "tool", "odd"]))
    message_id = draw(st.one_of(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10), JSON))
    base: dict[str, Any] = {"id": message_id, "role": role}
    if role == "user":
        parts = st.lists(st.dictionaries(TEXT, JSON, max_size=3), max_size=3)
        base["content"] = draw(st.one_of(user_content(), user_content(), parts, JSON))
    elif role == "assistant":
        base["content"] = draw(st.one_of(TEXT, st.none()))
        if draw(st.booleans()):
            function = {"name": draw(TEXT), "arguments": draw(TEXT)}
            base["toolCalls"] = [{"id": draw(TEXT), "type": "function", "function": function}]
    elif role == "tool":
        base.update(content=draw(TEXT), toolCallId=draw(TEXT))
    elif role == "odd":
        return draw(JSON)
    else:
        base["content"] = draw(TEXT)
    return base


@dataclass(frozen=True, slots=True)
class Context:
    port: int
    pool: tuple[str, ...]  # the valid thread ids most requests share

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return f"http://{self.host}"


VALID_ID = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
ODD_ID = st.one_of(
    st.text(min_size=1, max_size=30),
    st.sampled_from(["..", ".", "a/b", "a b", "a%2Fb", "%00", "a?b", "a#b", "x" * 65, "x" * 5000, "é"]),
)


def is_valid_id(thread: str) -> bool:
    return 0 < len(thread) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in thread)


@st.composite
def thread_id(draw: st.DrawFn, ctx: Context) -> str:
    kind = draw(st.sampled_from(["pool"] * 6 + ["new", "odd"]))
    if kind == "pool":
        return draw(st.sampled_from(ctx.pool))
    return draw(VALID_ID if kind == "new" else ODD_ID)


def in_path(thread: str, slashes: bool) -> str:
    # Slashes left as they are reach other routes (or none): the router, not the endpoint, answers.
    return quote(thread, safe="/" if slashes else "")


@st.composite
def run_input(draw: st.DrawFn, ctx: Context) -> tuple[Blob, tuple[str, ...]]:
    """A RunAgentInput body, valid or not, and the thread it names if that is a valid id."""
    thread = draw(thread_id(ctx))
    threads = (thread,) if is_valid_id(thread) else ()
    roll = draw(st.integers(0, 99))
    if roll < 50:  # what the page sends: a turn, mostly with the history before it (ignored)
        history = draw(st.lists(earlier_message(), max_size=3))
        user = {"id": draw(st.text(min_size=1, max_size=10)), "role": "user", "content": draw(user_content())}
        body: dict[str, Any] = {"threadId": thread, "runId": draw(st.text(min_size=1, max_size=20))}
        body.update(messages=[*history, user], state=draw(JSON), tools=[], context=[])
        return encoded(draw, body), threads
    if roll < 60:
        return draw(deep_json(thread)), threads
    if roll < 64:
        return draw(huge_input(thread)), threads
    if roll < 68:
        return blob(draw(st.binary(max_size=200))), threads
    if roll < 72:
        return blob(json.dumps(draw(JSON))), threads
    body = {
        "threadId": thread if draw(st.integers(0, 4)) else draw(JSON),
        "runId": draw(st.one_of(st.text(min_size=1, max_size=20), st.just("r" * 129), st.just(""), JSON)),
        "messages": draw(st.lists(message(), max_size=4) | JSON),
        "state": draw(JSON),
        "tools": draw(st.sampled_from([[]] * 4 + [None]) | JSON),
        "context": draw(st.sampled_from([[]] * 4 + [None]) | JSON),
        "forwardedProps": draw(JSON),
    }
    for _ in range(draw(st.integers(0, 2))):  # a field missing, of the wrong type, or unknown
        key = draw(st.sampled_from([*body, "protocolVersion", "parentRunId", "resume", "extra"]))
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(JSON)
    return encoded(draw, body), threads


def encoded(draw: st.DrawFn, value: Any) -> Blob:
    if draw(st.integers(0, 9)):  # escapes: lone surrogates arrive as \udXXX
        return blob(json.dumps(value))
    # Raw UTF-8, where a lone surrogate becomes bytes that are not UTF-8 (surrogatepass).
    return blob(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))


DEPTHS = st.one_of(st.sampled_from([99, 100, 101, 1_000, 10_000, 100_000]), st.integers(1, 200_000))


@st.composite
def deep_json(draw: st.DrawFn, thread: str) -> Blob:
    depth = draw(DEPTHS)
    shape = draw(st.sampled_from(["arrays", "objects", "state", "message", "unclosed"]))
    head = json.dumps({"threadId": thread, "runId": "deep", "messages": []})[:-1].encode()
    if shape == "arrays":
        return Blob(((b"[", depth), (b"]", depth)))
    if shape == "objects":
        return Blob(((b'{"a":', depth), (b"1", 1), (b"}", depth)))
    if shape == "state":
        return Blob(((head + b', "state": ', 1), (b"[", depth), (b"]", depth), (b"}", 1)))
    if shape == "message":
        content = b'"messages": [{"id": "u", "role": "user", "content": '
        tail = b"}]}"
        start = json.dumps({"threadId": thread, "runId": "deep"})[:-1].encode() + b", " + content
        return Blob(
            ((start, 1), (b'[{"type": "text", "text": ', depth), (b'"x"', 1), (b"}]", depth), (tail, 1))
        )
    return Blob(((b"[", depth),))


@st.composite
def huge_input(draw: st.DrawFn, thread: str) -> Blob:
    """A message around the 32,000-character limit, or a body around the 1 MiB one."""
    size = draw(st.one_of(st.integers(31_990, 32_010), st.integers((1 << 20) - 300, (1 << 20) + 300)))
    char = draw(st.sampled_from(["x", "é", "\U0001f600", "\\ud800", "\\n"])).encode()
    where = draw(st.sampled_from(["message", "state"]))
    head = json.dumps({"threadId": thread, "runId": "huge"})[:-1].encode()
    if where == "message":
        start = head + b', "messages": [{"id": "u", "role": "user", "content": "'
        return Blob(((start, 1), (char, size), (b'"}]}', 1)))
    return Blob(((head + b', "messages": [], "state": "', 1), (char, size), (b'"}', 1)))


def origins(ctx: Context, host: str) -> st.SearchStrategy[str | None]:
    """The Origin of a request to ``host``; for a foreign one, that of a page on it, which is how
    DNS rebinding reaches a loopback server: the browser thinks the page and the server are one site."""
    if host == ctx.host:
        return st.sampled_from([None] * 3 + [ctx.origin] * 5 + [EVIL_ORIGIN, "null"])
    return st.sampled_from([None, f"http://{host}"])


@st.composite
def headers(draw: st.DrawFn, ctx: Context, method: str, json_body: bool) -> tuple[tuple[str, str], ...]:
    """Mostly the page's own headers; some hostile, some merely unusual."""
    out: list[tuple[str, str]] = []
    host = draw(st.sampled_from([ctx.host] * 8 + [EVIL_HOST, f"localhost:{ctx.port}"]))
    out.append(("Host", host))
    origin = draw(origins(ctx, host))
    if origin is not None:
        out.append(("Origin", origin))
    if method == "POST" and json_body:
        types = ["application/json"] * 6 + ["application/json; charset=utf-8", *SIMPLE_TYPES, None]
        content_type = draw(st.sampled_from([*types, "application/xml"]))
        if content_type is not None:
            out.append(("Content-Type", content_type))
    return tuple(out)


def hostility(headers: tuple[tuple[str, str], ...], method: str, path: str) -> str:
    """Why a request must be refused (see the module docstring), or "" if it need not be."""
    given = dict(headers)
    if given.get("Host") == EVIL_HOST and path != "/healthz":
        return "foreign Host"
    if method in ("POST", "DELETE") and given.get("Origin") in (EVIL_ORIGIN, "null"):
        return "foreign Origin"
    if method == "POST" and given.get("Content-Type") in SIMPLE_TYPES:
        return "form content type"
    return ""


@st.composite
def agui(draw: st.DrawFn, ctx: Context) -> Http:
    path = draw(st.sampled_from(["/agui", "/agui", "/"]))
    body, threads = draw(run_input(ctx))
    hdrs = draw(headers(ctx, "POST", json_body=True))
    abandon = draw(st.integers(0, 9)) == 0
    return Http(f"POST {path}", "POST", path, hdrs, body, hostility(hdrs, "POST", path), threads, abandon)


@st.composite
def thread_request(draw: st.DrawFn, ctx: Context) -> Http:
    method, suffix, label = draw(
        st.sampled_from(
            [
                ("POST", "/stop", "POST /threads/{id}/stop"),
                ("GET", "/messages", "GET /threads/{id}/messages"),
                ("GET", "/messages", "GET /threads/{id}/messages"),
                ("DELETE", "", "DELETE /threads/{id}"),
            ]
        )
    )
    thread = draw(thread_id(ctx))
    path = f"/threads/{in_path(thread, draw(st.booleans()))}{suffix}"
    hdrs = draw(headers(ctx, method, json_body=False))
    body = draw(st.one_of(st.none(), st.builds(blob, st.binary(max_size=50)))) if method == "POST" else None
    threads = (thread,) if is_valid_id(thread) else ()
    return Http(label, method, path, hdrs, body, hostility(hdrs, method, path), threads)


STATIC = [
    "/static/chat.js",
    "/static/chat.css",
    "/static/index.html",
    "/static/nope.js",
    "/static/%2e%2e/_app.py",
    "/static/%2e%2e%2f_app.py",
    "/static/..%5c_app.py",
    "/static/%00",
    "/static/" + "a" * 3000,
    "/static/",
]


@st.composite
def other_request(draw: st.DrawFn, ctx: Context) -> Http:
    """The rest of the server: health, metrics, the page, static files, unknown paths and methods."""
    kind = draw(st.integers(0, 4))  # not one_of, which favours its first strategies
    if kind < 3:
        method, path = "GET", ("/healthz", "/metrics", "/")[kind]
        label = f"GET {path}"
    elif kind == 3:
        method, path, label = "GET", draw(st.sampled_from(STATIC)), "GET /static"
    else:
        method = draw(st.sampled_from(["GET", "PUT", "PATCH", "HEAD", "OPTIONS", "DELETE", "POST"]))
        path = draw(st.sampled_from(["/agui", "/ws/t", "/threads", "/healthz", "/metrics", "/x", "/%ff"]))
        label = "other"
    query = draw(st.one_of(st.just(""), st.text(max_size=20).map(lambda q: "?" + quote(q, safe="=&"))))
    hdrs = draw(headers(ctx, method, json_body=False))
    if method == "OPTIONS":  # a CORS preflight
        hdrs += (("Access-Control-Request-Method", "POST"),)
    return Http(label, method, path + query, hdrs, None, hostility(hdrs, method, path), ())


@st.composite
def ws_frame(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(["send"] * 5 + ["stop", "stop", "bad-command", "junk", "deep", "huge"]))
    if kind == "send":
        command: dict[str, Any] = {"type": "send", "text": draw(message_text())}
        if draw(st.booleans()):
            command["runId"] = draw(st.one_of(st.text(max_size=20), st.just("r" * 129), JSON))
        return Frame(encoded(draw, command), text=True)
    if kind == "stop":
        return Frame(blob(json.dumps({"type": "stop"})), text=True)
    if kind == "bad-command":
        command = {"type": draw(st.one_of(st.sampled_from(["send", "stop", "dance", ""]), JSON))}
        command.update(draw(st.dictionaries(st.sampled_from(["text", "runId", "extra"]), JSON, max_size=2)))
        return Frame(encoded(draw, command), text=True)
    if kind == "junk":  # not JSON, or not UTF-8 though sent as text, or a binary frame
        return Frame(blob(draw(st.binary(max_size=100))), text=draw(st.booleans()))
    if kind == "deep":
        return Frame(draw(deep_json("ws")), text=True)
    size = draw(st.one_of(st.integers(31_990, 32_010), st.integers((1 << 20) - 100, (1 << 20) + 100)))
    return Frame(Blob(((b'{"type": "send", "text": "', 1), (b"x", size), (b'"}', 1))), text=True)


@st.composite
def ws_session(draw: st.DrawFn, ctx: Context) -> Ws:
    thread = draw(thread_id(ctx))
    path = f"/ws/{in_path(thread, draw(st.integers(0, 9)) == 0)}"
    host = draw(st.sampled_from([None] * 9 + [EVIL_HOST]))
    origin = draw(origins(ctx, host or ctx.host))
    frames = tuple(draw(st.lists(ws_frame(), min_size=1, max_size=6)))
    # A WebSocket from a foreign origin, or reaching a foreign host's name, is one a browser
    # would open for a site other than this server's page.
    hostile = "foreign Host" if host else "foreign Origin" if origin in (EVIL_ORIGIN, "null") else ""
    threads = (thread,) if is_valid_id(thread) else ()
    return Ws(path, origin, host, frames, draw(st.booleans()), hostile, threads)


@st.composite
def any_request(draw: st.DrawFn, ctx: Context) -> Request:
    # Turns (POST /agui, WebSockets) are where most of the code is: they get most of the draws.
    roll = draw(st.integers(0, 99))
    if roll < 45:
        return draw(agui(ctx))
    if roll < 75:
        return draw(ws_session(ctx))
    return draw(thread_request(ctx) if roll < 90 else other_request(ctx))


def generate(ctx: Context, n: int, seed: int) -> list[Request]:
    """``n`` requests, the same ones for the same seed (and port: it is in the headers)."""
    drawn: list[Request] = []
    batch = 0
    while len(drawn) < n:  # hypothesis may stop a batch early, when it runs out of new examples

        @settings(
            max_examples=n - len(drawn),
            database=None,
            phases=[Phase.generate],
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis_seed(seed + batch)
        @given(any_request(ctx))
        def collect(request: Request) -> None:
            drawn.append(request)

        collect()
        batch += 1
    return drawn[:n]


# -- sending --------------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # hostile requests let through, by kind
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def fail(self, kind: str, request: Request, **detail: Any) -> None:
        self.counts[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append({"endpoint": request.endpoint, "request": request.describe(), **detail})


def sse_ending(body: str, tally: Tally, request: Request) -> str | None:
    """The type of a stream's last event; a ``server_error`` RUN_ERROR counts as a failure."""
    last = None
    for line in body.split("\n"):
        if line.startswith("data: "):
            event = json.loads(line[6:])
            last = event.get("type")
            if last == "RUN_ERROR" and event.get("code") == "server_error":
                tally.fail("server_error_events", request, event=event)
    return last


def check_status(request: Request, status: int, body: bytes, tally: Tally) -> None:
    tally.statuses[f"{request.endpoint} {status}"] += 1
    if status >= 500:
        tally.fail("responses_5xx", request, status=status, response=body[:300].decode("utf-8", "replace"))
    if request.hostile and not 400 <= status < 500:
        tally.fail("hostile_accepted", request, status=status, why=request.hostile)
        tally.accepted[f"{request.hostile}: {request.endpoint} {status}"] += 1
    if 400 <= status < 500 and body and not _is_error_json(body):
        tally.fail("errors_not_json", request, status=status, response=body[:200].decode("utf-8", "replace"))


def _is_error_json(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and all(isinstance(data.get(key), str) for key in ("error", "message"))


async def answer(http: httpx.AsyncClient, request: httpx.Request, tally: Tally) -> httpx.Response:
    """The response (its body not read yet), the request sent once more if its connection broke
    before any answer, as a browser does with a kept-alive connection: the pool may have handed out
    one the server was closing (uvicorn closes a connection whose request raised, after its 500)."""
    try:
        return await http.send(request, stream=True)
    except (httpx.ReadError, httpx.RemoteProtocolError):
        tally.counts["resent"] += 1
        return await http.send(request, stream=True)


async def send_http(http: httpx.AsyncClient, request: Http, tally: Tally) -> None:
    content = None if request.body is None else request.body.render()
    built = http.build_request(request.method, request.path, headers=list(request.headers), content=content)
    response = await answer(http, built, tally)
    try:
        if request.abandon and response.status_code == 200:
            async for _ in response.aiter_raw():
                break  # hung up on after the first bytes: the turn is interrupted
            check_status(request, response.status_code, b"", tally)
            return
        body = bytes(await response.aread())
    finally:
        await response.aclose()
    check_status(request, response.status_code, body, tally)
    stream = response.headers.get("content-type", "").startswith("text/event-stream")
    if response.status_code == 200 and stream and sse_ending(body.decode(), tally, request) not in ENDINGS:
        tally.fail("sse_unfinished", request, response=body[-300:].decode("utf-8", "replace"))


async def send_ws(ctx: Context, request: Ws, tally: Tally) -> None:
    host = request.host or ctx.host
    origin = None if request.origin is None else Origin(request.origin)
    # The URI names the Host header's value; host and port say where to connect. A server that does
    # not answer a close frame is found out after 2 s, not the default 10.
    options: dict[str, Any] = {"host": "127.0.0.1", "port": ctx.port, "proxy": None, "max_size": None}
    options["close_timeout"] = 2
    try:
        ws = await connect(f"ws://{host}{request.path}", origin=origin, open_timeout=TIMEOUT_S, **options)
    except InvalidStatus as refused:
        response = refused.response
        check_status(request, response.status_code, bytes(response.body or b""), tally)
        return
    except InvalidHandshake as exc:  # the connection broke before the handshake's answer
        tally.fail("ws_abnormal_closes", request, error=repr(exc)[:300])
        return
    check_status(request, 101, b"", tally)
    received: list[str] = []
    try:
        for frame in request.frames:
            await ws.send(frame.data.render(), text=frame.text)
        if request.linger:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TIMEOUT_S):
                    while True:
                        received.append(str(await asyncio.wait_for(ws.recv(), IDLE_S)))
    except ConnectionClosed:
        pass
    finally:
        await ws.close()
    _check_ws_end(ws, request, received, tally)


def _check_ws_end(ws: ClientConnection, request: Ws, received: list[str], tally: Tally) -> None:
    for text in received:
        event = json.loads(text)
        if event.get("type") == "RUN_ERROR" and event.get("code") == "server_error":
            tally.fail("server_error_events", request, event=event)
    close = ws.protocol.close_rcvd
    if close is None or close.code == 1011:
        code = None if close is None else close.code
        tally.fail(
            "ws_abnormal_closes", request, close_code=code, last_frames=[t[:200] for t in received[-3:]]
        )


async def send(ctx: Context, http: httpx.AsyncClient, request: Request, tally: Tally) -> None:
    tally.sent[request.endpoint] += 1
    try:
        async with asyncio.timeout(TIMEOUT_S * 2):
            if isinstance(request, Http):
                await send_http(http, request, tally)
            else:
                await send_ws(ctx, request, tally)
    except TimeoutError:
        tally.fail("dropped", request, error="timed out")
    except (httpx.TransportError, OSError) as exc:
        tally.fail("dropped", request, error=repr(exc)[:300])


def client(ctx: Context, connections: int = 16) -> httpx.AsyncClient:
    # trust_env: no proxy from the environment between the fuzzer and its loopback server.
    limits = httpx.Limits(max_connections=connections)
    return httpx.AsyncClient(base_url=ctx.origin, limits=limits, timeout=TIMEOUT_S, trust_env=False)


async def send_all(ctx: Context, batch: list[Request], concurrency: int, tally: Tally) -> None:
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in batch:
        queue.put_nowait(request)
    async with client(ctx, concurrency) as http:

        async def worker() -> None:
            while not queue.empty():
                await send(ctx, http, queue.get_nowait(), tally)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def unreadable(ctx: Context, threads: set[str], tally: Tally) -> None:
    """Read back every thread: a conversation that cannot be loaded is a page that cannot reload."""
    async with client(ctx) as http:
        semaphore = asyncio.Semaphore(16)

        async def read(thread: str) -> None:
            path = f"/threads/{thread}/messages"
            request = Http("GET /threads/{id}/messages (read back)", "GET", path, (), None, "", ())
            async with semaphore:
                try:
                    response = await answer(http, http.build_request("GET", path), tally)
                    async with contextlib.aclosing(response):
                        await response.aread()
                except httpx.TransportError as exc:
                    tally.fail("unreadable_threads", request, error=repr(exc))
                    return
            if not readable(thread, response):
                text = response.text[:300]
                tally.fail("unreadable_threads", request, status=response.status_code, response=text)

        await asyncio.gather(*(read(thread) for thread in sorted(threads)))


def readable(thread: str, response: httpx.Response) -> bool:
    """200 with the thread's AG-UI messages, or 404: no such conversation (deleted, or never begun)."""
    try:
        data = response.json()
        if response.status_code == 404:
            return bool(data["error"] == "unknown_thread")
        MESSAGES.validate_python(data["messages"])
        return response.status_code == 200 and bool(data["threadId"] == thread)
    except (ValueError, KeyError, TypeError, ValidationError):
        return False


async def turns_left(ctx: Context) -> int:
    """Turns the server still runs once every request is done, after up to 10 s to end them."""
    async with client(ctx) as http:
        deadline = time.monotonic() + 10
        while True:
            turns: int = (await http.get("/healthz")).json()["turns"]
            if turns == 0 or time.monotonic() > deadline:
                return turns
            await asyncio.sleep(0.1)


# -- the server -----------------------------------------------------------------------------------


@contextlib.contextmanager
def server(folder: Path, log: Path) -> Iterator[int]:
    """``rtagent serve`` on the fast agent, on a free loopback port; yields the port once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RTAGENT_MODEL", "RTAGENT_TOKEN")}
    env["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
    command = [sys.executable, "-m", "rtagent", "serve", str(AGENT), "--port", str(port)]
    command += ["--db", str(folder / "fuzz.db"), "--rate-limit", "0"]  # one client sends everything
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env)
        try:
            _wait_until_up(port, process)
            yield port
        finally:
            process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown, which the log records
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rtagent serve exited with {process.returncode} before it answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("rtagent serve did not answer /healthz within 60 s")


FRAME = re.compile(r'File "(?:.*/)?([^/"]+)", line (\d+), in (\S+)')


def tracebacks(log: str) -> list[str]:
    """Each traceback of the log as one line, its kind: the exception's type, and the deepest frame
    of rtagent's own code (or, when it has none, the deepest frame)."""
    found: list[str] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Traceback" not in line:
            continue
        end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith((" ", "\t"))), i)
        frames = [f for f in lines[i + 1 : end] if FRAME.search(f)]
        ours = [f for f in frames if "/rtagent/" in f] or frames[-1:]
        match = FRAME.search(ours[-1]) if ours else None
        where = "{}:{} {}".format(*match.groups()) if match else "?"
        found.append(f"{lines[end].split(':')[0]} at {where}")
    return found


def log_errors(log: str) -> Counter[str]:
    """The server's ERROR lines, by message: each is worth a look, though not all are failures."""
    return Counter(line[:120] for line in log.splitlines() if line.startswith("ERROR:"))


# -- the run --------------------------------------------------------------------------------------

ZERO = (
    "responses_5xx",
    "tracebacks_in_log",
    "unreadable_threads",
    "ws_abnormal_closes",
    "hostile_accepted",
    "server_error_events",
    "sse_unfinished",
    "dropped",
    "turns_stuck",
)


def fuzz(n: int, seed: int, concurrency: int, log: Path | None = None) -> dict[str, Any]:
    """Start a server, send it ``n`` generated requests, read every thread back; the report."""
    began = time.monotonic()
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="rtagent-fuzz-") as folder:
        log_path = log or Path(folder, "server.log")
        with server(Path(folder), log_path) as port:
            up = time.monotonic()
            ctx = Context(port, tuple(f"fz{seed % 10_000}-{k}" for k in range(24)))
            batch = generate(ctx, n, seed)
            generated = time.monotonic()
            threads = {thread for request in batch for thread in request.threads}
            asyncio.run(_run(ctx, batch, concurrency, threads, tally))
        text = log_path.read_text(errors="replace")
    found = tracebacks(text)
    tally.counts["tracebacks_in_log"] = len(found)
    report: dict[str, Any] = {
        "requests": sum(tally.sent.values()),
        "by_endpoint": dict(sorted(tally.sent.items())),
        "endpoints_missed": [endpoint for endpoint in ENDPOINTS if not tally.sent[endpoint]],
        **{kind: tally.counts[kind] for kind in ZERO},
        "hostile_accepted_by_kind": dict(sorted(tally.accepted.items())),
        "errors_not_json": tally.counts["errors_not_json"],
        "resent": tally.counts["resent"],
        "threads_read_back": len(threads),
        "seconds": round(time.monotonic() - began, 1),
        "start_seconds": round(up - began, 1),
        "generate_seconds": round(generated - up, 1),
        "seed": seed,
        "statuses": dict(sorted(tally.statuses.items())),
        "examples": {kind: _truncated(kept) for kind, kept in sorted(tally.examples.items())},
        "tracebacks": dict(Counter(found).most_common()),
        "log_errors": dict(log_errors(text).most_common()),
    }
    return report


async def _run(ctx: Context, batch: list[Request], concurrency: int, threads: set[str], tally: Tally) -> None:
    await send_all(ctx, batch, concurrency, tally)
    tally.counts["turns_stuck"] = await turns_left(ctx)
    await unreadable(ctx, threads, tally)


def _truncated(value: Any, limit: int = 300) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, dict):
        return {k: _truncated(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_truncated(v, limit) for v in value]
    return value


def failed(report: dict[str, Any]) -> bool:
    return any(report[kind] for kind in ZERO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000, metavar="N", help="requests to send (10,000)")
    parser.add_argument("--seed", type=int, help="hypothesis's seed, to replay a run (default: random)")
    parser.add_argument("--concurrency", type=int, default=16, metavar="C", help="clients at once (16)")
    parser.add_argument("--log", type=Path, metavar="PATH", help="keep the server's log here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    report = fuzz(args.requests, seed, args.concurrency, args.log)
    print(json.dumps(report, indent=1, ensure_ascii=True))
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())

"""What stands between the network and the agent, and what records it: limits, the bearer token,
rate limiting, the access log and the Prometheus metrics.

Every refusal is a JSON body ``{"error": CODE, "message": ONE_LINE}`` with a 4xx status, so a page
(or a person with curl) can tell what to fix. Both middlewares are plain ASGI: Starlette's
``BaseHTTPMiddleware`` would buffer and re-wrap every streamed event.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from ag_ui.core import RunAgentInput, TextPart, UserMessage
from limits import RateLimitItemPerSecond
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from .._events import Event, ToolFinished, TurnFailed, TurnFinished
from .._unicode import may_hold_surrogates, scrub_json

access_log = logging.getLogger("rtagent.access")
log = logging.getLogger("rtagent.server")

THREAD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_RUN_ID = 128


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's limits; each has a default fit for a public chat page."""

    max_body_bytes: int = 1 << 20
    """A request body or WebSocket frame. AG-UI clients send the whole conversation each time."""
    max_message_chars: int = 32_000
    """One user message."""
    max_json_depth: int = 100
    """How deeply arrays and objects may nest in a body or frame (AG-UI ``state`` is free-form)."""
    max_turns: int = 2048
    """Turns running at once over the whole server; more get 503 until one ends."""
    rate_per_s: float = 2.0
    """Requests (and WebSocket messages) a client may make per second, sustained; 0 disables."""
    burst: int = 30
    """Requests a client may make at once before the rate applies."""
    loaded_threads: int = 1024
    """Idle conversations kept in memory; older ones are reloaded from the database when used."""
    ping_s: float = 15.0
    """Seconds between keep-alive comments on an SSE stream, so proxies do not cut a long tool call."""


class InputError(ValueError):
    """A request the client must fix; ``status`` is the HTTP status and the text is one line."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def check_thread_id(thread_id: str) -> str:
    if not THREAD_ID.fullmatch(thread_id):
        raise InputError(
            f"invalid thread id {thread_id[:80]!r}: use 1-64 letters, digits, '_' or '-'",
            400,
            "invalid_thread_id",
        )
    return thread_id


def parse_json(body: bytes | str, max_depth: int) -> Any:
    """A client's JSON (a body or a WebSocket frame), or an ``InputError`` that says what is wrong.

    Nesting deeper than ``max_depth`` is refused before decoding: the decoder, pydantic and every
    later encoding recurse, so a body of ``[[[...]]]`` a hundred thousand deep failed in all of them.
    """
    try:
        # Strictly, before the decoder: given bytes, it lets encoded surrogates through.
        text = body.decode() if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise InputError("the body is not UTF-8 text", 400, "malformed_json") from None
    if nests_deeper(text, max_depth):
        raise InputError(f"the JSON nests more than {max_depth} levels deep", 400, "too_deep")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc}", 400, "malformed_json") from None
    if may_hold_surrogates(text) and scrub_json(data) != data:
        message = "the JSON holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
        raise InputError(message, 400, "invalid_unicode")
    return data


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS_ONLY = re.compile(r"[^\[\]{}]+")
_OPENING = frozenset("[{")


def nests_deeper(text: str, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest more than ``limit`` deep.

    Brackets inside strings do not count. For malformed text the answer is a guess, and the decoder
    refuses that text anyway.
    """
    brackets = _BRACKETS_ONLY.sub("", _STRING.sub("", text))
    if len(brackets) <= limit:  # the usual body, decided at once
        return False
    depth = 0
    for bracket in brackets:
        depth += 1 if bracket in _OPENING else -1
        if depth > limit:
            return True
    return False


def parse_run_input(body: bytes, limits: Limits) -> tuple[RunAgentInput, str | None]:
    """Validate a ``RunAgentInput`` body; return it and the new user text (``None``: nothing new).

    The server owns the history, so only the last message matters: a user message there is the new
    input; anything else (an empty list, a client re-sending what it already has) asks for no turn.
    """
    data = parse_json(body, limits.max_json_depth)
    if not isinstance(data, dict):
        raise InputError(f"the body must be a JSON object (RunAgentInput), not {_json_type(data)}")
    try:
        run = RunAgentInput.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"invalid RunAgentInput: {describe_validation(exc)}") from None
    if not THREAD_ID.fullmatch(run.thread_id):
        raise InputError(f"threadId {run.thread_id[:80]!r} is invalid: use 1-64 letters, digits, '_' or '-'")
    if not 0 < len(run.run_id) <= MAX_RUN_ID:
        raise InputError(f"runId must be 1-{MAX_RUN_ID} characters long")
    last = run.messages[-1] if run.messages else None
    if not isinstance(last, UserMessage):
        return run, None
    return run, check_text(message_text(last), limits.max_message_chars)


def check_text(text: str, max_chars: int) -> str:
    if not text.strip():
        raise InputError("the user message has no text")
    if len(text) > max_chars:
        raise InputError(
            f"the message is {len(text)} characters long; the limit is {max_chars}", 413, "message_too_long"
        )
    return text


def message_text(message: UserMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    # Images, audio and documents have no place in a text conversation yet; their text parts do.
    return "\n".join(part.text for part in content if isinstance(part, TextPart))


def describe_validation(error: ValidationError) -> str:
    """Pydantic's errors as one line: where, what, and how many more (never the input itself)."""
    problems = error.errors(include_url=False, include_input=False)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing it (413) as soon as it is known to be too large."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InputError(_too_large(int(declared), limit), 413, "payload_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(_too_large(size, limit), 413, "payload_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return f"the body is {'over ' if size > limit else ''}{size} bytes; the limit is {limit}"


# What a store or Redis that went away raises: the request may succeed again shortly (503).
UNAVAILABLE: tuple[type[Exception], ...] = (RedisError, SQLAlchemyError, OSError)


async def error_json(request: Request, exc: Exception) -> Response:
    """Every failure as ``{"error", "message"}`` JSON: a client mistake is a 4xx that names it."""
    if isinstance(exc, InputError):
        return error(exc.status, exc.code, str(exc))
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    if isinstance(exc, ClientDisconnect):
        return error(400, "client_disconnected", "the client went away before sending its whole request")
    if isinstance(exc, UNAVAILABLE):
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        message = "the server cannot reach its store or Redis just now; try again shortly"
        return error(503, "unavailable", message, {"Retry-After": "1"})
    log.exception("unexpected error serving %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "internal_error", "the server failed on this request; its log has the details")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """Per client: ``burst`` requests at once, then ``rate`` a second on average.

    ``limits``' moving window of ``burst`` requests per ``burst / rate`` seconds, counted in this
    process, or with ``redis`` (a URL) in Redis, where every replica counts against the same window.
    """

    def __init__(self, rate: float, burst: int, redis: str | None = None) -> None:
        self.item = RateLimitItemPerSecond(burst, max(1, math.ceil(burst / rate)), namespace="rtagent")
        storage = "async+memory://" if redis is None else "async+" + redis
        options = {} if redis is None else {"implementation": "redispy"}
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage, **options))

    async def wait(self, client: str) -> float:
        """0 if the client may go now (and counts it), else the seconds until it may."""
        try:
            if await self.limiter.hit(self.item, client):
                return 0.0
        except UNAVAILABLE as exc:  # no count to go by: serving beats refusing everyone
            log.warning("the rate limit cannot be checked: %s", exc)
            return 0.0
        stats = await self.limiter.get_window_stats(self.item, client)
        return max(0.1, stats.reset_time - time.time())


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class Guard:
    """Checks the bearer token and the client's rate before a request reaches the API.

    Open without a token: ``/healthz`` (for load balancers) and the page itself (``GET /`` and
    ``/static``), which must load before it can ask the person for a token. Browsers cannot set
    headers on a WebSocket, so there the token may also come as ``?token=``.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, limiter: RateLimiter | None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or _is_open(scope):
            await self.app(scope, receive, send)
            return
        if self.token is not None and not self._authorized(scope):
            response = error(
                401,
                "unauthorized",
                "this server needs its token: send 'Authorization: Bearer TOKEN'",
                {"WWW-Authenticate": "Bearer"},
            )
            await deny(scope, receive, send, response)
            return
        if self.limiter is not None:
            wait = await self.limiter.wait(client_of(scope))
            if wait > 0:
                message = f"too many requests from this client; try again in {wait:.1f} s"
                response = error(429, "rate_limited", message, {"Retry-After": str(max(1, round(wait)))})
                await deny(scope, receive, send, response)
                return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        if scope["type"] == "websocket":
            given_tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
            return bool(given_tokens) and hmac.compare_digest(given_tokens[0].encode(), self.token)
        return False


def _is_open(scope: Scope) -> bool:
    path: str = scope["path"]
    if path == "/healthz" or path.startswith("/static/"):
        return True
    return path == "/" and scope.get("method") in ("GET", "HEAD")


async def deny(scope: Scope, receive: Receive, send: Send, response: JSONResponse) -> None:
    """Send an error response, over HTTP or as a WebSocket handshake refusal."""
    if scope["type"] == "http":
        await response(scope, receive, send)
        return
    websocket = WebSocket(scope, receive, send)
    if "websocket.http.response" in scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:  # a server without the denial extension can only refuse the handshake, without a body
        await websocket.close(1008)


class AccessLog:
    """One JSON line per request on the ``rtagent.access`` logger, when the request ends.

    For a stream that is when the stream ends, so ``duration_ms`` is the whole turn. The query string
    is never logged (a WebSocket token may be in it). ``on_status`` sees every final status.
    """

    def __init__(self, app: ASGIApp, on_status: Callable[[int], None]) -> None:
        self.app = app
        self.on_status = on_status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        # The endpoints record the thread they served here (for /agui it is in the body).
        state: dict[str, Any] = scope.setdefault("state", {})

        async def record(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and not status:
                status = 403
            await send(message)

        try:
            await self.app(scope, receive, record)
        except BaseException:
            status = status or 500
            raise
        finally:
            self.on_status(status)
            if access_log.isEnabledFor(logging.INFO):
                thread = state.get("thread_id") or scope.get("path_params", {}).get("thread_id")
                line = {
                    "time": round(time.time(), 3),
                    "method": scope.get("method", "WEBSOCKET"),
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "thread_id": thread,
                    "client": client_of(scope),
                }
                access_log.info(json.dumps(line))


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may share a process).

    Observed per turn and per tool call, never per text delta.
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # With several worker processes (``serve --workers``) each writes its values to files in
        # this directory, and /metrics, answered by any of them, adds up those of the live ones.
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        s = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.turns_total = Counter("rtagent_turns", "Turns by outcome.", ["outcome"], registry=r)
        first = "Seconds from a turn's start to its first text delta."
        self.first_token = Histogram("rtagent_time_to_first_token_seconds", first, buckets=s, registry=r)
        rates = (1, 5, 10, 20, 40, 80, 160, 320, 640)
        rate = "Output tokens per second while a reply streamed."
        self.tokens_per_s = Histogram("rtagent_tokens_per_second", rate, buckets=rates, registry=r)
        tool = "Tool call durations."
        self.tool_seconds = Histogram("rtagent_tool_duration_seconds", tool, ["tool"], registry=r, buckets=s)
        # By cache ("tool": ``rtagent.cached``; "reply": ``ReplyCache``), from ``TurnMetrics.cache``.
        by = ["cache"]
        hits = "Tool calls (or, for the reply cache, turns) answered from a stored result."
        misses = "Tool calls (or turns) that ran, storing what they returned where it could be."
        self.cache_hits = Counter("rtagent_cache_hits", hits, by, registry=r)
        self.cache_misses = Counter("rtagent_cache_misses", misses, by, registry=r)
        shared = "Calls that shared an identical call's execution, here or on another replica."
        self.cache_deduplicated = Counter("rtagent_cache_deduplicated", shared, by, registry=r)
        stored = "Bytes of results stored in the cache."
        self.cache_stored_bytes = Counter("rtagent_cache_stored_bytes", stored, by, registry=r)
        errors = "Requests answered with an error status."
        self.errors_total = Counter("rtagent_http_errors", errors, ["status"], registry=r)
        live: Literal["livesum"] = "livesum"  # with several workers: the sum over those running
        self.turns = Gauge("rtagent_active_turns", "Turns running now.", registry=r, multiprocess_mode=live)
        streams = "Open SSE streams and WebSockets."
        self.connections = Gauge("rtagent_active_connections", streams, registry=r, multiprocess_mode=live)
        sessions = "Conversations loaded in memory."
        self.sessions = Gauge("rtagent_active_sessions", sessions, registry=r, multiprocess_mode=live)

    def observe(self, event: Event) -> None:
        if isinstance(event, ToolFinished):
            self.tool_seconds.labels(event.name).observe(event.duration_s)
        elif isinstance(event, TurnFinished | TurnFailed):
            result = event.result
            outcome = "interrupted" if result.interrupted else "completed"
            self.turns_total.labels("failed" if isinstance(event, TurnFailed) else outcome).inc()
            metrics = result.metrics
            for cache, counts in metrics.cache.items():
                self.cache_hits.labels(cache).inc(counts.hits)
                self.cache_misses.labels(cache).inc(counts.misses)
                self.cache_deduplicated.labels(cache).inc(counts.deduplicated)
                self.cache_stored_bytes.labels(cache).inc(counts.stored_bytes)
            if metrics.time_to_first_token_s is not None:
                self.first_token.observe(metrics.time_to_first_token_s)
            if metrics.tokens_per_s is not None:
                self.tokens_per_s.observe(metrics.tokens_per_s)

    def status(self, status: int) -> None:
        if status >= 400:
            self.errors_total.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """This process's live gauges no longer count (its files stay for the counters)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

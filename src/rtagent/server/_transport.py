"""The two transports of ``rtagent serve``: one run's AG-UI events as Server-Sent Events, and a
WebSocket carrying the same events plus the client's commands. Both stream a ``Reader`` of the run
log (``_runlog``): each event with its id, as the SSE ``id:`` field and as ``eventId`` in a frame."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Protocol

from ag_ui.encoder import EventEncoder
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from ._approvals import Answers, answers_command
from ._limits import (
    InputError,
    Limits,
    Metrics,
    RateLimiter,
    check_text,
    check_thread_id,
    client_of,
    deny,
    error,
    log,
    parse_json,
)
from ._runlog import SERVER_ERROR, Reader, RunLog


class Conversations(Protocol):
    """What the transports need of the app's conversations (``_app``'s server), which imports them."""

    limits: Limits
    limiter: RateLimiter | None
    metrics: Metrics

    log: RunLog

    async def start_run(self, thread_id: str, run_id: str, text: str | Answers | None) -> Reader:
        """See ``_app``; the WebSocket brings no client tools or state."""
        ...

    async def interrupt(self, thread_id: str) -> bool: ...


ENCODER = EventEncoder()

SSE_HEADERS = [
    (b"content-type", ENCODER.get_content_type().encode()),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx would otherwise hold events back in its buffer
]

# Frames whose JSON no decoder should take: the socket closes with 1007 (invalid payload data), as
# it would for bytes that are not UTF-8, rather than answer every one of a flood of them.
UNREADABLE = frozenset({"too_deep", "invalid_unicode"})

# Where ``App`` leaves the ASGI server's own ``send`` in the scope.
SERVER_SEND = "rtagent.server_send"


class App(Starlette):
    """Starlette, leaving the ASGI server's ``send`` in each request's scope for ``EventStream``.

    Starlette and each middleware wrap ``send`` in a coroutine of their own, and all of them look
    only at a response's start (its status, whether it began). A stream sends its start through
    them and its events (twenty a second for each of a thousand sessions) straight to the server:
    8% less server CPU per streamed token (bench/load.py, one worker, 300 sessions, mean of five
    runs each: 91 against 100 us).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


class EventStream:
    """The SSE response: a reader's events, each with its id (``id:``) when it has one.

    A client that goes away only stops its reading: the turn goes on (the run log's grace period
    decides whether it is interrupted, see ``_runlog``). A keep-alive comment goes out every
    ``ping_s``.
    """

    def __init__(self, reader: Reader, server: Conversations) -> None:
        self.reader = reader
        self.metrics = server.metrics
        self.ping_s = server.limits.ping_s
        self._open = True
        self._pinging: asyncio.Future[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics
        metrics.connections.inc()
        streaming = asyncio.ensure_future(self._stream(scope, send))
        watcher = asyncio.ensure_future(self._watch(receive, streaming))
        self._timer = asyncio.get_running_loop().call_later(self.ping_s, self._ping, send)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await streaming
        finally:
            self._open = False
            self._timer.cancel()
            watcher.cancel()
            await self.reader.aclose()
            metrics.connections.dec()

    async def _stream(self, scope: Scope, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            send = scope.get(SERVER_SEND, send)  # the start went through the wrappers: see App
            async for event_id, data, _ in self.reader:
                frame = f"id: {event_id}\ndata: {data}\n\n" if event_id else f"data: {data}\n\n"
                await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
            self._open = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under a send
            pass
        except Exception:  # a bug of ours: the client still gets an end it understands
            log.exception("streaming a run failed")
            if self._open:
                body = f"data: {SERVER_ERROR}\n\n".encode()
                await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _watch(self, receive: Receive, streaming: asyncio.Future[None]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._open:
            self._open = False
            streaming.cancel()

    def _ping(self, send: Send) -> None:
        # A timer, not a task per stream: a thousand quiet streams cost a thousand timer entries.
        if self._open:
            self._pinging = asyncio.ensure_future(self._send_ping(send))
            self._timer = asyncio.get_running_loop().call_later(self.ping_s, self._ping, send)

    async def _send_ping(self, send: Send) -> None:
        with contextlib.suppress(Exception):  # racing the end of the stream is harmless
            if self._open:
                await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})


class Socket:
    """The WebSocket transport: commands in, the same AG-UI events out, as JSON text frames.

    Commands: ``{"type": "send", "text": ...}``, ``{"type": "stop"}``, ``{"type": "resume",
    "after": ID}`` (the events after ``ID``, or with ``null`` those of the thread's latest run, then
    the live rest) and ``{"type": "answer", "approved": [CALL_ID...], "rejected": [...], "message"?:
    ...}`` (continues the run paused for these calls' approval, see ``_approvals``). Each logged
    event's frame carries its id as ``eventId``. Runs are streamed one after another, so a message
    sent while a turn streams (which interrupts it, by the chat's policy) gets its RUN_STARTED
    only after the earlier run's RUN_FINISHED.
    """

    def __init__(self, server: Conversations, ws: WebSocket) -> None:
        self.server = server
        self.ws = ws
        self.thread_id: str = ws.path_params["thread_id"]
        self.runs: asyncio.Queue[Reader] = asyncio.Queue()
        self.live: list[Reader] = []  # queued or streaming
        self.open = False
        self.sending = asyncio.Lock()  # error replies and events come from two tasks

    async def serve(self) -> None:
        ws = self.ws
        try:
            check_thread_id(self.thread_id)
        except InputError as exc:
            await deny(ws.scope, ws.receive, ws.send, error(exc.status, exc.code, str(exc)))
            return
        await ws.accept()
        self.open = True
        self.server.metrics.connections.inc()
        pump = asyncio.create_task(self._pump())
        try:
            while (message := await ws.receive())["type"] != "websocket.disconnect":
                try:
                    await self._command(message)
                except InputError as exc:
                    if exc.code in UNREADABLE:
                        await self._close(1007, str(exc))
                        break
                    await self._send(json.dumps({"type": "error", "error": exc.code, "message": str(exc)}))
        finally:
            self.open = False
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            for reader in self.live:  # the turns go on, for the run log's grace period
                await reader.aclose()
            self.server.metrics.connections.dec()

    async def _command(self, message: Message) -> None:
        limits = self.server.limits
        text = message.get("text")
        if text is None:
            raise InputError("send commands as JSON text frames", 400, "binary_frame")
        if len(text) > limits.max_body_bytes:
            raise InputError(f"the frame is over {limits.max_body_bytes} bytes", 413, "payload_too_large")
        command = parse_json(text, limits.max_json_depth)
        kind = command.get("type") if isinstance(command, dict) else None
        if kind == "stop":
            await self.server.interrupt(self.thread_id)
            return
        if kind == "resume":
            after = command.get("after")
            if after is not None and not isinstance(after, str):
                raise InputError('"after" must be an event id (a string) or null')
            reader = await self.server.log.read(self.thread_id, after)
            if reader is not None:
                self._queue(reader)
            return
        if kind not in ("send", "answer"):
            commands = (
                '{"type": "send", "text": "..."}, {"type": "stop"}, {"type": "resume", "after": ID}, '
                '{"type": "answer", "approved": [...], "rejected": [...]}'
            )
            raise InputError(f"a command is one of {commands}")
        if kind == "send" and not isinstance(command.get("text"), str):
            raise InputError('"text" must be a string')
        ask = (
            answers_command(command)
            if kind == "answer"
            else check_text(command["text"], limits.max_message_chars)
        )
        run_id = command.get("runId") or uuid.uuid4().hex
        if not isinstance(run_id, str) or len(run_id) > 128:
            raise InputError('"runId" must be a string of at most 128 characters')
        limiter = self.server.limiter
        wait = await limiter.wait(client_of(self.ws.scope)) if limiter is not None else 0.0
        if wait > 0:
            raise InputError(f"too many messages; try again in {wait:.1f} s", 429, "rate_limited")
        self._queue(await self.server.start_run(self.thread_id, run_id, ask))

    def _queue(self, reader: Reader) -> None:
        self.live.append(reader)
        self.runs.put_nowait(reader)

    async def _pump(self) -> None:
        while True:
            reader = await self.runs.get()
            try:
                async for event_id, data, _ in reader:
                    # The id joins the event's own fields: '{"type":...' becomes '{"eventId":"ID","type":...'.
                    await self._send(f'{{"eventId":"{event_id}",{data[1:]}' if event_id else data)
            except Exception:
                log.exception("streaming a run of thread %s failed", self.thread_id)
                await self._send(SERVER_ERROR)
            finally:
                self.live.remove(reader)
                await reader.aclose()

    async def _send(self, text: str) -> None:
        if not self.open:
            return
        try:
            async with self.sending:
                await self.ws.send_text(text)
        except (OSError, RuntimeError, WebSocketDisconnect):
            self.open = False

    async def _close(self, code: int, reason: str) -> None:
        self.open = False
        async with self.sending:
            with contextlib.suppress(OSError, RuntimeError, WebSocketDisconnect):
                await self.ws.close(code, reason)

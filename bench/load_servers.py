"""The two servers ``bench/load.py`` compares, each run as its own uvicorn process on loopback.

- ``rtagent``: ``rtagent.create_app`` (``POST /agui``, AG-UI events as SSE), with the per-client
  rate limit off and the concurrent-turn cap far above any N the benchmark tries;
- ``baseline``: what the Agents SDK documentation shows for streaming, behind the usual web
  tutorial's endpoint: Starlette (FastAPI's ``StreamingResponse`` is this same class) +
  ``Runner.run_streamed`` + ``result.stream_events()``, keeping the ``raw_response_event`` whose
  data is a ``ResponseTextDeltaEvent`` and sending each delta as ``data: {"delta": ...}``, then
  ``data: [DONE]``. It parses the same ``RunAgentInput`` body (with plain ``json``) and, like the
  documentation's example, keeps no session.

Both stream from the same scripted model (``rtagent.testing.reply`` steps, ``EndlessModel``): a
user message ``tokens=K`` gets K text deltas, ``INTERVAL`` seconds apart, so any gap beyond
``INTERVAL`` that a client sees is the server's.

Run (``bench/load.py`` does this): ``python bench/load_servers.py {rtagent|baseline} PORT INTERVAL
DB_PATH`` (DB_PATH: rtagent's SQLite file, or ``:memory:``). Environment switches:
``LOAD_PROFILE=FILE`` runs the server under cProfile and writes its stats to FILE when it stops
(SIGTERM or SIGINT); ``LOAD_GC_FREEZE=1`` freezes the
objects alive after start-up out of the garbage collector's view (``freeze_after_startup``);
``LOAD_GC_LOG=1`` prints every full collection, with its duration, to stderr. Either server also
answers ``GET /load/gc`` with the time its garbage collector took so far (``GcStats``);
``LOAD_GC_THRESHOLD=A,B,C`` calls ``gc.set_threshold(A, B, C)``;
``LOAD_SQLITE_SYNC=FULL`` sets ``PRAGMA synchronous`` on rtagent's database connection;
``LOAD_WORKERS=N`` runs N worker processes on the port, as ``rtagent serve --workers N`` does
(rtagent's share the database and coordinate on the Redis of ``LOAD_REDIS``, which also holds
their run log; ``LOAD_REDIS`` with one worker measures that run log's cost; the baseline keeps no
state).
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn
from agents import Agent, RunConfig, Runner, set_tracing_disabled
from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
from agents.models.interface import Model
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputRefusal,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtagent._replyevents import response
from rtagent.server._app import create_app
from rtagent.server._limits import Limits
from rtagent.testing import ScriptedModel, Step, reply

INSTRUCTIONS = "You are a helpful assistant."
TOKENS = re.compile(r"tokens=(\d+)")
DEFAULT_TOKENS = 40


class StreamingModel(Model):
    """A model that answers every call with ``tokens=K`` text deltas (K from the last user message),
    ``interval`` seconds apart, building each Responses-API event only when it is sent.

    Like a real model client, and unlike the test double ``rtagent.testing.ScriptedModel`` (which
    builds a response's every event up front, about six objects per future delta, and deep-copies
    every call), it holds nothing per delta while it waits. The events are the ones
    ``rtagent.testing`` streams, in the same order.
    """

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._ids = itertools.count(1)

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        raise NotImplementedError("the load benchmark only streams")

    async def stream_response(  # an async generator: what the SDK's signature means
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        *args: Any,
        **kwargs: Any,
    ) -> AsyncIterator[TResponseStreamEvent]:
        tokens = _requested_tokens(input)
        number = next(self._ids)
        sequence = itertools.count()
        item_id = f"msg_{number}"
        where: dict[str, Any] = {"item_id": item_id, "output_index": 0, "content_index": 0}
        started = response(f"resp_{number}", "load-bench", [], "in_progress")
        yield ResponseCreatedEvent(type="response.created", response=started, sequence_number=next(sequence))
        yield ResponseInProgressEvent(
            type="response.in_progress", response=started, sequence_number=next(sequence)
        )
        pending = _message(item_id, "", "in_progress")
        yield ResponseOutputItemAddedEvent(
            type="response.output_item.added", item=pending, output_index=0, sequence_number=next(sequence)
        )
        yield ResponseContentPartAddedEvent(
            type="response.content_part.added", part=_text(""), sequence_number=next(sequence), **where
        )
        pieces = []
        for index in range(tokens):
            if index:
                await asyncio.sleep(self._interval)
            piece = f" tok{index}"
            pieces.append(piece)
            yield ResponseTextDeltaEvent(
                type="response.output_text.delta",
                delta=piece,
                logprobs=[],
                sequence_number=next(sequence),
                **where,
            )
        text = "".join(pieces)
        yield ResponseTextDoneEvent(
            type="response.output_text.done", text=text, logprobs=[], sequence_number=next(sequence), **where
        )
        yield ResponseContentPartDoneEvent(
            type="response.content_part.done", part=_text(text), sequence_number=next(sequence), **where
        )
        done = _message(item_id, text, "completed")
        yield ResponseOutputItemDoneEvent(
            type="response.output_item.done", item=done, output_index=0, sequence_number=next(sequence)
        )
        completed = response(f"resp_{number}", "load-bench", [done], "completed", output_tokens=tokens)
        yield ResponseCompletedEvent(
            type="response.completed", response=completed, sequence_number=next(sequence)
        )


def _text(text: str) -> ResponseOutputText:
    return ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])


def _message(item_id: str, text: str, status: Literal["in_progress", "completed"]) -> ResponseOutputMessage:
    content: list[ResponseOutputText | ResponseOutputRefusal] = [_text(text)] if status == "completed" else []
    return ResponseOutputMessage(type="message", id=item_id, role="assistant", status=status, content=content)


class EndlessModel(ScriptedModel):
    """``rtagent.testing.ScriptedModel`` answering every call, however many come, like ``StreamingModel``.

    The project's own test double (``LOAD_MODEL=scripted``): it costs more per session than a real
    model client (see ``StreamingModel``), the same for both servers.
    """

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._steps_by_length: dict[int, Step] = {}

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        # The test double records every call and stream; a server making thousands must not keep them.
        self._calls.clear()
        self._streams.clear()
        tokens = _requested_tokens(args[1] if len(args) > 1 else kwargs["input"])
        step = self._steps_by_length.get(tokens)
        if step is None:
            step = self._steps_by_length[tokens] = reply(
                [f" tok{i}" for i in range(tokens)], delay=self._interval
            )
        self.enqueue(step)  # one step per call: every concurrent call pops one
        return super().stream_response(*args, **kwargs)


def make_model(interval: float) -> Model:
    """The model both servers stream from: ``LOAD_MODEL=scripted`` for ``EndlessModel``, else lazy."""
    if os.environ.get("LOAD_MODEL") == "scripted":
        return EndlessModel(interval)
    return StreamingModel(interval)


def _requested_tokens(model_input: str | list[Any]) -> int:
    text = model_input
    if isinstance(model_input, list):
        users = [item for item in model_input if isinstance(item, dict) and item.get("role") == "user"]
        text = str(users[-1].get("content")) if users else ""
    match = TOKENS.search(str(text))
    return int(match.group(1)) if match else DEFAULT_TOKENS


def rtagent_app(
    interval: float, db_path: str, synchronous: str | None = None, redis: str | None = None
) -> Starlette:
    model = make_model(interval)
    agent = Agent(name="bench", instructions=INSTRUCTIONS, model=model)
    limits = Limits(rate_per_s=0, max_turns=1_000_000)
    app = create_app(agent, model=model, db_path=db_path, limits=limits, redis=redis)
    if synchronous:  # e.g. FULL: every commit then waits for an fsync, as the SDK's own sessions do
        db = app.state.server.db
        with db.lock:
            db.connection.execute(f"PRAGMA synchronous={synchronous}")
    return app


def baseline_app(interval: float) -> ASGIApp:
    set_tracing_disabled(True)  # rtagent runs with tracing off too
    agent = Agent(name="bench", instructions=INSTRUCTIONS, model=make_model(interval))

    async def chat(request: Request) -> Response:
        body = await request.json()
        text = body["messages"][-1]["content"]
        result = Runner.run_streamed(agent, input=text, run_config=RunConfig(tracing_disabled=True))

        async def events() -> AsyncIterator[str]:
            async for event in result.stream_events():
                if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent):
                    yield f"data: {json.dumps({'delta': event.data.delta})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/chat", chat, methods=["POST"]), Route("/healthz", healthz)])


class GcStats:
    """Time spent in the garbage collector, by generation: wall and CPU ms, count, longest pause.

    A 2-core machine shared with other work stretches a pause's wall time; its CPU time says how
    much of it was the collector's own work. With ``log`` every full collection is printed to stderr.
    """

    def __init__(self, log: bool) -> None:
        self.log = log
        self.totals = {gen: {"count": 0, "wall_ms": 0.0, "cpu_ms": 0.0, "max_ms": 0.0} for gen in range(3)}
        self._started = (0.0, 0.0)
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
            return
        wall = (time.perf_counter() - self._started[0]) * 1e3
        cpu = (time.thread_time() - self._started[1]) * 1e3
        total = self.totals[info["generation"]]
        total["count"] += 1
        total["wall_ms"] += wall
        total["cpu_ms"] += cpu
        total["max_ms"] = max(total["max_ms"], wall)
        if self.log and info["generation"] == 2:
            live, frozen = len(gc.get_objects(2)), gc.get_freeze_count()
            line = f"gc gen2: {wall:.1f} ms ({cpu:.1f} ms CPU), {info['collected']} collected, {live} left"
            print(f"{line}, {frozen} frozen", file=sys.stderr, flush=True)

    def snapshot(self) -> dict[str, Any]:
        return {
            "generations": {str(gen): dict(total) for gen, total in self.totals.items()},
            "tracked_objects": len(gc.get_objects()),
            "frozen_objects": gc.get_freeze_count(),
        }


def with_gc_stats(app: ASGIApp, stats: GcStats) -> ASGIApp:
    """``app``, answering ``GET /load/gc`` itself with the collector's figures (for bench/load.py)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/load/gc":
            await JSONResponse(stats.snapshot())(scope, receive, send)
            return
        await app(scope, receive, send)

    return wrapped


def freeze_after_startup(app: ASGIApp) -> ASGIApp:
    """``app``, calling ``gc.collect(); gc.freeze()`` once its lifespan startup is complete.

    Every object alive then (the modules, classes and validators of the SDK, openai and pydantic:
    about 180,000, slow to traverse) leaves the collector's view, so a full collection no longer
    walks them. This is the change ``bench/load.py --gc-freeze rtagent`` measures.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def on_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.collect()
                gc.freeze()
            await send(message)

        await app(scope, receive, on_send)

    return wrapped


def build(argv: list[str]) -> ASGIApp:
    """The app ``argv`` names (see the module docstring), with the switches of the environment."""
    stats = GcStats(log=bool(os.environ.get("LOAD_GC_LOG")))
    kind, interval = argv[0], float(argv[2])
    app: ASGIApp
    if kind == "rtagent":
        redis = os.environ.get("LOAD_REDIS")
        app = rtagent_app(interval, argv[3], os.environ.get("LOAD_SQLITE_SYNC"), redis)
    else:
        app = baseline_app(interval)
    if os.environ.get("LOAD_GC_FREEZE"):
        app = freeze_after_startup(app)
    threshold = os.environ.get("LOAD_GC_THRESHOLD")
    if threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    return with_gc_stats(app, stats)


def worker() -> ASGIApp:
    """One of ``LOAD_WORKERS`` processes: the app of the arguments the parent left in ``LOAD_ARGV``."""
    return build(json.loads(os.environ["LOAD_ARGV"]))


def main(argv: list[str]) -> None:
    port = int(argv[1])
    # Loopback; uvloop and httptools when installed (uvicorn's "auto"), as in production.
    options: dict[str, Any] = {"host": "127.0.0.1", "port": port, "log_level": "warning", "access_log": False}
    options["backlog"] = 4096
    workers = int(os.environ.get("LOAD_WORKERS", "1"))
    if workers > 1:  # as ``rtagent serve --workers N`` runs them, sharing one database
        shared = tempfile.mkdtemp(prefix="load-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(shared, "metrics")
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        os.environ["LOAD_ARGV"] = json.dumps(argv)
        here = os.path.dirname(os.path.abspath(__file__))
        uvicorn.run("load_servers:worker", factory=True, workers=workers, app_dir=here, **options)
        return
    app = build(argv)
    profile_path = os.environ.get("LOAD_PROFILE")
    profiler = cProfile.Profile() if profile_path else None
    if profiler is not None:
        profiler.enable()
    try:
        uvicorn.run(app, **options)
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)


if __name__ == "__main__":
    main(sys.argv[1:])

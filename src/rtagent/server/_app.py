"""``rtagent serve``: an agent behind the AG-UI protocol, over Server-Sent Events and WebSocket.

=========================================  =========================================================
``POST /agui`` (also ``POST /``)           a ``RunAgentInput`` -> the run's AG-UI events as SSE
``GET /ws/{thread}`` (WebSocket)           the same events as JSON text frames; the client sends
                                           ``{"type": "send", "text": ...}`` and ``{"type": "stop"}``
``GET /threads/{thread}/stream``           the thread's events after ``Last-Event-ID`` (or
                                           ``?after=ID``), then the live rest (204: none to stream)
``POST /threads/{thread}/stop``            interrupt the thread's running turn
``GET /threads/{thread}/messages``         the history as AG-UI messages, to reload a page, and
                                           the ``interrupts`` its paused run waits on, if any
``DELETE /threads/{thread}``               forget a conversation
``GET /healthz``, ``GET /metrics``         liveness; Prometheus metrics
``GET /``, ``/static/...``                 the browser page, when ``static/`` has one
=========================================  =========================================================

The server owns the history: the AG-UI ``threadId`` is the session id, conversations live in one
SQLite file, and of the messages a client sends only the last one, the new user message, is used.
A run is one turn of a thread's ``Chat``, so a message sent while a turn runs follows the chat's
policy (interrupt it, by default), and a stop interrupts the turn with the usual semantics: what
the user saw is kept in the history, marked as cut off. Every event of a turn's run goes to the run
log (``_runlog``) with an id, so a client that reconnects misses nothing; a client that goes away
interrupts the turn only if nobody follows the thread again within ``disconnect_grace`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from agents import Agent
from agents.memory import Session
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from .._chat import Chat, Policy
from .._errors import ApprovalError, RTAgentError, describe
from .._events import ApprovalRequested
from .._history import content_text, record_cut
from .._loading import load_agent
from .._models import ModelSpec, resolve_model
from .._turn import Turn, TurnOptions, pending_of
from ..cache import configure_cache
from ..cache._replies import DEFAULT_TTL_S, RedisStore, ReplyCache
from ._agui import AguiRun, dump, history_messages, interrupts, log
from ._approvals import Answers, PausedRuns, answers_of
from ._bus import Bus, FencedSession, check_redis
from ._engines import check_store, open_store
from ._frontend import NO_FRONTEND, Frontend, frontend_tools, tool_results
from ._limits import (
    UNAVAILABLE,
    AccessLog,
    Guard,
    InputError,
    Limits,
    Metrics,
    RateLimiter,
    check_thread_id,
    error,
    error_json,
    is_loopback,
    parse_run_input,
    read_body,
)
from ._redislog import RedisRunLog
from ._runlog import Reader, RunLog, kind_of
from ._security import SameSite
from ._transport import App, EventStream, Socket

STATIC = Path(__file__).with_name("static")


class _Server:
    """The conversations of one app: a ``Chat`` per thread, loaded from SQLite when first used."""

    def __init__(
        self,
        agent: Agent[Any],
        model: ModelSpec,
        db_path: str | Path | None,
        policy: Policy,
        limits: Limits,
        redis: str | None = None,
        disconnect_grace: float = 15.0,
        lease_s: float = 5.0,
        store: str | None = None,
        reply_cache: ReplyCache | None = None,
    ) -> None:
        self.agent = agent
        self.reply_cache = reply_cache
        # The chats get the spec, not the model it resolves to: without one, each agent of a run
        # (after a handoff too) runs on its own model.
        self.model = model
        self.first_model = resolve_model(model, agent)  # a bad spec fails here, at start-up, in one line
        self.db = open_store(store, db_path)  # SQLite, PostgreSQL or Redis (see ``_engines``)
        self.paused = PausedRuns(self.db)
        # With Redis, replicas share the threads: one turn per thread across them (see ``_bus``).
        self.bus = None if redis is None else Bus(redis, lease_s=lease_s, max_turns=limits.max_turns)
        if redis is not None:  # and the results of cached tools, so a result computed on one is a hit on all
            configure_cache(redis)
        self.policy: Policy = policy
        self.limits = limits
        self.metrics = Metrics()
        self.log = (
            RunLog(grace_s=disconnect_grace) if self.bus is None else self._shared_log(disconnect_grace)
        )
        rate, burst = limits.rate_per_s, limits.burst
        self.limiter = RateLimiter(rate, burst, redis) if rate > 0 else None
        self._chats: OrderedDict[str, Chat] = OrderedDict()
        self._running: dict[str, int] = {}  # thread -> its turns here, running or waiting to
        self._members: dict[str, list[str]] = {}  # thread -> its turns' places in the shared cap
        # Held while a thread's lease is taken here, so that two messages of the thread arriving at
        # once do not both take it (the second would wait for the first turn's end, uninterrupted);
        # a lock lives as long as someone holds or awaits it.
        self._claiming: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Each thread's latest run here, set once the paused run it leaves is in the store: its
        # client may see its end, and answer again, before that write is done (``run_ended``).
        self._kept: dict[str, asyncio.Event] = {}

    @property
    def _active(self) -> int:
        """The turns of this process, running or waiting for the one before them."""
        return sum(self._running.values())

    def _shared_log(self, grace_s: float) -> RedisRunLog:
        assert self.bus is not None
        log = RedisRunLog(self.bus, grace_s=grace_s)
        log.recover = self.recover
        return log

    # -- conversations --------------------------------------------------------------------------

    def chat(self, thread_id: str) -> Chat:
        chat = self._chats.get(thread_id)
        if chat is None:
            self._make_room()
            session: Session = self.db.session(thread_id)  # no I/O: read when a turn needs it
            if self.bus is not None:
                session = FencedSession(session, self.bus, thread_id)
            chat = Chat(
                self.agent,
                session=session,
                policy=self.policy,
                model=self.model,
                reply_cache=self.reply_cache,
            )
            self._chats[thread_id] = chat
            self.metrics.sessions.set(len(self._chats))
        self._chats.move_to_end(thread_id)
        return chat

    def _make_room(self) -> None:
        # The oldest idle chats go (a busy one never does): their history is in the database, and a
        # background tool still running keeps its own reference to the session it writes to.
        excess = len(self._chats) + 1 - self.limits.loaded_threads
        if excess > 0:
            idle = (thread_id for thread_id, chat in self._chats.items() if _idle(chat))
            for thread_id in list(itertools.islice(idle, excess)):
                del self._chats[thread_id]

    async def known_chat(self, thread_id: str) -> Chat:
        """The chat of a thread that exists (is loaded or has history), else 404."""
        loaded = thread_id in self._chats
        chat = self.chat(check_thread_id(thread_id))
        if not loaded and not await chat.session.get_items(limit=1):
            self._chats.pop(thread_id, None)
            raise InputError(f"no conversation with thread id {thread_id!r}", 404, "unknown_thread")
        return chat

    async def start_run(
        self, thread_id: str, run_id: str, text: str | Answers | None, frontend: Frontend = NO_FRONTEND
    ) -> Reader:
        """Start a run of the thread (a turn for ``text``, one continuing its paused run with these
        ``Answers``, else its history), with the client's tools and state: its events to stream."""
        chat = self.chat(thread_id)
        if text is None:
            return Reader(_unlogged(AguiRun(thread_id, run_id, chat, None, observe=self.metrics.observe)))
        full = f"the server runs its maximum of {self.limits.max_turns} turns; try again shortly"
        if self.bus is None and self._active >= self.limits.max_turns:
            raise InputError(full, 503, "overloaded")
        if self.bus is not None:
            member = await self.bus.enter_turn()
            if member is None:
                raise InputError(full, 503, "overloaded")
            self._members.setdefault(thread_id, []).append(member)
            try:
                async with self._claim_lock(thread_id):
                    await self._claim(thread_id)
                    self._running[thread_id] = self._running.get(thread_id, 0) + 1
            except BaseException:
                await self._leave(thread_id)
                raise
        else:
            self._running[thread_id] = self._running.get(thread_id, 0) + 1
        self.metrics.turns.inc()
        try:
            turn, paused = await self._turn(chat, thread_id, text, frontend)
        except BaseException:
            await self.turn_ended(thread_id)
            raise
        observe = self.metrics.observe
        run = AguiRun(
            thread_id, run_id, chat, turn, observe=observe, client_tools=frontend.names, state=frontend.state
        )
        kept = self._kept[thread_id] = asyncio.Event()
        ended = functools.partial(self.run_ended, thread_id, turn, paused, kept)
        return self.log.produce(run, text if isinstance(text, str) else "", ended)

    async def _turn(
        self, chat: Chat, thread_id: str, text: str | Answers, frontend: Frontend
    ) -> tuple[Turn, bool]:
        """The chat's next turn, and whether it takes up a paused run (kept in the store until the
        turn that answers it ends). A run paused on another replica, or before a restart, is the
        store's: this replica holds the thread now, so what the store has is current."""
        paused = bool(chat.pending)
        if (state := await self._stored_pause(thread_id, chat)) is not None:
            await chat.restore(state)
            paused = True
        results = text.results if isinstance(text, Answers) else {}
        options: TurnOptions = {}
        if frontend.tools:
            options["tools"] = frontend_tools(self.agent, frontend.tools, results)
        if frontend.state is not None:
            options["context"] = frontend.state.value
        if isinstance(text, str):
            return chat.send(text, **options), paused
        try:
            return chat.resume(text.approved, text.rejected, **options), paused
        except ApprovalError as exc:
            raise InputError(str(exc), 409, "not_pending") from None

    async def _stored_pause(self, thread_id: str, chat: Chat) -> str | None:
        """The paused run the store keeps for the thread, when the chat here knows of none and runs
        no turn (it paused on another replica, or before a restart); once this replica's last run
        of the thread has written what it leaves there."""
        if chat.pending or (chat.turn is not None and not chat.turn.done):
            return None
        kept = self._kept.get(thread_id)
        if kept is not None:
            await kept.wait()
        return await self.paused.load(thread_id)

    async def run_ended(self, thread_id: str, turn: Turn, paused: bool, kept: asyncio.Event) -> None:
        """Keep the turn's paused run for whoever answers it; forget the one it took up."""
        try:
            state = turn.result.state if turn.done else None
            if state is not None or paused:
                await self.paused.save(thread_id, state)
        except Exception:  # the turn's own outcome stands; the thread can still go on
            log.exception("keeping the paused run of thread %s failed", thread_id)
        finally:
            kept.set()
            if self._kept.get(thread_id) is kept:
                del self._kept[thread_id]
            await self.turn_ended(thread_id)

    def _claim_lock(self, thread_id: str) -> asyncio.Lock:
        lock = self._claiming.get(thread_id)
        if lock is None:
            lock = self._claiming[thread_id] = asyncio.Lock()
        return lock

    async def _claim(self, thread_id: str) -> None:
        """Before a turn of the thread starts here: hold its lease (a turn of it elsewhere is
        interrupted, or awaited, by the policy); close the run of a replica that died with it."""
        assert self.bus is not None
        if self._running.get(thread_id):
            return  # this replica holds it already; the chat orders the turns
        await self._acquire(thread_id, interrupt=self.policy == "interrupt")
        await self._close_dead_run(thread_id)

    async def _acquire(self, thread_id: str, *, interrupt: bool, timeout_s: float = 30.0) -> None:
        assert self.bus is not None
        token = await self.bus.acquire(thread_id, interrupt=interrupt, timeout_s=timeout_s)
        session = self.chat(thread_id).session
        assert isinstance(session, FencedSession)
        session.hold(token)

    async def _close_dead_run(self, thread_id: str) -> None:
        assert isinstance(self.log, RedisRunLog)
        dead = await self.log.dead_run(thread_id)
        if dead is None:
            return
        # What the user saw of it stays in the history, marked as cut, as after an interrupt.
        session = self.chat(thread_id).session
        last = await session.get_items(limit=1)
        item: dict[str, Any] = last[0] if last else {}  # type: ignore[assignment]
        # A run answering approvals had no user message of its own.
        if dead.user and not (item.get("role") == "user" and content_text(item.get("content")) == dead.user):
            await session.add_items([{"role": "user", "content": dead.user}])
        if dead.text:
            await record_cut(session, dead.text, [], {})
        await self.log.close_dead(thread_id, dead)
        log.warning("thread %s: closed run %s of a replica that stopped", thread_id, dead.run_id)

    async def recover(self, thread_id: str) -> None:
        """Take over a thread whose replica died mid-run (a follower here found its lease gone)."""
        assert self.bus is not None
        async with self._claim_lock(thread_id):
            if self._running.get(thread_id):
                return
            try:
                await self._acquire(thread_id, interrupt=False, timeout_s=1.0)
            except InputError:
                return  # another replica took it meanwhile, and closes the run
            try:
                await self._close_dead_run(thread_id)
            finally:
                await self.bus.release(thread_id)

    async def turn_ended(self, thread_id: str) -> None:
        self.metrics.turns.dec()
        self._running[thread_id] -= 1
        if self._running[thread_id] == 0:
            del self._running[thread_id]
        if self.bus is not None:
            try:
                await self._leave(thread_id)
                if thread_id not in self._running:
                    await self.bus.release(thread_id)
            except (RedisError, OSError) as exc:  # the lease expires by itself
                log.warning("cannot release thread %s on Redis: %s", thread_id, exc)

    async def _leave(self, thread_id: str) -> None:
        assert self.bus is not None
        members = self._members.get(thread_id)
        if members:
            await self.bus.leave_turn(members.pop(0))
            if not members:
                del self._members[thread_id]

    async def answer(self, operation: str, thread_id: str) -> None:
        """What another replica asks of this one (see ``_bus``)."""
        if operation == "detached":
            self.log.detached_elsewhere(thread_id)
        elif operation in ("interrupt", "stop"):
            self.interrupt_here(thread_id)

    def interrupt_here(self, thread_id: str) -> bool:
        """Interrupt the thread's turn running in this process; whether there was one."""
        chat = self._chats.get(thread_id)
        if chat is None or _idle(chat):
            return False
        assert chat.turn is not None
        chat.turn.interrupt()
        return True

    async def aclose(self) -> None:
        """Interrupt every running turn, wait (briefly) for their histories to be saved, close the file."""
        closing = [chat.aclose() for chat in self._chats.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
        self._chats.clear()
        if self.bus is not None:
            assert isinstance(self.log, RedisRunLog)
            await self.log.aclose()
            await self.bus.aclose()
        self.metrics.close()
        await self.db.aclose()

    # -- HTTP endpoints -------------------------------------------------------------------------

    async def agui(self, request: Request) -> Response:
        body = await read_body(request, self.limits.max_body_bytes)
        run_input, text = parse_run_input(body, self.limits)
        request.state.thread_id = run_input.thread_id
        # Resume entries, or results of the client's tools, answer the thread's paused run.
        results = tool_results(run_input)
        ask = answers_of(run_input.resume or [], results) if run_input.resume or results else text
        frontend = Frontend.of(run_input)
        reader = await self.start_run(run_input.thread_id, run_input.run_id, ask, frontend)
        # Starlette only calls what an endpoint returns; the stream is an ASGI app, not a Response.
        return EventStream(reader, self)  # type: ignore[return-value]

    async def interrupt(self, thread_id: str) -> bool:
        """Interrupt the thread's running turn, here or in another replica; whether there was one."""
        if self.interrupt_here(thread_id):
            return True
        return self.bus is not None and await self.bus.tell_holder(thread_id, "stop")

    async def resume(self, request: Request) -> Response:
        thread_id = check_thread_id(request.path_params["thread_id"])
        after = request.headers.get("last-event-id") or request.query_params.get("after") or None
        reader = await self.log.read(thread_id, after)
        if reader is None:  # 204 also tells an EventSource to stop reconnecting
            return Response(status_code=204)
        return EventStream(reader, self)  # type: ignore[return-value]  # an ASGI app, as in agui

    async def stop(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        await self.known_chat(thread_id)
        return JSONResponse({"threadId": thread_id, "stopped": await self.interrupt(thread_id)})

    async def messages(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        chat = await self.known_chat(thread_id)
        messages = [dump(m) for m in history_messages(await chat.history())]
        waiting = [dump(i) for i in interrupts(await self.pending(thread_id, chat))]
        return JSONResponse({"threadId": thread_id, "messages": messages, "interrupts": waiting})

    async def pending(self, thread_id: str, chat: Chat) -> tuple[ApprovalRequested, ...]:
        """The calls the thread's paused run waits on, as ``_turn`` would take it up. A page
        reloading needs them: its history shows those calls only as calls without results."""
        state = await self._stored_pause(thread_id, chat)
        return chat.pending if state is None else await pending_of(chat.agent, state)

    async def delete(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        chat = await self.known_chat(thread_id)
        await chat.aclose()
        if self.bus is not None:
            async with self._claim_lock(thread_id):
                if not self._running.get(thread_id):  # and a turn of it elsewhere
                    await self.bus.acquire(thread_id, interrupt=True)
                    await self.bus.release(thread_id)
        await chat.session.clear_session()
        self._chats.pop(thread_id, None)
        self.metrics.sessions.set(len(self._chats))
        return Response(status_code=204)

    async def healthz(self, request: Request) -> Response:
        # Which worker answered, when several serve (each counts its own turns and threads).
        health = {"status": "ok", "turns": self._active, "threads": len(self._chats), "worker": os.getpid()}
        return JSONResponse(health)

    async def prometheus(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    async def index(self, request: Request) -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return error(404, "not_found", "this server has no page; use the AG-UI API at POST /agui")
        return FileResponse(page)

    # -- WebSocket ------------------------------------------------------------------------------

    async def websocket(self, ws: WebSocket) -> None:
        await Socket(self, ws).serve()


def _idle(chat: Chat) -> bool:
    return chat.turn is None or chat.turn.done


async def _unlogged(run: AguiRun) -> AsyncGenerator[tuple[str, str, int], None]:
    """A run without a turn (the history, for a client reloading): not logged, no ids."""
    async for event in run.events():
        yield "", event.model_dump_json(by_alias=True), kind_of(event)


def create_app(
    agent: Agent[Any],
    *,
    model: ModelSpec = None,
    db_path: str | Path | None = None,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
    policy: Policy = "interrupt",
    limits: Limits | None = None,
    redis: str | None = None,
    disconnect_grace: float = 15.0,
    lease_s: float = 5.0,
    store: str | None = None,
    reply_cache: ReplyCache | None = None,
) -> Starlette:
    """The ASGI app serving ``agent`` (run it with uvicorn); see the module docstring for the API.

    ``db_path``: the SQLite file of the conversations (by default ``threads.db`` in the user's data
    directory, see ``_store.default_path``).
    ``token``: every API request must then carry ``Authorization: Bearer TOKEN``. ``cors_origins``:
    the browser origins allowed to call the API from other sites (none by default).
    ``allowed_hosts``: the names it answers to besides the loopback ones (see ``_security``).
    ``redis``: the URL of the Redis that replicas serving the same conversations share (``serve
    --redis``, and ``--workers``): leases, stops, the turn cap and the run log live there (see
    ``_bus``), and a replica's lease expires ``lease_s`` after it stops renewing it; so do the
    results of cached tools (``rtagent.cached``), for every app of the process.
    ``disconnect_grace``: how long a turn whose clients all went away keeps running for one to
    come back (0: it is interrupted at once).
    ``store``: instead of ``db_path``, a URL: ``sqlite:///PATH``, ``postgresql://...`` or
    ``redis://...`` (see ``_engines``); it is connected to when the app starts.
    ``reply_cache``: every conversation's turns ask it first (see ``ReplyCache``; ``serve
    --reply-cache exact|semantic``).
    """
    server = _Server(
        agent,
        model,
        db_path,
        policy,
        limits or Limits(),
        redis,
        disconnect_grace,
        lease_s,
        store,
        reply_cache,
    )
    thread = "/threads/{thread_id}"
    routes: list[Route | WebSocketRoute | Mount] = [
        Route("/agui", server.agui, methods=["POST"]),
        Route("/", server.agui, methods=["POST"]),
        Route("/", server.index, methods=["GET"]),
        WebSocketRoute("/ws/{thread_id}", server.websocket),
        Route(f"{thread}/stream", server.resume, methods=["GET"]),
        Route(f"{thread}/stop", server.stop, methods=["POST"]),
        Route(f"{thread}/messages", server.messages, methods=["GET"]),
        Route(thread, server.delete, methods=["DELETE"]),
        Route("/healthz", server.healthz, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
    ]
    if STATIC.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=STATIC)))
    middleware = [
        Middleware(AccessLog, on_status=server.metrics.status),
        Middleware(SameSite, allowed_hosts=allowed_hosts, cors_origins=cors_origins),
    ]
    if cors_origins:
        # Outside the guard: a browser's preflight carries no token and must still be answered.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Accept"],
            )
        )
    middleware.append(Middleware(Guard, token=token, limiter=server.limiter))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await server.db.check()  # an engine it cannot reach fails the start, in one line
        warm = getattr(server.first_model, "warm", None)
        if warm is not None:  # the embedded model starts now, not on the first person's message
            await warm(server.agent)
        if server.reply_cache is not None:
            await server.reply_cache.warm()
        if server.bus is not None:
            await server.bus.start(server.answer, server.interrupt_here)
        # The SDK, openai and pydantic leave some 200,000 objects that live as long as the process;
        # every full collection walked them all, pausing every stream for up to half a second
        # (bench/load.py). Frozen, the collector only sees what the conversations allocate.
        gc.collect()
        gc.freeze()
        yield
        await server.aclose()

    app = App(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=dict.fromkeys(
            (InputError, HTTPException, ClientDisconnect, *UNAVAILABLE, Exception), error_json
        ),
    )
    app.state.server = server
    return app


def serve_main(args: argparse.Namespace) -> int:
    """``rtagent serve [AGENT] [--model SPEC] [--host H] [--port P] [--token T] [--db PATH | --store URL]
    [--cors-origin ORIGIN]... [--allowed-host NAME]... [--max-turns N] [--rate-limit PER_S]
    [--redis URL [--lease S]] [--workers N] [--disconnect-grace S] [--reply-cache exact|semantic
    [--reply-cache-ttl S]]``: serve until Ctrl-C.

    Returns the exit status. Every attribute of ``args`` is optional (``None`` means the default).
    With ``workers`` over 1, uvicorn starts that many processes, each building the app from the
    same options (``worker_app``); they coordinate on Redis, as replicas on several hosts do.
    """
    import uvicorn

    host: str = getattr(args, "host", None) or "127.0.0.1"
    port: int = getattr(args, "port", None) or 8000
    token: str | None = getattr(args, "token", None) or os.environ.get("RTAGENT_TOKEN") or None
    if token is None and not is_loopback(host):
        needs = "needs a token: pass --token or set RTAGENT_TOKEN"
        print(f"rtagent serve: listening on {host} {needs}", file=sys.stderr)
        return 2
    hosts = getattr(args, "allowed_host", None) or os.environ.get("RTAGENT_ALLOWED_HOSTS", "").split(",")
    allowed_hosts = [name.strip() for name in hosts if name.strip()]
    if not allowed_hosts and not is_loopback(host):
        needs = "needs the names it is reached by: pass --allowed-host or set RTAGENT_ALLOWED_HOSTS"
        print(f"rtagent serve: listening on {host} {needs}", file=sys.stderr)
        return 2
    db_path: str | None = getattr(args, "db", None) or None
    try:
        store = _store_url(db_path, getattr(args, "store", None))
        # Before uvicorn, which would report a failing start-up with a traceback.
        asyncio.run(check_store(store))
        grace = _seconds(getattr(args, "disconnect_grace", None), "RTAGENT_DISCONNECT_GRACE", 15.0)
        lease = _seconds(getattr(args, "lease", None), "RTAGENT_LEASE_S", 5.0)
        redis: str | None = getattr(args, "redis", None) or os.environ.get("RTAGENT_REDIS") or None
        workers: int = getattr(args, "workers", None) or 1
        if workers > 1 and redis is None:
            raise RTAgentError("--workers over 1 needs --redis URL (or RTAGENT_REDIS): the workers share it")
        if redis is not None:
            check_redis(redis)
    except RTAgentError as exc:
        print(f"rtagent serve: {describe(exc)}", file=sys.stderr)
        return 2
    overrides = {
        "max_turns": getattr(args, "max_turns", None),
        "rate_per_s": getattr(args, "rate_limit", None),
    }
    limits: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    options: dict[str, Any] = {
        "agent": getattr(args, "agent", None),
        "model": getattr(args, "model", None),
        "db_path": db_path,
        "store": store,
        "token": token,
        "cors_origins": getattr(args, "cors_origin", None) or [],
        "allowed_hosts": allowed_hosts,
        "limits": limits,
        "disconnect_grace": grace,
        "redis": redis,
        "lease_s": lease,
        "reply_cache": getattr(args, "reply_cache", None),
        "reply_cache_ttl": getattr(args, "reply_cache_ttl", None) or DEFAULT_TTL_S,
    }
    # uvicorn's own access log is off: ours is structured and knows the thread.
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": False,
        "ws": "rtagent.server._websocket:WebSocketProtocol",  # uvicorn's websockets-sansio, fixed
        "ws_max_size": dataclasses.replace(Limits(), **limits).max_body_bytes,
        "timeout_graceful_shutdown": 5,
    }
    try:
        if workers == 1:
            uvicorn.run(_app(options), **settings)
            return 0
        resolve_model(options["model"], load_agent(options["agent"]))  # a bad one fails here, once
    except RTAgentError as exc:
        print(f"rtagent serve: {describe(exc)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rtagent-metrics-") as metrics:
        # Read by each worker (uvicorn spawns them) before it imports prometheus_client.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics
        os.environ[_WORKER_OPTIONS] = json.dumps({**options, "parent": os.getpid()})
        uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, **settings)
    return 0


def _store_url(db: str | None, store: str | None) -> str | None:
    """The store URL of ``--store`` (else ``RTAGENT_STORE``, unless ``--db`` names a file)."""
    if db and store:
        raise RTAgentError("give --db or --store, not both")
    if db:
        return None
    return store or os.environ.get("RTAGENT_STORE") or None


def _seconds(given: float | None, variable: str, default: float) -> float:
    """A duration from its flag, else its environment variable, else ``default``."""
    if given is not None:
        return given
    try:
        return float(os.environ.get(variable) or default)
    except ValueError:
        raise RTAgentError(f"{variable} must be a number of seconds") from None


_WORKER_OPTIONS = "RTAGENT_SERVE_OPTIONS"
# How often a worker checks that its ``serve`` process still lives.
PARENT_CHECK_S = 0.25


def worker_app() -> Starlette:
    """The app of one ``serve --workers`` process, from the options its parent left in the environment."""
    options = json.loads(os.environ[_WORKER_OPTIONS])
    _stop_with(options.pop("parent"))
    return _app(options)


def _stop_with(parent: int) -> None:
    """Stop this worker as its supervisor would (SIGTERM) once the ``serve`` process ``parent`` is gone.

    uvicorn's supervisor stops its workers when it is asked to, but a supervisor killed outright
    (SIGKILL, the OOM killer) leaves them serving the port, and a restart cannot bind it. A watch on
    the parent's pid rather than Linux's parent-death signal: that fires when the supervisor's
    *thread* that started the worker ends, and works on Linux only. The watch also sees a parent that
    died before it began: the worker is then already another process's child.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        # uvicorn's handler: the worker closes the port, then ends its turns and saves them.
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="rtagent-parent-watch", daemon=True).start()


def _app(options: dict[str, Any]) -> Starlette:
    access = logging.getLogger("rtagent.access")  # its JSON lines, as they are, on stderr
    if not access.handlers:
        access.addHandler(logging.StreamHandler())
    access.setLevel(logging.INFO)
    access.propagate = False
    return create_app(
        load_agent(options["agent"]),
        model=options["model"],
        db_path=options["db_path"],
        store=options.get("store"),
        token=options["token"],
        cors_origins=options["cors_origins"],
        allowed_hosts=options["allowed_hosts"],
        limits=dataclasses.replace(Limits(), **options["limits"]),
        redis=options["redis"],
        disconnect_grace=options["disconnect_grace"],
        lease_s=options["lease_s"],
        reply_cache=_reply_cache(options),
    )


def _reply_cache(options: dict[str, Any]) -> ReplyCache | None:
    """Each worker's own cache; with Redis, their exact entries are shared (see ``ReplyCache``)."""
    match = options.get("reply_cache")
    if match is None:
        return None
    store = RedisStore(options["redis"]) if options.get("redis") else None
    return ReplyCache(match, ttl_s=options.get("reply_cache_ttl") or DEFAULT_TTL_S, store=store)

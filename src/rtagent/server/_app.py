"""``rtagent serve``: an agent behind the AG-UI protocol, over Server-Sent Events and WebSocket.

=========================================  =========================================================
``POST /agui`` (also ``POST /``)           a ``RunAgentInput`` -> the run's AG-UI events as SSE
``GET /ws/{thread}`` (WebSocket)           the same events as JSON text frames; the client sends
                                           ``{"type": "send", "text": ...}`` and ``{"type": "stop"}``
``POST /threads/{thread}/stop``            interrupt the thread's running turn
``GET /threads/{thread}/messages``         the history as AG-UI messages, to reload a page
``DELETE /threads/{thread}``               forget a conversation
``GET /healthz``, ``GET /metrics``         liveness; Prometheus metrics
``GET /``, ``/static/...``                 the browser page, when ``static/`` has one
=========================================  =========================================================

The server owns the history: the AG-UI ``threadId`` is the session id, conversations live in one
SQLite file, and of the messages a client sends only the last one, the new user message, is used.
A run is one turn of a thread's ``Chat``, so a message sent while a turn runs follows the chat's
policy (interrupt it, by default), and a stop or a client that goes away interrupts the turn with
the usual semantics: what the user saw is kept in the history, marked as cut off.
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
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from agents import Agent
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
from .._errors import RTAgentError, describe
from .._loading import load_agent
from .._models import ModelSpec, resolve_model
from ._agui import AguiRun, dump, history_messages
from ._engines import check_store, open_store
from ._limits import (
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
from ._security import SameSite
from ._transport import App, EventStream, Socket
from ._workers import Peers

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
        peers: str | Path | None = None,
        store: str | None = None,
    ) -> None:
        self.agent = agent
        self.model = resolve_model(model, agent)  # a bad spec fails here, at start-up, in one line
        self.db = open_store(store, db_path)  # SQLite, PostgreSQL or Redis (see ``_engines``)
        self.peers = None if peers is None else Peers(peers)
        self.policy: Policy = policy
        self.limits = limits
        self.metrics = Metrics()
        self.limiter = RateLimiter(limits.rate_per_s, limits.burst) if limits.rate_per_s > 0 else None
        self._chats: OrderedDict[str, Chat] = OrderedDict()
        self._active = 0

    # -- conversations --------------------------------------------------------------------------

    def chat(self, thread_id: str) -> Chat:
        chat = self._chats.get(thread_id)
        if chat is None:
            self._make_room()
            session = self.db.session(thread_id)  # no I/O: the history is read when a turn needs it
            chat = Chat(self.agent, session=session, policy=self.policy, model=self.model)
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

    async def start_run(self, thread_id: str, run_id: str, text: str | None) -> AguiRun:
        chat = self.chat(thread_id)
        turn = None
        if text is not None:
            if self._active >= self.limits.max_turns:
                message = f"the server runs its maximum of {self.limits.max_turns} turns; try again shortly"
                raise InputError(message, 503, "overloaded")
            if self.peers is not None:  # a turn of this thread in another worker goes first
                await self.peers.claim(thread_id, interrupt=self.policy == "interrupt")
            self._active += 1
            self.metrics.turns.inc()
            turn = chat.send(text)
        on_end = functools.partial(self.turn_ended, thread_id)
        return AguiRun(thread_id, run_id, chat, turn, observe=self.metrics.observe, on_end=on_end)

    def turn_ended(self, thread_id: str) -> None:
        self._active -= 1
        self.metrics.turns.dec()
        if self.peers is not None:
            self.peers.release(thread_id)

    async def aclose(self) -> None:
        """Interrupt every running turn, wait (briefly) for their histories to be saved, close the file."""
        closing = [chat.aclose() for chat in self._chats.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
        self._chats.clear()
        if self.peers is not None:
            await self.peers.aclose()
        self.metrics.close()
        await self.db.aclose()

    # -- HTTP endpoints -------------------------------------------------------------------------

    async def agui(self, request: Request) -> Response:
        body = await read_body(request, self.limits.max_body_bytes)
        run_input, text = parse_run_input(body, self.limits)
        request.state.thread_id = run_input.thread_id
        run = await self.start_run(run_input.thread_id, run_input.run_id, text)
        # Starlette only calls what an endpoint returns; the stream is an ASGI app, not a Response.
        return EventStream(run, self)  # type: ignore[return-value]

    async def interrupt(self, thread_id: str) -> bool:
        """Interrupt the thread's running turn, in this worker or another; whether there was one."""
        if await self.answer_peer("stop", thread_id):
            return True
        return self.peers is not None and await self.peers.stop(thread_id)

    async def answer_peer(self, operation: str, thread_id: str) -> bool:
        """Stop, interrupt or await the thread's turn running here (see ``Peers``); whether one was."""
        chat = self._chats.get(thread_id)
        if chat is None or _idle(chat):
            return False
        turn = chat.turn
        assert turn is not None
        if operation != "wait":
            turn.interrupt()
        if operation != "stop":
            await turn.join()
        return True

    async def stop(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        await self.known_chat(thread_id)
        return JSONResponse({"threadId": thread_id, "stopped": await self.interrupt(thread_id)})

    async def messages(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        chat = await self.known_chat(thread_id)
        messages = [dump(m) for m in history_messages(await chat.history())]
        return JSONResponse({"threadId": thread_id, "messages": messages})

    async def delete(self, request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        chat = await self.known_chat(thread_id)
        await chat.aclose()
        if self.peers is not None:  # and a turn of it in another worker
            await self.peers.claim(thread_id, interrupt=True)
            self.peers.release(thread_id)
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
    peers: str | Path | None = None,
    store: str | None = None,
) -> Starlette:
    """The ASGI app serving ``agent`` (run it with uvicorn); see the module docstring for the API.

    ``db_path``: the SQLite file of the conversations (by default ``threads.db`` in the user's data
    directory, see ``_store.default_path``).
    ``token``: every API request must then carry ``Authorization: Bearer TOKEN``. ``cors_origins``:
    the browser origins allowed to call the API from other sites (none by default).
    ``allowed_hosts``: the names it answers to besides the loopback ones (see ``_security``). ``peers``: a
    directory shared by the worker processes serving the same ``db_path`` (``serve --workers``),
    where they reach each other to keep to one turn per thread (see ``_workers``).
    ``store``: instead of ``db_path``, a URL: ``sqlite:///PATH``, ``postgresql://...`` or
    ``redis://...`` (see ``_engines``); it is connected to when the app starts.
    """
    server = _Server(agent, model, db_path, policy, limits or Limits(), peers, store)
    thread = "/threads/{thread_id}"
    routes: list[Route | WebSocketRoute | Mount] = [
        Route("/agui", server.agui, methods=["POST"]),
        Route("/", server.agui, methods=["POST"]),
        Route("/", server.index, methods=["GET"]),
        WebSocketRoute("/ws/{thread_id}", server.websocket),
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
        warm = getattr(server.model, "warm", None)
        if warm is not None:  # the embedded model starts now, not on the first person's message
            await warm(server.agent)
        if server.peers is not None:
            await server.peers.start(server.answer_peer)
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
            (InputError, HTTPException, ClientDisconnect, Exception), error_json
        ),
    )
    app.state.server = server
    return app


def serve_main(args: argparse.Namespace) -> int:
    """``rtagent serve [AGENT] [--model SPEC] [--host H] [--port P] [--token T] [--db PATH | --store URL]
    [--cors-origin ORIGIN]... [--allowed-host NAME]... [--max-turns N] [--rate-limit PER_S]
    [--workers N]``: serve until Ctrl-C.

    Returns the exit status. Every attribute of ``args`` is optional (``None`` means the default).
    With ``workers`` over 1, uvicorn starts that many processes, each building the app from the
    same options (``worker_app``); the turn cap and the rate limit then hold per worker.
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
    }
    workers: int = getattr(args, "workers", None) or 1
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
    with tempfile.TemporaryDirectory(prefix="rtagent-") as peers:
        metrics = Path(peers, "metrics")
        metrics.mkdir()
        # Read by each worker (uvicorn spawns them) before it imports prometheus_client.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        os.environ[_WORKER_OPTIONS] = json.dumps({**options, "peers": peers, "parent": os.getpid()})
        uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, **settings)
    return 0


def _store_url(db: str | None, store: str | None) -> str | None:
    """The store URL of ``--store`` (else ``RTAGENT_STORE``, unless ``--db`` names a file)."""
    if db and store:
        raise RTAgentError("give --db or --store, not both")
    if db:
        return None
    return store or os.environ.get("RTAGENT_STORE") or None


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
        peers=options.get("peers"),
    )

"""Chaos: turns interrupted or disconnected at random points, against a real ``rtagent serve``.

``rtagent serve bench/chaos_agent.py:agent`` runs as a subprocess on a free loopback port, its
model a real OpenAI-compatible server over HTTP (``bench/chaosmodel.py``, another subprocess) that
streams text and tool calls as each turn's plan says. Each turn (``--turns``, on threads of 2 to
``--max-turns-per-thread`` turns, ``--concurrency`` threads at a time, over SSE or a WebSocket at
random) gets one kind of trouble, chosen by a seeded random generator (``--seed``):

- ``stop``: ``POST /threads/ID/stop``, or ``{"type": "stop"}`` on the WebSocket;
- ``new_message``: the thread's next turn is sent while this one streams (which interrupts it);
- ``disconnect``: the client closes the SSE response, or closes or resets the WebSocket;
- ``tool_error``: a tool raises (at once or after a while); nothing else interrupts the turn;
- ``model_cut``: the model server closes the connection in the middle of a reply (reset or close).

The first three act after a random number of the turn's events (0: as soon as the response
starts) and a random delay of up to 50 ms; the model's tools (quick, slow, raising, finishing in the
background) come at random too, so an interrupt lands anywhere: before the model's first token,
in text, while tools run, between a tool round and the next model call; a model cut comes before
any chunk of a response or at any chunk of its text or its tool calls' arguments.

Then, with every count taken once the server has settled (polled, ``--settle-s`` at most):

- ``history``: every thread's ``GET /threads/ID/messages`` is 200 JSON and valid for an
  OpenAI-compatible API (``chaosmodel.message_problems``: every tool call answered by exactly one
  tool message right after its assistant message, no tool message without its call; call ids
  unique); every user message the server accepted is there once, in order; no reply is saved twice;
- ``db``: the SDK session items in the server's SQLite file: each ``function_call`` has exactly one
  ``function_call_output``, after it; the items as the SDK's chat-completions converter sends them
  to a model (cut replies marked, as rtagent does) pass the same check; and the model server
  checked every request it got the same way (``invalid_requests``);
- ``missing_text``: a thread's received texts (per AG-UI text message, the concatenated
  TEXT_MESSAGE_CONTENT deltas, in the order received) must map, in order, to distinct stored
  assistant messages each of which starts with that text (it may go on: the server may have sent
  more than a client that went away read, and a marker may follow a cut reply);
- ``turns``: no stream ends without RUN_FINISHED or RUN_ERROR unless its client left; no RUN_ERROR
  ``server_error``; a finished turn's text is the plan's whole reply; every RUN_FINISHED's
  ``result.text`` is what its client received; a ``tool_error`` turn finishes with the tool's error
  reported; a ``model_cut`` turn fails with ``agent_error``, or finishes if the cut came before the
  response's first chunk (retried unseen);
- ``leaks``: the server process's file descriptors, OS threads and TCP sockets (``/proc``; to the
  model server and from clients counted apart), and, from the ``probe`` tool inside the server,
  its asyncio tasks and the live turns, runs, streams, SDK results and HTTP responses, before the
  chaos and after it (both after a normal turn with the probe, once idle model connections have
  expired); ``/metrics`` active turns and connections 0, sessions = the threads used; the model
  server's open streams 0;
- ``after``: a normal turn over the WebSocket and one over SSE still get their full reply and
  RUN_FINISHED;
- ``log``: tracebacks in the server's stderr and any 5xx (its access log, and what clients saw).

Prints one JSON object; exits 1 if any check fails. Run: ``.venv/bin/python bench/chaos.py
[--turns 1000] [--seed 1] [--concurrency 30]`` (``--keep`` keeps the database and the logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from agents.models.chatcmpl_converter import Converter
from chaosmodel import call_id, message_problems, plan_message, words
from ports import free_port, healthy
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rtagent._history import _marked, is_cut

HERE = Path(__file__).resolve().parent
KINDS = ("stop", "new_message", "disconnect", "tool_error", "model_cut")
ACTIONS = KINDS[:3]  # the kinds the client itself brings about
RAISING = ("boom", "slow_boom")
TERMINAL = ("RUN_FINISHED", "RUN_ERROR")
MAX_EXAMPLES = 5
TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


# -- what each turn does ------------------------------------------------------------------------


@dataclass
class Turn:
    """One turn as planned (all of it drawn from the seeded generator) and as the client saw it."""

    thread: str
    index: int
    kind: str
    transport: str  # "sse" or "ws"
    plan: dict[str, Any]
    trigger: int  # act after this many events (0: once the response has started)
    delay_s: float
    how: str  # stop: "http" or "ws"; disconnect: "close" or "abort"
    run_id: str = ""
    confirmed: bool = False  # the server took the message (SSE 200, or RUN_STARTED)
    events: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # AG-UI message id -> received text
    tool_errors: dict[str, str | None] = field(default_factory=dict)
    tool_outputs: dict[str, str] = field(default_factory=dict)
    end: str = ""
    result_text: str | None = None
    fired: bool = False  # its interruption came before its end
    fired_at: str = ""  # the last event its client had when it came
    stop_answer: Any = None
    detail: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None  # an SSE turn's: cancelled to go away
    link: Link | None = None  # a WebSocket turn's
    action: asyncio.Task[None] | None = None
    next_turn: asyncio.Task[int] | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts.values())


def expected_text(plan: dict[str, Any]) -> str:
    return "".join(
        "".join(words(plan["tag"], r, spec.get("text", 0))) for r, spec in enumerate(plan["rounds"])
    )


def _tool_call(rng: random.Random) -> list[Any]:
    name = rng.choice(["quick", "quick", "slow", "slow", "boom", "slow_boom", "report"])
    seconds = {"seconds": round(rng.uniform(0.05, 0.8), 3)}
    return [name, {"quick": {"topic": "chaos"}, "boom": {"reason": "chaos"}}.get(name, seconds)]


def model_plan(rng: random.Random, tag: str, kind: str) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    tool_rounds = rng.choice([1, 1, 2]) if kind == "tool_error" or rng.random() < 0.5 else 0
    for _ in range(tool_rounds):
        calls = [_tool_call(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
        rounds.append({"text": rng.choice([0, 0, 3, 8]), "calls": calls})
    if kind == "tool_error" and not any(c[0] in RAISING for r in rounds for c in r["calls"]):
        calls = rng.choice(rounds)["calls"]
        calls[rng.randrange(len(calls))] = ["boom", {"reason": "chaos"}]
    rounds.append({"text": rng.randint(5, 60)})
    plan: dict[str, Any] = {"tag": tag, "interval": round(rng.uniform(0.004, 0.015), 4), "rounds": rounds}
    if kind == "model_cut":
        at = rng.randrange(len(rounds))
        chunks = rounds[at]["text"] + 3 * len(rounds[at].get("calls", []))
        plan["cut"] = {"round": at, "chunk": rng.randint(0, chunks), "how": rng.choice(["abort", "fin"])}
    return plan


def _events_of(plan: dict[str, Any]) -> int:
    """Roughly how many AG-UI events the plan's turn streams, to aim triggers inside it."""
    total = 3
    for spec in plan["rounds"]:
        text = spec.get("text", 0)
        total += 2 + text + (2 if text else 0) + 5 * len(spec.get("calls", []))
    return total


def make_turn(rng: random.Random, thread: str, index: int, kind: str) -> Turn:
    transport = rng.choice(["sse", "ws"])
    plan = model_plan(rng, f"{thread}x{index}", kind)
    how = ""
    if kind == "stop":
        how = rng.choice(["http", "ws"]) if transport == "ws" else "http"
    elif kind == "disconnect":
        how = rng.choice(["close", "abort"]) if transport == "ws" else "close"
    # A message sent on a WebSocket is known to have reached the server only at its RUN_STARTED; a
    # new message sent before that, on another connection, could overtake it.
    first = 1 if transport == "ws" and kind == "new_message" else 0
    trigger = rng.randint(first, max(first, _events_of(plan) - 2))
    return Turn(thread, index, kind, transport, plan, trigger, round(rng.uniform(0, 0.05), 4), how)


def make_threads(rng: random.Random, turns: int, per_thread: int, prefix: str) -> list[list[Turn]]:
    threads: list[list[Turn]] = []
    while turns > 0:
        count = min(turns, rng.randint(2, per_thread))
        thread = f"{prefix}{len(threads)}"
        kinds = [rng.choice(KINDS if i < count - 1 else KINDS[:1] + KINDS[2:]) for i in range(count)]
        threads.append([make_turn(rng, thread, i, kind) for i, kind in enumerate(kinds)])
        turns -= count
    return threads


def normal_turn(thread: str, transport: str, calls: list[list[Any]]) -> Turn:
    rounds = [{"text": 0, "calls": calls}, {"text": 12}] if calls else [{"text": 12}]
    plan = {"tag": f"{thread}x0", "interval": 0.005, "rounds": rounds}
    return Turn(thread, 0, "none", transport, plan, 1 << 30, 0.0, "")


# -- the client -----------------------------------------------------------------------------------


def run_input(turn: Turn) -> dict[str, Any]:
    message = {"id": f"u-{turn.run_id}", "role": "user", "content": plan_message(turn.plan)}
    return {
        "threadId": turn.thread,
        "runId": turn.run_id,
        "messages": [message],
        "state": {},
        "tools": [],
        "context": [],
        "forwardedProps": {},
    }


class Link:
    """A thread's WebSocket: the runs sent on it, matched to their events by RUN_STARTED's runId
    (the server streams one run after another on a socket)."""

    def __init__(self, driver: Driver, ws: ClientConnection) -> None:
        self.driver = driver
        self.ws = ws
        self.runs: dict[str, Turn] = {}
        self.current: Turn | None = None
        self.closed_by_us = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                event = json.loads(frame)
                kind = event.get("type")
                if kind == "error":  # a refused send: the server answers sends in order
                    self.driver.ws_errors.append(event)
                    refused = next((t for t in self.runs.values() if not t.events and not t.end), None)
                    if refused is not None:
                        refused.end = f"ws_error:{event.get('error')}"
                        refused.done.set()
                    continue
                if kind == "RUN_STARTED":
                    self.current = self.runs.get(event.get("runId", ""))
                turn = self.current
                if turn is not None:
                    self.driver.record(turn, event)
                    if kind in TERMINAL:
                        turn.done.set()
                        self.current = None
        except ConnectionClosed:
            pass
        finally:
            for turn in self.runs.values():
                if not turn.done.is_set():
                    turn.end = turn.end or ("client_left" if self.closed_by_us else "ws_closed")
                    turn.done.set()

    async def close(self, abort: bool = False) -> None:
        self.closed_by_us = True
        if abort:
            self.ws.transport.abort()
        else:
            with contextlib.suppress(Exception):
                await self.ws.close()
        await self.reader


class Driver:
    """Runs planned turns against the server, keeping what each client saw."""

    def __init__(self, port: int, concurrency: int, turn_timeout_s: float) -> None:
        self.port = port
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(60.0), limits=limits, trust_env=False
        )
        self.slots = asyncio.Semaphore(concurrency)
        self.turn_timeout_s = turn_timeout_s
        self.links: dict[str, Link] = {}
        self.threads: dict[str, list[Turn]] = {}
        self.statuses: Counter[int] = Counter()
        self.ws_errors: list[dict[str, Any]] = []

    async def aclose(self) -> None:
        for link in self.links.values():
            await link.close()
        self.links.clear()
        await self.http.aclose()

    async def run_threads(self, threads: list[list[Turn]]) -> None:
        for turns in threads:
            self.threads[turns[0].thread] = turns
        await asyncio.gather(*(self._thread(turns) for turns in threads))

    async def _thread(self, turns: list[Turn]) -> None:
        async with self.slots:
            index = 0
            while index < len(turns):
                index = await self.run_turn(turns, index)
            link = self.links.pop(turns[0].thread, None)
            if link is not None:
                await link.close()

    async def run_turn(self, turns: list[Turn], index: int) -> int:
        """Run turn ``index`` of a thread and the turns it sends while it streams; the next index."""
        turn = turns[index]
        turn.run_id = f"{turn.thread}r{index}"
        try:
            async with asyncio.timeout(self.turn_timeout_s):
                await (self._sse(turn) if turn.transport == "sse" else self._ws(turn))
                if turn.action is not None:
                    await turn.action
        except TimeoutError:
            turn.end = turn.end or "timeout"
        except Exception as exc:  # the exchange broke on the client's side: reported, not raised
            turn.end = turn.end or "client_error"
            turn.detail = f"{type(exc).__name__}: {exc}"[:300]
        if turn.next_turn is not None:
            return await turn.next_turn
        return index + 1

    async def _sse(self, turn: Turn) -> None:
        turn.reader = reader = asyncio.create_task(self._read_sse(turn))
        await asyncio.wait([reader])
        if reader.cancelled():
            turn.end = turn.end or "client_left"
        elif (error := reader.exception()) is not None:
            turn.end = turn.end or "broken"
            turn.detail = f"{type(error).__name__}: {error}"[:300]

    async def _read_sse(self, turn: Turn) -> None:
        async with self.http.stream("POST", "/agui", json=run_input(turn)) as response:
            self.statuses[response.status_code] += 1
            if response.status_code != 200:
                turn.end = f"http_{response.status_code}"
                turn.detail = (await response.aread()).decode(errors="replace")[:300]
                return
            turn.confirmed = True
            self._check_trigger(turn)
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    self.record(turn, json.loads(line[6:]))
            turn.end = turn.end or "truncated"

    async def _ws(self, turn: Turn) -> None:
        link = self.links.get(turn.thread)
        if link is None or link.closed_by_us or link.reader.done():
            url = f"ws://127.0.0.1:{self.port}/ws/{turn.thread}"
            link = self.links[turn.thread] = Link(self, await connect(url, max_size=None, proxy=None))
            self.statuses[101] += 1
        turn.link = link
        link.runs[turn.run_id] = turn
        command = {"type": "send", "text": plan_message(turn.plan), "runId": turn.run_id}
        await link.ws.send(json.dumps(command))
        self._check_trigger(turn)
        await turn.done.wait()

    def record(self, turn: Turn, event: dict[str, Any]) -> None:
        kind = event["type"]
        turn.events.append(kind)
        if kind == "RUN_STARTED":
            turn.confirmed = True
        elif kind == "TEXT_MESSAGE_CONTENT":
            turn.texts[event["messageId"]] = turn.texts.get(event["messageId"], "") + event["delta"]
        elif kind == "TOOL_CALL_RESULT":
            meta = (event.get("metadata") or {}).get("rtagent") or {}
            turn.tool_errors[event["toolCallId"]] = meta.get("error")
            turn.tool_outputs[event["toolCallId"]] = event["content"]
        elif kind == "RUN_FINISHED":
            turn.end = "cancelled" if event.get("outcome") else "finished"
            turn.result_text = (event.get("result") or {}).get("text")
        elif kind == "RUN_ERROR":
            turn.end = f"run_error:{event.get('code')}"
            turn.detail = event.get("message")
        self._check_trigger(turn)

    def _check_trigger(self, turn: Turn) -> None:
        acts = turn.kind in ACTIONS and turn.action is None
        if acts and not turn.end and len(turn.events) >= turn.trigger:
            turn.action = asyncio.create_task(self._act(turn))

    async def _act(self, turn: Turn) -> None:
        await asyncio.sleep(turn.delay_s)
        turn.fired_at = turn.events[-1] if turn.events else "(response started)"
        if turn.kind == "new_message":  # sent even if the turn has just ended: the thread goes on
            turn.fired = not turn.end
            turn.next_turn = asyncio.create_task(self.run_turn(self.threads[turn.thread], turn.index + 1))
            return
        if turn.end:
            return
        turn.fired = True
        if turn.kind == "disconnect":
            if turn.link is not None:
                await turn.link.close(abort=turn.how == "abort")
            elif turn.reader is not None:
                turn.reader.cancel()
        elif turn.how == "ws" and turn.link is not None:
            with contextlib.suppress(ConnectionClosed):
                await turn.link.ws.send(json.dumps({"type": "stop"}))
            turn.stop_answer = "sent"
        else:
            response = await self.http.post(f"/threads/{turn.thread}/stop", json={})
            self.statuses[response.status_code] += 1
            turn.stop_answer = (
                response.json().get("stopped") if response.status_code == 200 else response.status_code
            )


# -- the servers and what they report ---------------------------------------------------------------


@dataclass
class Servers:
    server: subprocess.Popen[bytes]
    model: subprocess.Popen[bytes]
    port: int
    model_port: int
    db: Path
    log: Path


def start_servers(workdir: Path, keepalive_s: float) -> Servers:
    model_port, port = free_port(), free_port()
    command = [
        sys.executable,
        str(HERE / "chaosmodel.py"),
        str(model_port),
        "--keepalive-s",
        str(keepalive_s),
    ]
    model = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert model.stdout is not None
    if model.stdout.readline().strip() != b"ready":
        raise RuntimeError("the chaos model server did not start")
    db, log = workdir / "chaos.db", workdir / "server.log"
    command = [
        sys.executable,
        "-m",
        "rtagent",
        "serve",
        f"{HERE / 'chaos_agent.py'}:agent",
        "--model",
        f"http://127.0.0.1:{model_port}/v1#chaos",
        "--port",
        str(port),
        "--db",
        str(db),
        "--rate-limit",
        "0",  # one client makes every request here
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    env.pop("RTAGENT_MODEL", None)
    with log.open("wb") as stderr:
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    servers = Servers(server, model, port, model_port, db, log)
    if healthy(server, port):
        return servers
    stop_servers(servers)
    raise RuntimeError(f"rtagent serve did not start within 60 s: see {log}")


def stop_servers(servers: Servers) -> int | None:
    """Stop both; the server's exit status after SIGINT (uvicorn's graceful shutdown)."""
    servers.server.send_signal(signal.SIGINT)
    try:
        status: int | None = servers.server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        servers.server.kill()
        servers.server.wait()
        status = None
    servers.model.terminate()
    servers.model.wait()
    return status


def process_resources(servers: Servers) -> dict[str, Any]:
    """The server process's descriptors, OS threads and TCP sockets, as /proc shows them."""
    pid = servers.server.pid
    kinds: Counter[str] = Counter()
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
            kinds[target.split(":")[0] if ":" in target else "file"] += 1
    tcp: Counter[str] = Counter()
    states: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            columns = line.split()
            if columns[9] not in inodes:
                continue
            local, remote = (int(columns[i].rsplit(":", 1)[1], 16) for i in (1, 2))
            state = TCP_STATES.get(columns[3], columns[3])
            where = "listening" if state == "LISTEN" else "to_model" if remote == servers.model_port else ""
            where = where or ("from_clients" if local == servers.port else "other")
            tcp[where] += 1
            states[f"{where} {state}"] += 1
    return {
        "fds": sum(kinds.values()),
        "fd_kinds": dict(kinds),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "tcp": {where: tcp.get(where, 0) for where in ("listening", "to_model", "from_clients", "other")},
        "tcp_states": dict(states),
    }


async def server_state(servers: Servers) -> dict[str, Any]:
    """``/healthz``, the active gauges and turn counters of ``/metrics``, the model server's /stats."""
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        health = (await http.get(f"http://127.0.0.1:{servers.port}/healthz")).json()
        metrics = (await http.get(f"http://127.0.0.1:{servers.port}/metrics")).text
        model = (await http.get(f"http://127.0.0.1:{servers.model_port}/v1/stats")).json()
    model["open_connections"] -= 1  # this request's own
    gauges = {}
    for line in metrics.splitlines():
        if line.startswith(("rtagent_active_", "rtagent_turns_total", "rtagent_http_errors_total")):
            name, value = line.rsplit(" ", 1)
            gauges[name] = float(value)
    return {"health": health, "metrics": gauges, "model": model}


def _settled(state: dict[str, Any]) -> bool:
    metrics = state["metrics"]
    return bool(
        state["health"]["turns"] == 0
        and metrics.get("rtagent_active_turns") == 0
        and metrics.get("rtagent_active_connections") == 0
        and state["model"]["open_streams"] == 0
    )


async def settle(servers: Servers, timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    while True:
        state = await server_state(servers)
        if _settled(state) or time.monotonic() - started > timeout_s:
            return {"settled": _settled(state), "waited_s": round(time.monotonic() - started, 2), **state}
        await asyncio.sleep(0.2)


async def probe_turn(servers: Servers, thread: str) -> tuple[Turn, dict[str, Any]]:
    """A normal SSE turn calling ``probe``; what the probe saw inside the server."""
    turn = normal_turn(thread, "sse", [["probe", {}]])
    driver = Driver(servers.port, 1, 60)
    await driver.run_threads([[turn]])
    await driver.aclose()
    output = turn.tool_outputs.get(call_id(turn.plan["tag"], 0, 0))
    return turn, json.loads(output) if output else {}


async def snapshot(servers: Servers, probe: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    # The server closes its side of the probe's connection once it sees the client's close.
    while process_resources(servers)["tcp"]["from_clients"] and time.monotonic() - started < 5:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return {"process": process_resources(servers), "probe": probe, **await server_state(servers)}


# -- the checks -----------------------------------------------------------------------------------


def _openai_form(message: dict[str, Any]) -> dict[str, Any]:
    """An AG-UI message as the chat-completions message it stands for."""
    role = message.get("role")
    out: dict[str, Any] = {"role": role, "content": message.get("content")}
    if role == "assistant" and message.get("toolCalls"):
        out["tool_calls"] = [
            {"id": c.get("id"), "type": c.get("type"), "function": c.get("function")}
            for c in message["toolCalls"]
        ]
    if role == "tool":
        out["tool_call_id"] = message.get("toolCallId")
    return out


async def check_histories(
    servers: Servers, threads: list[list[Turn]]
) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """Every thread's problems (``check_history``), by check, and the threads whose history did not read."""
    problems: dict[str, list[Any]] = defaultdict(list)
    unreadable: list[dict[str, Any]] = []
    base = f"http://127.0.0.1:{servers.port}"
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=60) as http:
        for turns in threads:
            response = await http.get(f"/threads/{turns[0].thread}/messages")
            if response.status_code == 404 and not any(t.confirmed for t in turns):
                continue  # no message of it reached the server
            messages = _messages(response)
            if messages is None:
                body = response.text[:200]
                unreadable.append({"thread": turns[0].thread, "status": response.status_code, "body": body})
                continue
            for name, found in check_history(turns, messages).items():
                problems[name] += found
    return problems, unreadable


def _messages(response: httpx.Response) -> list[dict[str, Any]] | None:
    if response.status_code != 200:
        return None
    try:
        messages = response.json().get("messages")
    except ValueError:
        return None
    return messages if isinstance(messages, list) else None


def check_history(turns: list[Turn], messages: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every problem of one thread's AG-UI history, by check (see the module docstring)."""
    thread = turns[0].thread
    problems: dict[str, list[Any]] = defaultdict(list)
    for problem in message_problems([_openai_form(m) for m in messages]) if messages else []:
        problems["invalid_for_openai"].append({"thread": thread, "problem": problem})
    calls = Counter(
        c.get("id") for m in messages if m.get("role") == "assistant" for c in m.get("toolCalls") or []
    )
    answers = Counter(m.get("toolCallId") for m in messages if m.get("role") == "tool")
    for call, count in calls.items():
        if count > 1 or answers[call] != 1:
            problems["tool_call_not_answered_once"].append(
                {"thread": thread, "call": call, "calls": count, "answers": answers[call]}
            )
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    seen = Counter(users)
    positions = []
    for turn in turns:
        text = plan_message(turn.plan)
        if seen[text] > 1:
            problems["duplicated_user_messages"].append({"thread": thread, "turn": turn.index})
        if turn.confirmed and not seen[text]:
            problems["missing_user_messages"].append({"thread": thread, "turn": turn.index, "end": turn.end})
        if seen[text]:
            positions.append(users.index(text))
    if positions != sorted(positions):
        problems["user_messages_out_of_order"].append({"thread": thread, "positions": positions})
    stored = [m["content"] for m in messages if m.get("role") == "assistant" and m.get("content")]
    firsts = Counter(text.split(" ", 1)[0] for text in stored)
    for first, count in firsts.items():
        if count > 1:  # each reply's first word is unique: the same reply saved twice
            problems["duplicated_replies"].append({"thread": thread, "first_word": first, "count": count})
    position = 0
    for turn in turns:
        for message_id, text in turn.texts.items():
            match = next((k for k in range(position, len(stored)) if stored[k].startswith(text)), None)
            if match is None:
                problems["missing_text"].append(_missing(turn, message_id, text, stored))
            else:
                position = match + 1
    return problems


def _missing(turn: Turn, message_id: str, text: str, stored: list[str]) -> dict[str, Any]:
    first = text.split(" ", 1)[0]
    candidates = [s for s in stored if s.startswith(first)]
    return {
        "thread": turn.thread,
        "turn": turn.index,
        "kind": turn.kind,
        "transport": turn.transport,
        "end": turn.end,
        "message_id": message_id,
        "received": _clip(text),
        "stored_with_same_start": [_clip(s) for s in candidates],
    }


def _clip(text: str, keep: int = 60) -> str:
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]} ({len(text)} chars)"


def check_db(path: Path) -> dict[str, Any]:
    """The SDK session items in the server's SQLite file, and the messages they become for a model."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT session_id, message_data FROM agent_messages ORDER BY id"
        ).fetchall()
    finally:
        connection.close()
    sessions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for session_id, data in rows:
        sessions[session_id].append(json.loads(data))
    problems: list[dict[str, Any]] = []
    for session_id, items in sessions.items():
        for problem in _item_problems(items):
            problems.append({"session": session_id, "problem": problem})
        marked: Any = [_marked(item) if is_cut(item) else item for item in items]  # type: ignore[arg-type]
        try:
            messages = [dict(m) for m in Converter.items_to_messages(marked)]
        except Exception as exc:  # the converter refusing the history is a finding too
            problems.append({"session": session_id, "problem": f"the converter failed: {exc!r}"[:300]})
            continue
        for problem in message_problems(messages):
            problems.append({"session": session_id, "problem": f"as chat messages: {problem}"})
    return {
        "sessions": len(sessions),
        "items": len(rows),
        "problems": len(problems),
        "examples": problems[:MAX_EXAMPLES],
    }


def _item_problems(items: list[dict[str, Any]]) -> Iterator[str]:
    calls: dict[str, int] = {}
    outputs: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        kind, call = item.get("type"), str(item.get("call_id"))
        if kind == "function_call":
            if call in calls:
                yield f"function_call {call} appears twice"
            calls[call] = position
        elif kind == "function_call_output":
            outputs[call].append(position)
            if call not in calls:
                yield f"function_call_output {call} (item {position}) has no function_call before it"
    for call in calls:
        if len(outputs[call]) != 1:
            yield f"function_call {call} has {len(outputs[call])} outputs"


def check_turns(turns: list[Turn]) -> dict[str, list[Any]]:
    """What each client saw, against what its turn's kind and plan lead one to expect."""
    problems: dict[str, list[Any]] = defaultdict(list)
    bad_ends = (
        "truncated",
        "broken",
        "timeout",
        "ws_closed",
        "client_error",
        "http_5",
        "ws_error",
        "run_error:server",
    )
    for turn in turns:
        where = {"thread": turn.thread, "turn": turn.index, "kind": turn.kind, "transport": turn.transport}
        if not turn.end or turn.end.startswith(bad_ends):
            problems["broken_streams"].append({**where, "end": turn.end, "detail": turn.detail})
        if turn.end == "finished" and turn.text != expected_text(turn.plan):
            problems["incomplete_replies"].append({**where, "received": _clip(turn.text)})
        if turn.end in ("finished", "cancelled") and turn.result_text != turn.text:
            received, result = _clip(turn.text), _clip(turn.result_text or "")
            problems["result_text_mismatch"].append({**where, "received": received, "result": result})
        if turn.kind == "tool_error":
            raising = [
                call_id(turn.plan["tag"], r, j)
                for r, spec in enumerate(turn.plan["rounds"])
                for j, call in enumerate(spec.get("calls", []))
                if call[0] in RAISING
            ]
            unreported = [c for c in raising if not turn.tool_errors.get(c)]
            if turn.end != "finished" or unreported:
                problems["tool_error_turns"].append({**where, "end": turn.end, "unreported": unreported})
        if turn.kind == "model_cut":
            expected = "finished" if turn.plan["cut"]["chunk"] == 0 else "run_error:agent_error"
            if turn.end != expected:
                problems["model_cut_turns"].append(
                    {**where, "cut": turn.plan["cut"], "end": turn.end, "expected": expected}
                )
    return problems


def kind_summary(turns: list[Turn]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        of_kind = [t for t in turns if t.kind == kind]
        summary: dict[str, Any] = {"turns": len(of_kind), "ends": dict(Counter(t.end for t in of_kind))}
        if kind in ACTIONS:
            summary["acted_before_end"] = sum(t.fired for t in of_kind)
            summary["acted_after"] = dict(Counter(t.fired_at for t in of_kind if t.fired).most_common())
            summary["by"] = dict(Counter(f"{t.transport}/{t.how or 'send'}" for t in of_kind))
        if kind == "stop":
            summary["stop_answers"] = dict(Counter(str(t.stop_answer) for t in of_kind if t.fired))
        if kind == "model_cut":
            summary["cut_before_first_chunk"] = sum(t.plan["cut"]["chunk"] == 0 for t in of_kind)
        out[kind] = summary
    return out


def read_log(path: Path) -> dict[str, Any]:
    """The server's stderr: tracebacks, access-log statuses, and any other line (not uvicorn's INFO)."""
    text = path.read_text(errors="replace")
    statuses: Counter[int] = Counter()
    other: list[str] = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                statuses[int(json.loads(line)["status"])] += 1
                continue
        if not line.startswith("INFO:"):
            other.append(line)
    first = text.find("Traceback (most recent call last)")
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "statuses": dict(sorted(statuses.items())),
        "http_5xx": sum(count for status, count in statuses.items() if status >= 500),
        "other_lines": len(other),
        "other_examples": other[:10],
        "first_traceback": text[first : first + 4000] if first >= 0 else None,
    }


def leak_checks(before: dict[str, Any], after: dict[str, Any], threads: tuple[int, int]) -> dict[str, Any]:
    """Each count after the chaos, the same count before it, and the most it may be."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, was: Any, now: Any, most: Any, least: Any = 0) -> None:
        ok = now is not None and least <= now <= most
        checks[name] = {"before": was, "after": now, "bound": most, "ok": ok}

    b, a = before["process"], after["process"]
    check("fds", b["fds"], a["fds"], b["fds"])
    check("os_threads", b["threads"], a["threads"], b["threads"])
    for where in ("to_model", "from_clients", "other"):
        check(
            f"tcp_{where}",
            b["tcp"][where],
            a["tcp"][where],
            0 if where == "from_clients" else b["tcp"][where],
        )
    check("healthz_turns", before["health"]["turns"], after["health"]["turns"], 0)
    for gauge in ("rtagent_active_turns", "rtagent_active_connections"):
        check(gauge, before["metrics"].get(gauge), after["metrics"].get(gauge), 0)
    chats = after["health"]["threads"]
    # Every thread whose message the server took has a chat; a send lost to a reset may have none.
    check("healthz_threads", before["health"]["threads"], chats, threads[1], threads[0])
    sessions = "rtagent_active_sessions"
    check(sessions, before["metrics"].get(sessions), after["metrics"].get(sessions), chats, chats)
    for count in ("open_streams", "open_connections"):
        most = 0 if count == "open_streams" else before["model"][count]
        check(f"model_{count}", before["model"][count], after["model"][count], most)
    probe_b, probe_a = before["probe"], after["probe"]
    if not probe_a or not probe_b:
        check("probe_answered", bool(probe_b), bool(probe_a), -1)
        return checks
    check("asyncio_tasks", probe_b["tasks"], probe_a["tasks"], probe_b["tasks"])
    for name, count in probe_a["objects"].items():
        short = name.rsplit(".", 1)[1]
        # A loaded chat keeps its last turn (and that turn its event buffer); nothing else stays.
        most = chats if short in ("Turn", "Chat", "EventBuffer") else probe_b["objects"][name]
        check(f"live_{short}", probe_b["objects"][name], count, most)
    return checks


# -- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    rng = random.Random(args.seed)
    warmup = make_threads(rng, args.warmup_turns, 4, "w")
    threads = make_threads(rng, args.turns, args.max_turns_per_thread, "c")
    expiry_s = args.keepalive_s + 0.5  # idle model connections close; the next request drops them

    # Warm up every path (so lazily made pools count in "before"), then the baseline.
    driver = Driver(servers.port, args.concurrency, args.turn_timeout_s)
    await driver.run_threads(warmup)
    await driver.aclose()
    await settle(servers, args.settle_s)
    await asyncio.sleep(expiry_s)
    before_turn, probe = await probe_turn(servers, "p0")
    before = await snapshot(servers, probe)

    started = time.monotonic()
    chaos = Driver(servers.port, args.concurrency, args.turn_timeout_s)
    await chaos.run_threads(threads)
    chaos_s = time.monotonic() - started
    await chaos.aclose()
    settled = await settle(servers, args.settle_s)
    settled_s = time.monotonic() - started

    every = [*warmup, *threads]
    history, unreadable = await check_histories(servers, every)
    db = check_db(servers.db)

    await asyncio.sleep(expiry_s)
    ws_after = normal_turn("a0", "ws", [["quick", {"topic": "after"}]])
    after_driver = Driver(servers.port, 1, args.turn_timeout_s)
    await after_driver.run_threads([[ws_after]])
    await after_driver.aclose()
    sse_after, probe = await probe_turn(servers, "p1")
    threads_used = (
        sum(any(t.confirmed for t in turns) for turns in every) + 3,  # p0, a0, p1
        len(every) + 3,
    )
    deadline = time.monotonic() + args.settle_s
    while True:
        after = await snapshot(servers, probe)
        leaks = leak_checks(before, after, threads_used)
        if all(c["ok"] for c in leaks.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)

    chaos_turns = [t for turns in threads for t in turns]
    all_turns = [t for turns in every for t in turns]
    model = after["model"]
    return {
        "turns": len(chaos_turns),
        "threads": len(threads),
        "warmup_turns": len(all_turns) - len(chaos_turns),
        "concurrency": args.concurrency,
        "seed": args.seed,
        "chaos_s": round(chaos_s, 2),
        "chaos_and_settle_s": round(settled_s, 2),
        "kinds": kind_summary(chaos_turns),
        "transports": dict(Counter(t.transport for t in chaos_turns)),
        "tool_calls_planned": sum(len(r.get("calls", [])) for t in chaos_turns for r in t.plan["rounds"]),
        "client_statuses": dict(sorted((chaos.statuses + driver.statuses).items())),
        "ws_error_frames": chaos.ws_errors + driver.ws_errors,
        "settle": {"settled": settled["settled"], "waited_s": settled["waited_s"]},
        "history": {
            "threads_checked": len(every) - len(unreadable),
            "unreadable": unreadable[:MAX_EXAMPLES],
            "checks": _counted(history, HISTORY_CHECKS),
        },
        "db": db,
        "model_server": {
            key: model[key]
            for key in (
                "requests",
                "cuts",
                "streams_closed_by_client",
                "max_open_streams",
                "invalid_requests",
                "invalid_examples",
            )
        },
        "turn_checks": _counted(check_turns([*all_turns, before_turn, ws_after, sse_after]), TURN_CHECKS),
        "after": {
            name: {"end": turn.end, "full_reply": turn.text == expected_text(turn.plan)}
            for name, turn in (("ws_turn", ws_after), ("sse_turn", sse_after))
        },
        "leaks": leaks,
        "state": {"before": before, "after": after},  # what the leak checks were taken from
    }


HISTORY_CHECKS = (
    "invalid_for_openai",
    "tool_call_not_answered_once",
    "missing_user_messages",
    "duplicated_user_messages",
    "user_messages_out_of_order",
    "duplicated_replies",
    "missing_text",
)
TURN_CHECKS = (
    "broken_streams",
    "incomplete_replies",
    "result_text_mismatch",
    "tool_error_turns",
    "model_cut_turns",
)


def _counted(found: dict[str, list[Any]], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: {"count": len(found[name]), "examples": found[name][:MAX_EXAMPLES]} for name in names}


def failures(report: dict[str, Any]) -> list[str]:
    failed = [f"history.{name}" for name, check in report["history"]["checks"].items() if check["count"]]
    failed += [f"turns.{name}" for name, check in report["turn_checks"].items() if check["count"]]
    failed += [f"leaks.{name}" for name, check in report["leaks"].items() if not check["ok"]]
    failed += [
        f"after.{name}"
        for name, turn in report["after"].items()
        if turn != {"end": "finished", "full_reply": True}
    ]
    flags = {
        "history.unreadable": report["history"]["unreadable"],
        "db.problems": report["db"]["problems"],
        "model_server.invalid_requests": report["model_server"]["invalid_requests"],
        "settle": not report["settle"]["settled"],
        "ws_error_frames": report["ws_error_frames"],
        "client_5xx": any(status >= 500 for status in report["client_statuses"]),
        "tracebacks_in_log": report["tracebacks_in_log"],
        "http_5xx_in_log": report["http_5xx_in_log"],
        "server_exit_status": report["server_exit_status"] != 0,
    }
    return failed + [name for name, bad in flags.items() if bad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=30, help="threads at a time")
    parser.add_argument("--max-turns-per-thread", type=int, default=8)
    parser.add_argument("--warmup-turns", type=int, default=20)
    parser.add_argument("--keepalive-s", type=float, default=2.0, help="the model server's idle keep-alive")
    parser.add_argument("--settle-s", type=float, default=30.0, help="how long counts may take to settle")
    parser.add_argument("--turn-timeout-s", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the database and the server's log")
    args = parser.parse_args()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="rtagent-chaos-"))
    servers = start_servers(workdir, args.keepalive_s)
    try:
        details = asyncio.run(run(args, servers))
    finally:
        exit_status = stop_servers(servers)
    log = read_log(servers.log)
    details |= {
        "tracebacks_in_log": log.pop("tracebacks"),
        "http_5xx_in_log": log.pop("http_5xx"),
        "server_exit_status": exit_status,
        "log": log,
    }
    failed = failures(details)
    report = {"ok": not failed, "failures": failed, "wall_s": round(time.monotonic() - started, 2), **details}
    if args.keep:
        report["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()

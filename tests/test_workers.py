"""``rtagent serve --workers 2``: two processes, one port, one database, and still one turn per thread.

The server runs as a real subprocess with the scripted agent of ``tests/agents``. Each check picks
the worker it talks to: a client keeps one connection, and ``/healthz`` on it names its process.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from rtagent.server._workers import TABLE, Peers

AGENT = str(Path(__file__).parent / "agents" / "scripted.py")


def run_input(text: str, thread: str, run: str) -> dict[str, Any]:
    messages = [{"id": f"u-{run}", "role": "user", "content": text}]
    return {"threadId": thread, "runId": run, "messages": messages, "state": {}, "tools": [], "context": []}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = tmp_path_factory.mktemp("workers") / "chats.db"
    command = [sys.executable, "-m", "rtagent", "serve", AGENT, "--workers", "2", "--port", str(port)]
    process = subprocess.Popen([*command, "--db", str(db), "--rate-limit", "0"], stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        seen: set[int] = set()
        for _ in range(600):  # both workers up: 30 s at most
            with suppress(httpx.TransportError):
                seen.add(httpx.get(f"{url}/healthz", headers={"Connection": "close"}).json()["worker"])
            if len(seen) == 2:
                break
            threading.Event().wait(0.05)
        assert len(seen) == 2, f"workers answering: {seen}"
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


@asynccontextmanager
async def worker(url: str, *, other_than: int | None = None) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """A client on one connection to one worker (not ``other_than``), and that worker's pid."""
    for _ in range(200):
        http = httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=30)
        pid = int((await http.get("/healthz")).json()["worker"])
        if pid != other_than:
            try:
                yield http, pid
            finally:
                await http.aclose()
            return
        await http.aclose()
    raise AssertionError("the kernel never handed a connection to the other worker")


async def events(
    http: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event | None = None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with http.stream("POST", "/agui", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
                if started is not None and out[-1]["type"] == "TEXT_MESSAGE_CONTENT":
                    started.set()
    return out


async def running_in(url: str) -> int:
    """The pid of the worker running the one turn in progress (it reports it in ``/healthz``)."""
    async with worker(url) as (http, pid):
        health = (await http.get("/healthz")).json()
    if health["turns"]:
        return pid
    async with worker(url, other_than=pid) as (http, other):
        assert (await http.get("/healthz")).json()["turns"] == 1, "no worker runs the turn"
        return other


async def test_a_stop_sent_to_the_other_worker_interrupts_the_turn(server: str) -> None:
    started = asyncio.Event()
    async with worker(server) as (http, _):
        stream = asyncio.create_task(events(http, run_input("a long one please", "stop-1", "r1"), started))
        await asyncio.wait_for(started.wait(), 10)
        owner = await running_in(server)
        async with worker(server, other_than=owner) as (other, _):
            stop = await other.post("/threads/stop-1/stop")
        finished = (await asyncio.wait_for(stream, 10))[-1]
    assert stop.json() == {"threadId": "stop-1", "stopped": True}
    assert finished["type"] == "RUN_FINISHED"
    assert finished["result"]["interrupted"] is True


async def test_a_message_to_the_other_worker_interrupts_then_follows_the_running_turn(server: str) -> None:
    started = asyncio.Event()
    async with worker(server) as (http, owner):
        first = asyncio.create_task(events(http, run_input("another long one", "cut-1", "r1"), started))
        await asyncio.wait_for(started.wait(), 10)
        async with worker(server, other_than=owner) as (other, _):
            second = await events(other, run_input("hello again", "cut-1", "r2"))
        cut = (await asyncio.wait_for(first, 10))[-1]
        history = (await http.get("/threads/cut-1/messages")).json()["messages"]
    assert cut["result"]["interrupted"] is True
    answer = "".join(e["delta"] for e in second if e["type"] == "TEXT_MESSAGE_CONTENT")
    # The second turn saw the first one's cut reply: it was saved before the second began.
    said = r"You said: hello again \(message 2\) My last reply was cut off after 'word\d+'\."
    assert re.fullmatch(said, answer), answer
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]


async def test_metrics_add_up_the_workers(server: str) -> None:
    async with worker(server) as (http, pid):
        await events(http, run_input("hi from one", "metrics-1", "r1"))
        async with worker(server, other_than=pid) as (other, _):
            await events(other, run_input("hi from two", "metrics-2", "r1"))
            turns = re.compile(r'^rtagent_turns_total\{outcome="(\w+)"\} (\S+)$', re.MULTILINE)
            totals = [turns.findall((await h.get("/metrics")).text) for h in (http, other)]
    assert totals[0] == totals[1]  # either worker reports both
    completed = dict(totals[0])["completed"]
    assert float(completed) >= 2


async def test_a_row_left_by_a_worker_that_died_is_cleared(tmp_path: Path) -> None:
    peers = Peers(tmp_path)
    connection = sqlite3.connect(tmp_path / "running.db", isolation_level=None)
    connection.execute(f"INSERT INTO {TABLE} VALUES ('t1', ?)", (str(tmp_path / "1.sock"),))
    await peers.claim("t1", interrupt=True)  # no such socket: the row goes, and this worker takes it
    assert connection.execute(f"SELECT peer FROM {TABLE}").fetchall() == [(peers.address,)]
    peers.release("t1")
    assert connection.execute(f"SELECT peer FROM {TABLE}").fetchall() == []
    await peers.aclose()

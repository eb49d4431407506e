"""Two ``rtagent serve`` replicas on one real Redis and one real PostgreSQL: a thread's turn
runs on one replica, and a stop, a new message or a reconnecting client on the other reaches it;
a replica killed mid-turn frees the thread within its lease, its streamed text kept.

Each replica is a real subprocess serving the scripted agent of ``tests/agents`` (``long``: a
200-word reply at 50 ms a word).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
import redis
from test_runlog import frames, read_until_cut, text_of
from test_server import (
    WORDS,
    client,
    lookup,
    make_app,
    run_node_test,
    serving,
    sse_events,
    tool_script,
    until,
)
from test_server import run_input as server_run_input

import rtagent
from rtagent.server._runlog import parse_id
from rtagent.testing import reply

AGENT = str(Path(__file__).parent / "agents" / "scripted.py")
LONG = " ".join(f"word{n}" for n in range(200))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(store: str, redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "rtagent", "serve", AGENT, "--port", str(port), "--store", store]
    options = ["--redis", redis_url, "--rate-limit", "0", "--lease", "1", "--disconnect-grace", "5"]
    process = subprocess.Popen([*command, *options], stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz").status_code == 200:
                return process, url
        assert process.poll() is None, "the replica exited"
        time.sleep(0.05)
    raise AssertionError("the replica did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


async def _forget_every_thread(postgres_url: str) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE 'agent_%'")
        for row in tables:
            await connection.execute(f'TRUNCATE "{row["tablename"]}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
def replicas(redis_url: str, postgres_url: str) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    redis.Redis.from_url(redis_url).flushall()
    asyncio.run(_forget_every_thread(postgres_url))
    a, url_a = start(postgres_url, redis_url)
    b, url_b = start(postgres_url, redis_url)
    try:
        yield url_a, url_b, a
    finally:
        stop(a)
        stop(b)


def run_input(text: str, thread: str = "t1", run: str = "r1") -> dict[str, Any]:
    messages = [{"id": f"u-{run}", "role": "user", "content": text}]
    return {"threadId": thread, "runId": run, "messages": messages, "state": {}, "tools": [], "context": []}


async def stream_some(url: str, body: dict[str, Any], count: int) -> list[tuple[str | None, dict[str, Any]]]:
    """The first ``count`` frames of a run; then the client goes away."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await read_until_cut(http, count, body)


async def test_a_client_of_a_reconnects_to_b_and_gets_the_rest_with_no_gap_or_duplicate(
    replicas: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    url_a, url_b, _ = replicas
    first = await stream_some(url_a, run_input("tell me something long"), 30)
    async with httpx.AsyncClient(base_url=url_b, timeout=30) as http:
        resumed = await http.get("/threads/t1/stream", headers={"Last-Event-ID": str(first[-1][0])})
        rest = frames(resumed.text)
    ids = [i for i, _ in first + rest if i]
    assert len(ids) == len(set(ids)) == len(first + rest)
    assert [parse_id(i) for i in ids] == sorted(parse_id(i) for i in ids)
    events = [e for _, e in first + rest]
    assert text_of(events) == LONG
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["result"]["interrupted"] is False


async def test_a_stop_sent_to_b_interrupts_the_turn_on_a(
    replicas: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    url_a, url_b, _ = replicas
    async with httpx.AsyncClient(base_url=url_a, timeout=30) as a, httpx.AsyncClient(base_url=url_b) as b:
        running = asyncio.create_task(a.post("/agui", json=run_input("something long please")))
        await asyncio.sleep(1.0)
        stopped = await b.post("/threads/t1/stop")
        events = [e for _, e in frames((await running).text)]
    assert stopped.json() == {"threadId": "t1", "stopped": True}
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["result"]["interrupted"] is True
    assert 0 < len(text_of(events)) < len(LONG)


async def test_a_message_to_b_interrupts_the_turn_on_a_and_runs_next(
    replicas: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    url_a, url_b, _ = replicas
    async with (
        httpx.AsyncClient(base_url=url_a, timeout=30) as a,
        httpx.AsyncClient(base_url=url_b, timeout=30) as b,
    ):
        running = asyncio.create_task(a.post("/agui", json=run_input("something long please")))
        await asyncio.sleep(1.0)
        second = frames((await b.post("/agui", json=run_input("hello again", run="r2"))).text)
        first = frames((await running).text)
        history = (await b.get("/threads/t1/messages")).json()["messages"]
    assert first[-1][1]["result"]["interrupted"] is True
    # The echo counts the user's messages and says where its last reply was cut: B saw A's history.
    reply = text_of([e for _, e in second])
    assert reply.startswith("You said: hello again (message 2) My last reply was cut off after 'word"), reply
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["metadata"] == {"rtagent": {"interrupted": True}}


async def test_a_replica_killed_mid_turn_frees_the_thread_within_its_lease_and_keeps_what_was_shown(
    replicas: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    url_a, url_b, process_a = replicas
    shown = await stream_some(url_a, run_input("something long please"), 40)
    streamed = text_of([e for _, e in shown])
    await asyncio.sleep(0.3)  # the run log's batches reach Redis within milliseconds
    process_a.send_signal(signal.SIGKILL)
    process_a.wait(10)
    killed = time.monotonic()
    async with httpx.AsyncClient(base_url=url_b, timeout=30) as b:
        second = frames((await b.post("/agui", json=run_input("are you there", run="r2"))).text)
        took = time.monotonic() - killed
        history = (await b.get("/threads/t1/messages")).json()["messages"]
    assert took < 5, f"the thread was free only after {took:.1f} s"
    assert second[-1][1]["type"] == "RUN_FINISHED"
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "something long please"
    cut = history[1]
    assert cut["metadata"] == {"rtagent": {"interrupted": True}}
    assert cut["content"].startswith(streamed), (cut["content"], streamed)
    assert LONG.startswith(cut["content"])


async def test_a_replica_paused_past_its_lease_writes_nothing_after_the_new_holder(
    replicas: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    url_a, url_b, process_a = replicas
    await stream_some(url_a, run_input("something long please"), 40)
    await asyncio.sleep(0.3)
    process_a.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(1.5)  # past the lease (1 s): B may take the thread
        async with httpx.AsyncClient(base_url=url_b, timeout=30) as b:
            second = frames((await b.post("/agui", json=run_input("are you there", run="r2"))).text)
            before = (await b.get("/threads/t1/messages")).json()["messages"]
            process_a.send_signal(signal.SIGCONT)
            # A finds its lease lost within a third of it and interrupts its turn, which would
            # then save its (longer) cut reply after B's turn.
            await asyncio.sleep(2.0)
            after = (await b.get("/threads/t1/messages")).json()["messages"]
    finally:
        process_a.send_signal(signal.SIGCONT)
    assert second[-1][1]["type"] == "RUN_FINISHED"
    assert [m["role"] for m in before] == ["user", "assistant", "user", "assistant"]
    assert after == before


async def test_a_run_paused_for_approval_on_a_is_answered_on_b(
    replicas: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    url_a, url_b, _ = replicas
    approve = {**run_input("", run="r2"), "messages": []}
    approve["resume"] = [{"interruptId": "call_1", "status": "resolved", "payload": {"approved": True}}]
    async with (
        httpx.AsyncClient(base_url=url_a, timeout=30) as a,
        httpx.AsyncClient(base_url=url_b, timeout=30) as b,
    ):
        paused = [e for _, e in frames((await a.post("/agui", json=run_input("refund my order"))).text)]
        resumed = [e for _, e in frames((await b.post("/agui", json=approve)).text)]
        again = await b.post("/agui", json={**approve, "runId": "r3"})
    assert paused[-1]["outcome"]["interrupts"][0]["toolCallId"] == "call_1"
    result = next(e for e in resumed if e["type"] == "TOOL_CALL_RESULT")
    assert result["content"] == "Order 42 refunded."
    assert text_of(resumed) == "That is settled."
    assert again.status_code == 409  # answered, on whichever replica


async def test_the_official_typescript_client_sees_a_message_to_b_interrupt_a(
    replicas: tuple[str, str, subprocess.Popen[bytes]],
) -> None:
    url_a, url_b, _ = replicas
    report = await run_node_test("replicas.test.mjs", {"RTAGENT_URL_A": url_a, "RTAGENT_URL_B": url_b})
    assert "# pass 1" in report, report


async def test_two_messages_of_a_thread_at_once_on_one_replica_take_its_lease_once(
    redis_url: str, tmp_path: Path
) -> None:
    # Both find no turn of the thread here; without the lock both would take the lease, and the
    # second would wait for the first turn to end instead of interrupting it (the policy).
    redis.Redis.from_url(redis_url).flushall()
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.02), reply("Second.")], redis=redis_url)
    async with serving(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=30) as http:
        answers = await asyncio.gather(
            http.post("/agui", json=server_run_input("first", run="a")),
            http.post("/agui", json=server_run_input("second", run="b")),
        )
    ends = sorted(frames(a.text)[-1][1]["result"]["interrupted"] for a in answers)
    assert ends == [False, True]  # unlocked, both take the lease: [False, False], one after the other
    assert "streaming" not in [stream.outcome for stream in model.streams]


async def test_a_cached_tool_result_computed_on_one_replica_is_a_hit_on_the_other(
    redis_url: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(redis_url).flushall()
    tool = rtagent.cached(lookup, ttl=60)
    script = tool_script()
    a, _ = make_app(tmp_path / "a", script, tools=[tool], redis=redis_url)
    b, _ = make_app(tmp_path / "b", script, tools=[tool], redis=redis_url)
    try:
        async with client(a) as on_a:
            first = sse_events((await on_a.post("/agui", json=server_run_input(thread="t1"))).text)
        rtagent.configure_cache(redis_url)  # B's own process: nothing of A's run in its memory
        async with client(b) as on_b:
            again = sse_events((await on_b.post("/agui", json=server_run_input(thread="t2"))).text)
    finally:
        await rtagent.clear_cache()
        rtagent.configure_cache()
    results = [next(e for e in events if e["type"] == "TOOL_CALL_RESULT") for events in (first, again)]
    assert "cached" not in results[0]["metadata"]["rtagent"]
    assert results[1]["metadata"]["rtagent"]["cached"] is True


def test_workers_need_redis(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from rtagent.server._app import serve_main

    assert serve_main(argparse.Namespace(agent=AGENT, workers=2)) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "--workers over 1 needs --redis" in err


def test_an_unreachable_redis_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from rtagent.server._app import serve_main

    assert (
        serve_main(argparse.Namespace(agent=AGENT, redis=f"redis://:hunter2@127.0.0.1:{free_port()}/0")) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("rtagent serve: cannot use Redis at redis://***@127.0.0.1:")
    assert "hunter2" not in err
    assert err.strip().count("\n") == 0


async def test_the_rate_limit_is_one_window_across_replicas(redis_url: str) -> None:
    from rtagent.server._limits import RateLimiter

    a, b = RateLimiter(1.0, 3, redis_url), RateLimiter(1.0, 3, redis_url)
    client = f"client-{time.monotonic_ns()}"
    waits = [await limiter.wait(client) for limiter in (a, b, a, b)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] > 0  # the fourth request in 3 s, wherever it lands
    assert await a.wait("someone-else") == 0.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A redis-server of this test's own, which it may kill."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        for _ in range(100):
            with suppress(redis.ConnectionError):
                if redis.Redis(port=port).ping():
                    break
            time.sleep(0.05)
        yield server, port
    finally:
        server.kill()
        server.wait()


async def test_redis_going_away_mid_turn_keeps_the_turn_and_new_turns_get_a_503(
    tmp_path: Path, own_redis: tuple[subprocess.Popen[bytes], int]
) -> None:
    server, port = own_redis
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.005)], redis=f"redis://127.0.0.1:{port}/0")
    async with serving(app) as base, httpx.AsyncClient(base_url=f"http://{base}", timeout=30) as http:
        posting = asyncio.create_task(http.post("/agui", json=server_run_input()))
        await until(lambda: model.deltas_emitted >= 20)
        server.kill()
        await asyncio.to_thread(server.wait)
        events = [e for _, e in frames((await posting).text)]
        refused = await http.post("/agui", json=server_run_input(run="r2"))
        history = (await http.get("/threads/t1/messages")).json()["messages"]
    assert text_of(events) == "".join(WORDS)  # the turn went on, and was not cut
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["result"]["interrupted"] is False
    assert refused.status_code == 503
    assert refused.json()["error"] == "unavailable"
    assert history[-1]["role"] == "assistant"
    assert history[-1]["content"].strip() == "".join(WORDS).strip()

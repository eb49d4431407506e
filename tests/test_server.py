"""``rtagent serve``: the AG-UI API over SSE and WebSocket, its limits, and the official TS client.

Most tests call the app in-process through ``httpx.ASGITransport``; the ones about streaming to a real
socket (a client going away, WebSockets, the Node client) run uvicorn on a random loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from ag_ui.core import Event
from agents import Agent, function_tool
from agents.tool import Tool
from pydantic import TypeAdapter
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import rtagent
from rtagent._history import INTERRUPTED
from rtagent.server import _agui
from rtagent.server import _app as _server
from rtagent.server._app import create_app, serve_main
from rtagent.server._limits import Limits
from rtagent.server._websocket import WebSocketProtocol
from rtagent.testing import ScriptedModel, Step, call, reply, tool_calls

EVENT = TypeAdapter(Event)
WORDS = [f"w{i} " for i in range(400)]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@function_tool
async def lookup(query: str) -> str:
    """Look something up."""
    rtagent.progress("searching", 0.5)
    await asyncio.sleep(0.02)
    return f"{query} has 2.1 million people."


def make_app(
    tmp_path: Path, steps: Sequence[Step], tools: Sequence[Tool] = (lookup,), **options: Any
) -> tuple[Starlette, ScriptedModel]:
    model = ScriptedModel(steps)
    agent = Agent(name="helper", tools=list(tools))
    return create_app(agent, model=model, db_path=tmp_path / "threads.db", **options), model


def run_input(text: str | None = "How big is Paris?", thread: str = "t1", run: str = "r1") -> dict[str, Any]:
    messages = [] if text is None else [{"id": f"u-{run}", "role": "user", "content": text}]
    return {"threadId": thread, "runId": run, "messages": messages, "state": {}, "tools": [], "context": []}


def sse_events(body: str) -> list[dict[str, Any]]:
    """The AG-UI events of an SSE body, each checked against the protocol's own models."""
    events = []
    for block in body.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            EVENT.validate_json(data[0])
            events.append(json.loads(data[0]))
    return events


def kinds(events: list[dict[str, Any]]) -> list[str]:
    types = [e["type"] for e in events]
    return [t for i, t in enumerate(types) if not (t == "TEXT_MESSAGE_CONTENT" and types[i - 1] == t)]


@asynccontextmanager
async def client(app: Starlette, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", **kwargs) as http:
            yield http


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """uvicorn on a random loopback port, in this event loop (so tests can watch the model)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws=WebSocketProtocol))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await until(lambda: server.started)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def until(condition: Any) -> None:
    """Poll ``condition()``: what it watches (a model's stream, a server flag) has no event to await."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


TOOL_TURN = [
    "RUN_STARTED",
    "STEP_STARTED",
    "STEP_FINISHED",
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_END",
    "TOOL_CALL_START",
    "TOOL_CALL_ARGS",
    "TOOL_CALL_END",
    "ACTIVITY_SNAPSHOT",
    "ACTIVITY_SNAPSHOT",
    "TOOL_CALL_RESULT",
    "STEP_STARTED",
    "STEP_FINISHED",
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_END",
    "RUN_FINISHED",
]


def tool_script() -> list[Step]:
    return [tool_calls(call("lookup", {"query": "Paris"}), text="Let me check. "), reply("It is big.")]


async def test_a_tool_turn_streams_the_full_event_sequence(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, tool_script())
    async with client(app) as http:
        response = await http.post("/agui", json=run_input())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert kinds(events) == TOOL_TURN
    assert events[0] == {"type": "RUN_STARTED", "threadId": "t1", "runId": "r1", "protocolVersion": "1.0"}
    by_type = {e["type"]: e for e in events}
    start = by_type["TOOL_CALL_START"]
    assert start["toolCallName"] == "lookup"
    assert start["parentMessageId"] == events[3]["messageId"]  # the text of the same model response
    assert by_type["TOOL_CALL_ARGS"]["delta"] == '{"query":"Paris"}'
    assert by_type["TOOL_CALL_RESULT"]["content"] == "Paris has 2.1 million people."
    assert by_type["TOOL_CALL_RESULT"]["metadata"]["rtagent"]["durationS"] > 0
    progress = [e["content"] for e in events if e["type"] == "ACTIVITY_SNAPSHOT"]
    assert progress[0]["message"] == "searching"
    assert progress[0]["fraction"] == 0.5
    assert progress[1]["done"] is True
    finished = events[-1]
    assert "outcome" not in finished  # absent means success
    assert finished["result"]["text"] == "Let me check. It is big."
    assert finished["result"]["interrupted"] is False
    assert finished["result"]["metrics"]["tools"][0]["name"] == "lookup"


async def test_served_without_a_model_each_agent_answers_on_its_own_in_its_own_step(tmp_path: Path) -> None:
    billing_model = ScriptedModel([reply("Billing here.")])
    triage_model = ScriptedModel([tool_calls(call("transfer_to_billing", {}, call_id="h1"))])
    billing = Agent(name="billing", model=billing_model)
    triage = Agent(name="triage", model=triage_model, handoffs=[billing])
    app = create_app(triage, db_path=tmp_path / "threads.db")
    async with client(app) as http:
        events = sse_events((await http.post("/agui", json=run_input("my invoice?"))).text)
    assert (len(triage_model.calls), len(billing_model.calls)) == (1, 1)
    assert [(e["type"], e["stepName"]) for e in events if e.get("stepName") == "billing"] == [
        ("STEP_STARTED", "billing"),
        ("STEP_FINISHED", "billing"),
    ]
    assert "TOOL_CALL_START" not in kinds(events)
    assert events[-1]["result"]["text"] == "Billing here."


async def test_post_root_is_the_same_endpoint_and_no_new_message_answers_with_the_history(
    tmp_path: Path,
) -> None:
    app, _ = make_app(tmp_path, [reply("Hello there.")])
    async with client(app) as http:
        first = sse_events((await http.post("/", json=run_input("hi"))).text)
        assert first[-1]["result"]["text"] == "Hello there."
        again = sse_events((await http.post("/agui", json=run_input(None, run="r2"))).text)
    assert kinds(again) == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "RUN_FINISHED"]
    assert [(m["role"], m["content"]) for m in again[1]["messages"]] == [
        ("user", "hi"),
        ("assistant", "Hello there."),
    ]


async def test_stop_interrupts_and_the_reloaded_history_marks_the_cut_reply(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.005)])
    async with client(app) as http:
        running = asyncio.create_task(http.post("/agui", json=run_input("tell me everything")))
        await until(lambda: model.deltas_emitted >= 20)
        stop = await http.post("/threads/t1/stop")
        assert stop.json() == {"threadId": "t1", "stopped": True}
        events = sse_events((await running).text)
        history = (await http.get("/threads/t1/messages")).json()
        assert (await http.post("/threads/t1/stop")).json()["stopped"] is False
    assert events[-1]["outcome"] == {"type": "cancelled"}
    assert events[-1]["result"]["interrupted"] is True
    shown = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert 0 < len(shown) < len("".join(WORDS))
    user, cut = history["messages"]
    assert user == {"id": "h0", "role": "user", "content": "tell me everything"}
    assert cut["content"] == shown
    assert cut["metadata"] == {"rtagent": {"interrupted": True}}
    assert model.streams[-1].outcome == "closed"


async def test_a_second_message_interrupts_the_running_turn(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.005), reply("Second.")])
    async with client(app) as http:
        first = asyncio.create_task(http.post("/agui", json=run_input("first", run="a")))
        await until(lambda: model.deltas_emitted >= 5)
        second = sse_events((await http.post("/agui", json=run_input("second", run="b"))).text)
        first_events = sse_events((await first).text)
    assert first_events[-1]["outcome"] == {"type": "cancelled"}
    assert second[-1]["result"]["text"] == "Second."
    # The second turn saw the cut reply, marked, before its own message.
    assert model.calls[1].input[-1] == {"content": "second", "role": "user"}
    assert "cut off" in str(model.calls[1].input[-2])


async def test_history_survives_a_restart_and_feeds_the_next_turn(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, tool_script())
    async with client(app) as http:
        await http.post("/agui", json=run_input())
        before = (await http.get("/threads/t1/messages")).json()
    restarted, model = make_app(tmp_path, [reply("Still here.")])
    async with client(restarted) as http:
        assert (await http.get("/threads/t1/messages")).json() == before
        await http.post("/agui", json=run_input("and now?", run="r2"))
    roles = [m["role"] for m in before["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert before["messages"][1]["toolCalls"][0]["function"]["name"] == "lookup"
    sent = model.calls[0].input
    assert isinstance(sent, list)
    assert sent[0] == {"content": "How big is Paris?", "role": "user"}
    assert sent[-1] == {"content": "and now?", "role": "user"}


async def test_delete_forgets_a_thread(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with client(app) as http:
        await http.post("/agui", json=run_input())
        assert (await http.delete("/threads/t1")).status_code == 204
        gone = await http.get("/threads/t1/messages")
    assert gone.status_code == 404
    assert gone.json()["error"] == "unknown_thread"


# -- a client that goes away ----------------------------------------------------------------------


async def disconnect_when(base: str, condition: Any) -> None:
    """Open an SSE run and drop the connection once ``condition()`` holds."""
    async with (
        httpx.AsyncClient(base_url=f"http://{base}") as http,
        http.stream("POST", "/agui", json=run_input()) as response,
    ):
        assert response.status_code == 200
        await until(condition)


async def test_a_client_that_disconnects_stops_the_model(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.005)], disconnect_grace=0)
    async with serving(app) as base:
        await disconnect_when(base, lambda: model.deltas_emitted >= 5)
        await until(lambda: model.streams[-1].outcome != "streaming")
        assert model.streams[-1].outcome == "closed"
        assert model.streams[-1].deltas < len(WORDS)
        async with httpx.AsyncClient(base_url=f"http://{base}") as http:
            await until(lambda: app.state.server._active == 0)
            history = (await http.get("/threads/t1/messages")).json()["messages"]
    assert history[-1]["metadata"] == {"rtagent": {"interrupted": True}}


async def test_a_client_that_disconnects_cancels_its_tools_but_not_background_ones(tmp_path: Path) -> None:
    started: set[str] = set()
    cancelled = asyncio.Event()
    finished = asyncio.Event()

    @function_tool
    async def stuck() -> str:
        """Never returns by itself."""
        started.add("stuck")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    @function_tool
    async def slow_report() -> str:
        """Finishes in the background."""
        started.add("report")
        await asyncio.sleep(0.3)
        finished.set()
        return "report ready"

    tools = [stuck, rtagent.background(slow_report)]
    steps = [tool_calls(call("stuck", call_id="s"), call("slow_report", call_id="b"))]
    app, _ = make_app(tmp_path, steps, tools, disconnect_grace=0)
    async with serving(app) as base:
        await disconnect_when(base, lambda: len(started) == 2)
        async with asyncio.timeout(5):
            await cancelled.wait()
            await finished.wait()
        async with httpx.AsyncClient(base_url=f"http://{base}") as http:
            await until(lambda: app.state.server._active == 0)
            await asyncio.sleep(0.1)  # the background tool's result is written after it returns
            history = (await http.get("/threads/t1/messages")).json()["messages"]
    outputs = {m["toolCallId"]: m["content"] for m in history if m["role"] == "tool"}
    assert outputs["s"] == INTERRUPTED
    assert outputs["b-done"] == "report ready"


# -- WebSocket ------------------------------------------------------------------------------------


async def receive_run(ws: ClientConnection) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in ("RUN_FINISHED", "RUN_ERROR"):
        frame = await ws.recv()
        assert isinstance(frame, str)
        EVENT.validate_json(frame)
        events.append(json.loads(frame))
    return events


async def test_websocket_carries_the_same_events_and_takes_send_and_stop(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [*tool_script(), reply(WORDS, delay=0.005), reply("Fine.")])
    async with serving(app) as base, connect(f"ws://{base}/ws/t1") as ws:
        await ws.send(json.dumps({"type": "send", "text": "How big is Paris?", "runId": "w1"}))
        assert kinds(await receive_run(ws)) == TOOL_TURN

        await ws.send(json.dumps({"type": "send", "text": "tell me everything"}))
        await until(lambda: model.deltas_emitted >= 10)
        await ws.send(json.dumps({"type": "stop"}))
        stopped = await receive_run(ws)
        assert stopped[-1]["outcome"] == {"type": "cancelled"}

        await ws.send("not json")
        assert json.loads(await ws.recv())["error"] == "malformed_json"
        await ws.send(json.dumps({"type": "dance"}))
        assert json.loads(await ws.recv())["error"] == "invalid_input"
        await ws.send(json.dumps({"type": "send", "text": "still there?"}))
        assert (await receive_run(ws))[-1]["result"]["text"] == "Fine."


async def test_a_websocket_that_closes_mid_turn_stops_the_model(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.005)], disconnect_grace=0)
    async with serving(app) as base:
        async with connect(f"ws://{base}/ws/t1") as ws:
            await ws.send(json.dumps({"type": "send", "text": "go"}))
            await until(lambda: model.deltas_emitted >= 5)
        await until(lambda: model.streams[-1].outcome != "streaming")
        assert model.streams[-1].outcome == "closed"
        await until(lambda: app.state.server._active == 0)


async def test_websocket_frames_are_limited_too(tmp_path: Path) -> None:
    limits = Limits(max_body_bytes=200, rate_per_s=0.1, burst=2)  # the handshake takes one token
    app, _ = make_app(tmp_path, [reply("ok")], limits=limits)
    async with serving(app) as base, connect(f"ws://{base}/ws/t1") as ws:
        await ws.send(b"\x00binary")
        assert json.loads(await ws.recv())["error"] == "binary_frame"
        await ws.send(json.dumps({"type": "send", "text": "x" * 300}))
        assert json.loads(await ws.recv())["error"] == "payload_too_large"
        await ws.send(json.dumps({"type": "send", "text": "hi"}))
        assert (await receive_run(ws))[-1]["type"] == "RUN_FINISHED"
        await ws.send(json.dumps({"type": "send", "text": "again"}))
        limited = json.loads(await ws.recv())
    assert limited["error"] == "rate_limited"
    assert "try again" in limited["message"]


async def test_websocket_handshakes_are_checked(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")], token=TOKEN)
    async with serving(app) as base:
        for url, origin, status in [
            (f"ws://{base}/ws/t1", None, 401),
            (f"ws://{base}/ws/bad%20id?token={TOKEN}", None, 400),
            (f"ws://{base}/ws/t1?token={TOKEN}", "https://evil.example", 403),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, origin=origin):  # type: ignore[arg-type]
                    pass
            assert refused.value.response.status_code == status
            assert json.loads(refused.value.response.body or b"")["message"]
        async with connect(f"ws://{base}/ws/t1", additional_headers=AUTH) as ws:
            await ws.send(json.dumps({"type": "send", "text": "hi"}))
            assert (await receive_run(ws))[-1]["type"] == "RUN_FINISHED"


# -- limits and bad input -------------------------------------------------------------------------


JSON_BODY = {"Content-Type": "application/json"}


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code
    assert "\n" not in body["message"]
    assert "Traceback" not in body["message"]
    for word in words:
        assert word in body["message"]


async def test_bad_requests_get_a_4xx_json_error_naming_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_server, "STATIC", tmp_path / "no-page")  # so that GET / has nothing to serve
    app, _ = make_app(tmp_path, [reply("ok")], limits=Limits(max_body_bytes=4000, max_message_chars=100))
    async with client(app) as http:
        post = http.post
        assert_error(
            await post("/agui", content=b"x" * 5000, headers=JSON_BODY), 413, "payload_too_large", "4000"
        )
        assert_error(await post("/agui", json=run_input("y" * 101)), 413, "message_too_long", "100")
        assert_error(await post("/agui", content=b'{"threadId": ', headers=JSON_BODY), 400, "malformed_json")
        assert_error(await post("/agui", content=b"\xff\xfe", headers=JSON_BODY), 400, "malformed_json")
        assert_error(await post("/agui", json=[1, 2]), 422, "invalid_input", "JSON object")
        assert_error(await post("/agui", json={}), 422, "invalid_input", "threadId", "Field required")
        number_id = {**run_input(), "threadId": 5}
        assert_error(await post("/agui", json=number_id), 422, "invalid_input", "threadId")
        assert_error(await post("/agui", json={**run_input(), "messages": "hi"}), 422, "invalid_input")
        bad_role = {**run_input(), "messages": [{"id": "1", "role": "boss", "content": "x"}]}
        assert_error(await post("/agui", json=bad_role), 422, "invalid_input", "messages")
        assert_error(await post("/agui", json=run_input(thread="a/b")), 422, "invalid_input", "threadId")
        assert_error(await post("/agui", json=run_input("   ")), 422, "invalid_input", "no text")
        assert_error(await http.get("/threads/bad.id/messages"), 400, "invalid_thread_id")
        assert_error(await http.get("/threads/nobody/messages"), 404, "unknown_thread")
        assert_error(await post("/threads/nobody/stop"), 404, "unknown_thread")
        assert_error(await http.delete("/threads/nobody"), 404, "unknown_thread")
        assert_error(await http.get("/nowhere"), 404, "not_found")
        assert_error(await http.get("/agui"), 405, "method_not_allowed")
        assert_error(await http.get("/"), 404, "not_found", "POST /agui")


async def test_a_token_is_required_once_configured(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")], token=TOKEN)
    async with client(app) as http:
        assert_error(await http.post("/agui", json=run_input()), 401, "unauthorized", "Bearer")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(await http.post("/agui", json=run_input(), headers=wrong), 401, "unauthorized")
        assert_error(await http.get("/metrics"), 401, "unauthorized")
        assert (await http.get("/healthz")).status_code == 200
        answered = await http.post("/agui", json=run_input(), headers=AUTH)
    assert sse_events(answered.text)[-1]["type"] == "RUN_FINISHED"


async def test_a_client_over_its_rate_gets_429(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [], limits=Limits(rate_per_s=0.5, burst=3))
    async with client(app) as http:
        statuses = [(await http.get("/threads/t1/messages")).status_code for _ in range(3)]
        limited = await http.get("/threads/t1/messages")
        assert (await http.get("/healthz")).status_code == 200  # health checks are never limited
    assert statuses == [404, 404, 404]
    assert_error(limited, 429, "rate_limited", "try again")
    assert int(limited.headers["retry-after"]) >= 1


async def test_turns_over_the_server_cap_get_503(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.005)], limits=Limits(max_turns=1))
    async with client(app) as http:
        running = asyncio.create_task(http.post("/agui", json=run_input(thread="a")))
        await until(lambda: model.deltas_emitted >= 1)
        assert_error(await http.post("/agui", json=run_input(thread="b")), 503, "overloaded", "maximum of 1")
        await http.post("/threads/a/stop")
        await running


async def test_cors_is_closed_unless_configured(tmp_path: Path) -> None:
    origin = {"Origin": "https://shop.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    app, _ = make_app(tmp_path, [])
    async with client(app) as http:
        assert "access-control-allow-origin" not in (await http.get("/healthz", headers=origin)).headers
        assert_error(await http.options("/agui", headers=preflight), 403, "forbidden_origin")
    app, _ = make_app(tmp_path, [], token=TOKEN, cors_origins=["https://shop.example"])
    async with client(app) as http:
        allowed = await http.options("/agui", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://shop.example"


async def test_a_failure_inside_the_server_still_ends_the_stream_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Any, event: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(_agui.RunMapper, "map", broken)
    app, _ = make_app(tmp_path, [reply("ok")])
    async with client(app) as http:
        response = await http.post("/agui", json=run_input())
    assert response.status_code == 200
    assert sse_events(response.text)[-1] == {
        "type": "RUN_ERROR",
        "message": "the server failed during this run; its log has details",
        "code": "server_error",
    }
    assert "a bug" in caplog.text  # the details are in the log, not on the wire
    assert app.state.server._active == 0


async def test_idle_conversations_leave_memory_but_not_the_database(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("one"), reply("two"), reply("three")], limits=Limits(loaded_threads=2))
    async with client(app) as http:
        for thread in ("a", "b", "c"):
            await http.post("/agui", json=run_input(thread=thread))
        assert list(app.state.server._chats) == ["b", "c"]
        reloaded = (await http.get("/threads/a/messages")).json()["messages"]
    assert [m["content"] for m in reloaded] == ["How big is Paris?", "one"]


# -- operations -----------------------------------------------------------------------------------


async def test_metrics_health_and_access_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app, _ = make_app(tmp_path, tool_script())
    caplog.set_level(logging.INFO, logger="rtagent.access")
    async with client(app) as http:
        await http.post("/agui", json=run_input())
        await http.get("/nowhere")
        metrics = (await http.get("/metrics")).text
        health = (await http.get("/healthz")).json()
    assert health == {"status": "ok", "turns": 0, "threads": 1, "worker": os.getpid()}
    for line in [
        'rtagent_turns_total{outcome="completed"} 1.0',
        "rtagent_time_to_first_token_seconds_count 1.0",
        "rtagent_tokens_per_second_count 1.0",
        'rtagent_tool_duration_seconds_count{tool="lookup"} 1.0',
        'rtagent_http_errors_total{status="404"} 1.0',
        "rtagent_active_turns 0.0",
        "rtagent_active_connections 0.0",
        "rtagent_active_sessions 1.0",
    ]:
        assert line in metrics
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "rtagent.access"]
    request = logged[0]
    assert (request["method"], request["path"], request["status"]) == ("POST", "/agui", 200)
    assert request["thread_id"] == "t1"
    assert request["duration_ms"] > 0
    assert logged[1]["status"] == 404


async def test_a_cached_tool_result_is_marked_and_counted(tmp_path: Path) -> None:
    rtagent.configure_cache()
    cached = rtagent.cached(lookup, ttl=60)
    app, _ = make_app(tmp_path, tool_script() * 2, tools=[cached])
    async with client(app) as http:
        first = sse_events((await http.post("/agui", json=run_input(thread="t1"))).text)
        again = sse_events((await http.post("/agui", json=run_input(thread="t2"))).text)
        metrics = (await http.get("/metrics")).text
    results = [next(e for e in events if e["type"] == "TOOL_CALL_RESULT") for events in (first, again)]
    assert "cached" not in results[0]["metadata"]["rtagent"]
    assert results[1]["metadata"]["rtagent"]["cached"] is True
    assert results[1]["content"] == "Paris has 2.1 million people."
    stored = len(json.dumps({"output": "Paris has 2.1 million people."}))
    for line in [
        'rtagent_cache_hits_total{cache="tool"} 1.0',
        'rtagent_cache_misses_total{cache="tool"} 1.0',
        'rtagent_cache_deduplicated_total{cache="tool"} 0.0',
        f'rtagent_cache_stored_bytes_total{{cache="tool"}} {float(stored)}',
    ]:
        assert line in metrics


async def test_the_page_is_served_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "index.html").write_text("<h1>chat</h1>")
    monkeypatch.setattr(_server, "STATIC", tmp_path)
    app, _ = make_app(tmp_path, [], token=TOKEN)
    async with client(app) as http:
        page = await http.get("/")  # no token: the page must load before it can ask for one
        asset = await http.get("/static/index.html")
    assert page.status_code == 200
    assert page.text == "<h1>chat</h1>"
    assert asset.status_code == 200


# -- hostile input and other websites (#18) -------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
LONE = "hi \ud800"  # in a str, as json.loads leaves the escape


async def test_deeply_nested_json_is_refused_with_a_400(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with client(app) as http:
        assert_error(await http.post("/agui", content=DEEP, headers=JSON_BODY), 400, "too_deep", "100")
        deep_state = json.dumps(run_input()).replace('"state": {}', '"state": ' + "[" * 5000 + "]" * 5000)
        assert_error(await http.post("/agui", content=deep_state, headers=JSON_BODY), 400, "too_deep")
        assert (await http.get("/threads/t1/messages")).status_code == 404  # nothing ran
        assert (await http.post("/agui", json=run_input())).status_code == 200


async def test_a_deeply_nested_frame_closes_the_websocket_with_1007(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with serving(app) as base:
        async with connect(f"ws://{base}/ws/t1") as ws:
            await ws.send(DEEP.decode())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1007
        assert "levels deep" in closed.value.rcvd.reason
        async with connect(f"ws://{base}/ws/t1") as ws:  # the server, and the thread, are fine
            await ws.send(json.dumps({"type": "send", "text": "hi"}))
            assert (await receive_run(ws))[-1]["type"] == "RUN_FINISHED"


async def test_a_frame_that_is_not_utf_8_closes_with_1007_and_no_error_in_the_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with serving(app) as base:
        async with connect(f"ws://{base}/ws/t1") as ws:
            await ws.send(b"\xed\xa0\x80 hi", text=True)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        with pytest.raises(InvalidStatus):  # a refused handshake, which uvicorn logged as an error
            async with connect(f"ws://{base}/ws/bad%20id"):
                pass
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1007
    log = capfd.readouterr().err
    assert "ERROR" not in log
    assert "Traceback" not in log


async def test_a_lone_surrogate_from_a_client_is_refused_on_every_path(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with client(app) as http:
        escaped = await http.post("/agui", content=json.dumps(run_input(LONE)), headers=JSON_BODY)
        assert_error(escaped, 400, "invalid_unicode", "surrogate")
        encoded = json.dumps(run_input("X")).encode().replace(b"X", b"hi \xed\xa0\x80")
        assert_error(await http.post("/agui", content=encoded, headers=JSON_BODY), 400, "malformed_json")
        in_state = json.dumps({**run_input(), "state": {"note": LONE}})
        assert_error(await http.post("/agui", content=in_state, headers=JSON_BODY), 400, "invalid_unicode")
        assert (await http.get("/threads/t1/messages")).status_code == 404  # nothing ran
    async with serving(app) as base, connect(f"ws://{base}/ws/t1") as ws:
        await ws.send(json.dumps({"type": "send", "text": LONE}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1007


async def test_lone_surrogates_from_the_model_and_tools_become_u_fffd(tmp_path: Path) -> None:
    @function_tool
    async def odd(query: str) -> str:
        """Returns text no encoder takes."""
        return f"tool \udc80 {query}"

    steps = [tool_calls(call("odd", {"query": "q"})), reply(["model ", "\ud83d", " said"])]
    app, _ = make_app(tmp_path, steps, tools=[odd])
    async with client(app) as http:
        streamed = await http.post("/agui", json=run_input())
        history = await http.get("/threads/t1/messages")
    events = sse_events(streamed.text)
    assert events[-1]["type"] == "RUN_FINISHED"
    result = next(e for e in events if e["type"] == "TOOL_CALL_RESULT")
    assert result["content"] == "tool \ufffd q"
    text = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert text == "model \ufffd said"
    assert history.status_code == 200
    messages = history.json()["messages"]
    assert messages[2]["content"] == "tool \ufffd q"
    assert messages[3]["content"] == "model \ufffd said"


async def test_a_stored_row_with_a_lone_surrogate_does_not_make_the_thread_unreadable(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with client(app) as http:
        await http.post("/agui", json=run_input())
        # As the server before #18 stored a user's "hi \ud800", and a row that is no JSON at all.
        with sqlite3.connect(tmp_path / "threads.db") as db:
            row = json.dumps({"role": "user", "content": LONE})
            db.execute("INSERT INTO agent_messages (session_id, message_data) VALUES ('t1', ?)", (row,))
            db.execute("INSERT INTO agent_messages (session_id, message_data) VALUES ('t1', '[[[')")
        app.state.server._chats.clear()  # reloaded from the file
        history = await http.get("/threads/t1/messages")
    assert history.status_code == 200
    assert history.json()["messages"][-1]["content"] == "hi \ufffd"


async def test_other_websites_cannot_drive_the_agent(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [])
    evil = {"Origin": "https://evil.example"}
    async with client(app) as http:
        # The simple requests a page on another site may send without asking first.
        as_text = {"Content-Type": "text/plain", **evil}
        body = json.dumps(run_input())
        assert_error(await http.post("/agui", content=body, headers=as_text), 403, "forbidden_origin")
        assert_error(await http.post("/", content=body, headers=as_text), 403, "forbidden_origin")
        null = {"Content-Type": "application/json", "Origin": "null"}
        assert_error(await http.post("/agui", content=body, headers=null), 403, "forbidden_origin")
        assert_error(await http.get("/threads/t1/messages", headers=evil), 403, "forbidden_origin")
        assert (await http.get("/threads/t1/messages")).status_code == 404  # no turn ran
        # Without an Origin (curl, the SDKs) a body still has to say it is JSON.
        assert_error(
            await http.post("/agui", content=body, headers={"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
            "text/plain",
        )
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert_error(await http.post("/agui", content=body, headers=form), 415, "unsupported_media_type")
    app, _ = make_app(tmp_path, [reply(WORDS, delay=0.01), reply("ok")])  # the last one closed its store
    async with serving(app) as base, httpx.AsyncClient(base_url=f"http://{base}") as http:
        async with http.stream("POST", "/agui", json=run_input()) as running:
            await until(lambda: app.state.server._active == 1)
            assert_error(await http.post("/threads/t1/stop", headers=evil), 403, "forbidden_origin")
            as_text = {"Content-Type": "text/plain"}
            assert_error(await http.post("/threads/t1/stop", headers=as_text), 415, "unsupported_media_type")
            assert app.state.server._active == 1  # still running
            assert (await http.post("/threads/t1/stop")).json()["stopped"] is True  # curl -X POST
            await running.aread()
        same_site = {"Origin": f"http://{base}"}
        assert (await http.post("/agui", json=run_input(run="r2"), headers=same_site)).status_code == 200
        assert_error(await http.delete("/threads/t1", headers=evil), 403, "forbidden_origin")
    app, _ = make_app(tmp_path, [reply("ok")], cors_origins=["https://shop.example"])
    async with client(app) as http:
        shop = {"Origin": "https://shop.example"}
        assert (await http.post("/agui", json=run_input(run="r3"), headers=shop)).status_code == 200


async def test_a_websocket_from_another_site_is_refused(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with serving(app) as base:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://{base}/ws/t1", origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        async with connect(f"ws://{base}/ws/t1", origin=f"http://{base}") as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"type": "send", "text": "hi"}))
            assert (await receive_run(ws))[-1]["type"] == "RUN_FINISHED"


async def test_only_loopback_names_and_allowed_hosts_are_served(tmp_path: Path) -> None:
    app, _ = make_app(
        tmp_path, [reply("ok"), reply("ok")], allowed_hosts=["chat.example.com", "*.shop.example"]
    )
    async with client(app) as http:
        await http.post("/agui", json=run_input())
        for host in ["evil.example", "chat.example.com.evil.example", "shop.example", "127.0.0.2.nip.io"]:
            refused = await http.get("/threads/t1/messages", headers={"Host": host})
            assert_error(refused, 400, "invalid_host", host)
        for host in ["localhost:8000", "127.0.0.1", "[::1]:8000", "CHAT.example.com", "eu.shop.example:443"]:
            assert (await http.get("/threads/t1/messages", headers={"Host": host})).status_code == 200, host
        assert (await http.get("/healthz", headers={"Host": "10.0.0.7:8000"})).status_code == 200
    async with serving(app) as base:
        with pytest.raises(InvalidStatus) as refused_ws:
            async with connect(f"ws://{base}/ws/t1", additional_headers={"Host": "evil.example"}):
                pass
        assert refused_ws.value.response.status_code == 400
        assert json.loads(refused_ws.value.response.body or b"")["error"] == "invalid_host"


async def test_every_response_carries_the_security_headers(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with client(app) as http:
        responses = [
            await http.post("/agui", json=run_input()),  # a stream
            await http.get("/threads/t1/messages"),
            await http.get("/nowhere"),
            await http.get("/healthz", headers={"Host": "evil.example"}),
            await http.post("/agui", content="{}", headers={"Content-Type": "text/plain"}),
        ]
    for response in responses:
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"db": "a.db", "store": "sqlite:///b.db"}, "not both"),
        ({"store": "mysql://h"}, "unknown store URL"),
    ],
)
def test_serve_refuses_a_store_it_cannot_use_in_one_line(
    flags: dict[str, str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve_main(argparse.Namespace(**flags)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert words in line


def test_serve_refuses_an_open_address_without_allowed_hosts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RTAGENT_ALLOWED_HOSTS", raising=False)
    args = argparse.Namespace(host="0.0.0.0", token=TOKEN)
    assert serve_main(args) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "--allowed-host" in line


def test_serve_refuses_an_open_address_without_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(agent=None, model=None, host="0.0.0.0", port=8000, token=None, db=None)
    assert serve_main(args) == 2
    assert "needs a token" in capsys.readouterr().err
    args.host, args.agent = "127.0.0.1", "no/such/file.py"
    assert serve_main(args) == 2
    assert "no such file" in capsys.readouterr().err


# -- serve --workers: no process outlives the one that started them ------------------------------

SCRIPTED = str(Path(__file__).parent / "agents" / "scripted.py")


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid``, found through each process's parent in ``/proc/PID/stat``."""
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):  # a process that ended while we looked
            # The fields after the command name, which is in parentheses and may hold anything.
            state, parent = stat.read_text().rpartition(")")[2].split()[:2]
            if state != "Z":
                children.setdefault(int(parent), set()).add(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), set())
        found |= below
        todo.extend(below)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the processes in /proc")
def test_the_workers_end_when_serve_is_killed(tmp_path: Path, redis_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "rtagent", "serve", SCRIPTED, "--workers", "2", "--port", str(port)]
    options = ["--db", str(tmp_path / "threads.db"), "--redis", redis_url]
    serve = subprocess.Popen([*command, *options], stdin=subprocess.DEVNULL)
    below: set[int] = set()
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:
            with suppress(httpx.TransportError):
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"Connection": "close"})
                workers.add(health.json()["worker"])
            time.sleep(0.05)
        assert len(workers) == 2, f"workers answering: {workers}"
        below = descendants(serve.pid)
        assert workers < below  # and multiprocessing's resource tracker
        serve.kill()
        serve.wait()
        deadline = time.monotonic() + 3
        while (left := {pid for pid in below if alive(pid)}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"still running after serve was killed: {left}"
        with socket.socket() as sock:  # as a restarted server would bind it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:  # no strays, whatever failed
        if serve.returncode is None:  # not reaped: the pid is still this one's
            below |= descendants(serve.pid)
        serve.kill()
        serve.wait()
        for pid in below:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- the official TypeScript client ---------------------------------------------------------------

NODE_DIR = Path(__file__).parent / "node"


async def run_node_test(file: str, env: dict[str, str]) -> str:
    """Run ``tests/node/FILE`` with ``node --test``: its report; the test fails if the run does."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node is not installed: the @ag-ui/client test needs Node.js 18+ and npm")
    if not (NODE_DIR / "node_modules" / "@ag-ui" / "client").is_dir():
        # node_modules is not committed: install exactly what package-lock.json pins.
        install = [npm, "ci", "--no-audit", "--no-fund"]
        installed = await asyncio.to_thread(
            subprocess.run, install, cwd=NODE_DIR, capture_output=True, text=True, timeout=300
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
    process = await asyncio.create_subprocess_exec(
        node,
        "--test",
        file,
        cwd=NODE_DIR,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    report = output.decode()
    assert process.returncode == 0, report
    return report


async def test_the_official_typescript_client_runs_turns(tmp_path: Path) -> None:
    agent = rtagent.load_agent(str(NODE_DIR / "scripted_agent.py"))
    app = create_app(agent, db_path=tmp_path / "threads.db", token=TOKEN)
    async with serving(app) as base:
        report = await run_node_test(
            "agui.test.mjs", {"RTAGENT_URL": f"http://{base}/agui", "RTAGENT_TOKEN": TOKEN}
        )
    assert "# pass 3" in report, report


async def test_the_official_typescript_client_follows_handoffs_and_guardrail_errors(tmp_path: Path) -> None:
    agent = rtagent.load_agent(str(NODE_DIR / "handoff_agent.py"))
    app = create_app(agent, db_path=tmp_path / "threads.db", token=TOKEN)
    async with serving(app) as base:
        report = await run_node_test(
            "handoff.test.mjs", {"RTAGENT_URL": f"http://{base}/agui", "RTAGENT_TOKEN": TOKEN}
        )
    assert "# pass 2" in report, report

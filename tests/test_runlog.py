"""The run log: event ids, resuming a stream after a reconnect, and the grace period of a client
that went away. The server runs on a real socket (uvicorn), the model is the scripted one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server import WORDS, make_app, run_input, serving, until
from websockets.asyncio.client import connect

from rtagent.server._runlog import parse_id
from rtagent.testing import reply


def frames(body: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, event) of each SSE frame."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "data" in fields:
            out.append((fields.get("id"), json.loads(fields["data"])))
    return out


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")


async def read_until_cut(
    http: httpx.AsyncClient, events: int, body: dict[str, Any] | None = None
) -> list[tuple[str | None, dict[str, Any]]]:
    """A run's first ``events`` frames over ``POST /agui``; then the connection is dropped."""
    seen: list[tuple[str | None, dict[str, Any]]] = []
    buffer = ""
    async with http.stream("POST", "/agui", json=body or run_input()) as response:
        async for chunk in response.aiter_text():
            buffer += chunk
            *blocks, buffer = buffer.split("\n\n")
            seen += frames("\n\n".join(blocks))
            if len(seen) >= events:
                break
    return seen


async def test_every_logged_event_has_an_increasing_id(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("One two three.")])
    async with serving(app) as base, httpx.AsyncClient(base_url=f"http://{base}") as http:
        body = (await http.post("/agui", json=run_input())).text
    ids = [event_id for event_id, _ in frames(body)]
    assert all(ids), ids
    keys = [parse_id(i) for i in ids if i]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


async def test_a_reconnect_with_last_event_id_gets_the_rest_with_no_gap_or_duplicate(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply(WORDS, delay=0.002), reply(WORDS)])
    async with serving(app) as base, httpx.AsyncClient(base_url=f"http://{base}", timeout=30) as http:
        first = await read_until_cut(http, 40)
        last = first[-1][0]
        assert last is not None
        rest = frames((await http.get("/threads/t1/stream", headers={"Last-Event-ID": last})).text)
        # The same reply, uninterrupted, for comparison.
        whole = frames((await http.post("/agui", json=run_input(thread="t2"))).text)
    ids = [i for i, _ in first + rest]
    assert len(ids) == len(set(ids))
    assert [parse_id(i) for i in ids if i] == sorted(parse_id(i) for i in ids if i)
    events = [e for _, e in first + rest]
    assert [e["type"] for e in events] == [e["type"] for _, e in whole]
    assert text_of(events) == "".join(WORDS) == text_of([e for _, e in whole])
    assert events[-1]["type"] == "RUN_FINISHED"
    assert events[-1]["result"]["interrupted"] is False  # the client that left did not cut it


async def test_after_resumes_like_last_event_id_and_without_an_id_only_a_live_run_streams(
    tmp_path: Path,
) -> None:
    app, _ = make_app(tmp_path, [reply("Alpha beta gamma.")])
    async with serving(app) as base, httpx.AsyncClient(base_url=f"http://{base}") as http:
        whole = frames((await http.post("/agui", json=run_input())).text)
        middle = whole[3][0]
        after = frames((await http.get("/threads/t1/stream", params={"after": middle})).text)
        ended = await http.get("/threads/t1/stream")
        done = await http.get("/threads/t1/stream", headers={"Last-Event-ID": whole[-1][0] or ""})
        unknown = await http.get("/threads/nobody/stream")
        bad = await http.get("/threads/t1/stream", headers={"Last-Event-ID": "yesterday"})
    assert after == whole[4:]
    assert ended.status_code == 204  # the history has a run that ended
    assert done.status_code == 204  # nothing after the end: an EventSource stops reconnecting
    assert unknown.status_code == 204
    assert bad.status_code == 400
    assert bad.json()["error"] == "bad_event_id"


async def test_a_turn_nobody_comes_back_to_is_interrupted_after_the_grace_period(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.005)], disconnect_grace=0.3)
    async with serving(app) as base, httpx.AsyncClient(base_url=f"http://{base}") as http:
        await read_until_cut(http, 10)
        await asyncio.sleep(0.1)
        during = model.streams[-1].outcome
        assert during == "streaming"  # still within the grace period
        await until(lambda: model.streams[-1].outcome != "streaming")
        assert model.streams[-1].outcome == "closed"
        await until(lambda: app.state.server._active == 0)
        history = (await http.get("/threads/t1/messages")).json()["messages"]
    assert history[-1]["metadata"] == {"rtagent": {"interrupted": True}}


async def test_joining_a_live_run_without_an_id_replays_it_from_its_start(tmp_path: Path) -> None:
    app, model = make_app(tmp_path, [reply(WORDS, delay=0.002)])
    async with serving(app) as base, httpx.AsyncClient(base_url=f"http://{base}", timeout=30) as http:
        posting = asyncio.create_task(http.post("/agui", json=run_input()))
        await until(lambda: model.deltas_emitted >= 20)
        joined = frames((await http.get("/threads/t1/stream")).text)
        whole = frames((await posting).text)
    assert joined == whole


async def test_a_websocket_resumes_after_an_event_id(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply(WORDS, delay=0.002)])
    async with serving(app) as base:
        first: list[dict[str, Any]] = []
        async with connect(f"ws://{base}/ws/t1") as ws:
            await ws.send(json.dumps({"type": "send", "text": "go"}))
            while len(first) < 30:
                first.append(json.loads(await ws.recv()))
        rest: list[dict[str, Any]] = []
        async with connect(f"ws://{base}/ws/t1") as ws:
            await ws.send(json.dumps({"type": "resume", "after": first[-1]["eventId"]}))
            while not rest or rest[-1]["type"] != "RUN_FINISHED":
                rest.append(json.loads(await ws.recv()))
    events = first + rest
    assert len({e["eventId"] for e in events}) == len(events)
    assert text_of(events) == "".join(WORDS)
    assert events[-1]["result"]["interrupted"] is False


@pytest.mark.parametrize(("after", "code"), [(17, "invalid_input"), ("12-x", "bad_event_id")])
async def test_a_bad_resume_command_is_a_one_line_error(tmp_path: Path, after: object, code: str) -> None:
    app, _ = make_app(tmp_path, [reply("ok")])
    async with serving(app) as base, connect(f"ws://{base}/ws/t1") as ws:
        await ws.send(json.dumps({"type": "resume", "after": after}))
        answer = json.loads(await ws.recv())
    assert answer["type"] == "error"
    assert answer["error"] == code

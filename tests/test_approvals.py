"""Tool approvals over ``rtagent serve``: AG-UI's interrupt outcome and resume entries, the
WebSocket's ``answer`` command, and a paused run that outlives the server process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agents import function_tool
from test_server import (
    NODE_DIR,
    client,
    kinds,
    make_app,
    receive_run,
    run_input,
    run_node_test,
    serving,
    sse_events,
)
from websockets.asyncio.client import connect

import rtagent
from rtagent import create_app
from rtagent._history import NOT_ANSWERED
from rtagent.server._agui import APPROVAL_SCHEMA
from rtagent.testing import call, reply, tool_calls

refunds: list[str] = []


@function_tool(needs_approval=True)
async def refund(order: str) -> str:
    """Refund an order."""
    refunds.append(order)
    return f"refunded order {order}"


def answer(*entries: tuple[str, str, Any], run: str = "r2") -> dict[str, Any]:
    body = run_input(None, run=run)
    body["resume"] = [
        {"interruptId": i, "status": status, "payload": payload} for i, status, payload in entries
    ]
    return body


def approve(call_id: str, run: str = "r2") -> dict[str, Any]:
    return answer((call_id, "resolved", {"approved": True}), run=run)


def app_for(tmp_path: Path, *steps: Any) -> Any:
    refunds.clear()
    return make_app(tmp_path, list(steps), tools=[refund])


ASK = tool_calls(call("refund", {"order": "42"}), text="Let me do that. ")


async def test_a_run_pauses_with_an_interrupt_and_a_resolved_resume_runs_the_tool(tmp_path: Path) -> None:
    app, _ = app_for(tmp_path, ASK, reply("Refunded."))
    async with client(app) as http:
        paused = sse_events((await http.post("/agui", json=run_input("refund order 42"))).text)
        resumed = sse_events((await http.post("/agui", json=approve("call_1"))).text)
    assert "TOOL_CALL_RESULT" not in kinds(paused)
    start = next(e for e in paused if e["type"] == "TOOL_CALL_START")
    assert (start["toolCallId"], start["toolCallName"]) == ("call_1", "refund")
    outcome = paused[-1]["outcome"]
    assert outcome == {
        "type": "interrupt",
        "interrupts": [
            {
                "id": "call_1",
                "reason": "tool_approval",
                "message": 'Approve refund({"order":"42"})?',
                "toolCallId": "call_1",
                "responseSchema": APPROVAL_SCHEMA,
            }
        ],
    }
    assert kinds(resumed) == [
        "RUN_STARTED",
        "STEP_STARTED",
        "STEP_FINISHED",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "STEP_STARTED",
        "STEP_FINISHED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    assert "outcome" not in resumed[-1]
    assert refunds == ["42"]


async def test_a_cancelled_resume_rejects_the_call_and_the_model_is_told(tmp_path: Path) -> None:
    app, model = app_for(tmp_path, ASK, reply("Understood, no refund."))
    async with client(app) as http:
        await http.post("/agui", json=run_input("refund order 42"))
        declined = ("call_1", "resolved", {"approved": False, "message": "Not without a receipt."})
        resumed = sse_events((await http.post("/agui", json=answer(declined))).text)
        history = (await http.get("/threads/t1/messages")).json()["messages"]
    assert refunds == []
    assert resumed[-1]["type"] == "RUN_FINISHED"
    said = {"call_id": "call_1", "output": "Not without a receipt.", "type": "function_call_output"}
    assert said in model.calls[-1].input
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]


async def test_a_paused_run_is_continued_by_the_server_after_a_restart(tmp_path: Path) -> None:
    app, _ = app_for(tmp_path, ASK)
    async with client(app) as http:
        paused = sse_events((await http.post("/agui", json=run_input("refund order 42"))).text)
    assert paused[-1]["outcome"]["type"] == "interrupt"
    restarted, _ = app_for(tmp_path, reply("Refunded after the restart."))  # same database file
    async with client(restarted) as http:
        resumed = sse_events((await http.post("/agui", json=approve("call_1"))).text)
    assert refunds == ["42"]
    text = "".join(e["delta"] for e in resumed if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert text == "Refunded after the restart."


async def test_the_messages_list_the_waiting_calls_also_after_a_restart(tmp_path: Path) -> None:
    app, _ = app_for(tmp_path, ASK)
    async with client(app) as http:
        before = (await http.get("/threads/t1/messages")).status_code
        await http.post("/agui", json=run_input("refund order 42"))
        paused = (await http.get("/threads/t1/messages")).json()
    restarted, _ = app_for(tmp_path, reply("Refunded."))  # same database file: the store's run
    async with client(restarted) as http:
        stored = (await http.get("/threads/t1/messages")).json()
        await http.post("/agui", json=approve("call_1"))
        answered = (await http.get("/threads/t1/messages")).json()
    assert before == 404
    waiting = {
        "id": "call_1",
        "reason": "tool_approval",
        "message": 'Approve refund({"order":"42"})?',
        "toolCallId": "call_1",
        "responseSchema": APPROVAL_SCHEMA,
    }
    assert paused["interrupts"] == stored["interrupts"] == [waiting]
    assert paused["messages"][-1]["toolCalls"][0]["id"] == "call_1"
    assert answered["interrupts"] == []
    assert [m["role"] for m in answered["messages"]] == ["user", "assistant", "tool", "assistant"]


async def test_two_interrupts_are_answered_in_two_runs_in_either_order(tmp_path: Path) -> None:
    two = tool_calls(call("refund", {"order": "1"}), call("refund", {"order": "2"}))
    app, _ = app_for(tmp_path, two, reply("Done."))
    async with client(app) as http:
        first = sse_events((await http.post("/agui", json=run_input("refund 1 and 2"))).text)
        second = sse_events((await http.post("/agui", json=approve("call_2"))).text)
        third = sse_events(
            (await http.post("/agui", json=answer(("call_1", "cancelled", None), run="r3"))).text
        )
    assert [i["id"] for i in first[-1]["outcome"]["interrupts"]] == ["call_1", "call_2"]
    assert [i["id"] for i in second[-1]["outcome"]["interrupts"]] == ["call_1"]
    assert "outcome" not in third[-1]
    assert refunds == ["2"]


async def test_a_new_message_instead_of_an_answer_closes_the_interrupt(tmp_path: Path) -> None:
    app, model = app_for(tmp_path, ASK, reply("OK, something else then."))
    async with client(app) as http:
        await http.post("/agui", json=run_input("refund order 42"))
        await http.post("/agui", json=run_input("forget it", run="r2"))
        late = await http.post("/agui", json=approve("call_1", run="r3"))
    assert refunds == []
    closed = {"type": "function_call_output", "call_id": "call_1", "output": NOT_ANSWERED}
    assert closed in model.calls[-1].input
    assert late.status_code == 409
    assert late.json()["error"] == "not_pending"


async def test_bad_answers_are_one_line_4xx_errors(tmp_path: Path) -> None:
    app, _ = app_for(tmp_path, ASK, reply("Refunded."))
    async with client(app) as http:
        nothing = await http.post("/agui", json=approve("call_1"))
        await http.post("/agui", json=run_input("refund order 42"))
        unknown = await http.post("/agui", json=approve("call_9"))
        malformed = await http.post("/agui", json=answer(("call_1", "resolved", {"ok": "yes"})))
        ok = sse_events((await http.post("/agui", json=approve("call_1"))).text)
        again = await http.post("/agui", json=approve("call_1", run="r3"))
    assert (nothing.status_code, nothing.json()["error"]) == (409, "not_pending")
    assert (unknown.status_code, unknown.json()["error"]) == (409, "not_pending")
    assert "'call_9'" in unknown.json()["message"]
    assert (malformed.status_code, malformed.json()["error"]) == (422, "bad_resume")
    assert ok[-1]["type"] == "RUN_FINISHED"
    assert again.status_code == 409
    assert refunds == ["42"]


async def test_an_answer_right_after_the_resumed_run_ends_finds_nothing_waiting(tmp_path: Path) -> None:
    app, _ = app_for(tmp_path, ASK, reply("Refunded."))
    paused = app.state.server.paused
    save = paused.save

    async def slow_save(thread_id: str, state: str | None) -> None:
        await asyncio.sleep(0.3)  # the store answers after the client has seen the run's end
        await save(thread_id, state)

    paused.save = slow_save
    async with client(app) as http:
        await http.post("/agui", json=run_input("refund order 42"))
        await asyncio.sleep(0.5)
        await http.post("/agui", json=approve("call_1"))
        again = await http.post("/agui", json=approve("call_1", run="r3"))
    assert again.status_code == 409
    assert refunds == ["42"]


async def test_the_websocket_answers_with_its_own_command(tmp_path: Path) -> None:
    app, _ = app_for(tmp_path, ASK, reply("Refunded."))
    async with serving(app) as base, connect(f"ws://{base}/ws/t1") as ws:
        await ws.send(json.dumps({"type": "send", "text": "refund order 42"}))
        paused = await receive_run(ws)
        await ws.send(json.dumps({"type": "answer", "approved": "call_1"}))
        bad = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "answer", "approved": ["call_1"]}))
        resumed = await receive_run(ws)
        await asyncio.sleep(0)
    assert paused[-1]["outcome"]["interrupts"][0]["toolCallId"] == "call_1"
    assert bad["error"] == "bad_answer"
    assert "TOOL_CALL_RESULT" in kinds(resumed)
    assert refunds == ["42"]


async def test_the_official_typescript_client_drives_an_approval_and_a_client_tool(tmp_path: Path) -> None:
    agent = rtagent.load_agent(str(NODE_DIR / "approval_agent.py"))
    app = create_app(agent, db_path=tmp_path / "threads.db")
    async with serving(app) as base:
        report = await run_node_test("approvals.test.mjs", {"RTAGENT_URL": f"http://{base}/agui"})
    assert "# pass 2" in report, report

"""A client's own tools and the state it shares with the agent, over ``POST /agui``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents import RunContextWrapper, function_tool
from test_server import client, kinds, make_app, run_input, sse_events

from rtagent.testing import call, reply, tool_calls

CONFIRM = {
    "name": "confirm_address",
    "description": "Ask the person to confirm their delivery address in the page.",
    "parameters": {"type": "object", "properties": {"address": {"type": "string"}}, "required": ["address"]},
}


def with_tools(body: dict[str, Any], *tools: dict[str, Any]) -> dict[str, Any]:
    return {**body, "tools": list(tools)}


async def test_a_client_tool_call_ends_the_run_and_its_result_continues_the_turn(tmp_path: Path) -> None:
    asked = tool_calls(call("confirm_address", {"address": "1 Main St"}), text="One moment. ")
    app, model = make_app(tmp_path, [asked, reply("Great, it ships to 1 Main St.")])
    async with client(app) as http:
        first = sse_events((await http.post("/agui", json=with_tools(run_input("ship it"), CONFIRM))).text)
        result = {"id": "t1", "role": "tool", "toolCallId": "call_1", "content": "confirmed"}
        body = with_tools(run_input(None, run="r2"), CONFIRM)
        body["messages"] = [{"id": "u1", "role": "user", "content": "ship it"}, result]
        second = sse_events((await http.post("/agui", json=body)).text)
    # The model saw the client's tool, and the call streams whole with no result of the server's.
    assert [tool.name for tool in model.calls[0].tools] == ["lookup", "confirm_address"]
    assert "TOOL_CALL_RESULT" not in kinds(first)
    start = next(e for e in first if e["type"] == "TOOL_CALL_START")
    assert (start["toolCallId"], start["toolCallName"]) == ("call_1", "confirm_address")
    assert first[-1]["outcome"] == {"type": "success", "pendingToolCallIds": ["call_1"]}
    # The next run carries the result: the model gets it, and the call is not streamed again.
    told = {"call_id": "call_1", "output": "confirmed", "type": "function_call_output"}
    assert told in model.calls[-1].input
    assert not {"TOOL_CALL_START", "TOOL_CALL_RESULT"} & set(kinds(second))
    text = "".join(e["delta"] for e in second if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert text == "Great, it ships to 1 Main St."
    assert "outcome" not in second[-1]


async def test_a_client_tool_named_like_the_agents_own_is_a_422(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, [reply("never")])
    clash = {**CONFIRM, "name": "lookup"}
    async with client(app) as http:
        answer = await http.post("/agui", json=with_tools(run_input("hi"), clash))
    assert answer.status_code == 422
    assert "'lookup' is the agent's own" in answer.json()["message"]


@function_tool
async def add_to_cart(ctx: RunContextWrapper[dict[str, Any]], item: str) -> str:
    """Put an item in the shared cart."""
    ctx.context.setdefault("cart", []).append(item)
    return f"{item} is in the cart"


async def test_the_state_reaches_the_tools_and_their_changes_stream_as_json_patches(tmp_path: Path) -> None:
    steps = [tool_calls(call("add_to_cart", {"item": "tea"})), reply("Added.")]
    app, _ = make_app(tmp_path, steps, tools=[add_to_cart])
    body = {**run_input("add tea"), "state": {"cart": ["milk"], "user": "ann"}}
    async with client(app) as http:
        events = sse_events((await http.post("/agui", json=body)).text)
    types = [e["type"] for e in events]
    assert events[1] == {"type": "STATE_SNAPSHOT", "snapshot": {"cart": ["milk"], "user": "ann"}}
    # Once the tool has ended, right after its result; nothing changed after it.
    assert types.index("STATE_DELTA") == types.index("TOOL_CALL_RESULT") + 1
    assert events[types.index("STATE_DELTA")]["delta"] == [{"op": "add", "path": "/cart/1", "value": "tea"}]
    assert types.count("STATE_DELTA") == 1
    assert types[-1] == "RUN_FINISHED"

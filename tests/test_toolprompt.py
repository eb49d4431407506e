"""The tool format for models without one: prompt, worked examples, grammar, history, copy check.

All pure functions, tested on the agents of the labelled set (``tests/evals``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agents import Agent, handoff
from agents.items import TResponseInputItem
from agents.tool import WebSearchTool

from rtagent import _toolprompt

sys.path.insert(0, str(Path(__file__).parent / "evals"))
from eval_agents import AGENTS
from eval_runner import load_rows

SHOP, HELPER = AGENTS["shop"], AGENTS["helper"]


def specs(agent: Agent[Any]) -> list[_toolprompt.ToolSpec]:
    return _toolprompt.tool_specs(agent.tools, [])


# -- the prompt -----------------------------------------------------------------------------------


def test_the_system_prompt_lists_each_tool_on_one_line() -> None:
    prompt = _toolprompt.system_prompt(str(HELPER.instructions), specs(HELPER))
    assert prompt.startswith("You are a helpful assistant.")
    assert "\n- calculate(expression: string): Evaluate an arithmetic expression" in prompt
    assert '\n- get_weather(city: string, unit: "celsius"|"fahrenheit"): Get the current weather' in prompt
    assert "Args:" not in prompt  # only the first line of each description
    assert prompt.endswith(
        'reply only with JSON {"name": ..., "arguments": {...}}. Otherwise reply with a short plain answer.'
    )


def test_one_worked_example_per_tool_from_its_own_schema() -> None:
    turns = _toolprompt.example_turns(specs(SHOP))
    assert turns == [
        {"role": "user", "content": "Please get order status for X-7731."},
        {"role": "assistant", "content": '{"name": "get_order_status", "arguments": {"order_id": "X-7731"}}'},
        {"role": "user", "content": "Please cancel order for X-7731, reason it arrived broken."},
        {
            "role": "assistant",
            "content": '{"name": "cancel_order", "arguments": '
            '{"order_id": "X-7731", "reason": "it arrived broken"}}',
        },
    ]
    weather = _toolprompt.example_turns(specs(HELPER))[3]["content"]
    assert json.loads(weather) == {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "fahrenheit"}}


def test_handoffs_are_tools_and_hosted_tools_are_left_out() -> None:
    expert = Agent(name="Expert")
    found = _toolprompt.tool_specs([*SHOP.tools, WebSearchTool()], [handoff(expert)])
    assert [spec.name for spec in found] == ["get_order_status", "cancel_order", "transfer_to_expert"]


# -- the grammar ----------------------------------------------------------------------------------


def test_the_text_grammar_ends_with_the_end_token_and_cannot_start_a_call() -> None:
    lines = _toolprompt.text_grammar(7).splitlines()
    assert lines == ["%llguidance {}", "start: text", r"text: /[^\{\s](.|\n)*/ <[7]>"]


def test_a_call_is_valid_for_its_tool_schema() -> None:
    lines = _toolprompt.call_grammar(specs(SHOP)).splitlines()
    assert lines[:2] == ["%llguidance {}", "start: call"]
    schema = json.loads(lines[2].removeprefix("call: %json "))
    names = [variant["properties"]["name"]["const"] for variant in schema["anyOf"]]
    assert names == ["get_order_status", "cancel_order"]
    order_id = schema["anyOf"][0]["properties"]["arguments"]["properties"]["order_id"]
    assert order_id["maxLength"] == _toolprompt.MAX_STRING
    assert schema["x-guidance"] == {
        "whitespace_flexible": False,
        "item_separator": ", ",
        "key_separator": ": ",
    }


def test_parallel_calls_are_one_per_line_up_to_the_cap_and_one_call_is_the_default() -> None:
    single = _toolprompt.call_grammar(specs(SHOP)).splitlines()
    several = _toolprompt.call_grammar(specs(SHOP), _toolprompt.MAX_CALLS).splitlines()
    assert _toolprompt.MAX_CALLS == 4
    assert not [line for line in single if line.startswith("calls")]
    assert several[1] == "start: calls"
    assert several[2] == single[2]  # each call is the same JSON as a lone one
    assert several[3] == 'calls: call ("\\n" call){0,3}'


def test_definitions_are_hoisted_and_renamed_per_tool() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    params = {
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/Point"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["at", "tags"],
        "$defs": {"Point": point},
    }
    tools = [_toolprompt.ToolSpec("a", "", params), _toolprompt.ToolSpec("b", "", params)]
    schema = _toolprompt.call_schema(tools)
    assert set(schema["$defs"]) == {"a__Point", "b__Point"}
    first = schema["anyOf"][0]["properties"]["arguments"]
    assert first["properties"]["at"] == {"$ref": "#/$defs/a__Point"}
    assert first["properties"]["tags"]["items"]["maxLength"] == _toolprompt.MAX_STRING
    assert first["properties"]["tags"]["maxItems"] == _toolprompt.MAX_ITEMS
    assert "$defs" not in first
    assert params["$defs"] == {"Point": point}  # the tool's own schema is left alone


# -- the conversation -----------------------------------------------------------------------------


HISTORY: list[TResponseInputItem] = [
    {"role": "user", "content": "where is order A1?"},
    {"type": "function_call", "call_id": "c1", "name": "get_order_status", "arguments": '{"order_id": "A1"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "Shipped yesterday."},
]


def test_history_renders_calls_as_the_json_taught_and_results_as_tool_messages() -> None:
    answer: TResponseInputItem = {
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "id": "m1",
        "content": [{"type": "output_text", "text": "It shipped.", "annotations": []}],
    }
    messages = _toolprompt.history([*HISTORY, answer, {"role": "user", "content": "thanks"}])
    assert messages == [
        {"role": "user", "content": "where is order A1?"},
        {"role": "assistant", "content": '{"name": "get_order_status", "arguments": {"order_id": "A1"}}'},
        {"role": "tool", "content": "get_order_status returned: Shipped yesterday."},
        {"role": "assistant", "content": "It shipped."},
        {"role": "user", "content": "thanks"},
    ]
    assert _toolprompt.ends_with_tool_result(HISTORY)
    assert not _toolprompt.ends_with_tool_result(HISTORY[:1])
    assert not _toolprompt.ends_with_tool_result("hi")


def test_a_call_copying_the_example_is_told_from_one_the_user_asked_for() -> None:
    status, weather = specs(SHOP)[0], specs(HELPER)[1]
    assert _toolprompt.copies_example(status, '{"order_id": "X-7731"}', "what are your opening hours?")
    assert not _toolprompt.copies_example(status, '{"order_id": "x7731"}', "where is order X-7731?")
    assert not _toolprompt.copies_example(status, '{"order_id": "A1234"}', "where is order A1234?")
    # The unit is a choice among enum values, not a copy; Oslo is.
    assert _toolprompt.copies_example(weather, '{"city": "Oslo", "unit": "celsius"}', "what is 2 + 2?")
    assert not _toolprompt.copies_example(weather, '{"city": "Rome", "unit": "fahrenheit"}', "Rome?")
    # As the arguments stream: judged once a copied value has closed, not before.
    assert _toolprompt.copies_example(status, '{"order_id": "X-7731"}', "hi")
    assert _toolprompt.copies_example(weather, '{"city": "Oslo", "un', "what is 2 + 2?")
    assert not _toolprompt.copies_example(weather, '{"city": "Oslo', "what is 2 + 2?")
    assert not _toolprompt.copies_example(weather, '{"city": "Rome", "un', "what is 2 + 2?")


# -- the labelled set -----------------------------------------------------------------------------


def test_the_labelled_set_names_real_tools_and_arguments() -> None:
    rows = load_rows()
    assert len(rows) >= 60
    assert {row["agent"] for row in rows} == set(AGENTS)
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        if row["tool"] is None:
            continue
        [tool] = [spec for spec in specs(AGENTS[row["agent"]]) if spec.name == row["tool"]]
        assert set(row["args"]) <= set(tool.parameters["properties"])

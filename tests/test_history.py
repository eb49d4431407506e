"""Keeping the conversation whole when a turn is cut short: what an interrupt saves, and when not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents import Agent, SQLiteSession, function_tool
from agents.items import TResponseInputItem

import rtagent
from rtagent.testing import ScriptedModel, call, reply, tool_calls


@function_tool
async def fast() -> str:
    """Returns at once."""
    return "fast result"


class InterruptedAfterSave(SQLiteSession):
    """A session whose turn is interrupted the moment the SDK has saved items that ``when`` picks."""

    def __init__(self, when: Callable[[list[TResponseInputItem]], bool]) -> None:
        super().__init__("cut-after-save")
        self.when = when
        self.turn: rtagent.Turn | None = None

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        await super().add_items(items)
        if self.turn is not None and self.when(items):
            self.turn.interrupt()


def has(kind: str) -> Callable[[list[TResponseInputItem]], bool]:
    return lambda items: any(isinstance(i, dict) and i.get("type") == kind for i in items)


async def replies_after_a_cut(model: ScriptedModel, session: InterruptedAfterSave) -> list[Any]:
    agent = Agent(name="a", model=model, tools=[fast])
    async with rtagent.stream(agent, "go", session=session) as turn:
        session.turn = turn
        await turn.wait()
    assert turn.result.interrupted
    history = await session.get_items()
    return [i for i in history if isinstance(i, dict) and i.get("role") == "assistant"]


async def test_a_response_the_sdk_saved_before_the_cut_is_not_saved_again() -> None:
    # Cut after the SDK saved the tool round (its text, call and output), before the next model call.
    model = ScriptedModel([tool_calls(call("fast", call_id="f"), text="Checking. "), reply("Done.")])
    replies = await replies_after_a_cut(model, InterruptedAfterSave(has("function_call_output")))
    assert [r["content"][0]["text"] for r in replies] == ["Checking. "]
    assert replies[0].get("status") != "incomplete"


async def test_a_final_reply_the_sdk_saved_before_the_cut_is_not_saved_again() -> None:
    # Cut after the SDK saved the final reply, before the run had ended.
    model = ScriptedModel([reply("All done.")])
    replies = await replies_after_a_cut(model, InterruptedAfterSave(has("message")))
    assert [r["content"][0]["text"] for r in replies] == ["All done."]

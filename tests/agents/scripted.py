"""A scripted agent for the terminal tests: a keyword in each message picks the model's script.

lookup    a 1 s tool call, then a reply
search    a tool that reports progress as it goes
both      two tools at once
broken    a tool that raises
long      a long reply streamed slowly (something to interrupt)
fail      the model fails in the middle of its reply
refund    a call to a tool that needs a person's approval, then a reply ("two refunds": two calls)
billing   a handoff to the billing agent, which answers on a model of its own
secret    a long reply that the input guardrail stops at once
think     a reply that takes 0.8 s to start
otherwise an echo that counts the user's messages, which shows the history is kept, and says
          where the model's last reply was cut off, if it was (what the history kept of it)
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import Agent, GuardrailFunctionOutput, RunContextWrapper, function_tool, input_guardrail
from agents.models.interface import Model

import rtagent
from rtagent._history import CUT_MARK
from rtagent.testing import ScriptedModel, Step, call, fail, reply, tool_calls


@function_tool
async def delayed_lookup(query: str) -> str:
    """Look something up slowly."""
    await asyncio.sleep(1.0)
    return f"Data for '{query}' retrieved successfully after a delay.\nSecond line that is not shown."


@function_tool
async def search(query: str) -> str:
    """Search the catalogue, reporting progress."""
    rtagent.progress("searching the catalogue", 0.4)
    await asyncio.sleep(0.8)
    rtagent.progress("ranking", 0.8)
    await asyncio.sleep(0.4)
    return f"3 books about {query}"


@function_tool(needs_approval=True)
async def refund(order: str) -> str:
    """Refund an order: a person approves each one."""
    return f"Order {order} refunded."


@function_tool
async def broken() -> str:
    """Always fails."""
    raise ValueError("the catalogue is offline")


LONG = " ".join(f"word{n}" for n in range(200))


def _script(text: str, messages: int, last_reply: str, answered: bool) -> list[Step]:
    if "lookup" in text:
        return [
            tool_calls(call("delayed_lookup", {"query": "x"})),
            reply("The lookup says: done.", delay=0.02),
        ]
    if "search" in text:
        return [tool_calls(call("search", {"query": "cats"})), reply("Found 3 books.", delay=0.02)]
    if "both" in text:
        calls = tool_calls(call("delayed_lookup", {"query": "y"}), call("search", {"query": "dogs"}))
        return [calls, reply("Both done.", delay=0.02)]
    if "billing" in text:
        return [tool_calls(call("transfer_to_billing", {}))]
    if "secret" in text:
        return [reply(LONG, delay=0.05)]
    if "refund" in text:
        # Answered: a run continued after the approval, maybe in another process than the call.
        settled = reply("That is settled.", delay=0.02)
        orders = ["1", "2"] if "two refunds" in text else ["42"]
        calls = tool_calls(*(call("refund", {"order": order}) for order in orders))
        return [settled] if answered else [calls, settled]
    if "broken" in text:
        return [tool_calls(call("broken")), reply("The tool failed, sorry.", delay=0.02)]
    if "long" in text:
        return [reply(LONG, delay=0.05)]
    if "think" in text:
        return [reply("Thought about it.", first_delay=0.8)]
    if "fail" in text:
        return [fail(RuntimeError("the model fell over"), after=reply("Partial answer", delay=0.02))]
    echo = f"You said: {text} (message {messages})"
    if last_reply.endswith(CUT_MARK):
        words = last_reply.removesuffix(CUT_MARK).split()
        echo += f" My last reply was cut off after {words[-1]!r}." if words else " My last reply was cut off."
    return [reply(echo, delay=0.02)]


def _text(item: dict[str, Any]) -> str:
    content = item.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


class ByKeyword(Model):
    """Starts a fresh script for every new user message, chosen by that message's words."""

    def __init__(self) -> None:
        self._message: tuple[int, str] = (0, "")  # the user message the script is for
        self._script = ScriptedModel()

    def _for(self, input: str | list[Any]) -> ScriptedModel:
        items = [{"role": "user", "content": input}] if isinstance(input, str) else input
        users = [item for item in items if isinstance(item, dict) and item.get("role") == "user"]
        # Counted and read: one process serves several conversations (the server tests).
        message = (len(users), _text(users[-1]) if users else "")
        if message != self._message:
            self._message = message
            replies = [_text(i) for i in items if isinstance(i, dict) and i.get("role") == "assistant"]
            last = items[-1] if items and isinstance(items[-1], dict) else {}
            answered = last.get("type") == "function_call_output"
            steps = _script(_text(users[-1]), len(users), replies[-1] if replies else "", answered)
            self._script = ScriptedModel(steps)
        return self._script

    async def get_response(self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._for(input).get_response(system_instructions, input, *args, **kwargs)

    def stream_response(self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        return self._for(input).stream_response(system_instructions, input, *args, **kwargs)


class Billing(ScriptedModel):
    """The billing agent's own model: the same answer to every request."""

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        self.enqueue(reply("Billing here: your last invoice is paid.", delay=0.02))
        return super().stream_response(*args, **kwargs)


@input_guardrail
async def no_secrets(
    _context: RunContextWrapper[Any], _agent: Agent[Any], given: str | list[Any]
) -> GuardrailFunctionOutput:
    # The SDK gives the whole input, history included: only the new message counts.
    users = [{"content": given}] if isinstance(given, str) else [i for i in given if i.get("role") == "user"]
    found = bool(users) and "secret" in _text(users[-1])
    return GuardrailFunctionOutput(output_info="it holds a secret", tripwire_triggered=found)


billing = Agent(name="billing", model=Billing())
agent = Agent(
    name="Scripted",
    model=ByKeyword(),
    tools=[delayed_lookup, search, broken, refund],
    handoffs=[billing],
    input_guardrails=[no_secrets],
)

not_an_agent = 42

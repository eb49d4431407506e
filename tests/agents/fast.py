"""A scripted agent that answers at once, for the fuzzer (``bench/fuzz.py``): thousands of turns
must take seconds, not minutes. A keyword in the message picks the script:

tool      a tool call that returns at once, then a reply
broken    a tool that raises, then a reply
fail      the model fails after part of its reply
slow      40 words, 10 ms apart (something to stop or walk away from)
otherwise an echo of the message, in up to 4 deltas
"""

from __future__ import annotations

from typing import Any

from agents import Agent, function_tool
from agents.models.interface import Model

from rtagent.testing import ScriptedModel, Step, call, fail, reply, tool_calls


@function_tool
async def quick(query: str) -> str:
    """Look something up, at once."""
    return f"found {query}"


@function_tool
async def broken() -> str:
    """Always fails."""
    raise ValueError("the catalogue is offline")


SLOW = " ".join(f"word{n}" for n in range(40))


def _script(text: str) -> list[Step]:
    if "tool" in text:
        return [tool_calls(call("quick", {"query": text[:40]}))]
    if "broken" in text:
        return [tool_calls(call("broken"))]
    if "fail" in text:
        return [fail(RuntimeError("the model fell over"), after=reply("Partial answer"))]
    if "slow" in text:
        return [reply(SLOW, delay=0.01)]
    echo = f"You said: {text}"
    return [reply(echo, chunks=min(4, len(echo)))]


def _text(item: Any) -> str:
    content = item.get("content", "") if isinstance(item, dict) else ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


class Instant(Model):
    """Stateless, unlike ``tests/agents/scripted.py``: many conversations call it at once, and each
    call's script follows from its own input (after a tool's output, the closing reply)."""

    def _for(self, input: str | list[Any]) -> ScriptedModel:
        items: list[Any] = [{"role": "user", "content": input}] if isinstance(input, str) else input
        last = items[-1] if items else {}
        if isinstance(last, dict) and last.get("type") == "function_call_output":
            return ScriptedModel([reply("Done.", chunks=2)])
        users = [item for item in items if isinstance(item, dict) and item.get("role") == "user"]
        return ScriptedModel(_script(_text(users[-1]) if users else ""))

    async def get_response(self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._for(input).get_response(system_instructions, input, *args, **kwargs)

    def stream_response(self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        return self._for(input).stream_response(system_instructions, input, *args, **kwargs)


agent = Agent(name="Fast", model=Instant(), tools=[quick, broken])

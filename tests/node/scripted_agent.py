"""The agent the Node test talks to: a scripted model, so the test needs no model at all.

First message: a tool call (with progress), then the answer. Second message: a plain reply.
"""

from __future__ import annotations

import asyncio

from agents import Agent, function_tool

import rtagent
from rtagent.testing import ScriptedModel, call, reply, tool_calls


@function_tool
async def lookup(query: str) -> str:
    """Look something up."""
    rtagent.progress("searching", 0.5)
    await asyncio.sleep(0.05)
    return f"{query} has 2.1 million people."


model = ScriptedModel(
    [
        tool_calls(call("lookup", {"query": "Paris"}), text="Let me check. "),
        reply("Paris has 2.1 million people.", delay=0.005),
        reply("You asked about Paris.", delay=0.005),
    ]
)
agent = Agent(name="node-test", instructions="Be concise.", tools=[lookup], model=model)

"""The demo agent: a concise assistant with one slow tool, to show tools running live.

Run it with ``rtagent chat`` (it is the default) or point ``rtagent chat`` at your own agent.
"""

from __future__ import annotations

import asyncio

from agents import Agent, function_tool


@function_tool
async def delayed_lookup(query: str) -> str:
    """Look something up in a slow external source (takes about 3 seconds)."""
    await asyncio.sleep(3)
    return f"Data for '{query}' retrieved successfully after a delay."


agent = Agent(
    name="RealtimeChatAgent",
    instructions=(
        "You are a highly responsive chat assistant. Answer user questions concisely. "
        "If the user asks for a 'delayed lookup', use the 'delayed_lookup' tool."
    ),
    tools=[delayed_lookup],
)

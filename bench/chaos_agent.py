"""The agent ``bench/chaos.py`` serves: async tools that are quick, slow, failing, finishing in the
background, and ``probe``, which reports from inside the server what leak checks cannot see from
outside (asyncio tasks, threads, live objects of the classes a leak would keep).

``rtagent serve bench/chaos_agent.py:agent --model http://127.0.0.1:PORT/v1#chaos``, with
``bench/chaosmodel.py`` on PORT deciding which tools are called.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections import Counter

from agents import Agent, function_tool

import rtagent

# A leak of a turn, a run, a stream or a model response keeps one of these alive.
WATCHED = (
    "rtagent._turn.Turn",
    "rtagent._chat.Chat",
    "rtagent.server._agui.AguiRun",
    "rtagent.server._transport.EventStream",
    "rtagent.server._transport.Socket",
    "rtagent._buffer.EventBuffer",
    "agents.result.RunResultStreaming",
    "openai.AsyncStream",
    "httpx.Response",
)


@function_tool
async def quick(topic: str) -> str:
    """Look something up, fast."""
    await asyncio.sleep(0.005)
    return f"quick facts about {topic}"


@function_tool
async def slow(seconds: float) -> str:
    """Work for a while, reporting progress."""
    steps = 4
    for step in range(steps):
        rtagent.progress("working", step / steps)
        await asyncio.sleep(seconds / steps)
    return f"worked {seconds} s"


@function_tool
async def boom(reason: str) -> str:
    """Fail at once."""
    raise RuntimeError(f"boom: {reason}")


@function_tool
async def slow_boom(seconds: float) -> str:
    """Fail after a while."""
    await asyncio.sleep(seconds)
    raise ValueError(f"gave up after {seconds} s")


@function_tool
async def report(seconds: float) -> str:
    """Write a report; finishes in the background if the turn is interrupted."""
    await asyncio.sleep(seconds)
    return f"report ready after {seconds} s"


@function_tool
async def probe() -> str:
    """The server process's asyncio tasks, threads and watched live objects, as JSON."""
    gc.collect()  # turns and tasks refer to each other: only a collection frees the ended ones
    objects = Counter(
        name for o in gc.get_objects() if (name := f"{type(o).__module__}.{type(o).__qualname__}") in WATCHED
    )
    tasks = Counter(getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks())
    threads = Counter(t.name.split("_")[0] for t in threading.enumerate())
    return json.dumps(
        {
            "tasks": sum(tasks.values()),
            "task_coroutines": dict(tasks),
            "threads": dict(threads),
            "objects": {name: objects.get(name, 0) for name in WATCHED},
        }
    )


agent = Agent(
    name="chaos",
    instructions="You are tested by a chaos benchmark.",
    tools=[quick, slow, boom, slow_boom, rtagent.background(report), probe],
)

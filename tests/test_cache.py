"""The tool-result cache: stored results, shared executions, and what is never stored."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from agents import Agent, FunctionTool, SQLiteSession, function_tool
from agents.tool_context import ToolContext

import rtagent
from rtagent import ToolFinished, TurnFinished, _cli
from rtagent._history import STILL_RUNNING
from rtagent.cache._tools import ToolCache
from rtagent.testing import ScriptedModel, call, reply, tool_calls


@pytest.fixture(autouse=True)
async def fresh_cache() -> AsyncIterator[None]:
    rtagent.configure_cache()
    yield
    rtagent.configure_cache()


@pytest.fixture
async def shared_cache(redis_url: str) -> AsyncIterator[str]:
    redis.Redis.from_url(redis_url).flushdb()
    rtagent.configure_cache(redis_url)
    yield redis_url
    await rtagent.clear_cache()


def counting(delay: float = 0.0, failures: int = 0) -> tuple[FunctionTool, list[str]]:
    """A ``lookup`` tool that records each run and fails its first ``failures`` runs."""
    runs: list[str] = []

    @function_tool
    async def lookup(query: str) -> str:
        """Looks something up."""
        runs.append(query)
        await asyncio.sleep(delay)
        if len(runs) <= failures:
            raise RuntimeError("the catalogue is down")
        return f"facts about {query}"

    return lookup, runs


async def invoke(tool: FunctionTool, query: str, call_id: str = "c") -> Any:
    arguments = json.dumps({"query": query})
    context: ToolContext[None] = ToolContext(
        context=None, tool_name=tool.name, tool_call_id=call_id, tool_arguments=arguments
    )
    return await tool.on_invoke_tool(context, arguments)


async def lookup_turn(tool: FunctionTool, query: str) -> tuple[ToolFinished, TurnFinished]:
    model = ScriptedModel([tool_calls(call("lookup", {"query": query}, call_id="l")), reply("ok")])
    async with rtagent.stream(Agent(name="a", model=model, tools=[tool]), "go") as turn:
        events = [event async for event in turn]
    finished = next(e for e in events if isinstance(e, ToolFinished))
    assert isinstance(events[-1], TurnFinished)
    return finished, events[-1]


async def test_a_stored_result_is_returned_without_running_the_tool() -> None:
    tool, runs = counting()
    lookup = rtagent.cached(tool, ttl=60)
    first, first_turn = await lookup_turn(lookup, "Paris")
    again, again_turn = await lookup_turn(lookup, "Paris")
    assert runs == ["Paris"]
    assert (first.output, first.cached) == ("facts about Paris", False)
    assert (again.output, again.cached) == ("facts about Paris", True)
    stored = len(json.dumps({"output": "facts about Paris"}))
    assert first_turn.result.metrics.cache["tool"] == rtagent.CacheCounts(misses=1, stored_bytes=stored)
    assert again_turn.result.metrics.cache["tool"] == rtagent.CacheCounts(hits=1)


async def test_a_turn_without_cached_tools_has_no_cache_counts() -> None:
    tool, _ = counting()
    _, turn = await lookup_turn(tool, "Paris")
    assert turn.result.metrics.cache == {}


async def test_different_arguments_miss() -> None:
    tool, runs = counting()
    lookup = rtagent.cached(tool)
    assert await invoke(lookup, "Paris") == "facts about Paris"
    assert await invoke(lookup, "Rome") == "facts about Rome"
    assert await invoke(lookup, "Paris") == "facts about Paris"
    assert runs == ["Paris", "Rome"]


async def test_the_key_is_the_canonical_json_of_the_arguments() -> None:
    runs: list[tuple[str, int]] = []

    @function_tool
    async def search(query: str, limit: int) -> str:
        """Searches."""
        runs.append((query, limit))
        return "found"

    tool = rtagent.cached(search)
    for arguments in ('{"query": "x", "limit": 3}', '{"limit":3,"query":"x"}'):
        context: ToolContext[None] = ToolContext(
            context=None, tool_name="search", tool_call_id="c", tool_arguments=arguments
        )
        assert await tool.on_invoke_tool(context, arguments) == "found"
    assert runs == [("x", 3)]


async def test_a_key_function_decides_what_identifies_a_call() -> None:
    tool, runs = counting()
    # Case does not matter to this lookup, so "Paris" and "PARIS" are one call.
    lookup = rtagent.cached(tool, key=lambda _context, arguments: str(arguments["query"]).lower())
    await invoke(lookup, "Paris")
    assert await invoke(lookup, "PARIS") == "facts about Paris"
    assert runs == ["Paris"]


async def test_a_result_expires_after_its_ttl() -> None:
    tool, runs = counting()
    lookup = rtagent.cached(tool, ttl=0.2)
    await invoke(lookup, "Paris")
    await invoke(lookup, "Paris")
    assert runs == ["Paris"]
    await asyncio.sleep(0.3)
    await invoke(lookup, "Paris")
    assert runs == ["Paris", "Paris"]


async def test_an_error_is_not_cached() -> None:
    tool, runs = counting(failures=1)
    lookup = rtagent.cached(tool)
    failed, failed_turn = await lookup_turn(lookup, "Paris")
    assert (failed.error, failed.cached) == ("RuntimeError: the catalogue is down", False)
    assert failed_turn.result.metrics.cache["tool"] == rtagent.CacheCounts(misses=1)
    ran, _ = await lookup_turn(lookup, "Paris")
    assert (ran.output, ran.error, ran.cached) == ("facts about Paris", None, False)
    assert runs == ["Paris", "Paris"]


async def test_an_error_reaches_every_call_that_shared_the_execution() -> None:
    tool, runs = counting(delay=0.1, failures=1)
    lookup = rtagent.cached(tool)
    outputs = await asyncio.gather(invoke(lookup, "Paris", "a"), invoke(lookup, "Paris", "b"))
    # Outside a turn the SDK's own formatter tells the model of the error, for each call.
    assert list(outputs) == ["An error occurred while running the tool. Please try again."] * 2
    assert runs == ["Paris"]
    assert await invoke(lookup, "Paris") == "facts about Paris"


async def test_concurrent_identical_calls_share_one_execution() -> None:
    tool, runs = counting(delay=0.5)
    lookup = rtagent.cached(tool)
    started = time.perf_counter()
    outputs = await asyncio.gather(*(invoke(lookup, "Paris", f"c{i}") for i in range(50)))
    took = time.perf_counter() - started
    assert outputs == ["facts about Paris"] * 50
    assert runs == ["Paris"]
    assert took < 1.0


async def test_a_cancelled_leader_does_not_poison_its_followers() -> None:
    tool, runs = counting(delay=0.3)
    lookup = rtagent.cached(tool)
    leader = asyncio.ensure_future(invoke(lookup, "Paris", "leader"))
    await asyncio.sleep(0.05)
    follower = asyncio.ensure_future(invoke(lookup, "Paris", "follower"))
    await asyncio.sleep(0.05)
    leader.cancel()
    assert await follower == "facts about Paris"
    assert leader.cancelled()
    assert runs == ["Paris"]
    assert await invoke(lookup, "Paris") == "facts about Paris"
    assert runs == ["Paris"]


async def test_a_call_cancelled_with_nobody_waiting_is_cancelled_and_stores_nothing() -> None:
    finished: list[str] = []

    @function_tool
    async def lookup(query: str) -> str:
        """Slow."""
        await asyncio.sleep(0.3)
        finished.append(query)
        return "late"

    cached = rtagent.cached(lookup)
    alone = asyncio.ensure_future(invoke(cached, "Paris"))
    await asyncio.sleep(0.05)
    alone.cancel()
    await asyncio.sleep(0.4)
    assert finished == []  # the tool was cancelled, as an uncached tool is


async def test_a_call_made_just_after_a_cancelled_one_runs_the_tool_itself() -> None:
    tool, runs = counting(delay=0.2)
    lookup = rtagent.cached(tool)
    alone = asyncio.ensure_future(invoke(lookup, "Paris"))
    await asyncio.sleep(0.05)
    alone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await alone
    # Its execution is still being cancelled: joined, it would cancel this call too.
    assert await invoke(lookup, "Paris") == "facts about Paris"
    assert runs == ["Paris", "Paris"]


async def test_an_interrupted_turn_shares_its_call_with_another_session() -> None:
    tool, runs = counting(delay=0.3)
    lookup = rtagent.cached(tool)
    agent = Agent(name="a", tools=[lookup])

    async def one_turn(interrupt: bool) -> list[Any]:
        model = ScriptedModel([tool_calls(call("lookup", {"query": "Paris"}, call_id="l")), reply("ok")])
        events: list[Any] = []
        async with rtagent.stream(agent, "go", model=model) as turn:
            async for event in turn:
                events.append(event)
                if interrupt and isinstance(event, rtagent.ToolStarted):
                    await asyncio.sleep(0.1)
                    turn.interrupt()
        return events

    cut, kept = await asyncio.gather(one_turn(interrupt=True), one_turn(interrupt=False))
    assert runs == ["Paris"]
    assert next(e for e in cut if isinstance(e, ToolFinished)).error == "interrupted"
    shared = next(e for e in kept if isinstance(e, ToolFinished))
    assert (shared.output, shared.error) == ("facts about Paris", None)
    counts = kept[-1].result.metrics.cache["tool"]
    assert counts.hits + counts.deduplicated + counts.misses == 1


@pytest.mark.parametrize("order", ["background(cached)", "cached(background)"])
async def test_it_composes_with_background(order: str) -> None:
    tool, runs = counting(delay=0.2)
    if order == "background(cached)":
        lookup = rtagent.background(rtagent.cached(tool))
    else:
        lookup = rtagent.cached(rtagent.background(tool))
    assert isinstance(lookup, rtagent.CachedTool)
    model = ScriptedModel([tool_calls(call("lookup", {"query": "Paris"}, call_id="l")), reply("ok")])
    session = SQLiteSession("bg")
    agent = Agent(name="a", model=model, tools=[lookup])
    async with rtagent.stream(agent, "go", session=session) as turn:
        async for event in turn:
            if isinstance(event, rtagent.ToolStarted):
                await asyncio.sleep(0.05)
                turn.interrupt()
    await asyncio.sleep(0.3)  # the kept call finishes in the background and stores its result
    assert runs == ["Paris"]
    outputs = [i.get("output") for i in await session.get_items() if i.get("type") == "function_call_output"]
    assert outputs == [STILL_RUNNING, "facts about Paris"]
    hit, _ = await lookup_turn(lookup, "Paris")
    assert (hit.output, hit.cached) == ("facts about Paris", True)
    assert runs == ["Paris"]


async def test_clearing_a_tool_forgets_its_results_only() -> None:
    tool, runs = counting()
    lookup = rtagent.cached(tool)

    @function_tool
    async def other(query: str) -> str:
        """Another tool."""
        runs.append(f"other {query}")
        return "other"

    other_tool = rtagent.cached(other)
    await invoke(lookup, "Paris")
    await invoke(other_tool, "Paris")
    await lookup.aclear()
    await invoke(lookup, "Paris")
    await invoke(other_tool, "Paris")
    assert runs == ["Paris", "other Paris", "Paris"]
    await rtagent.clear_cache()
    await invoke(other_tool, "Paris")
    assert runs[-1] == "other Paris"


def test_clear_works_without_an_event_loop() -> None:
    tool, runs = counting()
    lookup = rtagent.cached(tool)
    asyncio.run(invoke(lookup, "Paris"))
    lookup.clear()
    asyncio.run(invoke(lookup, "Paris"))
    assert runs == ["Paris", "Paris"]


async def test_memory_is_bounded_by_size() -> None:
    rtagent.configure_cache(size=2)
    tool, runs = counting()
    lookup = rtagent.cached(tool)
    for query in ("a", "b", "c", "a"):
        await invoke(lookup, query)
    assert runs == ["a", "b", "c", "a"]  # "a" was the least recently used of three


async def test_a_result_that_is_no_json_is_returned_but_not_stored() -> None:
    runs: list[int] = []

    @function_tool
    async def odd(query: str) -> Any:
        """Returns a set."""
        runs.append(1)
        return {query}

    tool = rtagent.cached(odd)
    assert await invoke(tool, "x") == {"x"}
    assert await invoke(tool, "x") == {"x"}
    assert len(runs) == 2


def test_a_ttl_must_be_positive() -> None:
    tool, _ = counting()
    with pytest.raises(ValueError, match="ttl must be positive"):
        rtagent.cached(tool, ttl=0)


# -- on Redis: shared by every process that uses it ------------------------------------------------


async def test_on_redis_concurrent_identical_calls_share_one_execution(shared_cache: str) -> None:
    tool, runs = counting(delay=0.5)
    lookup = rtagent.cached(tool)
    started = time.perf_counter()
    outputs = await asyncio.gather(*(invoke(lookup, "Paris", f"c{i}") for i in range(50)))
    assert time.perf_counter() - started < 1.0
    assert outputs == ["facts about Paris"] * 50
    assert runs == ["Paris"]
    assert await invoke(lookup, "Paris") == "facts about Paris"
    assert runs == ["Paris"]


def replica_call(cache: ToolCache, run: Callable[[], Any], outcomes: list[str]) -> Any:
    return cache.call(f"{PREFIX}lookup:k", 60, run, lambda outcome, _bytes: outcomes.append(outcome))


PREFIX = "rtagent:cache:tool:"


async def test_two_replicas_on_one_redis_share_executions_and_results(shared_cache: str) -> None:
    a, b = ToolCache(shared_cache), ToolCache(shared_cache)
    runs: list[str] = []

    async def run() -> str:
        runs.append("ran")
        await asyncio.sleep(0.3)
        return "facts"

    outcomes: list[str] = []
    calls = [replica_call(cache, run, outcomes) for cache in (a, b) for _ in range(10)]
    assert await asyncio.gather(*calls) == ["facts"] * 20
    assert runs == ["ran"]
    assert sorted(set(outcomes)) == ["miss", "shared"]
    later: list[str] = []
    assert await replica_call(ToolCache(shared_cache), run, later) == "facts"
    assert later == ["hit"]


async def test_on_redis_a_cancelled_leader_lets_another_replica_run_the_call(shared_cache: str) -> None:
    a, b = ToolCache(shared_cache), ToolCache(shared_cache)
    runs: list[str] = []

    async def run() -> str:
        runs.append("ran")
        await asyncio.sleep(0.3)
        return "facts"

    leader = asyncio.ensure_future(replica_call(a, run, []))
    await asyncio.sleep(0.05)
    outcomes: list[str] = []
    follower = asyncio.ensure_future(replica_call(b, run, outcomes))
    await asyncio.sleep(0.05)
    leader.cancel()
    assert await follower == "facts"
    assert runs == ["ran", "ran"]  # A's run was cancelled with its only caller; B ran it itself
    assert outcomes == ["miss"]


async def test_on_redis_a_result_stored_by_one_process_is_a_hit_in_another(shared_cache: str) -> None:
    tool, runs = counting()
    lookup = rtagent.cached(tool)
    await invoke(lookup, "Paris")
    rtagent.configure_cache(shared_cache)  # a new process's cache: nothing of the first in memory
    hit, turn = await lookup_turn(lookup, "Paris")
    assert (hit.output, hit.cached) == ("facts about Paris", True)
    assert turn.result.metrics.cache["tool"] == rtagent.CacheCounts(hits=1)
    assert runs == ["Paris"]
    await lookup.aclear()
    await invoke(lookup, "Paris")
    assert runs == ["Paris", "Paris"]


async def test_the_cache_clear_command_forgets_results_on_redis(
    shared_cache: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tool, runs = counting()
    lookup = rtagent.cached(tool)
    await invoke(lookup, "Paris")
    # The command runs its own event loop, as it does in a process of its own.
    code = await asyncio.to_thread(_cli.main, ["cache", "clear", "--redis", shared_cache, "--tool", "lookup"])
    assert code == 0
    assert capsys.readouterr().out == "cleared the cached results of tool lookup\n"
    rtagent.configure_cache(shared_cache)
    await invoke(lookup, "Paris")
    assert runs == ["Paris", "Paris"]


def test_the_cache_clear_command_needs_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RTAGENT_REDIS", raising=False)
    assert _cli.main(["cache", "clear"]) == 2
    assert "needs --redis URL" in capsys.readouterr().err

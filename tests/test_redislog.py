"""The run log on a real Redis: every thread's batch in one script call, each fenced on its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rtagent.server._bus import PREFIX, Bus
from rtagent.server._redislog import FLUSH_S, RedisRunLog
from rtagent.server._runlog import END, START

STARTED = '{"type":"RUN_STARTED"}'


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[tuple[Bus, RedisRunLog, list[int]]]:
    bus = Bus(redis_url, lease_s=5)
    await bus.redis.flushall()
    log = RedisRunLog(bus)
    calls: list[int] = []  # the keys of each script call
    append = log._append

    async def counted(*, keys: list[str], args: list[Any]) -> Any:
        calls.append(len(keys))
        await asyncio.sleep(0.2)  # a slow round trip: a turn's end must wait for it
        return await append(keys=keys, args=args)

    log._append = counted
    try:
        yield bus, log, calls
    finally:
        await log.aclose()
        await bus.aclose()


async def entries(bus: Bus, thread_id: str) -> list[str]:
    return [event_id for event_id, _ in await bus.redis.xrange(f"{PREFIX}log:{thread_id}")]


async def test_every_threads_batch_goes_in_one_call_and_a_fenced_off_thread_is_skipped(
    shared: tuple[Bus, RedisRunLog, list[int]],
) -> None:
    bus, log, calls = shared
    for thread_id in ("a", "b", "c"):
        await bus.acquire(thread_id, interrupt=False)
    await bus.redis.set(f"{PREFIX}lease:b", "9:another-replica")  # b's lease was lost meanwhile
    for thread_id in ("a", "b", "c"):
        log.publish(thread_id, ("5-1", STARTED, START), "hello", "r1")
        log.publish(thread_id, ("5-2", '{"type":"RUN_FINISHED"}', END), None, "r1")
    await asyncio.gather(*(log.flush(t) for t in ("a", "b", "c")))
    assert calls == [9]
    assert await entries(bus, "a") == await entries(bus, "c") == ["5-1", "5-2"]
    assert await entries(bus, "b") == []
    run = await bus.redis.hgetall(f"{PREFIX}run:a")
    assert run == {"run": "r1", "first": "5-1", "user": "hello", "state": "ended"}


async def test_a_turn_end_waits_for_its_write_in_flight(shared: tuple[Bus, RedisRunLog, list[int]]) -> None:
    bus, log, calls = shared
    await bus.acquire("a", interrupt=False)
    log.publish("a", ("5-1", STARTED, END), "hello", "r1")
    await asyncio.sleep(FLUSH_S * 4)  # the writer has taken the batch and waits for Redis
    assert calls == [3]
    await log.flush("a")
    # What the lease's release, which follows, could otherwise make Redis refuse.
    assert await entries(bus, "a") == ["5-1"]


async def test_a_batch_redis_refuses_is_dropped_and_the_others_are_written(
    shared: tuple[Bus, RedisRunLog, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    bus, log, _ = shared
    for thread_id in ("a", "b"):
        await bus.acquire(thread_id, interrupt=False)
    log.publish("a", ("5-1", STARTED, START), "hello", "r1")
    await log.flush("a")
    with caplog.at_level(logging.ERROR, logger="rtagent"):
        log.publish("a", ("4-1", STARTED, START), "again", "r2")  # not after the stream's top
        log.publish("b", ("4-1", STARTED, START), "hello", "r1")
        await asyncio.gather(log.flush("a"), log.flush("b"))
    assert await entries(bus, "a") == ["5-1"]
    assert await entries(bus, "b") == ["4-1"]
    assert "Redis refused the run log of thread a" in caplog.text
    assert "equal or smaller" in caplog.text


async def test_a_reader_on_another_replica_waits_for_a_new_runs_first_batch(
    shared: tuple[Bus, RedisRunLog, list[int]], redis_url: str
) -> None:
    bus, log, _ = shared
    await bus.acquire("a", interrupt=False)
    log.publish("a", ("5-1", STARTED, START), "hello", "r1")
    log.publish("a", ("5-2", '{"type":"RUN_FINISHED"}', END), None, "r1")
    await log.flush("a")
    log.publish("a", ("9-1", STARTED, START), "again", "r2")
    log.publish("a", ("9-2", '{"type":"RUN_FINISHED"}', END), None, "r2")
    other = Bus(redis_url, lease_s=5)
    try:
        # A client of r2 that read 9-1 from this replica resumes on the other one before r2's
        # first batch is written: Redis still describes r1, which has ended.
        reader = await RedisRunLog(other).read("a", "9-1")
        assert reader is not None
        got = [event_id async for event_id, _, _ in reader]
        await reader.aclose()
    finally:
        await other.aclose()
    assert got == ["9-2"]

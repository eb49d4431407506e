"""The run log shared by replicas: each thread's events in a Redis Stream (``rtagent:log:THREAD``,
bounded in length, expiring an hour after its last write), beside the ring of the process that
produces them (see ``_runlog``).

The producing process serves its own clients from its ring and writes the streams in batches: one
script call for all its threads every few milliseconds (``FLUSH_S``) rather than a round trip per
token or per thread, which checks each thread's fencing token before it writes (see ``_bus``). The
script's keys span threads, so the run log needs one Redis (a primary, with Sentinel or not), not
a Redis Cluster. A thread's latest run is
described in ``rtagent:run:THREAD``: its id, first event id, the user's message and whether it
ended, which is how a replica taking over from a dead one finds the run to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from ._agui import log
from ._bus import PREFIX, Bus
from ._runlog import END, START, Entry, Reader, RunLog, interrupt, parse_id

# One call appends a batch for every thread that has one: three keys per thread (lease, stream,
# run) and, in ARGV[3], a JSON list of the threads' [fencing token, run fields, entries]. One JSON
# argument, not three per entry: redis-py packs a command's arguments in time that grows with
# their count squared. A thread whose lease another token holds is skipped (0); one whose entries
# Redis refuses gets the error's text; the others are written (1).
APPEND = """
local size, ttl, written = ARGV[1], ARGV[2], {}
for t, batch in ipairs(cjson.decode(ARGV[3])) do
  local lease, stream, run = KEYS[3 * t - 2], KEYS[3 * t - 1], KEYS[3 * t]
  local token, fields, entries = batch[1], batch[2], batch[3]
  written[t] = 0
  if redis.call('get', lease) == token then
    written[t] = 1
    for i = 1, #entries, 3 do
      local added = redis.pcall(
        'xadd', stream, 'MAXLEN', '~', size, entries[i], 'e', entries[i + 1], 'k', entries[i + 2])
      if type(added) == 'table' and added.err then written[t] = added.err; break end
    end
    if type(fields) == 'table' then
      for field, value in pairs(fields) do redis.call('hset', run, field, value) end
    end
    redis.call('pexpire', stream, ttl)
    redis.call('pexpire', run, ttl)
  end
end
return written
"""
# How long writes wait to be batched: each script call has a fixed cost in this process, so fewer,
# larger calls cost less CPU per token. It is also what a client reading another replica's run may
# wait more for an event (the producing replica's own clients read its ring): well inside the 50 ms
# a reconnect may take to its first missed event (bench/resume.py).
FLUSH_S = 0.02
# How long a follower on another replica waits for an event before it checks the run's holder.
BLOCK_MS = 1000


@dataclass
class DeadRun:
    """A run whose replica died: what it had streamed, and the entries that close it."""

    run_id: str
    user: str
    text: str
    closing: list[Entry]


class RedisRunLog(RunLog):
    def __init__(
        self,
        bus: Bus,
        *,
        grace_s: float = 15.0,
        size: int = 10_000,
        keep_s: float = 600.0,
        ttl_s: float = 3600.0,
    ) -> None:
        super().__init__(grace_s=grace_s, size=size, keep_s=keep_s)
        self.bus = bus
        self.redis: Any = bus.redis
        self.ttl_ms = int(ttl_s * 1000)
        self._append = self.redis.register_script(APPEND)
        self._pending: dict[str, list[str]] = {}
        self._meta: dict[str, dict[str, str]] = {}
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._writing: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        # Set by the server: take over a thread whose holder died (see ``_app``).
        self.recover: Callable[[str], Awaitable[None]] | None = None
        self._unwatching: set[asyncio.Future[None]] = set()

    # -- writing ----------------------------------------------------------------------------------

    async def last_id(self, thread_id: str) -> str | None:
        # Redis's, not this process's ring: other replicas may have run the thread since.
        found = await self.redis.xrevrange(f"{PREFIX}log:{thread_id}", count=1)
        return str(found[0][0]) if found else None

    def publish(self, thread_id: str, entry: Entry, user: str | None, run_id: str) -> None:
        event_id, data, kind = entry
        self._pending.setdefault(thread_id, []).extend((event_id, data, str(kind)))
        if user is not None:
            self._meta[thread_id] = {"run": run_id, "first": event_id, "user": user, "state": "running"}
        if kind == END:
            self._meta.setdefault(thread_id, {})["state"] = "ended"
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever())
        self._wake.set()

    async def flush(self, thread_id: str) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):  # Redis gone: the turn still ends, its history saved
                while thread_id in self._pending or thread_id in self._meta or thread_id in self._writing:
                    await self._flushed.wait()

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_S)
            self._wake.clear()
            pending, self._pending = self._pending, {}
            meta, self._meta = self._meta, {}
            # Until written, a turn's end waits for these too: its lease must outlive its writes.
            self._writing = pending.keys() | meta.keys()
            try:
                await self._write(pending, meta)
            except (RedisError, OSError) as exc:
                log.warning("cannot write the run log to Redis (%s); retrying", exc)
                for thread_id, args in pending.items():  # back in front, in order, within bounds
                    kept = args + self._pending.get(thread_id, [])
                    self._pending[thread_id] = kept[-3 * self.size :]
                for thread_id, fields in meta.items():
                    self._meta[thread_id] = {**fields, **self._meta.get(thread_id, {})}
                self._wake.set()
                await asyncio.sleep(0.2)
            finally:
                self._writing = set()
                flushed, self._flushed = self._flushed, asyncio.Event()
                flushed.set()

    async def _write(self, pending: dict[str, list[str]], meta: dict[str, dict[str, str]]) -> None:
        """Append every thread's batch in one script call (a round trip per batch, not per thread)."""
        threads = list(pending.keys() | meta.keys())
        written = await self._append_all({t: (meta.get(t), pending.get(t, [])) for t in threads})
        for thread_id, result in zip(threads, written, strict=True):
            if result == 0:  # fenced off: another replica holds the thread now
                log.warning("thread %s is another replica's now; this one's run is not logged", thread_id)
                ring = self._rings.get(thread_id)
                if ring is not None:
                    interrupt(ring)
            elif result != 1:  # refused (it would be again): dropped, the other threads' kept
                log.error("Redis refused the run log of thread %s: %s", thread_id, result)

    async def _append_all(self, batches: dict[str, tuple[dict[str, str] | None, list[str]]]) -> list[Any]:
        keys: list[str] = []
        batch: list[tuple[str, dict[str, str] | None, list[str]]] = []
        for thread_id, (fields, entries) in batches.items():
            keys += [f"{PREFIX}lease:{thread_id}", f"{PREFIX}log:{thread_id}", f"{PREFIX}run:{thread_id}"]
            batch.append((self.bus.held.get(thread_id, ""), fields, entries))
        args = [self.size, self.ttl_ms, json.dumps(batch, separators=(",", ":"))]
        written: list[Any] = await self._append(keys=keys, args=args)
        return written

    # -- a dead replica's run -------------------------------------------------------------------

    async def dead_run(self, thread_id: str) -> DeadRun | None:
        """The thread's latest run if it never ended (call it holding the lease: nobody runs it)."""
        meta = await self.redis.hgetall(f"{PREFIX}run:{thread_id}")
        if meta.get("state") != "running":
            return None
        text: list[str] = []
        open_message: str | None = None
        last = meta["first"]
        for event_id, fields in await self.redis.xrange(f"{PREFIX}log:{thread_id}", min=meta["first"]):
            last = event_id
            event: dict[str, Any] = json.loads(fields["e"])
            if event["type"] == "TEXT_MESSAGE_START":
                open_message = event["messageId"]
            elif event["type"] == "TEXT_MESSAGE_CONTENT":
                text.append(event["delta"])
            elif event["type"] == "TEXT_MESSAGE_END":
                open_message = None
        ms, seq = parse_id(last)
        closing: list[dict[str, Any]] = []
        if open_message is not None:
            closing.append({"type": "TEXT_MESSAGE_END", "messageId": open_message})
        message = "the server running this reply stopped; the text so far is kept"
        closing.append({"type": "RUN_ERROR", "message": message, "code": "server_lost"})
        entries = [
            (f"{ms}-{seq + i}", json.dumps(event, separators=(",", ":")), END if i == len(closing) else 0)
            for i, event in enumerate(closing, 1)
        ]
        return DeadRun(meta.get("run", ""), meta.get("user", ""), "".join(text), entries)

    async def close_dead(self, thread_id: str, dead: DeadRun) -> None:
        entries = [str(field) for entry in dead.closing for field in entry]
        await self._append_all({thread_id: ({"state": "ended"}, entries)})

    # -- reading ----------------------------------------------------------------------------------

    async def read(self, thread_id: str, after: str | None) -> Reader | None:
        ring = self._rings.get(thread_id)
        # This process produces the thread's run: its ring has it all, even what is not written yet.
        if (
            ring is not None
            and ring.running
            and ring.entries
            and (after is None or parse_id(after) >= parse_id(ring.entries[0][0]))
        ):
            return await super().read(thread_id, after)
        key = f"{PREFIX}log:{thread_id}"
        if after is None:
            first = await self.redis.hget(f"{PREFIX}run:{thread_id}", "first")
            if first is None:
                return None
            batch = await self.redis.xrange(key, min=first, count=1000)
        else:
            parse_id(after)
            batch = await self.redis.xrange(key, min=f"({after}", count=1000)
        if not batch and await self._ended(thread_id, after):
            return None
        await self.redis.incr(f"{PREFIX}watch:{thread_id}")
        await self.redis.expire(f"{PREFIX}watch:{thread_id}", 3600)
        entries = self._tail(thread_id, batch, after)
        return Reader(entries, lambda: self._unwatch_soon(thread_id))

    async def _ended(self, thread_id: str, last: str | None) -> bool:
        """Whether the run of event ``last`` (else the latest) has ended. A run newer than the one
        Redis describes is one whose first batch is still on its way: it has not ended while a
        replica holds the thread."""
        state, first = await self.redis.hmget(f"{PREFIX}run:{thread_id}", ["state", "first"])
        if state == "running":
            return False
        if last is not None and (first is None or parse_id(last)[0] > parse_id(first)[0]):
            return await self.bus.holder(thread_id) is None
        return True

    async def _tail(self, thread_id: str, batch: list[Any], after: str | None) -> AsyncGenerator[Entry, None]:
        key = f"{PREFIX}log:{thread_id}"
        last = after or "0-0"
        ended = False
        while True:
            for event_id, fields in batch:
                last = event_id
                kind = int(fields.get("k", 0))
                ended = kind == END or (ended and kind != START)
                yield event_id, fields["e"], kind
            if (ended or not batch) and await self._ended(thread_id, last):
                more = await self.redis.xrange(key, min=f"({last}", count=1)
                if not more:
                    return
            found = await self.redis.xread({key: last}, count=1000, block=BLOCK_MS)
            batch = found[0][1] if found else []
            idle = not batch and not ended and not await self._ended(thread_id, last)
            if idle and await self.bus.holder(thread_id) is None and self.recover is not None:
                await self.recover(thread_id)  # its replica died: close the run, keep its text

    def _unwatch_soon(self, thread_id: str) -> None:
        task = asyncio.ensure_future(self._unwatch(thread_id))
        self._unwatching.add(task)
        task.add_done_callback(self._unwatching.discard)

    async def _unwatch(self, thread_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            if await self.redis.decr(f"{PREFIX}watch:{thread_id}") <= 0:
                await self.bus.tell_holder(thread_id, "detached")

    async def watched(self, thread_id: str) -> bool:
        return int(await self.redis.get(f"{PREFIX}watch:{thread_id}") or 0) > 0

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._flusher

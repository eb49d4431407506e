"""The run log: every AG-UI event of a thread's runs with an increasing id, so that a client that
reconnects (``GET /threads/{thread}/stream`` with ``Last-Event-ID``, or a WebSocket ``resume``)
gets every event it missed, then the live rest, with no gap and no duplicate.

An id is ``MS-SEQ``, a Redis Stream's own form: MS is when the run began (and later than every
earlier id of the thread), SEQ counts the run's events from 1. Ids compare as number pairs.

A run's events are produced once, by ``RunLog.produce`` in the process that runs the turn, and
kept in the thread's ring in that process, from which its own clients are served. With Redis
(``_redislog.RedisRunLog``) they also go to the thread's Redis Stream, and a reconnecting client
on any replica is served from there.

A client that goes away no longer interrupts the turn at once: once the run has no reader left,
it keeps running for ``grace_s`` and is interrupted (its text kept, as before) only if nobody has
come back by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from ag_ui.core import RunErrorEvent, RunFinishedEvent, RunStartedEvent

from ._agui import AguiRun, log
from ._limits import InputError

# An entry: (id, the event's JSON, its kind).
Entry = tuple[str, str, int]
EVENT, START, END = 0, 1, 2

SERVER_ERROR = RunErrorEvent(
    message="the server failed during this run; its log has details", code="server_error"
).model_dump_json(by_alias=True)

ID = re.compile(r"(\d{1,15})-(\d{1,15})")


def parse_id(text: str) -> tuple[int, int]:
    match = ID.fullmatch(text.strip())
    if match is None:
        message = f"an event id is MS-SEQ, as the stream sent it, not {text[:40]!r}"
        raise InputError(message, 400, "bad_event_id")
    return int(match[1]), int(match[2])


def kind_of(event: object) -> int:
    if isinstance(event, RunStartedEvent):
        return START
    return END if isinstance(event, (RunFinishedEvent, RunErrorEvent)) else EVENT


class Ring:
    """A thread's latest entries in this process, and the run it produces now, if any."""

    __slots__ = ("active", "changed", "check", "entries", "expiry", "grace", "pumps", "readers", "run")

    def __init__(self, size: int) -> None:
        self.entries: deque[Entry] = deque(maxlen=size)
        self.changed = asyncio.Event()
        self.pumps: asyncio.Future[None] | None = None  # the last run's pump, which the next awaits
        self.active = 0  # runs produced or waiting to be
        self.run: AguiRun | None = None  # the run being produced
        self.readers = 0
        self.grace: asyncio.TimerHandle | None = None
        self.expiry: asyncio.TimerHandle | None = None
        self.check: asyncio.Future[None] | None = None  # whether anyone follows it elsewhere

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.wake()

    def wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    @property
    def running(self) -> bool:
        return self.active > 0


class RunLog:
    """The runs of every thread, in this process (see the module docstring).

    ``size``: entries a thread keeps; ``keep_s``: how long they stay after its last run ended.
    """

    def __init__(self, *, grace_s: float = 15.0, size: int = 10_000, keep_s: float = 600.0) -> None:
        self.grace_s = grace_s
        self.size = size
        self.keep_s = keep_s
        self._rings: OrderedDict[str, Ring] = OrderedDict()

    def ring(self, thread_id: str) -> Ring:
        ring = self._rings.get(thread_id)
        if ring is None:
            ring = self._rings[thread_id] = Ring(self.size)
        if ring.expiry is not None:
            ring.expiry.cancel()
            ring.expiry = None
        return ring

    # -- producing --------------------------------------------------------------------------------

    def produce(self, run: AguiRun, user: str, on_end: Callable[[], Awaitable[None]]) -> Reader:
        """Start appending ``run``'s events to its thread's log; the run's own entries, to stream.

        A thread's runs are produced one after another (a new run's first event waits for the
        previous run's last), so the log never interleaves two runs. ``on_end`` runs once the
        run's last entry is in the log.
        """
        ring = self.ring(run.thread_id)
        previous = ring.pumps
        mine: list[Entry] = []
        done = asyncio.Event()
        ring.active += 1
        ring.pumps = asyncio.ensure_future(self._pump(ring, run, user, previous, mine, done, on_end))
        return self._reader(ring, self._follow_run(ring, mine, done))

    async def _pump(
        self,
        ring: Ring,
        run: AguiRun,
        user: str,
        previous: asyncio.Future[None] | None,
        mine: list[Entry],
        done: asyncio.Event,
        on_end: Callable[[], Awaitable[None]],
    ) -> None:
        thread_id = run.thread_id
        ms, seq = int(time.time() * 1000), 0

        def add(data: str, kind: int) -> None:
            nonlocal seq
            seq += 1
            entry = (f"{ms}-{seq}", data, kind)
            mine.append(entry)
            ring.append(entry)
            self.publish(thread_id, entry, user if seq == 1 else None, run.run_id)

        try:
            if previous is not None:
                await asyncio.shield(previous)
            ring.run = run
            if ring.readers == 0:  # its client went away while it waited for the run before it
                self.detached(ring)
            last = await self.last_id(thread_id)
            ms = max(int(time.time() * 1000), parse_id(last)[0] + 1 if last else 0)
            async for event in run.events():
                add(event.model_dump_json(by_alias=True), kind_of(event))
        except Exception:  # a bug of ours: the client still gets an end it understands
            log.exception("logging a run of thread %s failed", thread_id)
            run.interrupt()
            add(SERVER_ERROR, END)
        finally:
            ring.run = None
            with contextlib.suppress(Exception):
                await run.aclose()
            try:
                await self.flush(thread_id)
            finally:
                ring.active -= 1
                done.set()
                ring.wake()
                await on_end()
                if not ring.running:
                    self._expire_later(thread_id, ring)

    def _expire_later(self, thread_id: str, ring: Ring) -> None:
        def expire() -> None:
            if not ring.running and ring.readers == 0 and self._rings.get(thread_id) is ring:
                del self._rings[thread_id]

        ring.expiry = asyncio.get_running_loop().call_later(self.keep_s, expire)

    # What a shared log adds (``_redislog``); in one process there is nothing more to do.

    async def last_id(self, thread_id: str) -> str | None:
        """The thread's latest id, which the next run's ids must follow."""
        ring = self._rings.get(thread_id)
        return ring.entries[-1][0] if ring is not None and ring.entries else None

    def publish(self, thread_id: str, entry: Entry, user: str | None, run_id: str) -> None:
        """Share ``entry`` (``user``: the message the run answers, with its first entry)."""

    async def flush(self, thread_id: str) -> None:
        """Return once what ``publish`` took of the thread is shared."""

    async def watched(self, thread_id: str) -> bool:
        """Whether a client follows the thread from another process."""
        return False

    # -- reading ------------------------------------------------------------------------------------

    def _reader(self, ring: Ring, entries: AsyncGenerator[Entry, None]) -> Reader:
        self._attach(ring)
        return Reader(entries, lambda: self._detach(ring))

    async def _follow_run(
        self, ring: Ring, mine: list[Entry], done: asyncio.Event
    ) -> AsyncGenerator[Entry, None]:
        """The entries of one run, live, until its last."""
        position = 0
        while True:
            while position < len(mine):
                position += 1
                yield mine[position - 1]
            if done.is_set():  # set only after the run's last entry, which the loop above sent
                return
            await ring.changed.wait()

    async def read(self, thread_id: str, after: str | None) -> Reader | None:
        """The thread's entries after ``after``, then the live rest until no run is left; ``None``
        when there is nothing to stream. Without ``after``: the running run's, from its start (a
        page reloading has the history up to it), and ``None`` if no run is running."""
        if after is not None:
            parse_id(after)  # a bad one is the client's error, whatever the thread holds
        ring = self._rings.get(thread_id)
        if ring is None or not ring.entries or (after is None and not ring.running):
            return None
        position = _position(ring.entries, after)
        if position == len(ring.entries) and not ring.running:
            return None
        return self._reader(ring, self._follow(ring, position))

    async def _follow(self, ring: Ring, position: int) -> AsyncGenerator[Entry, None]:
        last = ring.entries[position - 1][0] if position > 0 else None
        while True:
            entries = ring.entries
            # The ring may have dropped entries off its front: find the position again.
            if last is not None and (position > len(entries) or entries[position - 1][0] != last):
                position = _position(entries, last)
            while position < len(entries):
                entry = entries[position]
                position += 1
                last = entry[0]
                yield entry
            if not ring.running:
                return
            await ring.changed.wait()

    # -- the grace period -------------------------------------------------------------------------

    def _attach(self, ring: Ring) -> None:
        ring.readers += 1
        if ring.grace is not None:
            ring.grace.cancel()
            ring.grace = None

    def _detach(self, ring: Ring) -> None:
        ring.readers -= 1
        if ring.readers == 0:
            self.detached(ring)

    def detached(self, ring: Ring) -> None:
        """The run's last reader went away: start the grace period."""
        if ring.readers > 0 or not ring.running:
            return
        if ring.grace is not None:
            ring.grace.cancel()
        if self.grace_s <= 0:
            interrupt(ring)
            return

        def check() -> None:
            ring.grace = None
            if ring.readers == 0 and ring.run is not None:
                ring.check = asyncio.ensure_future(self._interrupt_unwatched(ring, ring.run.thread_id))

        ring.grace = asyncio.get_running_loop().call_later(self.grace_s, check)

    async def _interrupt_unwatched(self, ring: Ring, thread_id: str) -> None:
        try:
            watched = await self.watched(thread_id)
        except Exception:  # nobody can tell: the turn goes on, as it would with a client
            log.warning("cannot tell whether thread %s is followed elsewhere", thread_id)
            return
        if not watched and ring.readers == 0:
            interrupt(ring)

    def detached_elsewhere(self, thread_id: str) -> None:
        """The last follower of the thread in another process went away."""
        ring = self._rings.get(thread_id)
        if ring is not None:
            self.detached(ring)


class Reader:
    """A client's reading of a thread's log: it counts as following the thread until ``aclose``,
    whether or not iterating has begun (a WebSocket queues the runs it will stream)."""

    __slots__ = ("_entries", "_on_close")

    def __init__(
        self, entries: AsyncGenerator[Entry, None], on_close: Callable[[], None] | None = None
    ) -> None:
        self._entries = entries
        self._on_close = on_close

    def __aiter__(self) -> AsyncIterator[Entry]:
        return self._entries

    async def aclose(self) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            await self._entries.aclose()
        finally:
            if on_close is not None:
                on_close()


def interrupt(ring: Ring) -> None:
    if ring.run is not None:
        ring.run.interrupt()


def _position(entries: deque[Entry], after: str | None) -> int:
    """The index of the first entry after ``after``; of the latest run's start for ``None``."""
    if after is None:
        for index in range(len(entries) - 1, -1, -1):
            if entries[index][2] == START:
                return index
        return 0
    key = parse_id(after)
    # Entries are in id order; most resumes are near the end.
    index = len(entries)
    while index > 0 and parse_id(entries[index - 1][0]) > key:
        index -= 1
    return index

"""The queue between a turn and its consumer, bounded by merging what a slow consumer missed."""

from __future__ import annotations

import asyncio
from collections import deque

from ._events import Event, TextDelta, ToolProgress

# A consumer that falls this far behind gets consecutive text deltas merged instead of queued, so a
# slow front end costs latency, never unbounded memory.
MAX_PENDING_EVENTS = 256


class EventBuffer:
    """A single-consumer queue that coalesces when the consumer falls behind.

    Cheaper than ``asyncio.Queue`` on the per-delta hot path: one deque append and at most one
    future wake-up per event.
    """

    __slots__ = ("_items", "_limit", "_waiter")

    def __init__(self, limit: int) -> None:
        self._items: deque[Event] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: Event) -> None:
        items = self._items
        if len(items) >= self._limit and items:
            merged = _coalesce(items[-1], event)
            if merged is not None:
                items[-1] = merged
                return
        items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drop_text(self) -> int:
        """Remove the text deltas not yet taken; returns how many characters they held."""
        kept = [event for event in self._items if not isinstance(event, TextDelta)]
        dropped = sum(len(event.text) for event in self._items if isinstance(event, TextDelta))
        self._items = deque(kept)
        return dropped

    async def get(self) -> Event:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def _coalesce(last: Event, new: Event) -> Event | None:
    if isinstance(last, TextDelta) and isinstance(new, TextDelta):
        return TextDelta(last.text + new.text)
    if isinstance(last, ToolProgress) and isinstance(new, ToolProgress) and last.call_id == new.call_id:
        return new
    return None

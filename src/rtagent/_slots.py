"""Which of the embedded server's slots each request names, so that it finds its prompt cached.

Pure bookkeeping (no I/O): ``LocalServer.slot_for`` acts on its choices.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Choice:
    """A slot for a request, and the kept prefix to restore into it first, if any."""

    index: int
    restore: str | None = None


class Slots:
    """Which of the server's slots a request should name (``id_slot``), so it finds its prompt cached.

    Left to itself, llama.cpp gives a request the idle slot whose cached prompt fits best; but a
    stream that was just closed keeps its slot busy until the server notices, a token later. A
    request sent right after (the adapter's second request of a reply, the next turn after an
    interrupt) then went to a cold slot and re-read its whole prompt: 1.8 s instead of 0.1 s for
    SmolLM2 on one core. Naming the slot makes llama.cpp wait those few milliseconds for it.

    A prompt is a sequence of strings (its messages). Of the slots no request of this process
    holds, a request gets:

    1. the one whose whole cached prompt starts its own: the same conversation, a turn later;
    2. else, when a kept prefix (an agent's fixed prompt, see ``LocalServer.read_ahead``) starts
       it, an empty slot or the least recently used, with the prefix restored into it unless that
       slot holds it already (a restore takes about 4 ms, round trip included): a new conversation
       does not overwrite another one's cache (two chats of one agent shared a slot, and each
       turn re-read its own history: first text after 321, 431, 548, 720 ms);
    3. else the one sharing the longest start with it, the least recently used on a tie;

    and no slot (llama.cpp's own choice) when every slot is held.
    """

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()  # the server, and so its slots, serve every event loop
        self._holders = [0] * count
        self._released = [0.0] * count
        self._prompts: list[tuple[str, ...]] = [()] * count
        self._kept: dict[tuple[str, ...], str] = {}

    def reset(self) -> None:
        """Every slot empty and nothing kept: a new server (requests still held stay counted)."""
        with self._lock:
            self._prompts = [()] * len(self._prompts)
            self._kept = {}

    def kept(self, prompt: Iterable[str], name: str) -> None:
        """The slot state saved as ``name`` holds ``prompt``: restore it for prompts it starts."""
        with self._lock:
            self._kept[tuple(prompt)] = name

    def is_kept(self, prompt: Iterable[str]) -> bool:
        with self._lock:
            return tuple(prompt) in self._kept

    @contextlib.contextmanager
    def take(self, prompt: Iterable[str]) -> Iterator[Choice | None]:
        key = tuple(prompt)
        with self._lock:
            choice = self._choose(key)
            if choice is not None:
                self._holders[choice.index] += 1
                self._prompts[choice.index] = key
        try:
            yield choice
        finally:
            if choice is not None:
                with self._lock:
                    self._holders[choice.index] -= 1
                    self._released[choice.index] = time.monotonic()

    def _choose(self, key: tuple[str, ...]) -> Choice | None:
        free = [slot for slot, holders in enumerate(self._holders) if not holders]
        if not free:
            return None

        def shared(slot: int) -> int:
            return _shared_start(self._prompts[slot], key)

        going_on = [slot for slot in free if self._prompts[slot] and _starts(key, self._prompts[slot])]
        if going_on:
            return Choice(max(going_on, key=shared))
        best = max(free, key=lambda slot: (shared(slot), -self._released[slot]))
        prefix = max((kept for kept in self._kept if _starts(key, kept)), key=len, default=())
        if prefix and len(prefix) >= shared(best):
            spare = min(free, key=lambda slot: (bool(self._prompts[slot]), self._released[slot]))
            # Another conversation of the same prefix left it there: llama.cpp keeps what matches.
            held = _starts(self._prompts[spare], prefix)
            return Choice(spare, None if held else self._kept[prefix])
        return Choice(best)


def _shared_start(a: Sequence[str], b: Sequence[str]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _starts(prompt: Sequence[str], prefix: Sequence[str]) -> bool:
    return len(prefix) <= len(prompt) and _shared_start(prompt, prefix) == len(prefix)

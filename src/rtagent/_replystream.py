"""Reading an adapted model's stream: text relayed token by token, calls read to their end.

``relay_text`` turns a text stream into Responses events as each token arrives and stops it at a
loop (``LoopGuard``); ``read_calls`` follows the calls' JSON (``CallScanner``) and hands each over
as soon as its arguments close, so it can be checked before anything of it is shown.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from agents.exceptions import ModelBehaviorError
from agents.items import TResponseStreamEvent
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk

from ._replyevents import ReplyEvents
from ._toolprompt import CALL_SEPARATOR

Chunks: TypeAlias = AsyncStream[ChatCompletionChunk]


async def first_content(stream: Chunks) -> ChatCompletionChunk | None:
    async for chunk in stream:
        if content(chunk):
            return chunk
    return None


def content(chunk: ChatCompletionChunk) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


async def relay_text(
    reply: ReplyEvents, stream: Chunks, first: ChatCompletionChunk | None
) -> AsyncIterator[TResponseStreamEvent]:
    """A text reply, token by token, until the model ends it, the cap, or a loop; closes the stream."""
    guard = LoopGuard()
    try:
        for event in reply.start():
            yield event
        async for chunk in _chunks(stream, first):
            reply.count(chunk)
            text = content(chunk)
            if not text:
                continue
            if guard.looping(text):
                break
            for event in reply.text(text):
                yield event
        for event in reply.text_done():
            yield event
        yield reply.completed()
    finally:
        await stream.close()


async def _chunks(stream: Chunks, first: ChatCompletionChunk | None) -> AsyncIterator[ChatCompletionChunk]:
    if first is not None:
        yield first
    async for chunk in stream:
        yield chunk


@dataclass(slots=True)
class Call:
    """A call read to the end of its arguments, not shown yet."""

    name: str = ""
    pieces: list[str] = field(default_factory=list)
    chunks: list[ChatCompletionChunk] = field(default_factory=list)
    doubtful: bool = False
    """Rejected as it streamed (see ``read_calls``); its arguments may be cut off."""

    @property
    def arguments(self) -> str:
        return "".join(self.pieces)


async def read_calls(
    stream: Chunks, limit: int, doubtful: Callable[[Call], bool] = lambda call: False
) -> AsyncGenerator[Call, None]:
    """Each call of a call-only stream as soon as its arguments close, at most ``limit`` of them.

    The stream is read on only when the next call is asked for, so a caller that stops (at a
    call it rejects) leaves the rest unread; it is closed however this ends. After the last call
    there is nothing to wait for: the rest is a brace and the end token. A call that turns
    ``doubtful`` as its arguments grow is handed over at once, marked, and ends the stream: its
    remaining tokens would only delay what comes instead.
    """
    call, scanner, made = Call(), CallScanner(), 0
    try:
        async for chunk in stream:
            call.chunks.append(chunk)
            delta = content(chunk)
            while True:  # one chunk may close a call and hold the start of the next
                name, piece, closed = scanner.feed(delta)
                delta = ""
                call.name = name or call.name
                if piece:
                    call.pieces.append(piece)
                    if doubtful(call):
                        call.doubtful = True
                        yield call
                        return
                if not closed:
                    break
                yield call
                made += 1
                if made == limit:
                    return
                call = Call()
    finally:
        await stream.close()
    if not made:
        raise ModelBehaviorError(
            f"the local model's tool call did not finish within its token cap: {scanner.text!r}"
        )


def call_events(reply: ReplyEvents, call: Call) -> list[TResponseStreamEvent]:
    """An accepted call's output item, its argument deltas as the model wrote them.

    They go out together once the call is known to stand, which is when rtagent would announce
    it anyway (complete arguments), so checking it first delays nothing a user sees.
    """
    for chunk in call.chunks:
        reply.count(chunk)
    events = [reply.call_added(call.name), *(reply.call_delta(piece) for piece in call.pieces)]
    return [*events, *reply.call_done()]


class CallScanner:
    """Follows streamed ``{"name": "...", "arguments": {...}}`` calls as the grammar writes them.

    ``feed`` returns the name once it is complete, the new part of the arguments, and whether the
    arguments have just closed; then it follows the next call, one ``CALL_SEPARATOR`` after the
    brace that closes this one. Only strings and nesting depth are tracked: the grammar already
    guarantees valid JSON, with these separators and in this key order.
    """

    _HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
    _BETWEEN = len("}" + CALL_SEPARATOR)

    def __init__(self) -> None:
        self.text = ""
        self._head = 0  # where the current call's head is expected
        self._scanned: int | None = None  # where the arguments scan has reached, once they began
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, delta: str) -> tuple[str | None, str, bool]:
        self.text += delta
        name = None
        if self._scanned is None:
            head = self._HEAD.match(self.text, self._head)
            if head is None:
                return None, "", False
            name = json.loads(f'"{head.group(1)}"')
            self._scanned = head.end()
        start = self._scanned
        for i in range(start, len(self.text)):
            char = self.text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._scanned, self._head = None, i + 1 + self._BETWEEN
                    return name, self.text[start : i + 1], True
        self._scanned = len(self.text)
        return name, self.text[start:], False


class LoopGuard:
    """Says when a plain reply starts repeating itself, so it stops well before the cap.

    Small models loop in two shapes: a sentence said again, and a short stretch repeated back to
    back inside a sentence ("A: A: A: A:").
    """

    SENTENCE_MIN = 12  # characters: short sentences ("Yes.", "Thanks!") may honestly repeat
    TAIL = 240

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._sentence = ""
        self._tail = ""

    def looping(self, delta: str) -> bool:
        self._tail = (self._tail + delta)[-self.TAIL :]
        if _periodic(self._tail):
            return True
        self._sentence += delta
        while (end := re.search(r"[.!?\n]", self._sentence)) is not None:
            sentence, self._sentence = self._sentence[: end.end()], self._sentence[end.end() :]
            key = re.sub(r"\W+", " ", sentence).strip().lower()
            if len(key) >= self.SENTENCE_MIN:
                if key in self._seen:
                    return True
                self._seen.add(key)
        return False


def _periodic(tail: str) -> bool:
    """The tail ends in 4+ back-to-back copies (16+ characters) of a unit holding a letter.

    The letter keeps markdown rules and table borders ("| --- | --- |") from counting as loops.
    """
    for period in range(2, 61):
        copies = max(4, -(-16 // period))
        if copies * period > len(tail):
            continue
        unit = tail[-period:]
        if tail[-copies * period :] == unit * copies and re.search(r"[^\W\d_]", unit):
            return True
    return False

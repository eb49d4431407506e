"""A scripted model for testing agents offline, with exact event order and real timing.

Each step is one model response, streamed the way the Responses API streams it and paced with
real ``asyncio.sleep`` so that latency tests measure what they claim::

    from agents import Agent, Runner
    from rtagent.testing import ScriptedModel, call, fail, reply, tool_calls

    model = ScriptedModel([
        tool_calls(call("lookup", {"query": "x"}), first_delay=0.05),
        reply("Found it.", chunks=3, delay=0.01),  # "Fou", "nd ", "it." 10 ms apart
        fail(RuntimeError("boom"), after=reply("partial", chunks=7)),
    ])
    result = Runner.run_streamed(Agent(name="a", model=model, tools=[lookup]), "hi")
    async for event in result.stream_events():
        ...
    assert result.final_output == "Found it."
    assert model.calls[1].input[-1]["type"] == "function_call_output"
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from agents.items import TResponseOutputItem, TResponseStreamEvent
from agents.testing import ModelCall, ModelStep
from agents.testing import ScriptedModel as _SDKScriptedModel
from agents.testing.model import ModelResponder, ModelScriptItem, ModelStepResult
from agents.usage import Usage
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from ._replyevents import response

__all__ = ["Call", "ScriptedModel", "Step", "StreamLog", "call", "fail", "reply", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Call:
    """One function call of a step; its JSON arguments stream as ``argument_chunks``."""

    name: str
    argument_chunks: tuple[str, ...]
    call_id: str | None = None

    @property
    def arguments(self) -> str:
        return "".join(self.argument_chunks)


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted model response: optional text, then function calls, then completion or ``error``.

    ``text`` is ``None`` when the response has no message item at all (a tool-only response).
    """

    text: tuple[str, ...] | None = None
    calls: tuple[Call, ...] = ()
    delay: float = 0.0
    first_delay: float = 0.0
    yield_to_loop: bool = True
    error: Exception | None = None
    error_delay: float = 0.0

    @property
    def deltas(self) -> int:
        """Text and argument deltas this step streams (also its reported output tokens)."""
        return len(self.text or ()) + sum(len(c.argument_chunks) for c in self.calls)


@dataclass(slots=True)
class StreamLog:
    """What one streamed response actually did, updated live while it streams.

    ``response`` numbers the scripted responses from 1, as in their ids (``resp_1``, ``msg_1``).
    """

    response: int
    deltas: int = 0
    outcome: Literal["streaming", "completed", "failed", "closed"] = "streaming"


def _split(text: str, chunks: int) -> tuple[str, ...]:
    if not 1 <= chunks <= len(text):
        raise ValueError(f"cannot split {len(text)} characters into {chunks} non-empty chunks")
    size, extra = divmod(len(text), chunks)
    bounds = [0, *itertools.accumulate(size + (i < extra) for i in range(chunks))]
    return tuple(text[a:b] for a, b in itertools.pairwise(bounds))


def _words(text: str) -> tuple[str, ...]:
    # Whitespace stays in front of the word it precedes, the way BPE tokenizers emit it.
    return tuple(part for part in re.split(r"(?<=\S)(?=\s)", text) if part)


def call(
    name: str,
    arguments: Mapping[str, Any] | str | None = None,
    *,
    call_id: str | None = None,
    chunks: int = 1,
) -> Call:
    """A function call; ``call_id`` defaults to ``call_1``, ``call_2``... in the order they stream."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {}, separators=(",", ":"))
    return Call(name=name, argument_chunks=_split(text, chunks) if text else (), call_id=call_id)


def _pieces(text: str | Sequence[str], chunks: int | None) -> tuple[str, ...]:
    if not isinstance(text, str):
        if chunks is not None:
            raise TypeError("chunks only applies to text given as one string")
        return tuple(text)
    return _split(text, chunks) if chunks is not None else _words(text)


def reply(
    text: str | Sequence[str],
    *,
    chunks: int | None = None,
    delay: float = 0.0,
    first_delay: float = 0.0,
    yield_to_loop: bool = True,
) -> Step:
    """A text response, streamed as the given chunks, as ``chunks`` equal pieces, or word by word.

    ``first_delay`` is waited before the response starts and ``delay`` before every later delta.
    With ``delay=0`` and ``yield_to_loop`` the stream still does ``asyncio.sleep(0)`` between
    deltas, so consumers keep up; ``yield_to_loop=False`` emits a burst without yielding.
    """
    return Step(_pieces(text, chunks), (), delay, first_delay, yield_to_loop)


def tool_calls(
    *calls: Call,
    text: str | Sequence[str] | None = None,
    delay: float = 0.0,
    first_delay: float = 0.0,
    yield_to_loop: bool = True,
) -> Step:
    """One response making several function calls (run in parallel by the SDK), after optional text.

    Without ``text`` the response has no message item at all, like a real tool-only response.
    """
    if not calls:
        raise ValueError("tool_calls needs at least one call")
    pieces = None if text is None else _pieces(text, None)
    return Step(pieces, calls, delay, first_delay, yield_to_loop)


def fail(error: Exception, *, after: Step | None = None, delay: float = 0.0) -> Step:
    """A response that raises ``error`` ``delay`` seconds in: at once, or after streaming ``after``.

    With ``after`` every event of that step but ``response.completed`` is streamed first, so the
    consumer sees ``after.deltas`` deltas before the error.
    """
    return replace(after or Step(), error=error, error_delay=delay)


class ScriptedModel(_SDKScriptedModel):
    """The SDK's ``ScriptedModel``, also accepting ``Step`` objects and logging each stream.

    SDK step kinds (``ModelStep``, exceptions, output lists) pass through unchanged, and
    ``calls`` records the exact input of every model call.
    """

    def __init__(self, steps: Iterable[Step | ModelScriptItem] = ()) -> None:
        self._responses = 0
        self._ids = itertools.count(1)
        self._streams: list[StreamLog] = []
        super().__init__([self._lower(step) for step in steps])

    @property
    def streams(self) -> list[StreamLog]:
        """One log per streamed ``Step`` response, in call order."""
        return list(self._streams)

    @property
    def deltas_emitted(self) -> int:
        """Deltas actually handed to the consumer, over all streams."""
        return sum(log.deltas for log in self._streams)

    @property
    def streams_closed(self) -> int:
        """Streams the consumer closed or cancelled before they completed."""
        return sum(log.outcome == "closed" for log in self._streams)

    def enqueue(self, step: Step | ModelScriptItem) -> None:
        super().enqueue(self._lower(step))

    def extend(self, steps: Iterable[Step | ModelScriptItem]) -> None:
        super().extend([self._lower(step) for step in steps])

    def _lower(self, step: Step | ModelScriptItem) -> ModelScriptItem:
        return ModelStep.respond(self._responder(step)) if isinstance(step, Step) else step

    def _responder(self, step: Step) -> ModelResponder:
        async def respond(model_call: ModelCall) -> ModelStepResult:
            # Ids are assigned when the response happens so they follow the order the run sees.
            self._responses += 1
            number = self._responses
            calls = tuple(
                c if c.call_id else replace(c, call_id=f"call_{next(self._ids)}") for c in step.calls
            )
            resolved = replace(step, calls=calls)
            if model_call.streamed:
                return ModelStep.stream(lambda _: self._stream(resolved, number))
            # Unstreamed, the caller gets the whole response after the time streaming would take.
            pauses = step.delay * max(step.deltas - 1, 0)
            await asyncio.sleep(step.first_delay + pauses + step.error_delay)
            if step.error is not None:
                return step.error
            tokens = step.deltas
            return ModelStep(
                output=_output(resolved, number),
                usage=Usage(requests=1, output_tokens=tokens, total_tokens=tokens),
                response_id=f"resp_{number}",
            )

        return respond

    async def _stream(self, step: Step, number: int) -> AsyncIterator[TResponseStreamEvent]:
        log = StreamLog(response=number)
        self._streams.append(log)
        try:
            *events, completed = _events(step, number)
            await asyncio.sleep(step.first_delay)
            if step.text is None and not step.calls and step.error is not None:
                events = []  # a bare failure happens before the response even starts
            for event, is_delta in events:
                if is_delta and log.deltas:
                    if step.delay > 0:
                        await asyncio.sleep(step.delay)
                    elif step.yield_to_loop:
                        # Lets the consumer task take each delta before the next one is produced.
                        await asyncio.sleep(0)
                log.deltas += is_delta
                yield event
            if step.error is not None:
                await asyncio.sleep(step.error_delay)
                raise step.error
            # Marked before the yield: a consumer closing right after the last event got it all.
            log.outcome = "completed"
            yield completed[0]
        except (GeneratorExit, asyncio.CancelledError):
            if log.outcome == "streaming":
                log.outcome = "closed"
            raise
        except BaseException:
            log.outcome = "failed"
            raise


def _events(step: Step, number: int) -> list[tuple[TResponseStreamEvent, bool]]:
    """The response's events in Responses API order, each flagged whether it is a delta."""
    events: list[tuple[TResponseStreamEvent, bool]] = []

    def add(kind: type[TResponseStreamEvent], is_delta: bool = False, /, **fields: Any) -> None:
        type_ = get_args(kind.model_fields["type"].annotation)[0]
        events.append((kind(type=type_, sequence_number=len(events), **fields), is_delta))

    started = response(f"resp_{number}", "rtagent-scripted", [], "in_progress")
    add(ResponseCreatedEvent, response=started)
    add(ResponseInProgressEvent, response=started)
    output = _output(step, number)
    chunks = ([] if step.text is None else [step.text]) + [c.argument_chunks for c in step.calls]
    for index, (item, pieces) in enumerate(zip(output, chunks, strict=True)):
        emptied: dict[str, Any] = (
            {"content": []} if isinstance(item, ResponseOutputMessage) else {"arguments": ""}
        )
        pending = item.model_copy(update={"status": "in_progress", **emptied})
        add(ResponseOutputItemAddedEvent, item=pending, output_index=index)
        if isinstance(item, ResponseOutputMessage):
            where: dict[str, Any] = {"item_id": item.id, "output_index": index, "content_index": 0}
            add(ResponseContentPartAddedEvent, part=_text_part(""), **where)
            for piece in pieces:
                add(ResponseTextDeltaEvent, True, delta=piece, logprobs=[], **where)
            add(ResponseTextDoneEvent, text="".join(pieces), logprobs=[], **where)
            add(ResponseContentPartDoneEvent, part=item.content[0].model_copy(deep=True), **where)
        elif isinstance(item, ResponseFunctionToolCall):
            where = {"item_id": item.id, "output_index": index}
            for piece in pieces:
                add(ResponseFunctionCallArgumentsDeltaEvent, True, delta=piece, **where)
            # The live API also sends the name; newer openai types keep it as an extra field.
            add(ResponseFunctionCallArgumentsDoneEvent, arguments=item.arguments, name=item.name, **where)
        add(ResponseOutputItemDoneEvent, item=item.model_copy(deep=True), output_index=index)
    done = response(f"resp_{number}", "rtagent-scripted", output, "completed", output_tokens=step.deltas)
    add(ResponseCompletedEvent, response=done)
    return events


def _text_part(text: str) -> ResponseOutputText:
    return ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])


def _output(step: Step, number: int) -> list[TResponseOutputItem]:
    output: list[TResponseOutputItem] = []
    if step.text is not None:
        text = _text_part("".join(step.text))
        output.append(
            ResponseOutputMessage(
                type="message", id=f"msg_{number}", role="assistant", status="completed", content=[text]
            )
        )
    output.extend(
        ResponseFunctionToolCall(
            type="function_call",
            id=f"fc_{c.call_id}",
            call_id=c.call_id or "",
            name=c.name,
            arguments=c.arguments,
            status="completed",
        )
        for c in step.calls
    )
    return output


# Pydantic builds the openai models' validators on first use (~0.1 s); pay that at import so it
# does not land inside the first scripted response and skew timing tests.
_events(Step(("",), (Call("warm_up", ("{}",)),)), 0)

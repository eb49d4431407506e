"""The Responses-API stream events of one adapted reply, built as the model's tokens arrive.

``ReplyEvents`` emits them in the order the Responses API streams them (the same order
``rtagent.testing`` scripts), so neither the SDK nor rtagent's tap can tell an adapted local
model from a hosted one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Literal

from agents.items import TResponseOutputItem, TResponseStreamEvent
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import (
    Response,
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
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ReplyEvents:
    """The events of one response: at most one message item, then function calls one by one."""

    def __init__(self, model: str, *, parallel_tool_calls: bool = False) -> None:
        self._model = model
        self._parallel_tool_calls = parallel_tool_calls
        self._id = _id("resp")
        self._sequence = 0
        self._output: list[TResponseOutputItem] = []
        self._text: list[str] | None = None
        self._message_id = _id("msg")
        self._call: ResponseFunctionToolCall | None = None
        self._arguments: list[str] = []
        self._input_tokens = 0
        self._output_tokens = 0

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def start(self) -> list[TResponseStreamEvent]:
        response = self._response("in_progress")
        return [
            ResponseCreatedEvent(type="response.created", response=response, sequence_number=self._next()),
            ResponseInProgressEvent(
                type="response.in_progress", response=response, sequence_number=self._next()
            ),
        ]

    def count(self, chunk: ChatCompletionChunk) -> None:
        """Usage: one token per content chunk (llama.cpp streams one each), prompt size if reported."""
        if chunk.choices and (chunk.choices[0].delta.content or "") != "":
            self._output_tokens += 1
        if chunk.usage is not None:
            self._input_tokens = chunk.usage.prompt_tokens

    # -- text -----------------------------------------------------------------------------------

    def text(self, delta: str) -> list[TResponseStreamEvent]:
        events: list[TResponseStreamEvent] = []
        index = len(self._output)
        if self._text is None:
            self._text = []
            message = ResponseOutputMessage(
                type="message", id=self._message_id, role="assistant", status="in_progress", content=[]
            )
            events.append(self._added(message))
            events.append(
                ResponseContentPartAddedEvent(
                    type="response.content_part.added",
                    item_id=self._message_id,
                    output_index=index,
                    content_index=0,
                    part=_text_part(""),
                    sequence_number=self._next(),
                )
            )
        self._text.append(delta)
        events.append(
            ResponseTextDeltaEvent(
                type="response.output_text.delta",
                item_id=self._message_id,
                output_index=index,
                content_index=0,
                delta=delta,
                logprobs=[],
                sequence_number=self._next(),
            )
        )
        return events

    def text_done(self) -> list[TResponseStreamEvent]:
        if self._text is None:
            return []
        text, index = "".join(self._text), len(self._output)
        message = ResponseOutputMessage(
            type="message",
            id=self._message_id,
            role="assistant",
            status="completed",
            content=[_text_part(text)],
        )
        self._output.append(message)
        self._text = None
        return [
            ResponseTextDoneEvent(
                type="response.output_text.done",
                item_id=self._message_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
                sequence_number=self._next(),
            ),
            ResponseContentPartDoneEvent(
                type="response.content_part.done",
                item_id=self._message_id,
                output_index=index,
                content_index=0,
                part=_text_part(text),
                sequence_number=self._next(),
            ),
            self._done(message, index),
        ]

    # -- function calls -------------------------------------------------------------------------

    def call_added(self, name: str) -> TResponseStreamEvent:
        call_id = _id("call")
        self._arguments = []
        self._call = ResponseFunctionToolCall(
            type="function_call",
            id=f"fc_{call_id}",
            call_id=call_id,
            name=name,
            arguments="",
            status="in_progress",
        )
        return self._added(self._call)

    def call_delta(self, piece: str) -> TResponseStreamEvent:
        assert self._call is not None
        self._arguments.append(piece)
        return ResponseFunctionCallArgumentsDeltaEvent(
            type="response.function_call_arguments.delta",
            item_id=self._call.id or "",
            output_index=len(self._output),
            delta=piece,
            sequence_number=self._next(),
        )

    def call_done(self) -> list[TResponseStreamEvent]:
        assert self._call is not None
        call = self._call.model_copy(update={"arguments": "".join(self._arguments), "status": "completed"})
        index = len(self._output)
        self._output.append(call)
        done = ResponseFunctionCallArgumentsDoneEvent(
            type="response.function_call_arguments.done",
            item_id=call.id or "",
            output_index=index,
            arguments=call.arguments,
            sequence_number=self._next(),
        )
        return [done, self._done(call, index)]

    # -- the end --------------------------------------------------------------------------------

    def completed(self) -> TResponseStreamEvent:
        return ResponseCompletedEvent(
            type="response.completed", response=self._response("completed"), sequence_number=self._next()
        )

    def _added(self, item: TResponseOutputItem) -> TResponseStreamEvent:
        return ResponseOutputItemAddedEvent(
            type="response.output_item.added",
            item=item,
            output_index=len(self._output),
            sequence_number=self._next(),
        )

    def _done(self, item: TResponseOutputItem, index: int) -> TResponseStreamEvent:
        return ResponseOutputItemDoneEvent(
            type="response.output_item.done", item=item, output_index=index, sequence_number=self._next()
        )

    def _response(self, status: Literal["in_progress", "completed"]) -> Response:
        return response(
            self._id,
            self._model,
            self._output,
            status,
            input_tokens=self._input_tokens,
            output_tokens=self._output_tokens if status == "completed" else None,
            parallel_tool_calls=self._parallel_tool_calls,
        )


def response(
    id: str,
    model: str,
    output: Sequence[TResponseOutputItem],
    status: Literal["in_progress", "completed"],
    *,
    input_tokens: int = 0,
    output_tokens: int | None = None,
    parallel_tool_calls: bool = True,
) -> Response:
    """A streamed reply's ``Response``, as the Responses API reports it; usage once it is known."""
    usage = None
    if output_tokens is not None:
        usage = ResponseUsage(
            input_tokens=input_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
            output_tokens=output_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
            total_tokens=input_tokens + output_tokens,
        )
    return Response(
        id=id,
        created_at=0,
        model=model,
        object="response",
        output=list(output),
        tool_choice="auto",
        tools=[],
        top_p=None,
        parallel_tool_calls=parallel_tool_calls,
        status=status,
        usage=usage,
    )


def _text_part(text: str) -> ResponseOutputText:
    return ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])

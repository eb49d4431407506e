"""Keeping the conversation whole when a turn is cut short.

The SDK saves a model response to the session only once the response and its tools are done, and
its ``cancel()`` discards the response in progress. rtagent writes what the user saw instead:

- the partial reply, exactly as delivered, as an assistant message with ``status: "incomplete"``;
- each tool call of that response with its output, or ``INTERRUPTED`` if it had not finished, so
  the history stays valid for any OpenAI-compatible API (every call has an output);
- for a tool that finishes in the background, its real output later, as a call/output pair;
- for a call that waited for approval when the person sent a new message instead, ``NOT_ANSWERED``.

Before a model sees the history, ``mark_cut_replies`` turns the ``incomplete`` status into words,
so the model knows it was cut off; the session keeps the exact text for front ends.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from agents.items import TResponseInputItem
from agents.memory import Session
from agents.run_config import CallModelData, CallModelInputFilter, ModelInputData

from ._errors import describe

INTERRUPTED = "Interrupted by the user before the tool finished."
NOT_ANSWERED = "Not run: the person did not answer the request to approve it and went on."
STILL_RUNNING = "Still running in the background; its result will be added to the conversation."
CUT_MARK = "[cut off: the user interrupted this reply]"


def cut_reply(text: str) -> TResponseInputItem:
    """The assistant message for a reply that was cut short."""
    item: dict[str, Any] = {
        "type": "message",
        "role": "assistant",
        "status": "incomplete",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return item  # type: ignore[return-value]


def call_pair(call_id: str, name: str, arguments: str, output: str) -> list[TResponseInputItem]:
    return [
        {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments},
        call_output(call_id, output),
    ]


def call_output(call_id: str, output: str) -> TResponseInputItem:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


async def record_cut(
    session: Session,
    text: str,
    calls: Sequence[tuple[str, str, str]],
    outputs: dict[str, str],
) -> None:
    """Append the cut response: its delivered ``text`` and its ``calls`` (id, name, arguments).

    The SDK saves a response whole (its message, calls and outputs) in one write, and a turn can be
    cut just after that write: then the response, its text too, is already saved.
    """
    latest = await session.get_items(limit=2 * len(calls) + 4)
    saved = _call_ids(latest, "function_call")
    answered = _call_ids(latest, "function_call_output")
    if calls:
        responded = any(call_id in saved for call_id, _, _ in calls)
    else:  # saved, its message is the latest item (before it: the user's message or a tool's output)
        responded = bool(latest) and _says(latest[-1], text)
    items: list[TResponseInputItem] = [cut_reply(text)] if text and not responded else []
    for call_id, name, arguments in calls:
        output = outputs.get(call_id, INTERRUPTED)
        if call_id not in saved:
            items += call_pair(call_id, name, arguments, output)
        elif call_id not in answered:  # saved by a run that paused before it (an approval)
            items.append(call_output(call_id, output))
    if items:
        await session.add_items(items)


def _call_ids(items: list[TResponseInputItem], kind: str) -> set[str]:
    found: Any = (item for item in items if isinstance(item, dict) and item.get("type") == kind)
    return {str(item.get("call_id")) for item in found}


def not_answered(call_ids: Sequence[str]) -> list[TResponseInputItem]:
    """The outputs of calls a person never approved or rejected: the conversation went on."""
    return [call_output(call_id, NOT_ANSWERED) for call_id in call_ids]


def _says(item: Any, text: str) -> bool:
    """Whether ``item`` is a complete assistant message that starts with ``text``."""
    if not isinstance(item, dict) or item.get("role") != "assistant" or is_cut(item):
        return False
    return content_text(item.get("content")).startswith(text)


def content_text(content: Any) -> str:
    """The text of a content field: a string, or a list of parts (input_text, output_text, refusal...)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") or p.get("refusal") or "" for p in content if isinstance(p, dict))
        return "".join(parts)
    return ""


def is_cut(item: Any) -> bool:
    return isinstance(item, dict) and item.get("role") == "assistant" and item.get("status") == "incomplete"


def mark_cut_replies(data: CallModelData[Any]) -> ModelInputData:
    """The model input with each cut reply ending in words that say so."""
    model_data = data.model_data
    if not any(is_cut(item) for item in model_data.input):
        return model_data
    return replace(model_data, input=[_marked(item) if is_cut(item) else item for item in model_data.input])


def _marked(item: TResponseInputItem) -> TResponseInputItem:
    text = content_text(item["content"])  # type: ignore[typeddict-item]
    return {"type": "message", "role": "assistant", "content": f"{text.rstrip()} {CUT_MARK}".lstrip()}


def record_late(session: Session, call_id: str, name: str, arguments: str, task: asyncio.Future[Any]) -> None:
    """Save a background tool's output as a call/output pair of its own, once it arrives."""
    if task.cancelled():
        return
    error = task.exception()
    output = f"The tool failed: {describe(error)}" if error is not None else str(task.result())
    pair = call_pair(f"{call_id}-done", name, arguments, output)
    _late_writes.add(saving := asyncio.ensure_future(session.add_items(pair)))
    saving.add_done_callback(_late_writes.discard)


# Strong references, so a pending write is not garbage-collected before it runs.
_late_writes: set[asyncio.Future[None]] = set()


def with_cut_marks(user_filter: CallModelInputFilter | None) -> CallModelInputFilter:
    if user_filter is None:
        return mark_cut_replies

    async def both(data: CallModelData[Any]) -> ModelInputData:
        marked = replace(data, model_data=mark_cut_replies(data))
        result = user_filter(marked)
        return await result if inspect.isawaitable(result) else result

    return both

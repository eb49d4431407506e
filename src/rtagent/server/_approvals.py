"""Tool approvals on the server: the answers a client sends, and the paused runs it keeps.

A turn that calls a tool marked ``needs_approval`` ends paused (``Chat``). The server keeps the
paused run's state (``TurnResult.state``) in the history store, beside the thread's history, as the
one item of the session ``THREAD:paused`` (no thread id holds a colon): every engine stores it
without a table of its own, and any replica, or this one after a restart, continues it.

Answers come as AG-UI ``resume`` entries, one per interrupt (the interrupt's id is the call's id):
``status: "resolved"`` with ``payload: {"approved": bool, "message"?: str}``, or ``"cancelled"``
(the call is rejected); on the WebSocket as ``{"type": "answer", "approved": [...], "rejected":
[...], "message"?: ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ag_ui.core import ResumeEntry

from ._engines import HistoryStore
from ._limits import InputError

SCHEMA = '{"approved": true | false, "message"?: string}'


@dataclass(frozen=True, slots=True)
class Answers:
    """A person's answers to a paused run's calls: approved ones, and rejected ones with what the
    model is told (``None``: the SDK's own words)."""

    approved: frozenset[str] = frozenset()
    rejected: dict[str, str | None] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)
    """What the client's own tools returned (see ``_frontend``): those calls are approved too."""


def answers_of(entries: Sequence[ResumeEntry], results: dict[str, str]) -> Answers:
    """The answers in AG-UI resume entries, and the client tools' ``results``; a malformed entry
    is a 422."""
    approved: set[str] = set()
    rejected: dict[str, str | None] = {}
    for entry in entries:
        if entry.status == "cancelled":
            rejected[entry.interrupt_id] = None
            continue
        payload: Any = entry.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("approved"), bool):
            raise _bad(entry, f"the payload must be {SCHEMA}")
        message = payload.get("message")
        if message is not None and not isinstance(message, str):
            raise _bad(entry, '"message" must be a string')
        if payload["approved"]:
            approved.add(entry.interrupt_id)
        else:
            rejected[entry.interrupt_id] = message or None
    return Answers(frozenset(approved | results.keys()), rejected, results)


def _bad(entry: ResumeEntry, what: str) -> InputError:
    return InputError(f"resume entry {entry.interrupt_id[:80]!r}: {what}", 422, "bad_resume")


def answers_command(command: dict[str, Any]) -> Answers:
    """The answers of a WebSocket ``answer`` command; a malformed one is a 422."""
    lists = [command.get("approved", []), command.get("rejected", [])]
    if not all(isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in lists):
        raise InputError('"approved" and "rejected" must be lists of tool call ids', 422, "bad_answer")
    message = command.get("message")
    if message is not None and not isinstance(message, str):
        raise InputError('"message" must be a string', 422, "bad_answer")
    return Answers(frozenset(lists[0]), dict.fromkeys(lists[1], message or None))


class PausedRuns:
    """The paused run of each thread, in the history store (see the module docstring)."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store

    async def load(self, thread_id: str) -> str | None:
        items: list[Any] = await self._store.session(f"{thread_id}:paused").get_items(limit=1)
        state = items[0].get("state") if items and isinstance(items[0], dict) else None
        return state if isinstance(state, str) else None

    async def save(self, thread_id: str, state: str | None) -> None:
        """Keep ``state`` as the thread's paused run (``None``: it has none)."""
        session = self._store.session(f"{thread_id}:paused")
        await session.clear_session()
        if state is not None:
            await session.add_items([{"type": "rtagent_paused_run", "state": state}])  # type: ignore[list-item]

"""A conversation: one agent, one history, one turn at a time."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Unpack

from agents import Agent, SQLiteSession
from agents.items import TResponseInputItem
from agents.memory import Session

from ._errors import ApprovalError
from ._events import ApprovalRequested
from ._turn import Resume, Turn, TurnOptions, pending_of

Policy = Literal["interrupt", "queue"]


class Chat:
    """Owns the history across turns and runs one turn at a time.

    A message sent while a turn is still running interrupts it (``policy="interrupt"``, the
    default, as a person cutting in would expect) or waits for it to end (``policy="queue"``).
    Either way the new turn starts only once the old one has ended and its history is saved.

    A turn that calls a tool marked ``needs_approval`` ends paused, with the calls in ``pending``;
    ``approve`` / ``reject`` (or ``resume`` for several answers at once) continue it as a new turn.
    A message sent instead closes the waiting calls as not run, and the conversation goes on.

        chat = rtagent.Chat(agent)
        async with chat.send("hello") as turn:
            async for event in turn:
                ...
    """

    def __init__(
        self,
        agent: Agent[Any],
        *,
        policy: Policy = "interrupt",
        **options: Unpack[TurnOptions],
    ) -> None:
        self.agent = agent
        # Without a session of the caller's, the history lives in memory for the chat's lifetime.
        self.session: Session = options.get("session") or SQLiteSession(f"chat-{uuid.uuid4().hex}")
        self.policy = policy
        self._options: TurnOptions = {**options, "session": self.session}
        self._turn: Turn | None = None

    @property
    def turn(self) -> Turn | None:
        """The latest turn (running or ended), if any."""
        return self._turn

    def send(self, text: str, *, policy: Policy | None = None, **options: Unpack[TurnOptions]) -> Turn:
        """Start a turn for ``text`` (needs a running event loop); iterate the turn for its events.
        ``options`` override the chat's for this turn (its ``context`` or extra ``tools``)."""
        previous = self._turn
        if previous is not None and (policy or self.policy) == "interrupt":
            previous.interrupt()
        turn = Turn(self.agent, text, after=previous, **self._with(options))
        self._turn = turn
        # Started at once, so that a conversation moves on whether or not anyone reads this turn.
        turn.start()
        return turn

    @property
    def pending(self) -> tuple[ApprovalRequested, ...]:
        """The tool calls the latest turn paused for (empty while it runs)."""
        turn = self._turn
        return turn.result.pending if turn is not None and turn.done else ()

    def approve(self, *call_ids: str) -> Turn:
        """Run these waiting calls and continue the turn; see ``resume``."""
        return self.resume(approved=call_ids)

    def reject(self, *call_ids: str, message: str | None = None) -> Turn:
        """Tell the model the person declined these calls (``message``, else the SDK's words)."""
        return self.resume(rejected=call_ids, message=message)

    def resume(
        self,
        approved: Iterable[str] = (),
        rejected: Iterable[str] | Mapping[str, str | None] = (),
        *,
        message: str | None = None,
        **options: Unpack[TurnOptions],
    ) -> Turn:
        """Continue the paused turn from the SDK's run state with the person's answers. Calls left
        unanswered stay pending: the new turn runs the answered ones and pauses again for them.
        ``rejected`` maps each call to what the model is told, or takes ``message`` for all (else
        the SDK's words). ``ApprovalError`` if a call waits for no answer (unknown, or answered)."""
        turn, waiting = self._turn, {request.call_id for request in self.pending}
        reasons = dict(rejected) if isinstance(rejected, Mapping) else dict.fromkeys(rejected, message)
        yes, no = frozenset(approved), frozenset(reasons)
        if turn is None or turn.result.state is None:
            raise ApprovalError("no tool call is waiting for approval")
        for call_id in sorted(yes | no):
            if call_id not in waiting:
                raise ApprovalError(f"no tool call {call_id!r} is waiting for approval")
            if call_id in yes and call_id in no:
                raise ApprovalError(f"tool call {call_id!r} cannot be both approved and rejected")
        if not yes | no:
            raise ApprovalError("approve or reject at least one of the waiting calls")
        resume = Resume(turn.result.state, yes, reasons)
        resumed = Turn(self.agent, resume, after=turn, **self._with(options))
        self._turn = resumed
        resumed.start()
        return resumed

    async def restore(self, state: str) -> None:
        """Take up a paused run saved elsewhere (``TurnResult.state``: another process, before a
        restart); ``pending`` then lists its calls. The history must be this chat's session."""
        self._turn = Turn.paused(self.agent, await pending_of(self.agent, state), state, **self._options)

    def _with(self, options: TurnOptions) -> TurnOptions:
        merged: TurnOptions = {**self._options, **options}
        return merged

    async def history(self) -> list[TResponseInputItem]:
        """Every item of the conversation, as the session holds it."""
        return await self.session.get_items()

    async def aclose(self) -> None:
        """Interrupt the running turn, if any, and wait for it to end."""
        if self._turn is not None:
            await self._turn.aclose()

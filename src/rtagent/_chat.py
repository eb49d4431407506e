"""A conversation: one agent, one history, one turn at a time."""

from __future__ import annotations

import uuid
from typing import Any, Literal, Unpack

from agents import Agent, SQLiteSession
from agents.items import TResponseInputItem
from agents.memory import Session

from ._turn import Turn, TurnOptions

Policy = Literal["interrupt", "queue"]


class Chat:
    """Owns the history across turns and runs one turn at a time.

    A message sent while a turn is still running interrupts it (``policy="interrupt"``, the
    default, as a person cutting in would expect) or waits for it to end (``policy="queue"``).
    Either way the new turn starts only once the old one has ended and its history is saved.

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

    def send(self, text: str, *, policy: Policy | None = None) -> Turn:
        """Start a turn for ``text`` (needs a running event loop); iterate the turn for its events."""
        previous = self._turn
        if previous is not None and (policy or self.policy) == "interrupt":
            previous.interrupt()
        turn = Turn(self.agent, text, after=previous, **self._options)
        self._turn = turn
        # Started at once, so that a conversation moves on whether or not anyone reads this turn.
        turn.start()
        return turn

    async def history(self) -> list[TResponseInputItem]:
        """Every item of the conversation, as the session holds it."""
        return await self.session.get_items()

    async def aclose(self) -> None:
        """Interrupt the running turn, if any, and wait for it to end."""
        if self._turn is not None:
            await self._turn.aclose()

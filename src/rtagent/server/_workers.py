"""Several worker processes serving one conversation database (``rtagent serve --workers N``).

uvicorn's workers share one listening socket, so any request of a conversation may land on any
worker, while a conversation still runs one turn at a time and a stop must reach its turn wherever
it runs. So each worker records the threads whose turns it runs in a small SQLite file of the
directory the workers share (``PEERS/running.db``, written without fsync: it only describes live
processes), and answers the other workers on a Unix socket of its own (``PEERS/PID.sock``):
"interrupt this thread's turn, tell me when its history is saved", "let it finish, then tell me",
"stop it". A worker that starts a turn of a thread another one runs asks that one first; a row
left by a worker that died (its socket gone) is cleared by whoever finds it.

One worker needs none of this: ``create_app`` without ``peers`` makes no ``Peers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

TABLE = "rtagent_running"
# How a worker answers a peer: (operation, thread id) -> whether the thread had a running turn.
Handler = Callable[[str, str], Awaitable[bool]]


class Peers:
    """This worker's view of the others: who runs which thread, and how to reach them."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.address = str(self.directory / f"{os.getpid()}.sock")
        self._running: Counter[str] = Counter()  # this worker's turns per thread
        self._listener: asyncio.Server | None = None
        self._lock = threading.Lock()
        # Autocommit, and no fsync: each turn's start and end write here, on the event loop.
        self._connection = sqlite3.connect(self.directory / "running.db", isolation_level=None, timeout=10)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=OFF")
        table = f"CREATE TABLE IF NOT EXISTS {TABLE} (thread_id TEXT PRIMARY KEY, peer TEXT NOT NULL)"
        self._connection.execute(table)

    async def start(self, handler: Handler) -> None:
        """Answer the other workers' requests with ``handler``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)  # a socket file left by an earlier process with this pid

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = json.loads(await reader.readline())
                had_turn = await handler(request["op"], request["thread"])
                writer.write(json.dumps({"running": had_turn}).encode() + b"\n")
                await writer.drain()
            except (OSError, ValueError, KeyError):
                pass  # the asking worker went away, or sent nonsense: nothing to answer
            finally:
                writer.close()

        self._listener = await asyncio.start_unix_server(answer, path=self.address)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
        with self._lock:
            self._connection.execute(f"DELETE FROM {TABLE} WHERE peer = ?", (self.address,))
            self._connection.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)

    async def claim(self, thread_id: str, *, interrupt: bool) -> None:
        """Before this worker starts a turn of ``thread_id``: end (or, if not ``interrupt``, await)
        the turn another worker runs for it, until its history is saved."""
        while (owner := self._take(thread_id)) is not None:
            if not await self._ask(owner, "interrupt" if interrupt else "wait", thread_id):
                # That worker is gone, or runs no turn of the thread (any more): the row is stale,
                # or about to be released once the ended run's last events are sent.
                self._forget(thread_id, owner)
        self._running[thread_id] += 1

    def release(self, thread_id: str) -> None:
        """A turn of ``thread_id`` ended in this worker."""
        self._running[thread_id] -= 1
        if self._running[thread_id] <= 0:
            del self._running[thread_id]
            self._forget(thread_id, self.address)

    async def stop(self, thread_id: str) -> bool:
        """Interrupt the thread's turn in whichever other worker runs it; whether one did."""
        owner = self._owner(thread_id)
        if owner is None or owner == self.address:
            return False
        return await self._ask(owner, "stop", thread_id)

    # -- the table and the sockets --------------------------------------------------------------

    def _take(self, thread_id: str) -> str | None:
        """Record this worker as the thread's runner; the other worker that is, if any."""
        with self._lock:
            self._connection.execute(
                f"INSERT INTO {TABLE} (thread_id, peer) VALUES (?, ?) ON CONFLICT (thread_id) DO NOTHING",
                (thread_id, self.address),
            )
        owner = self._owner(thread_id)
        return None if owner in (None, self.address) else owner

    def _owner(self, thread_id: str) -> str | None:
        with self._lock:
            found = self._connection.execute(f"SELECT peer FROM {TABLE} WHERE thread_id = ?", (thread_id,))
            row = found.fetchone()
        return None if row is None else str(row[0])

    def _forget(self, thread_id: str, peer: str) -> None:
        with self._lock:
            forget = f"DELETE FROM {TABLE} WHERE thread_id = ? AND peer = ?"
            self._connection.execute(forget, (thread_id, peer))

    async def _ask(self, peer: str, operation: str, thread_id: str) -> bool:
        """Whether the thread had a running turn at the peer; ``False`` too if the peer is gone."""
        try:
            reader, writer = await asyncio.open_unix_connection(peer)
        except OSError:
            return False
        try:
            writer.write(json.dumps({"op": operation, "thread": thread_id}).encode() + b"\n")
            await writer.drain()
            return bool(json.loads(await reader.readline())["running"])
        except (OSError, ValueError, KeyError):  # gone mid-way, or no answer
            return False
        finally:
            writer.close()

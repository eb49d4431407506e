"""The server's conversations in one SQLite file: the SDK's ``SQLiteSession`` tables, read and
written on the event loop's own thread.

The SDK runs every session operation in a worker thread, under a lock for the file. Under load
that is where a new turn waited: each SQLite call gives up the GIL and, with the event loop busy
streaming, gets it back only after the interpreter's switch interval, all the while holding the
lock the next session waits on (``bench/load.py``, 250 sessions arriving at 100 a second:
``get_items`` took 23 ms at the median and 300 ms at p90, for a read that costs 0.1 ms). Here the
operations run inline, which is cheap because nothing in them waits for the disk:

- the WAL journal with ``synchronous=NORMAL``: a commit is a write to the OS, not an fsync. A
  commit survives the server process crashing; an OS crash or power loss can lose the last
  commits, never the file's consistency (SQLite's documented guarantee for this mode);
- the fsyncs happen in checkpoints, which a background thread runs on a connection of its own
  (``CHECKPOINT_S``), so no stream waits for the disk.

What can still hold the loop is another process writing the same file (``serve --workers``):
SQLite's busy handler then sleeps a millisecond or more. Measured with two workers, 500 sessions:
a read or write held the connection 0.2 ms at the median, 1.4 ms at p99, 5.5 ms at most.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import platformdirs
from agents import SQLiteSession
from agents.items import TResponseInputItem
from agents.memory import SessionSettings
from agents.memory.session_settings import resolve_session_limit

from .._errors import RTAgentError
from .._unicode import may_hold_surrogates, scrub_json


def default_path() -> Path:
    """Where conversations live unless ``--db`` or ``--store`` says: the user's data directory
    (``~/.local/share/rtagent`` on Linux), not whatever directory the server was started in."""
    return platformdirs.user_data_path("rtagent") / "threads.db"


def store_path(url: str) -> str:
    """The SQLite file a ``--store`` URL names: ``sqlite:///relative.db``, ``sqlite:////abs.db``
    (SQLAlchemy's spelling) or ``sqlite:///:memory:``."""
    scheme, sep, rest = url.partition("://")
    if scheme == "sqlite" and sep and rest.startswith("/") and rest != "/":
        return rest[1:]
    known = "use sqlite:///PATH, postgresql://... or redis://..."
    raise RTAgentError(f"unknown store URL {url[:80]!r}: {known}")


# How often the WAL is copied back into the database file (and both are fsynced).
CHECKPOINT_S = 1.0


class Store:
    """One SQLite file of conversations, its connection and the thread that checkpoints it."""

    def __init__(self, path: str) -> None:
        self.path = path
        # The SDK's own operations (``pop_item`` and the like) still run in worker threads and take
        # this lock; the inline ones take it too.
        self.lock = threading.RLock()
        self.connection = sqlite3.connect(path, check_same_thread=False)
        SQLiteSession._configure_connection(self.connection)
        self.connection.execute("PRAGMA synchronous=NORMAL")
        # The SDK's tables, once, on this connection (for ":memory:" the only place they exist).
        StoreSession("", self)._init_db_for_connection(self.connection)
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if path != ":memory:":
            self.connection.execute("PRAGMA wal_autocheckpoint=0")  # the thread's job instead
            self._checkpointer = threading.Thread(
                target=self._checkpoint, name="rtagent-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def session(self, session_id: str) -> StoreSession:
        return StoreSession(session_id, self)

    async def check(self) -> None:
        """Nothing to do: the file was opened by the constructor (see ``_engines.open_store``)."""

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        with self.lock:
            self.connection.close()  # the last connection to close checkpoints what is left

    def _checkpoint(self) -> None:
        connection = sqlite3.connect(self.path, timeout=30)
        try:
            while not self._stop.wait(CHECKPOINT_S):
                # PASSIVE: copies what no reader still needs, and never blocks a writer. One that
                # fails (a locked or busy file) leaves the journal as it was, for the next one.
                with contextlib.suppress(sqlite3.OperationalError):
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            connection.close()


class StoreSession(SQLiteSession):
    """The SDK's ``SQLiteSession`` (same file, same tables) on the store's one shared connection.

    The SDK opens a connection per session and per worker thread, yet every operation on a file
    holds one process-wide lock: a thousand conversations held thousands of file descriptors (and
    paid a connect each) for no added concurrency. ``SQLiteSession.__init__`` is not called: it
    would open, configure and run the schema on a connection of its own for every conversation,
    and none of its other state is used with the connection overridden. Reading, adding and
    clearing, the operations of every turn, run inline (see the module docstring); the rest are
    the SDK's.
    """

    def __init__(self, session_id: str, store: Store) -> None:
        self.session_id = session_id
        self.session_settings = SessionSettings()
        self.db_path = store.path
        self.sessions_table = "agent_sessions"
        self.messages_table = "agent_messages"
        self._lock = store.lock
        self._closed = False
        self._store = store

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The history, oldest first; ``limit``: only the latest that many items (as the SDK's)."""
        limit = resolve_session_limit(limit, self.session_settings)
        select = f"SELECT message_data FROM {self.messages_table} WHERE session_id = ?"
        with self._locked_connection() as conn:
            if limit is None:
                return _decode(conn.execute(f"{select} ORDER BY id ASC", (self.session_id,)).fetchall())
            # Rows that do not decode are skipped, and do not count against the limit.
            window = limit
            while True:
                rows = conn.execute(
                    f"{select} ORDER BY id DESC LIMIT ?", (self.session_id, window)
                ).fetchall()
                items = _decode(rows[::-1])
                if limit <= 0 or len(items) >= limit or len(rows) < window:
                    return items[-limit:] if limit > 0 else items
                window *= 2

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        self._check_not_closed()
        if not items:
            return
        with self._write_connection() as conn:
            # What no encoder takes would make the thread unreadable, and every request to the model.
            self._insert_items(conn, [scrub_json(item) for item in items])
            conn.commit()

    async def clear_session(self) -> None:
        with self._write_connection() as conn:
            conn.execute(f"DELETE FROM {self.messages_table} WHERE session_id = ?", (self.session_id,))
            conn.execute(f"DELETE FROM {self.sessions_table} WHERE session_id = ?", (self.session_id,))
            conn.commit()

    def _get_connection(self) -> sqlite3.Connection:
        self._check_not_closed()
        return self._store.connection

    def _invalidate_connection(self, conn: sqlite3.Connection) -> None:
        pass  # the SDK would close it after a failed rollback; shared, it must stay open

    def close(self) -> None:
        self._closed = True  # the connection is the store's, closed with it


def _decode(rows: list[Any]) -> list[TResponseInputItem]:
    """The rows' items; one that is not JSON is skipped, one with lone surrogates repaired (rows
    written before ``add_items`` scrubbed them), so no row can make the whole thread unreadable."""
    items: list[TResponseInputItem] = []
    for (data,) in rows:
        try:
            item = json.loads(data)
            items.append(scrub_json(item) if may_hold_surrogates(data) else item)
        except (json.JSONDecodeError, TypeError, RecursionError):
            continue
    return items

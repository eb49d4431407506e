from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NoReturn

import pytest
from pytest_redis import factories

# Tests must never post traces to OpenAI, whatever the developer's environment says.
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _warm_sdk() -> None:
    """Run one throwaway turn so timing tests measure turns, not the SDK's first-use imports."""
    from agents import Agent

    import rtagent
    from rtagent.testing import ScriptedModel, reply

    asyncio.run(rtagent.run(Agent(name="warm", model=ScriptedModel([reply("ok")])), "hi"))


# -- real engines on loopback, for the stores by URL ---------------------------------------------

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
# pytest-redis runs it with ``--save ""`` and ``--appendonly no``: nothing is written to disk.
_redis_server = factories.redis_proc()


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose engine is not installed, except in CI, where every test must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """A Redis server of its own for the session, as ``redis://127.0.0.1:PORT/0``."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed (apt-get install redis-server)")
    server = request.getfixturevalue("_redis_server")
    return f"redis://{server.host}:{server.port}/0"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own for the session, as ``postgresql://postgres@127.0.0.1:PORT/rtagent``.

    User ``postgres`` is trusted on loopback; any other user needs its password (``scram-sha-256``):
    role ``secret``, password ``right``, is there to be refused a wrong one. As root, the binaries
    (which refuse root) run as user ``postgres``.
    """
    binaries = [POSTGRES_BIN / "initdb", POSTGRES_BIN / "postgres"]
    missing = [str(path) for path in binaries if not path.exists()]
    root = os.geteuid() == 0
    if root and shutil.which("runuser") is None:
        missing.append("runuser")
    if missing:
        unavailable(f"PostgreSQL 15 is not installed: no {', '.join(missing)} (apt-get install postgresql)")
    as_postgres: list[str] = []
    folder = tempfile.mkdtemp(prefix="rtagent-pg-")
    if root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            unavailable("there is no user postgres to run PostgreSQL as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    server: subprocess.Popen[bytes] | None = None
    # A file, not a pipe: a pipe nobody reads would fill up and stall the server.
    with tempfile.TemporaryFile() as log:
        try:
            subprocess.run(
                [*as_postgres, str(binaries[0]), "-N", "-D", folder, "-U", "postgres"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            hba = "local all postgres trust\nhost all postgres 127.0.0.1/32 trust\n"
            hba += "host all all 127.0.0.1/32 scram-sha-256\n"
            Path(folder, "pg_hba.conf").write_text(hba)
            port = free_port()
            command = [str(binaries[1]), "-D", folder, "-k", folder, "-h", "127.0.0.1", "-p", str(port)]
            server = subprocess.Popen([*as_postgres, *command], stdout=subprocess.DEVNULL, stderr=log)
            asyncio.run(_prepare_postgres(port, server, log))
            yield f"postgresql://postgres@127.0.0.1:{port}/rtagent"
        finally:
            if server is not None:
                _stop_postgres(folder, server)
            shutil.rmtree(folder, ignore_errors=True)


async def _prepare_postgres(port: int, server: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """Wait until the server accepts connections, then create database ``rtagent`` and role ``secret``."""
    import asyncpg  # type: ignore[import-untyped]

    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None:
            log.seek(0)
            errors = log.read().decode(errors="replace")
            raise RuntimeError(f"postgres exited with {server.returncode}: {errors[-2000:]}")
        try:
            connection = await asyncpg.connect(
                host="127.0.0.1", port=port, user="postgres", database="postgres"
            )
            break
        except (OSError, asyncpg.CannotConnectNowError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        await connection.execute("CREATE DATABASE rtagent")
        await connection.execute("CREATE ROLE secret LOGIN PASSWORD 'right'")
    finally:
        await connection.close()


def _stop_postgres(folder: str, server: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT) of the postmaster this fixture started, found by its pid file; then
    wait for ``runuser`` (or the postmaster itself) to end."""
    pid_file = Path(folder, "postmaster.pid")
    postmaster = int(pid_file.read_text().split()[0]) if pid_file.exists() else server.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(postmaster, signal.SIGINT)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(postmaster, signal.SIGKILL)
        server.kill()
        server.wait()

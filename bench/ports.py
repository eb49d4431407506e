"""A free loopback port, for the servers the benchmarks start, waiting for one to answer, and a
real redis-server for those that coordinate on it."""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthy(server: subprocess.Popen[bytes], port: int, timeout_s: float = 60.0) -> bool:
    """Wait until ``server`` answers ``GET /healthz`` on ``port``; ``False`` if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return True
        time.sleep(0.1)
    return False


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on a free loopback port, persisting nothing; it and its port."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return process, port
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")

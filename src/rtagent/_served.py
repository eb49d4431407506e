"""Models behind an OpenAI-compatible server, reached through one pooled client per server and
event loop: what ``_models`` resolves a spec to, and what ``_adapter`` builds on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from agents import Agent, RunContextWrapper
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
from agents.model_settings import ModelSettings
from agents.models.interface import Model, ModelTracing
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from agents.models.openai_responses import OpenAIResponsesModel
from agents.tool import Tool
from openai import AsyncOpenAI, Timeout
from openai.types.responses.response_prompt_param import ResponsePromptParam

from ._errors import ModelError

if TYPE_CHECKING:
    from ._local import LocalServer

# Connection problems must surface as one line within seconds, not after the openai client's
# default minute-long timeouts and retries.
_TIMEOUT = Timeout(120.0, connect=3.0)

_ClientKey: TypeAlias = tuple[str | None, str | None, frozenset[tuple[str, str]]]
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_ClientKey, AsyncOpenAI]]
_clients = weakref.WeakKeyDictionary()


def pooled_client(
    base_url: str | None, api_key: str | None, headers: dict[str, str] | None = None
) -> AsyncOpenAI:
    """One client (one connection pool) per server and key, per event loop.

    Connections belong to the loop that opened them, so ``run_sync`` (a new loop per call) gets its
    own pool instead of reusing sockets from a closed loop.
    """
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    key = (base_url, api_key, frozenset((headers or {}).items()))
    client = per_loop.get(key)
    if client is None:
        client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, default_headers=headers, timeout=_TIMEOUT, max_retries=0
        )
        per_loop[key] = client
    return client


class ServedModel(Model):
    """A model behind an OpenAI-compatible API, with default settings the agent may override."""

    def __init__(
        self,
        label: str,
        name: str | None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api: Literal["chat", "responses"] = "chat",
        settings: ModelSettings | None = None,
        server: LocalServer | None = None,
    ) -> None:
        self.label = label
        self._name = name
        self._base_url = base_url
        self._api_key = api_key
        self._api = api
        self._settings = settings or ModelSettings()
        self._server = server

    def __str__(self) -> str:
        return self.label

    async def warm(self, agent: Agent[Any] | None = None) -> None:
        """Start what the first request would otherwise wait for: the in-process server, and the
        prompt every request of ``agent`` starts with, read into its cache and kept there."""
        if self._server is None:
            return
        await self._server.start()
        fixed = await self._fixed_prompt(agent) if agent is not None else None
        if fixed is not None:
            await self._server.read_ahead(self._name or "local", *fixed)

    async def _fixed_prompt(self, agent: Agent[Any]) -> tuple[list[dict[str, str]], list[str]] | None:
        """The messages every request for ``agent`` starts with, and their key for ``_pinned``."""
        instructions = await instructions_of(agent)
        if not instructions or agent.tools or agent.handoffs:
            return None  # nothing fixed, or tools the template renders into the prompt
        return [{"role": "system", "content": instructions}], list(_prompt_of(instructions, []))

    async def _target(self) -> Model:
        base_url, api_key, headers = self._base_url, self._api_key, None
        if self._server is not None:
            from ._local import CLIENT_HEADERS

            await self._server.start()
            base_url, api_key, headers = self._server.base_url, self._server.api_key, CLIENT_HEADERS
        client = pooled_client(base_url, api_key, headers)
        if self._name is None:
            models = [model.id async for model in client.models.list()]
            if not models:
                raise ModelError(f"the server at {base_url} lists no models; name one as URL#MODEL")
            self._name = models[0]
        if self._api == "responses":
            return OpenAIResponsesModel(model=self._name, openai_client=client)
        return OpenAIChatCompletionsModel(model=self._name, openai_client=client)

    @contextlib.asynccontextmanager
    async def _pinned(self, settings: ModelSettings, prompt: Iterable[str]) -> AsyncIterator[ModelSettings]:
        """``settings`` naming the embedded server's slot for ``prompt`` (see ``_slots.Slots``).

        ``prompt`` is only read for an embedded server: pass a generator, so a remote model's
        requests pay nothing for it.
        """
        if self._server is None:
            yield settings
            return
        async with self._server.slot_for(prompt) as slot:
            if slot is None:
                yield settings
                return
            yield dataclasses.replace(settings, extra_body={**body_fields(settings), "id_slot": slot})

    def _cache_keyed(
        self, settings: ModelSettings, instructions: str | None, tools: list[Tool]
    ) -> ModelSettings:
        """For OpenAI's Responses API, ``settings`` with a ``prompt_cache_key`` unless they have one.

        OpenAI routes requests with the same key to the same cache, and what every request of an
        agent shares is its prefix: the instructions and the tools. So the key is a digest of those,
        the same for every conversation, process and replica of the agent. (OpenAI-compatible
        servers cache by prefix alone; the SDK builds that prefix identically every turn.)
        """
        if (
            self._api != "responses"
            or PROMPT_CACHE_KEY in body_fields(settings)
            or (isinstance(settings.extra_args, Mapping) and PROMPT_CACHE_KEY in settings.extra_args)
        ):
            return settings
        return dataclasses.replace(
            settings,
            extra_args={
                **(settings.extra_args or {}),
                PROMPT_CACHE_KEY: prompt_cache_key(instructions, tools),
            },
        )

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        target = await self._target()
        settings = self._cache_keyed(self._settings.resolve(model_settings), system_instructions, tools)
        async with self._pinned(settings, _prompt_of(system_instructions, input)) as settings:
            return await target.get_response(
                system_instructions,
                input,
                settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        target = await self._target()
        settings = self._cache_keyed(self._settings.resolve(model_settings), system_instructions, tools)
        async with self._pinned(settings, _prompt_of(system_instructions, input)) as settings:
            stream = target.stream_response(
                system_instructions,
                input,
                settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )
            try:
                async for event in stream:
                    yield event
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()


PROMPT_CACHE_KEY = "prompt_cache_key"


def prompt_cache_key(instructions: str | None, tools: Iterable[Tool]) -> str:
    """A stable key for the fixed prefix of an agent's requests: its instructions and tools."""
    schemas = [
        [tool.name, getattr(tool, "description", ""), getattr(tool, "params_json_schema", None)]
        for tool in tools
    ]
    fixed = json.dumps([instructions or "", schemas], sort_keys=True, separators=(",", ":"), default=str)
    return "rtagent-" + hashlib.sha256(fixed.encode()).hexdigest()[:32]


async def instructions_of(agent: Agent[Any]) -> str | None:
    """The agent's system prompt as a run would start it, or None if it needs a run's context."""
    try:
        return await agent.get_system_prompt(RunContextWrapper(None))
    except Exception:  # instructions that read the run's context: nothing to read ahead
        return None


def body_fields(settings: ModelSettings) -> dict[str, Any]:
    """A copy of the settings' extra request-body fields (``extra_body`` may be unset or any mapping)."""
    return dict(settings.extra_body) if isinstance(settings.extra_body, Mapping) else {}


def _prompt_of(instructions: str | None, input: str | list[TResponseInputItem]) -> Iterator[str]:
    yield instructions or ""
    for item in [input] if isinstance(input, str) else input:
        yield json.dumps(item, sort_keys=True, default=str)

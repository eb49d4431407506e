"""The model as a turn sees it: every raw event reported the moment it arrives, and transient
failures before the first event retried out of the user's sight."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Protocol

import openai
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
from agents.model_settings import ModelSettings
from agents.models.interface import Model, ModelTracing
from agents.retry import ModelRetryAdvice, ModelRetryAdviceRequest
from agents.tool import Tool
from openai.types.responses import ResponseFunctionCallArgumentsDeltaEvent, ResponseTextDeltaEvent
from openai.types.responses.response_prompt_param import ResponsePromptParam

from ._errors import RTAgentError


class ModelSink(Protocol):
    """What the tap reports to (the turn)."""

    def _on_model_call(self, tools: list[Tool], handoffs: list[Handoff]) -> None: ...
    def _on_model_event(self, event: TResponseStreamEvent) -> None: ...


# A model that fails before its first event is retried with exponential backoff, within a budget
# that keeps "the server is down" under five seconds.
MODEL_RETRIES = 3
RETRY_BACKOFF_S = 0.25
RETRY_BUDGET_S = 2.5


_DELTAS = (ResponseTextDeltaEvent, ResponseFunctionCallArgumentsDeltaEvent)


def _transient(error: Exception) -> bool:
    """Worth another try: not a request the server will refuse again, nor a configuration error."""
    permanent = (
        openai.BadRequestError,
        openai.AuthenticationError,
        openai.PermissionDeniedError,
        openai.NotFoundError,
        openai.UnprocessableEntityError,
        RTAgentError,
    )
    return not isinstance(error, permanent)


class Tap(Model):
    """Passes a model through, showing the turn each raw event before the SDK sees it."""

    def __init__(self, inner: Model, turn: ModelSink) -> None:
        self._inner = inner
        self._turn = turn

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
        return await self._inner.get_response(
            system_instructions,
            input,
            model_settings,
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
        turn = self._turn
        turn._on_model_call(tools, handoffs)
        first_attempt = time.monotonic()
        for attempt in itertools.count():
            stream = self._inner.stream_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )
            started = False
            try:
                async for event in stream:
                    started = True
                    turn._on_model_event(event)
                    # The SDK builds its items from the completed response, so deltas, which rtagent
                    # has already delivered, would only cost it work per token: they stop here.
                    if not isinstance(event, _DELTAS):
                        yield event
                return
            except Exception as exc:
                # Nothing reached the user yet, so a transient failure can be retried unseen.
                waited = time.monotonic() - first_attempt
                if started or attempt >= MODEL_RETRIES or not _transient(exc) or waited > RETRY_BUDGET_S:
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
            finally:
                # Closing the inner stream closes its HTTP response, which is what makes a model
                # server stop generating when the turn is interrupted.
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()

    def get_retry_advice(self, request: ModelRetryAdviceRequest) -> ModelRetryAdvice | None:
        return self._inner.get_retry_advice(request)

    async def close(self) -> None:
        await self._inner.close()

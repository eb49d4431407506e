"""Tool calls for embedded models whose chat template has no tool support (SmolLM2 first).

``AdaptedModel`` is the local ``ServedModel`` plus a tool format of its own (``_toolprompt``),
invisible to the agent's author: the same tools, the same SDK run, the same events. Per reply:

1. One streamed request with the first token's probabilities and no grammar: a grammar costs
   llama.cpp its compilation and a token mask per token (about 6 ms of SmolLM2's 95 ms to the
   first token, measured), and the only thing it would forbid here is what step 2 redoes anyway.
   If the first token is text (not white space) and P(reply starts with ``{``) is under the
   threshold, that same stream is the reply: text deltas go out token by token, no second
   request, no added delay.
2. Otherwise that stream is dropped before anything was shown, and the reply is asked for again
   (the prompt is cached, so this costs about one token) with only the branch decided on. A call
   is always asked for without the repetition penalty: llama.cpp counts prompt tokens in it, and
   it pushed arguments away from the user's own words (order ids came out as random letters).
3. Each call is read until its arguments close (not waiting for the model's last tokens) and
   checked: a call whose argument is a copy of the worked example's, not something the user
   said, is how this model answers what no tool does ("what are your opening hours?" ->
   ``get_order_status("X-7731")``) or picks the wrong tool; the other tools are tried, then text.
   A call that stands goes out at once as ``output_item.added``, its argument deltas and
   ``output_item.done``: rtagent announces a call when its arguments are complete anyway.
   ``response.completed``, where the SDK runs the calls, follows as soon as no call can follow.

Several calls per reply (one per line, at most ``MAX_CALLS``) only when the settings ask for them
with ``parallel_tool_calls=True``. Given the choice, the 135M model goes on after almost every
call, mostly repeating it: on single-request messages that held ``response.completed`` (where
the SDK runs the calls) back by about 0.4 s for nothing, so one call stays the default, which
completes the moment its arguments close. A later call that repeats an earlier one or copies the
example ends the reply with the calls before it; only the first is worth the fallback to other
tools. The worked examples stay single calls: a longer cached prefix is what plain replies pay
for in time to first token. After a tool result the reply is text only, so a call can never
loop. Text stops at the cap (``max_tokens``) and as soon as it repeats itself (``LoopGuard``).

Requests without tools go straight to ``ServedModel``, and so do models whose template has
native tool support (llama.cpp parses their calls itself).
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, cast

import httpx
from agents import Agent
from agents.agent_output import AgentOutputSchemaBase
from agents.exceptions import ModelBehaviorError
from agents.handoffs import Handoff
from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
from agents.model_settings import ModelSettings
from agents.models.interface import ModelTracing
from agents.tool import Tool
from agents.usage import Usage
from openai import AsyncOpenAI, Omit, omit
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.responses import ResponseCompletedEvent
from openai.types.responses.response_prompt_param import ResponsePromptParam

from ._local import CLIENT_HEADERS
from ._replyevents import ReplyEvents
from ._replystream import Call, Chunks, call_events, content, first_content, read_calls, relay_text
from ._served import ServedModel, body_fields, instructions_of, pooled_client
from ._toolprompt import (
    CALL_START,
    MAX_CALLS,
    ToolSpec,
    call_grammar,
    copies_example,
    ends_with_tool_result,
    history,
    prefix,
    text_grammar,
    tool_specs,
)

# Decide "call" when the first token's raw probability of starting one reaches this.
CALL_THRESHOLD = 0.5
# Alternatives reported for the first token; each 10 cost about 1 ms on a 2-core machine.
TOP_LOGPROBS = 10
# The cap when the settings name none: a 135M model rambles without one.
DEFAULT_MAX_TOKENS = 384


@dataclass(frozen=True, slots=True)
class Template:
    """What the served model's chat template can do, read once from the server."""

    native_tools: bool
    end_token: int


class AdaptedModel(ServedModel):
    """A local model that is taught tool calls when its chat template cannot make them."""

    _template: Template | None = None

    def stream_response(
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
        def plain() -> AsyncIterator[TResponseStreamEvent]:
            return super(AdaptedModel, self).stream_response(
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

        specs = _adaptable(tools, handoffs, output_schema)
        if not specs:
            return plain()  # no tools: not even a wrapper around the plain stream
        settings = self._settings.resolve(model_settings)
        return self._adapted(plain, system_instructions, input, settings, specs)

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
        """The streamed reply, collected: the decision needs the first token's probabilities."""
        if not _adaptable(tools, handoffs, output_schema):
            return await super().get_response(
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
        stream = self.stream_response(
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
        async for event in _closing(stream):
            if isinstance(event, ResponseCompletedEvent):
                usage = event.response.usage
                tokens = (usage.input_tokens, usage.output_tokens) if usage else (0, 0)
                return ModelResponse(
                    output=event.response.output,
                    usage=Usage(
                        requests=1, input_tokens=tokens[0], output_tokens=tokens[1], total_tokens=sum(tokens)
                    ),
                    response_id=None,
                )
        raise ModelBehaviorError("the local model's stream ended without a response")

    async def _fixed_prompt(self, agent: Agent[Any]) -> tuple[list[dict[str, str]], list[str]] | None:
        """The tool prompt and worked examples: some 150-200 tokens every request of the agent starts
        with, which SmolLM2 reads in over a second on one core; the plain prompt otherwise."""
        specs = tool_specs(agent.tools, []) if not agent.handoffs else []
        if not specs or (await self.template()).native_tools:
            return await super()._fixed_prompt(agent)
        instructions = await instructions_of(agent)
        if instructions is None:
            return None
        messages = prefix(instructions, specs)
        return messages, list(_prompt_key(messages))

    async def template(self) -> Template:
        if self._template is None:
            root, key = await self._address()
            self._template = await _read_template(root, key)
        return self._template

    async def _address(self) -> tuple[str, str]:
        if self._server is None:
            raise RuntimeError("AdaptedModel serves only in-process models")
        await self._server.start()
        return self._server.address, self._server.api_key

    async def _adapted(
        self,
        plain: Callable[[], AsyncIterator[TResponseStreamEvent]],
        instructions: str | None,
        input: str | list[TResponseInputItem],
        settings: ModelSettings,
        specs: list[ToolSpec],
    ) -> AsyncIterator[TResponseStreamEvent]:
        template = await self.template()
        if template.native_tools:
            async for event in _closing(plain()):
                yield event
            return
        past = history(input)
        messages = [*prefix(instructions, specs), *past]
        # Every request of the reply has this prompt, so they all go to the slot that caches it.
        async with self._pinned(settings, _prompt_key(messages)) as settings:
            async for event in self._reply(template, settings, specs, input, past, messages):
                yield event

    async def _reply(
        self,
        template: Template,
        settings: ModelSettings,
        specs: list[ToolSpec],
        input: str | list[TResponseInputItem],
        past: list[dict[str, str]],
        messages: list[dict[str, str]],
    ) -> AsyncIterator[TResponseStreamEvent]:
        may_call, may_text, callable_specs = _choices(settings.tool_choice, specs, input)
        most = MAX_CALLS if settings.parallel_tool_calls else 1
        reply = ReplyEvents(self._name or "local", parallel_tool_calls=most > 1)

        async def request(tools: Sequence[ToolSpec], *, call: bool, text: bool) -> Chunks:
            root, key = await self._address()
            client = pooled_client(f"{root}/v1", key)
            # The deciding request (both branches open) goes without a grammar: see the docstring.
            rules = None
            if not (call and text):
                rules = call_grammar(tools, most) if call else text_grammar(template.end_token)
            name = self._name or "local"
            return await _open(client, name, messages, settings, rules, decide=call and text, penalty=text)

        if may_call and may_text:
            stream = await request(callable_specs, call=True, text=True)
            first = await first_content(stream)
            sampled = content(first) if first is not None else ""
            sampled_call = sampled.lstrip().startswith(CALL_START)
            decided_call = first is not None and _p_call(first, sampled_call) >= CALL_THRESHOLD
            # A reply starting with white space is asked for again under the text grammar: the
            # call it may lead into is not in the first token's alternatives.
            if first is not None and sampled[:1].strip() and not sampled_call and not decided_call:
                async for event in relay_text(reply, stream, first):
                    yield event
                return
            # Nothing has been shown yet: drop this stream and ask for the branch decided on.
            await stream.close()
            may_call = decided_call
        conversation = "\n".join(message["content"] for message in past)
        candidates = callable_specs if may_call else []
        made: set[tuple[str, str]] = set()

        def doubtful(call: Call) -> bool:
            # A call copying the example's values is one the model had no grounds for: the first
            # falls back to the other tools, then text (unless tool_choice leaves no text), and a
            # later one ends the reply with the calls before it.
            if not made and not may_text:
                return False
            return copies_example(by_name[call.name], call.arguments, conversation)

        while candidates:
            by_name = {spec.name: spec for spec in candidates}
            stream = await request(candidates, call=True, text=False)
            async with aclosing(read_calls(stream, most, doubtful)) as found:
                call = await anext(found)
                if not call.doubtful:
                    for event in [*reply.start(), *call_events(reply, call)]:
                        yield event
                    made.add((call.name, call.arguments))
                    async for later in found:
                        if later.doubtful or (later.name, later.arguments) in made:
                            break
                        for event in call_events(reply, later):
                            yield event
                        made.add((later.name, later.arguments))
            if made:
                yield reply.completed()  # once the stream is closed: a rejected call stops generating
                return
            candidates = [other for other in candidates if other.name != call.name]
        async for event in relay_text(reply, await request(callable_specs, call=False, text=True), None):
            yield event


def _prompt_key(messages: Sequence[Mapping[str, str]]) -> Iterator[str]:
    return (f"{message['role']}: {message['content']}" for message in messages)


def _adaptable(
    tools: Sequence[Tool], handoffs: Sequence[Handoff[Any, Any]], output_schema: AgentOutputSchemaBase | None
) -> list[ToolSpec]:
    """The tools to teach, or none when the plain path serves the request as well."""
    # A structured output type needs the plain path's response_format, which the grammar replaces.
    if output_schema is not None and not output_schema.is_plain_text():
        return []
    return tool_specs(tools, handoffs)


async def _open(
    client: AsyncOpenAI,
    model: str,
    messages: list[dict[str, str]],
    settings: ModelSettings,
    rules: str | None,
    *,
    decide: bool,
    penalty: bool,
) -> Chunks:
    """One streamed request, under the grammar ``rules`` if any, with or without the repetition penalties."""
    extra = body_fields(settings)
    if rules is not None:
        extra["grammar"] = rules
    if not penalty:
        extra["repeat_penalty"] = 1.0  # see the module docstring: it spoils copied arguments
    return await client.chat.completions.create(
        model=model,
        messages=cast("list[ChatCompletionMessageParam]", messages),  # roles as the template takes them
        stream=True,
        max_tokens=settings.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=_given(settings.temperature),
        top_p=_given(settings.top_p),
        frequency_penalty=_given(settings.frequency_penalty if penalty else None),
        presence_penalty=_given(settings.presence_penalty if penalty else None),
        logprobs=True if decide else omit,
        top_logprobs=TOP_LOGPROBS if decide else omit,
        stream_options={"include_usage": True},
        extra_body=extra,
        extra_headers=CLIENT_HEADERS,
    )


def _given(value: float | None) -> float | Omit:
    return omit if value is None else value


def _choices(
    tool_choice: Any, specs: list[ToolSpec], input: str | list[TResponseInputItem]
) -> tuple[bool, bool, list[ToolSpec]]:
    """May this reply call, may it be text, and which tools may it call."""
    if ends_with_tool_result(input) or tool_choice == "none":
        return False, True, specs
    if tool_choice == "required":
        return True, False, specs
    named = [spec for spec in specs if spec.name == tool_choice]
    if named:
        return True, False, named
    return True, True, specs


def _p_call(chunk: ChatCompletionChunk, sampled_call: bool) -> float:
    """P(the reply starts a call) from the first token's raw (pre-grammar) probabilities."""
    logprobs = chunk.choices[0].logprobs
    if logprobs is None or not logprobs.content:
        return 1.0 if sampled_call else 0.0  # a server without logprobs: trust the sample
    tops = logprobs.content[0].top_logprobs
    return sum(math.exp(top.logprob) for top in tops if top.token.lstrip().startswith(CALL_START))


async def _closing(stream: AsyncIterator[TResponseStreamEvent]) -> AsyncIterator[TResponseStreamEvent]:
    """Forward a stream and close it however this generator ends (the HTTP response goes with it)."""
    try:
        async for event in stream:
            yield event
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _read_template(root: str, key: str) -> Template:
    """Native tool support and the end-of-turn token id, from llama.cpp's ``/props``."""
    headers = {"Authorization": f"Bearer {key}", **CLIENT_HEADERS}
    async with httpx.AsyncClient(base_url=root, headers=headers, timeout=10.0) as http:
        props = (await http.get("/props")).raise_for_status().json()
        end = {"content": props["eos_token"], "parse_special": True}
        tokens = (await http.post("/tokenize", json=end)).raise_for_status().json()["tokens"]
    # llama.cpp reports the template's capabilities as a Python-style dict inside a string.
    caps = str(props.get("chat_template_caps", ""))
    native = re.search(r"supports_tools\W+true", caps, re.IGNORECASE) is not None
    return Template(native_tools=native, end_token=int(tokens[0]))

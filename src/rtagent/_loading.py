"""Finding the user's agent from a reference: ``path/to/file.py:name`` or ``package.module:name``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from agents import Agent

from ._errors import AgentLoadError

DEFAULT_AGENT = "rtagent.demo:agent"


def load_agent(reference: str | None = None) -> Agent[Any]:
    """Load an ``Agent`` by reference; the name after ``:`` defaults to ``agent``."""
    reference = reference or DEFAULT_AGENT
    location, _, name = reference.rpartition(":") if ":" in reference else (reference, "", "agent")
    name = name or "agent"
    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _load_file(Path(location))
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise AgentLoadError(f"cannot import module {location!r}: {exc}") from exc
    if not hasattr(module, name):
        raise AgentLoadError(f"{location} has no attribute {name!r}")
    agent = getattr(module, name)
    if not isinstance(agent, Agent):
        raise AgentLoadError(f"{location}:{name} is a {type(agent).__name__}, not an agents.Agent")
    return agent


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise AgentLoadError(f"no such file: {path}")
    module_name = f"rtagent_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise AgentLoadError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so dataclasses and pickling inside the user's file can find it.
    sys.modules[module_name] = module
    # The user's own files may reasonably import siblings.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise AgentLoadError(f"{path} failed to load: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module

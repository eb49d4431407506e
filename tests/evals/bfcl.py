"""The development set of issue #22: BFCL v4's non-live categories, read from the ``bfcl-eval`` wheel.

The wheel is downloaded from PyPI (``pip download --no-deps``) into a cache folder the first time and
read as a zip: neither the data nor the package is part of rtagent. Only the categories below are
ever read. The ``live_*`` and multi-turn categories are held out (they judge the work), and
``load`` refuses them.

A case is one request with the functions it may call, their parameter schemas converted from BFCL's
own type names (``dict``, ``float``, ``tuple``, ``any``) to JSON Schema so that they become SDK
``FunctionTool``s, and, but for ``irrelevance``, BFCL's possible answers: per call, each argument's
acceptable values (``""`` in a list means the argument may be left out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents import FunctionTool

VERSION = "2026.3.23"
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
CACHE = Path(os.environ.get("RTAGENT_BFCL_CACHE", Path.home() / ".cache" / "rtagent" / "bfcl"))

# BFCL's type names that are not JSON Schema's.
TYPES = {"dict": "object", "float": "number", "tuple": "array"}


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    answers: list[dict[str, dict[str, list[Any]]]]
    """Per expected call: the function's name -> each argument's acceptable values (none: irrelevant)."""


def json_schema(schema: Any) -> Any:
    """A BFCL parameter schema as JSON Schema: its type names mapped, ``any`` left untyped."""
    if isinstance(schema, list):
        return [json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            if value != "any":
                out["type"] = TYPES.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf"):
            out[key] = json_schema(value)
        else:
            out[key] = value
    return out


def function_tool(function: dict[str, Any]) -> FunctionTool:
    """A BFCL function as an SDK tool the model may call; the evaluation never runs it."""

    async def never(_context: Any, _arguments: str) -> str:
        raise RuntimeError("an evaluation scores calls; it does not run them")

    parameters = json_schema(function.get("parameters") or {"type": "dict", "properties": {}})
    return FunctionTool(
        name=function["name"].replace(".", "_"),  # BFCL names like math.factorial; the API takes no dot
        description=function.get("description", ""),
        params_json_schema=parameters,
        on_invoke_tool=never,
        strict_json_schema=False,
    )


def wheel(cache: Path = CACHE) -> Path:
    """The ``bfcl-eval`` wheel, downloaded once into ``cache``."""
    found = sorted(cache.glob(f"bfcl_eval-{VERSION}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    # The project's own venv has no pip (uv made it); the one scripts/setup makes for uv has.
    tools = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "python"
    python = str(tools) if tools.exists() else sys.executable
    command = [python, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache)]
    subprocess.run([*command, f"bfcl-eval=={VERSION}"], check=True, timeout=300)
    return sorted(cache.glob(f"bfcl_eval-{VERSION}-*.whl"))[0]


def load(category: str, source: Path | None = None) -> list[Case]:
    """The cases of one development category."""
    if category not in CATEGORIES:
        raise ValueError(f"{category!r} is not a development category (held out, or unknown): {CATEGORIES}")
    with zipfile.ZipFile(source or wheel()) as archive:
        questions = _lines(archive, f"bfcl_eval/data/BFCL_v4_{category}.json")
        answers = {}
        if category != "irrelevance":
            truth = _lines(archive, f"bfcl_eval/data/possible_answer/BFCL_v4_{category}.json")
            answers = {row["id"]: row["ground_truth"] for row in truth}
    return [
        Case(
            id=row["id"],
            category=category,
            messages=row["question"][0],  # the non-live categories are single-turn
            functions=row["function"],
            answers=answers.get(row["id"], []),
        )
        for row in questions
    ]


def _lines(archive: zipfile.ZipFile, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in archive.read(name).decode().splitlines() if line.strip()]

"""The BFCL development-set reader (``tests/evals/bfcl.py``), on a wheel-shaped zip made here."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "evals"))

import bfcl

FUNCTION = {
    "name": "math.hypot",
    "description": "Length of a vector.",
    "parameters": {
        "type": "dict",
        "properties": {
            "point": {"type": "tuple", "items": {"type": "float"}, "description": "The coordinates."},
            "options": {"type": "dict", "properties": {"round": {"type": "integer"}}},
            "tag": {"type": "any"},
        },
        "required": ["point"],
    },
}


def test_bfcl_types_become_json_schema() -> None:
    assert bfcl.json_schema(FUNCTION["parameters"]) == {
        "type": "object",
        "properties": {
            "point": {"type": "array", "items": {"type": "number"}, "description": "The coordinates."},
            "options": {"type": "object", "properties": {"round": {"type": "integer"}}},
            "tag": {},
        },
        "required": ["point"],
    }


def test_a_function_becomes_a_tool_with_an_api_safe_name() -> None:
    tool = bfcl.function_tool(FUNCTION)
    assert tool.name == "math_hypot"
    assert tool.params_json_schema["properties"]["point"]["type"] == "array"


def test_cases_join_their_possible_answers(tmp_path: Path) -> None:
    question = {"id": "simple_python_0", "question": [[{"role": "user", "content": "hypot of 3, 4"}]]}
    truth = {"id": "simple_python_0", "ground_truth": [{"math.hypot": {"point": [[3.0, 4.0]]}}]}
    wheel = tmp_path / "bfcl_eval-test.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(
            "bfcl_eval/data/BFCL_v4_simple_python.json", json.dumps({**question, "function": [FUNCTION]})
        )
        archive.writestr("bfcl_eval/data/possible_answer/BFCL_v4_simple_python.json", json.dumps(truth))
    [case] = bfcl.load("simple_python", wheel)
    assert case.messages == [{"role": "user", "content": "hypot of 3, 4"}]
    assert case.answers == truth["ground_truth"]


@pytest.mark.parametrize("category", ["live_simple", "live_irrelevance", "multi_turn_base", "memory"])
def test_held_out_and_other_categories_are_refused(category: str) -> None:
    with pytest.raises(ValueError, match="not a development category"):
        bfcl.load(category, Path("never-read.whl"))

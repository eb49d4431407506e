"""Lone UTF-16 surrogates: code points U+D800-U+DFFF, which JSON can carry (``"\\ud800"``) and
Python can hold in a ``str``, but which are not text and cannot be encoded as UTF-8.

One of them in a conversation made every later encoding of it fail: the history endpoint, the
page's reload, the next request to the model. Text from the model and from tools is the agent's
own output, so it is repaired (each one becomes U+FFFD, as a decoder does with bytes that are not
UTF-8); what a client sends is refused instead (``server._limits.parse_json``), since the server would
otherwise store words the person did not write.
"""

from __future__ import annotations

import re
from typing import Any

_LONE = re.compile("[\ud800-\udfff]")
# What a JSON text holds where one may be: a ``\u`` escape of a code point in that range.
_ESCAPED = re.compile(r"\\u[dD][89a-fA-F]")
REPLACEMENT = "\ufffd"


def scrub(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD."""
    return _LONE.sub(REPLACEMENT, text) if _LONE.search(text) else text


def scrub_json(value: Any) -> Any:
    """A decoded JSON value (or an SDK item) with every string in it, keys too, scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(key) if isinstance(key, str) else key: scrub_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_json(item) for item in value]
    return value


def may_hold_surrogates(text: str) -> bool:
    """Whether a JSON text may decode to lone surrogates (a quick check before a closer look)."""
    return _ESCAPED.search(text) is not None or _LONE.search(text) is not None

"""rtagent's exceptions, and the one-line wording a person sees for any failure."""

from __future__ import annotations

import openai
from agents.exceptions import MaxTurnsExceeded


class RTAgentError(Exception):
    """A problem the user can fix (a bad model spec, a missing key or file); its text is one line."""


class ModelError(RTAgentError):
    """The model spec cannot be used: unknown form, missing key, missing file."""


class ApprovalError(RTAgentError):
    """An answer to an approval that nothing waits for: an unknown call, or one already answered."""


class GuardrailTripwire(RTAgentError):
    """A guardrail's tripwire fired: the turn stopped there (``TurnFailed.guardrail`` names it)."""

    def __init__(self, kind: str, guardrail: str, info: object) -> None:
        # A guardrail that explains itself in words (its ``output_info``) is quoted.
        reason = f": {info}" if isinstance(info, str) and info.strip() else ""
        super().__init__(f"the {kind} guardrail {guardrail} stopped the turn{reason}")
        self.guardrail = guardrail


class AgentLoadError(RTAgentError):
    """An agent reference (``file.py:name`` or ``package.module:name``) cannot be loaded."""


def describe(error: BaseException) -> str:
    """A single line saying what went wrong, in the user's terms rather than a traceback's."""
    match error:
        case RTAgentError():
            text = str(error)
        case openai.APITimeoutError():
            text = f"the model server at {_address(error)} did not answer in time"
        case openai.APIConnectionError():
            text = f"cannot reach the model server at {_address(error)}"
        case openai.AuthenticationError():
            text = "the model server refused the API key (check OPENAI_API_KEY or the key in the model spec)"
        case openai.APIStatusError():
            text = f"the model server answered {error.status_code}: {error.message}"
        case MaxTurnsExceeded():
            text = f"the agent gave no final answer within its turn limit ({error.message})"
        case _:
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return " ".join(text.split())


def _address(error: openai.APIConnectionError) -> str:
    url = error.request.url
    return f"{url.host}:{url.port}" if url.port else str(url.host)

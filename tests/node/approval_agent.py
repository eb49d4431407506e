"""The agent the Node approval test talks to: a scripted model and a tool that needs approval.

First turn: a refund call that waits for approval, then the answer. Second: a call to the
client's own tool (``confirm_address``, sent in ``RunAgentInput.tools``), then the answer.
"""

from __future__ import annotations

from agents import Agent, function_tool

from rtagent.testing import ScriptedModel, call, reply, tool_calls


@function_tool(needs_approval=True)
async def refund(order: str) -> str:
    """Refund an order."""
    return f"Order {order} refunded."


model = ScriptedModel(
    [
        tool_calls(call("refund", {"order": "42"}), text="I can do that. "),
        reply("Your refund is done.", delay=0.005),
        tool_calls(call("confirm_address", {"address": "1 Main St"})),
        reply("It ships to 1 Main St.", delay=0.005),
    ]
)
agent = Agent(name="node-approvals", tools=[refund], model=model)

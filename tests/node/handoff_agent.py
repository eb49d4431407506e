"""The agents the Node handoff test talks to, each on a scripted model of its own.

First message: triage hands off to billing, which answers and hands back, and triage ends the reply.
Second message: triage's input guardrail trips while its reply streams.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import Agent, GuardrailFunctionOutput, RunContextWrapper, handoff, input_guardrail

from rtagent.testing import ScriptedModel, call, reply, tool_calls


@input_guardrail
async def no_secrets(
    _context: RunContextWrapper[Any], _agent: Agent[Any], message: Any
) -> GuardrailFunctionOutput:
    asking = "secret" in str(message[-1]["content"] if isinstance(message, list) else message)
    await asyncio.sleep(0.2)  # a classifier takes its time: the reply has begun meanwhile
    return GuardrailFunctionOutput(output_info="it asks for a secret", tripwire_triggered=asking)


billing = Agent(
    name="billing",
    model=ScriptedModel(
        [tool_calls(call("back_to_triage", {}, call_id="h2"), text="Billing here: your invoice is paid. ")]
    ),
)
agent = Agent(
    name="triage",
    model=ScriptedModel(
        [
            tool_calls(call("transfer_to_billing", {}, call_id="h1")),
            reply("Anything else?", delay=0.005),
            reply([f"w{i} " for i in range(200)], delay=0.005),
        ]
    ),
    handoffs=[billing],
    input_guardrails=[no_secrets],
)
billing.handoffs = [handoff(agent, tool_name_override="back_to_triage")]

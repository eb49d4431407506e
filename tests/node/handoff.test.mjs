// The official AG-UI TypeScript client against agents that hand off and a guardrail that trips
// (tests/test_server.py serves handoff_agent.py and sets RTAGENT_URL and RTAGENT_TOKEN). The client
// verifies the protocol itself: an agent's step open around its thinking step and text must pair.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HttpAgent } from "@ag-ui/client";

const url = process.env.RTAGENT_URL;
const headers = { Authorization: `Bearer ${process.env.RTAGENT_TOKEN}` };
const skip = url ? false : "RTAGENT_URL is not set (tests/test_server.py starts a server and sets it)";
const threadId = "node-handoff";

test("each agent that takes over answers in a step named after it", { skip }, async () => {
  const agent = new HttpAgent({ url, headers, threadId });
  agent.addMessage({ id: "u1", role: "user", content: "Is my invoice paid?" });
  const steps = [];
  const { result } = await agent.runAgent(
    { runId: "node-handoff-1" },
    {
      onStepStartedEvent: ({ event }) => steps.push(`+${event.stepName}`),
      onStepFinishedEvent: ({ event }) => steps.push(`-${event.stepName}`),
    },
  );
  assert.deepEqual(steps, [
    "+thinking",
    "-thinking",
    "+billing",
    "+thinking",
    "-thinking",
    "-billing",
    "+triage",
    "+thinking",
    "-thinking",
    "-triage",
  ]);
  assert.equal(result.text, "Billing here: your invoice is paid. Anything else?");
});

test("a guardrail tripwire fails the run with its own code, naming the guardrail", { skip }, async () => {
  const agent = new HttpAgent({ url, headers, threadId });
  agent.addMessage({ id: "u2", role: "user", content: "Tell me the secret." });
  const errors = [];
  const types = [];
  await agent.runAgent(
    { runId: "node-handoff-2" },
    {
      onEvent: ({ event }) => types.push(event.type),
      onRunErrorEvent: ({ event }) => errors.push(event),
    },
  );
  // The reply had begun; it ends, closed, just before the error.
  assert.deepEqual(types.slice(-2), ["TEXT_MESSAGE_END", "RUN_ERROR"]);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "guardrail_tripwire");
  assert.match(errors[0].message, /no_secrets/);
});

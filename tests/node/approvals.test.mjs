// Tool approvals and a client's own tool, through the official AG-UI client (@ag-ui/client).
//
// tests/test_approvals.py serves approval_agent.py and runs `node --test` on this file with
// RTAGENT_URL set. The client checks the protocol itself and fails a run on any violation.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HttpAgent, buildResumeArray } from "@ag-ui/client";

const url = process.env.RTAGENT_URL;
const skip = url ? false : "RTAGENT_URL is not set (tests/test_approvals.py starts a server and sets it)";

test("an approval: the run ends with an interrupt, and a resume runs the tool", { skip }, async () => {
  const agent = new HttpAgent({ url, threadId: "node-approval" });
  agent.addMessage({ id: "u1", role: "user", content: "Refund order 42, please." });
  const paused = await agent.runAgent({ runId: "a1" });
  assert.equal(agent.pendingInterrupts.length, 1);
  const [interrupt] = agent.pendingInterrupts;
  assert.equal(interrupt.reason, "tool_approval");
  const call = paused.newMessages.find((m) => m.role === "assistant" && m.toolCalls);
  assert.equal(interrupt.toolCallId, call.toolCalls[0].id);
  assert.equal(call.toolCalls[0].function.name, "refund");

  const resume = buildResumeArray(agent.pendingInterrupts, {
    [interrupt.id]: { status: "resolved", payload: { approved: true } },
  });
  const resumed = await agent.runAgent({ runId: "a2", resume });
  const tool = resumed.newMessages.find((m) => m.role === "tool");
  assert.equal(tool.content, "Order 42 refunded.");
  assert.equal(resumed.result.text, "Your refund is done.");
  assert.equal(agent.pendingInterrupts.length, 0);
});

test("a client tool: the run ends at its call, and its result continues the turn", { skip }, async () => {
  const tools = [
    {
      name: "confirm_address",
      description: "Ask the person to confirm their delivery address.",
      parameters: { type: "object", properties: { address: { type: "string" } }, required: ["address"] },
    },
  ];
  const agent = new HttpAgent({ url, threadId: "node-client-tool" });
  agent.addMessage({ id: "u1", role: "user", content: "Ship my order." });
  const outcomes = [];
  const asked = await agent.runAgent(
    { runId: "c1", tools },
    { onRunFinishedEvent: ({ outcome }) => outcomes.push(outcome) },
  );
  const call = asked.newMessages.find((m) => m.role === "assistant" && m.toolCalls).toolCalls[0];
  assert.equal(call.function.name, "confirm_address");
  assert.equal(JSON.parse(call.function.arguments).address, "1 Main St");
  assert.deepEqual(outcomes, ["success"]);

  agent.addMessage({ id: "t1", role: "tool", toolCallId: call.id, content: "confirmed" });
  const answered = await agent.runAgent({ runId: "c2", tools });
  assert.equal(answered.result.text, "It ships to 1 Main St.");
});

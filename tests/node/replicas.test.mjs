// The official AG-UI TypeScript client (@ag-ui/client's HttpAgent) against two rtagent replicas on
// one Redis and one PostgreSQL (tests/test_bus.py starts them and sets RTAGENT_URL_A and _B). The
// client checks the protocol itself (event order, open/close pairing) and fails on any violation.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HttpAgent } from "@ag-ui/client";

const urlA = process.env.RTAGENT_URL_A;
const urlB = process.env.RTAGENT_URL_B;
const skip = urlA && urlB ? false : "RTAGENT_URL_A/_B are not set (tests/test_bus.py sets them)";

test("a message sent to B interrupts the turn running on A, which then ends cleanly", { skip }, async () => {
  const threadId = "node-replicas";
  const onA = new HttpAgent({ url: `${urlA}/agui`, threadId });
  onA.addMessage({ id: "u1", role: "user", content: "something long please" });
  let streaming;
  const started = new Promise((resolve) => (streaming = resolve));
  const outcomes = [];
  const first = onA.runAgent(
    { runId: "node-a" },
    {
      onTextMessageContentEvent: () => streaming(),
      onRunFinishedEvent: ({ event }) => outcomes.push(event),
    },
  );
  await started;

  const onB = new HttpAgent({ url: `${urlB}/agui`, threadId });
  onB.addMessage({ id: "u2", role: "user", content: "hello again" });
  const second = await onB.runAgent({ runId: "node-b" });
  await first;

  assert.equal(outcomes.length, 1);
  assert.equal(outcomes[0].result.interrupted, true);
  const reply = second.newMessages.find((m) => m.role === "assistant");
  assert.match(reply.content, /^You said: hello again \(message 2\) My last reply was cut off after 'word\d+'\./);
});

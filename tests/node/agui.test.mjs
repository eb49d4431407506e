// The official AG-UI TypeScript client (@ag-ui/client's HttpAgent) against a real rtagent server.
//
// tests/test_server.py starts the server on loopback with the scripted agent in scripted_agent.py and runs
// `node --test` here with RTAGENT_URL and RTAGENT_TOKEN set. The client verifies the protocol itself
// (event order, open/close pairing) and fails the run on any violation, so a passing run is also a
// conformance check.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HttpAgent } from "@ag-ui/client";

const url = process.env.RTAGENT_URL;
const headers = { Authorization: `Bearer ${process.env.RTAGENT_TOKEN}` };
const skip = url ? false : "RTAGENT_URL is not set (tests/test_server.py starts a server and sets it)";
const threadId = "node-thread";

// Consecutive TEXT_MESSAGE_CONTENT events collapse to one: how many deltas a reply takes is not
// part of the contract.
function collapse(types) {
  return types.filter((type, i) => !(type === "TEXT_MESSAGE_CONTENT" && types[i - 1] === type));
}

test("a tool-using turn arrives as the complete AG-UI event sequence", { skip }, async () => {
  const agent = new HttpAgent({ url, headers, threadId });
  agent.addMessage({ id: "u1", role: "user", content: "How big is Paris?" });
  const types = [];
  const results = [];
  const outcomes = [];
  const { result, newMessages } = await agent.runAgent(
    { runId: "node-run-1" },
    {
      onEvent: ({ event }) => {
        types.push(event.type);
      },
      onToolCallResultEvent: ({ event }) => {
        results.push(event);
      },
      onRunFinishedEvent: ({ outcome }) => {
        outcomes.push(outcome);
      },
    },
  );

  assert.deepEqual(collapse(types), [
    "RUN_STARTED",
    "STEP_STARTED",
    "STEP_FINISHED",
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_END",
    "TOOL_CALL_START",
    "TOOL_CALL_ARGS",
    "TOOL_CALL_END",
    "ACTIVITY_SNAPSHOT",
    "ACTIVITY_SNAPSHOT",
    "TOOL_CALL_RESULT",
    "STEP_STARTED",
    "STEP_FINISHED",
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_END",
    "RUN_FINISHED",
  ]);
  assert.deepEqual(outcomes, ["success"]);
  assert.equal(result.text, "Let me check. Paris has 2.1 million people.");
  assert.equal(result.interrupted, false);
  assert.equal(results[0].content, "Paris has 2.1 million people.");
  assert.equal(typeof results[0].metadata.rtagent.durationS, "number");

  // The client assembled the conversation from the events alone.
  const [call, tool, answer] = newMessages.filter((m) => m.role !== "activity");
  assert.equal(call.role, "assistant");
  assert.equal(call.content, "Let me check. ");
  assert.equal(call.toolCalls[0].function.name, "lookup");
  assert.equal(call.toolCalls[0].function.arguments, '{"query":"Paris"}');
  assert.equal(tool.role, "tool");
  assert.equal(tool.toolCallId, call.toolCalls[0].id);
  assert.equal(answer.content, "Paris has 2.1 million people.");
  const activity = newMessages.find((m) => m.role === "activity");
  assert.equal(activity.activityType, "tool_progress");
  assert.equal(activity.content.done, true);
});

test("the server keeps the conversation: a new client on the thread reloads it", { skip }, async () => {
  const agent = new HttpAgent({ url, headers, threadId });
  // Only the last message counts as new: the server owns the history, so none is re-sent.
  agent.addMessage({ id: "u2", role: "user", content: "What did I ask?" });
  const { result } = await agent.runAgent({ runId: "node-run-2" });
  assert.equal(result.text, "You asked about Paris.");

  // No new message: the run answers with MESSAGES_SNAPSHOT, the whole server-side history.
  const fresh = new HttpAgent({ url, headers, threadId });
  const types = [];
  await fresh.runAgent({ runId: "node-run-3" }, { onEvent: ({ event }) => types.push(event.type) });
  assert.deepEqual(types, ["RUN_STARTED", "MESSAGES_SNAPSHOT", "RUN_FINISHED"]);
  assert.deepEqual(
    fresh.messages.map((m) => [m.role, m.content ?? null]),
    [
      ["user", "How big is Paris?"],
      ["assistant", "Let me check. "],
      ["tool", "Paris has 2.1 million people."],
      ["assistant", "Paris has 2.1 million people."],
      ["user", "What did I ask?"],
      ["assistant", "You asked about Paris."],
    ],
  );
});

test("without the token the server refuses the run with 401", { skip }, async () => {
  const agent = new HttpAgent({ url, threadId });
  agent.addMessage({ id: "u3", role: "user", content: "hello" });
  await assert.rejects(agent.runAgent({ runId: "node-run-4" }, { onRunFailed: () => ({}) }), (error) => {
    assert.equal(error.status, 401);
    assert.equal(error.payload.error, "unauthorized");
    return true;
  });
});

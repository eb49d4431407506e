// rtagent's chat page: one conversation over the server's WebSocket, drawn from its AG-UI events.
//
// Everything the model or a tool says is untrusted. It reaches the page only as text nodes (the
// markdown subset below builds its elements itself), and the page's CSP enforces Trusted Types, so
// an HTML-parsing sink would throw rather than parse.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), statusEl = $("status");
const THREAD_KEY = "rtagent.thread", TOKEN_KEY = "rtagent.token";

let thread = localStorage.getItem(THREAD_KEY);
let fresh = !thread; // a conversation nothing was sent in yet: the server has no history of it
thread ||= newThread();
let token = localStorage.getItem(TOKEN_KEY);
let socket = null; // the live socket; events of any other (closed) one are ignored
let ready = false; // the history is drawn and the socket is open: sending is possible
let resuming = false; // asked for the run still streaming, if any, and not sent anything since
let starts = 0; // counts start() calls, so a superseded one gives up
let retries = 0;
let retryTimer = 0;
let pending = 0; // replies asked for and not yet finished
let turn = null; // the element the running reply draws into
const texts = new Map(); // messageId -> {node, text}
const tools = new Map(); // toolCallId -> tool card state
let ticker = 0;

function newThread() {
  // Not crypto.randomUUID: that needs a secure context, and the page may be served over plain http.
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function secs(s) {
  return s < 1 ? `${s.toFixed(2)}s` : `${s.toFixed(1)}s`;
}

// -- drawing ------------------------------------------------------------------------------------

// The markdown subset models use most: ``` fences, `code` and **bold**, as elements built here.
// A fence still open while streaming simply runs to the end of the text.
function renderMarkdown(node, text) {
  const parts = text.split(/^```[^\n]*(?:\n|$)/m);
  node.replaceChildren(
    ...parts.flatMap((part, i) => {
      if (i % 2) return part ? [el("pre", "code", part.replace(/\n$/, ""))] : [];
      // A code block is a block already: the blank lines around it would only add space.
      if (i > 0) part = part.replace(/^\n+/, "");
      if (i < parts.length - 1) part = part.replace(/\n+$/, "");
      return part.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/).map((piece, j) => {
        if (j % 2 === 0) return document.createTextNode(piece);
        return piece[0] === "`" ? el("code", null, piece.slice(1, -1)) : el("strong", null, piece.slice(2, -2));
      });
    }),
  );
}

function append(node, parent = log) {
  $("empty").hidden = true;
  parent.append(node);
  return node;
}

function addUser(text) {
  append(el("div", "msg user", text));
}

function addTurn() {
  return append(el("div", "turn"));
}

function current() {
  turn ??= addTurn();
  return turn;
}

function addText(parent, text) {
  const node = append(el("div", "text"), parent);
  renderMarkdown(node, text);
  return node;
}

function addNotice(text, parent = log) {
  append(el("div", "notice error", text), parent);
}

function addTool(parent, id, name, args) {
  const card = el("details", "tool running");
  const summary = el("summary");
  const tool = {
    card, name, args, started: performance.now(),
    label: el("span", "tool-label", `using ${name}…`),
    meta: el("span", "tool-meta"),
    out: el("span", "tool-out"),
    bar: el("progress"),
  };
  tool.bar.max = 1;
  tool.bar.hidden = true;
  summary.append(el("span", "tool-icon"), tool.label, tool.meta, tool.out, tool.bar);
  card.append(summary);
  tools.set(id, tool);
  append(card, parent);
  tick();
  return tool;
}

function progress(tool, content) {
  // Resync with the server's clock: the card's own start was when the call reached this page.
  tool.started = performance.now() - content.elapsedS * 1000;
  if (content.done) return;
  tool.out.textContent = content.message || "";
  if (content.fraction != null) {
    tool.bar.hidden = false;
    tool.bar.value = content.fraction;
  }
}

// What a card that ended without an output of its own says on its line.
const NOTES = { stopped: "stopped", rejected: "rejected", unrun: "not run" };

// `state` is "done", "failed" (`output` is then the error), "stopped" (the reply was stopped
// first), or for a call that waited for approval, "rejected" (the person said no) or "unrun" (they
// sent a message instead).
function finishTool(tool, state, output, durationS) {
  tool.card.classList.remove("running", "waiting");
  tool.card.classList.add(state);
  tool.bar.remove();
  tool.label.textContent = state === "failed" ? `${tool.name} failed` : tool.name;
  tool.meta.textContent = durationS != null ? secs(durationS) : "";
  tool.out.textContent = NOTES[state] ?? output;
  toolBody(tool, el("div", "tool-head", state === "failed" ? "error" : "result"), el("pre", null, output));
}

// The card's unfolded part: the call's arguments, then `nodes` (this replaces an earlier one).
function toolBody(tool, ...nodes) {
  tool.card.querySelector(".tool-body")?.remove();
  const body = el("div", "tool-body");
  if (tool.args && tool.args !== "{}") {
    body.append(el("div", "tool-head", "arguments"), el("pre", null, pretty(tool.args)));
  }
  body.append(...nodes);
  tool.card.append(body);
}

// A call the run paused on until the person approves or rejects it: its card unfolds on its
// arguments and the two answers. `question` is the server's, for a screen reader.
function askApproval(id, tool, question) {
  if (tool.waiting) return; // asked already, by an earlier pause of the same run
  tool.waiting = true;
  tool.card.classList.replace("running", "waiting");
  tool.label.textContent = tool.name;
  tool.meta.textContent = "";
  tool.out.textContent = "waiting for approval";
  const approve = el("button", "approve", "Approve"), reject = el("button", "reject", "Reject");
  approve.type = reject.type = "button";
  approve.addEventListener("click", () => answer(id, tool, true));
  reject.addEventListener("click", () => answer(id, tool, false));
  const actions = el("div", "tool-actions");
  actions.setAttribute("role", "group");
  actions.setAttribute("aria-label", question);
  actions.append(approve, reject);
  toolBody(tool, actions);
  tool.card.open = true;
}

// One call per answer: the server runs it (or tells the model no) and pauses again for the rest.
function answer(id, tool, approved) {
  if (!ready || !tool.waiting) return;
  resuming = false;
  socket.send(JSON.stringify({ type: "answer", [approved ? "approved" : "rejected"]: [id] }));
  tool.waiting = false;
  for (const button of tool.card.querySelectorAll(".tool-actions button")) button.disabled = true;
  tool.card.open = false;
  if (approved) {
    tool.approved = true; // its run streams its call again: the same card shows it running
    tool.out.textContent = "approved";
    tool.card.querySelector("summary").append(el("span", "badge", "approved"));
  } else {
    finishTool(tool, "rejected", "(not run)", null);
  }
  input.focus(); // the focused button folded away with the card
  setRunning(+1);
}

// A message sent instead of answering closes the waiting calls, unrun.
function closeWaiting() {
  for (const tool of tools.values()) {
    if (!tool.waiting) continue;
    tool.waiting = false;
    tool.card.open = false;
    finishTool(tool, "unrun", "(not run)", null);
  }
}

// The approved call starts in the run that continues the paused one.
function rerun(tool) {
  tool.approved = false;
  tool.args = ""; // its arguments stream again
  tool.started = performance.now();
  tool.card.classList.replace("waiting", "running");
  tool.label.textContent = `using ${tool.name}…`;
  tool.out.textContent = "";
  tick();
}

function pretty(json) {
  try {
    return JSON.stringify(JSON.parse(json), null, 2);
  } catch {
    return json;
  }
}

// One timer ticks every running tool's elapsed seconds, and stops when none runs.
function tick() {
  ticker ||= setInterval(() => {
    const now = performance.now();
    let running = 0;
    for (const tool of tools.values()) {
      if (!tool.card.classList.contains("running")) continue;
      running++;
      tool.meta.textContent = `${((now - tool.started) / 1000).toFixed(1)}s`;
    }
    if (!running) {
      clearInterval(ticker);
      ticker = 0;
    }
  }, 100);
}

// Calls that will never get a result (the reply was stopped, or failed) stop ticking, and an
// approved call its run did not get to is not left looking about to run.
function settleTools() {
  for (const tool of tools.values()) {
    const unfinished = tool.card.classList.contains("running") || tool.approved;
    if (unfinished) finishTool(tool, "stopped", "(no result)", null);
  }
}

function markInterrupted(parent) {
  append(el("span", "badge interrupted", "interrupted"), parent);
}

function setRunning(delta) {
  pending = delta === null ? 0 : Math.max(0, pending + delta);
  document.body.classList.toggle("running", pending > 0);
}

function clear() {
  log.replaceChildren($("empty"));
  $("empty").hidden = false;
  texts.clear();
  tools.clear();
  turn = null;
  setRunning(null);
}

function renderHistory(messages, interrupts) {
  clear();
  let group = null; // an assistant's messages and tool results since the last user message
  for (const m of messages) {
    if (m.role === "user") {
      addUser(m.content);
      group = null;
    } else if (m.role === "assistant") {
      group ??= addTurn();
      if (m.content) addText(group, m.content);
      for (const call of m.toolCalls ?? []) addTool(group, call.id, call.function.name, call.function.arguments);
      if (m.metadata?.rtagent?.interrupted) markInterrupted(group);
    } else if (m.role === "tool" && tools.has(m.toolCallId)) {
      finishTool(tools.get(m.toolCallId), "done", m.content, null);
    }
  }
  askAll(interrupts);
  settleTools();
}

// The calls a run paused on: from its RUN_FINISHED, or after a reload from the history's answer.
function askAll(interrupts) {
  for (const i of interrupts ?? []) {
    const tool = i.reason === "tool_approval" && tools.get(i.toolCallId);
    if (tool) askApproval(i.toolCallId, tool, i.message);
  }
}

// -- the AG-UI events ---------------------------------------------------------------------------

function handle(e) {
  switch (e.type) {
    case "RUN_STARTED":
      turn = addTurn();
      if (resuming) setRunning(+1); // a replayed run, which no send of this page counted
      resuming = false;
      break;
    case "STEP_STARTED": {
      const agent = e.metadata?.rtagent?.agent; // a handoff: another agent answers from now on
      if (agent) append(el("div", "agent", `${agent} is answering`), current());
      else if (e.stepName === "thinking") append(el("div", "thinking", "thinking"), current());
      break;
    }
    case "STEP_FINISHED":
      current().querySelector(".thinking")?.remove();
      break;
    case "TEXT_MESSAGE_START":
      texts.set(e.messageId, { node: addText(current(), ""), text: "" });
      break;
    case "TEXT_MESSAGE_CONTENT": {
      const message = texts.get(e.messageId);
      if (!message) break;
      message.text += e.delta;
      renderMarkdown(message.node, message.text);
      break;
    }
    case "TOOL_CALL_START":
      if (tools.get(e.toolCallId)?.approved) rerun(tools.get(e.toolCallId));
      else addTool(current(), e.toolCallId, e.toolCallName, "");
      break;
    case "TOOL_CALL_ARGS":
      if (tools.has(e.toolCallId)) tools.get(e.toolCallId).args += e.delta;
      break;
    case "ACTIVITY_SNAPSHOT":
      if (e.activityType === "tool_progress" && tools.has(e.content.toolCallId)) {
        progress(tools.get(e.content.toolCallId), e.content);
      }
      break;
    case "TOOL_CALL_RESULT": {
      const { durationS, error } = e.metadata?.rtagent ?? {};
      const tool = tools.get(e.toolCallId);
      if (!tool) break;
      if (error === "interrupted") finishTool(tool, "stopped", e.content, durationS);
      else if (error != null) finishTool(tool, "failed", error, durationS);
      else finishTool(tool, "done", e.content, durationS);
      // From the tool cache: the tool did not run for this call, so its time would mislead.
      if (e.metadata?.rtagent?.cached) tool.meta.textContent = "cached";
      break;
    }
    case "RUN_FINISHED":
      current().querySelector(".thinking")?.remove();
      if (e.result?.interrupted) {
        settleTools();
        markInterrupted(current());
      }
      if (e.outcome?.type === "interrupt") askAll(e.outcome.interrupts);
      if (e.result?.cached) append(el("span", "badge cached", "cached"), current());
      turn = null;
      setRunning(-1);
      break;
    case "RUN_ERROR":
      current().querySelector(".thinking")?.remove();
      settleTools();
      // A guardrail stopped the reply: what was shown of it stays, as cut.
      if (e.code === "guardrail_tripwire" && current().querySelector(".text")) markInterrupted(current());
      addNotice(e.message || "the reply failed", current());
      turn = null;
      setRunning(-1);
      break;
    case "error": // a command the server refused; for a send, no reply will come
      addNotice(e.message || e.error);
      setRunning(-1);
      break;
  }
}

// -- the connection -----------------------------------------------------------------------------

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
}

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askToken() {
  const dialog = $("token-dialog");
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve($("token").value.trim()), { once: true });
  });
}

// The conversation so far. A fresh one has none to ask for, unless its socket was refused
// (`probe`): the answer then tells whether the server wants a token.
async function loadHistory(probe) {
  if (fresh && !probe) return renderHistory([]);
  // Relative URLs: the page keeps working when a proxy serves it under a path prefix.
  const response = await fetch(`threads/${thread}/messages`, { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) {
    token = await askToken();
    localStorage.setItem(TOKEN_KEY, token);
    return loadHistory(false);
  }
  if (response.status === 404) return renderHistory([]); // e.g. deleted meanwhile
  if (!response.ok) throw new Error(`the history answered ${response.status}`);
  const history = await response.json();
  renderHistory(history.messages, history.interrupts);
  log.scrollTop = log.scrollHeight;
}

// (Re)connect: the history first, then the reply still streaming, if any (see onopen).
async function start(probe = false) {
  const run = ++starts;
  ready = false;
  setStatus("connecting", retries ? "reconnecting…" : "connecting…");
  try {
    await loadHistory(probe);
  } catch {
    if (run === starts) retry(probe);
    return;
  }
  if (run !== starts) return; // "New conversation" was clicked meanwhile
  const url = new URL(`ws/${thread}`, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  const ws = (socket = new WebSocket(url));
  let opened = false;
  ws.onopen = () => {
    opened = true;
    retries = 0;
    ready = true;
    setStatus("online", "online");
    // A reply still streaming (the page was reloaded, or the socket dropped): the history holds
    // everything before it, and the server replays it from its start, then streams the rest live.
    resuming = !fresh;
    if (resuming) ws.send(JSON.stringify({ type: "resume", after: null }));
  };
  ws.onmessage = (message) => {
    if (ws !== socket) return;
    const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    handle(JSON.parse(message.data));
    if (nearBottom) log.scrollTop = log.scrollHeight;
  };
  ws.onclose = () => {
    if (ws !== socket) return;
    ready = false;
    setRunning(null);
    retry(!opened);
  };
}

function retry(probe) {
  setStatus("offline", "reconnecting…");
  const delay = Math.min(10_000, 500 * 2 ** retries++);
  retryTimer = setTimeout(start, delay, probe);
}

function send() {
  const text = input.value;
  if (!text.trim() || !ready) return;
  resuming = false;
  socket.send(JSON.stringify({ type: "send", text }));
  closeWaiting();
  if (fresh) {
    // Only now is the conversation worth coming back to after a reload.
    fresh = false;
    localStorage.setItem(THREAD_KEY, thread);
  }
  addUser(text);
  input.value = "";
  autosize();
  setRunning(+1);
  log.scrollTop = log.scrollHeight;
}

function autosize() {
  input.style.height = "auto";
  // scrollHeight leaves out the borders, which the border-box height includes.
  input.style.height = `${input.scrollHeight + input.offsetHeight - input.clientHeight}px`;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
input.addEventListener("input", autosize);
$("stop").addEventListener("click", () => {
  if (ready) socket.send(JSON.stringify({ type: "stop" }));
});
$("new").addEventListener("click", () => {
  const old = socket;
  socket = null; // closing the old socket (which stops its reply) must not trigger a reconnect
  old?.close();
  clearTimeout(retryTimer);
  thread = newThread();
  fresh = true;
  localStorage.removeItem(THREAD_KEY); // a reload now also starts afresh
  start();
  input.focus();
});

start();
input.focus();

// The playground: each message goes to one model, or to two side by side, streamed from POST /v1/chat/completions
// (the API's own route, with the session's cookie). Each pane keeps its model's conversation (multi-turn), shows the
// time to the first token and in all, the prompt and completion tokens (the usage chunk of
// stream_options.include_usage), and the `openai` SDK and curl equivalents of exactly the body it sent.
// Text from the user and the models is set as text (h()), never as HTML.

import { ApiError, h, postStream } from "/static/console.js";

const form = document.getElementById("chat");
const message = document.getElementById("message");
const send = document.getElementById("send");
const stop = document.getElementById("stop-answer");
let answering = null; // the AbortController of the answers streaming in, while they do
const compareOn = document.getElementById("compare-on");
const formError = form.querySelector(".pg-form-error");
// Sampling fields the SDK has no argument for: sent by it in extra_body (the API takes them: web/openai_schemas.py).
const EXTRA_BODY = ["top_k", "repetition_penalty"];
const MAX_STOPS = 4;

const panes = ["a", "b"].map((key) => {
  const root = document.querySelector(`[data-pane="${key}"]`);
  return {
    root,
    select: document.getElementById(`model-${key}`),
    history: [], // this model's conversation: [{role, content}]
    chat: root.querySelector(".pg-chat"),
    error: root.querySelector(".pg-error"),
    stat: (name) => root.querySelector(`[data-stat="${name}"]`),
    code: (name) => root.querySelector(`[data-code="${name}"]`),
  };
});

function active() {
  return compareOn.checked ? panes : panes.slice(0, 1);
}

function showModels() {
  panes[1].root.hidden = !compareOn.checked;
  panes[1].select.disabled = !compareOn.checked;
  for (const pane of panes) pane.root.querySelector(".pg-model").textContent = pane.select.value;
}

// The settings as the request sends them: a field left empty is not sent (the API's default applies).
function settings() {
  const body = {};
  for (const input of form.querySelectorAll("[data-setting]")) {
    if (input.value.trim() === "") continue;
    const value = Number(input.value);
    if (!Number.isFinite(value)) throw new FieldError(input, `${input.id}: a number, not ${JSON.stringify(input.value)}`);
    body[input.dataset.setting] = value;
  }
  const stops = document.getElementById("stop").value.split("\n").filter((line) => line !== "");
  if (stops.length > MAX_STOPS) throw new FieldError(document.getElementById("stop"), `stop: at most ${MAX_STOPS} sequences`);
  if (stops.length) body.stop = stops;
  return body;
}

class FieldError extends Error {
  constructor(input, text) {
    super(text);
    this.input = input;
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  formError.replaceChildren();
  const text = message.value;
  if (!text.trim()) {
    formError.replaceChildren(h("span", { class: "error", role: "alert" }, "Write a message first."));
    message.focus();
    return;
  }
  let sampling;
  try {
    sampling = settings();
  } catch (error) {
    formError.replaceChildren(h("span", { class: "error", role: "alert" }, error.message));
    error.input?.focus();
    return;
  }
  send.disabled = true;
  stop.hidden = false;
  message.value = "";
  answering = new AbortController();
  try {
    await Promise.all(active().map((pane) => ask(pane, text, sampling, answering.signal)));
  } finally {
    answering = null;
    send.disabled = false;
    stop.hidden = true;
    message.focus();
  }
});

// Stop: the answers end where they are (the server stops generating when the stream is closed), and what arrived is
// kept as the model's turn.
stop.addEventListener("click", () => answering?.abort());

// One turn of one pane: the user's message, the model's answer as it streams in, its latency and tokens.
async function ask(pane, text, sampling, signal) {
  const model = pane.select.value;
  pane.history.push({ role: "user", content: text });
  const body = {
    model, messages: pane.history.map((m) => ({ ...m })), ...sampling,
    stream: true, stream_options: { include_usage: true },
  };
  showCode(pane, body);
  pane.error.replaceChildren();
  for (const name of ["ttft", "total", "prompt", "completion"]) pane.stat(name).textContent = "…";
  const asked = turn(pane, "You", text, "user");
  const answer = turn(pane, model, "", "assistant");
  const started = performance.now();
  let first = null;
  let usage = null;
  let reply = "";
  try {
    await postStream("/v1/chat/completions", body, (chunk) => {
      if (chunk.error) throw new ApiError(null, chunk); // the stream could not complete
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (!piece) continue;
        if (first === null) first = performance.now() - started;
        reply += piece;
        answer.append(piece); // a text node per piece: the answer grows as it arrives
        pane.chat.scrollTop = pane.chat.scrollHeight;
      }
    }, signal);
    pane.history.push({ role: "assistant", content: reply });
  } catch (error) {
    if (error.name === "AbortError") {
      pane.history.push({ role: "assistant", content: reply }); // what arrived before Stop is the model's turn
      answer.closest("li").append(h("span", { class: "pg-stopped muted" }, " (stopped)"));
    } else {
      pane.history.pop(); // the unanswered message is not sent again with the next one
      asked.closest("li").classList.add("pg-unanswered");
      answer.closest("li").classList.add("pg-unanswered");
      showApiError(pane.error, error);
    }
  }
  const total = performance.now() - started;
  pane.stat("ttft").textContent = first === null ? "—" : seconds(first);
  pane.stat("total").textContent = seconds(total);
  pane.stat("prompt").textContent = usage ? String(usage.prompt_tokens) : "—";
  pane.stat("completion").textContent = usage ? String(usage.completion_tokens) : "—";
}

// A message in the pane's conversation; returns the element its text goes in.
function turn(pane, who, text, role) {
  const body = h("div", { class: "pg-text" }, text);
  pane.chat.append(h("li", { class: `pg-msg ${role}` }, h("span", { class: "pg-who" }, who), body));
  return body;
}

function showApiError(target, error) {
  const where = error.param ? ` (field: ${error.param})` : "";
  const status = error.status ? `${error.status}: ` : "";
  const parts = [h("span", { class: "error", role: "alert" }, `${status}${error.message}${where}`)];
  if (error.status === 402) parts.push(" ", h("a", { href: "/billing" }, "Top up in Billing"));
  target.replaceChildren(...parts);
}

const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;

// --- The request as code: the `openai` SDK and curl, for exactly `body` ---

function showCode(pane, body) {
  pane.code("python").textContent = pythonSnippet(body);
  pane.code("curl").textContent = curlSnippet(body);
}

function pythonSnippet(body) {
  const args = [];
  const extra = {};
  for (const [name, value] of Object.entries(body)) {
    if (EXTRA_BODY.includes(name)) extra[name] = value;
    else if (name === "messages") args.push(`    messages=[\n${value.map((m) => `        ${py(m)},\n`).join("")}    ],`);
    else args.push(`    ${name}=${py(value)},`);
  }
  if (Object.keys(extra).length) {
    args.push("    # Loraplex's sampling fields the SDK has no argument for:", `    extra_body=${py(extra)},`);
  }
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    "client = OpenAI(",
    `    base_url=${py(`${location.origin}/v1`)},`,
    '    api_key=os.environ["LORAPLEX_API_KEY"],',
    ")",
    "stream = client.chat.completions.create(",
    ...args,
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
    "    if chunk.usage:",
    '        print("\\n", chunk.usage)',
    "",
  ].join("\n");
}

// A JSON value as a Python literal (a JSON string is a valid Python string literal).
function py(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

function curlSnippet(body) {
  const json = JSON.stringify(body, null, 2).replaceAll("'", "'\\''"); // inside '...' for the shell
  return [
    `curl -N ${location.origin}/v1/chat/completions \\`,
    '  -H "Authorization: Bearer $LORAPLEX_API_KEY" \\',
    '  -H "Content-Type: application/json" \\',
    `  -d '${json}'`,
    "",
  ].join("\n");
}

for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", async () => {
    const text = button.closest(".pg-pane").querySelector(`[data-code="${button.dataset.copy}"]`).textContent;
    const label = button.textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Select the text to copy it";
    }
    setTimeout(() => { button.textContent = label; }, 1500);
  });
}

document.getElementById("clear").addEventListener("click", () => {
  for (const pane of panes) {
    pane.history = [];
    pane.chat.replaceChildren();
    pane.error.replaceChildren();
    for (const name of ["ttft", "total", "prompt", "completion"]) pane.stat(name).textContent = "—";
  }
  message.focus();
});

message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    form.requestSubmit();
  }
});
if (!compareOn.checked) { // the second model starts on the first adapter, if any: base vs adapter
  const adapter = panes[1].select.querySelector("optgroup:nth-of-type(2) option");
  if (adapter) adapter.selected = true;
}
compareOn.addEventListener("change", showModels);
for (const pane of panes) pane.select.addEventListener("change", showModels);
showModels();

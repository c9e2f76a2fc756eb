// The new-job form (templates/job_new.html, generated from the config's schema by config_form.py): reads back only
// the fields the user set or changed from their defaults, asks POST /v1/finetuning/jobs/quote for the price as
// they change, and starts the job with POST /v1/finetuning/jobs. Errors are shown next to the field they name.
import { api, h } from "/static/console.js";

const data = JSON.parse(document.getElementById("page-data").textContent);
const form = document.getElementById("job-form");
const quoteBody = document.getElementById("quote-body");
const payment = document.getElementById("payment");
const formError = document.getElementById("form-error");
const input = (name) => document.getElementById(`f-${name}`);
const QUOTE_DELAY_MS = 350;

// A number's mode select ("auto", "none", "epoch" or "a number") shows its number input.
for (const mode of form.querySelectorAll("select[data-mode-for]")) {
  mode.addEventListener("change", () => {
    const number = input(mode.dataset.modeFor);
    number.disabled = number.hidden = mode.value !== "number";
    if (!number.disabled) number.focus();
  });
}

// Choosing a dataset picks its base model, until the user picks one.
let baseModelChosen = false;
input("base_model").addEventListener("change", () => { baseModelChosen = true; });
input("dataset").addEventListener("change", followDataset);
function followDataset() {
  const model = data.datasets[input("dataset").value];
  if (model && !baseModelChosen) input("base_model").value = model;
}
followDataset();

// The request's JSON: required fields, and every other field whose value differs from its default.
function config() {
  const body = {};
  for (const field of data.fields) {
    const value = read(field);
    if (value === undefined) continue;
    if (field.required || JSON.stringify(value) !== JSON.stringify(field.default)) body[field.name] = value;
  }
  return body;
}

// A field's value as JSON; undefined when left unset (the default applies).
function read(field) {
  const node = input(field.name);
  switch (field.kind) {
    case "checkbox":
      return node.checked;
    case "select":
      return node.value === "" ? (field.required ? "" : undefined) : node.value;
    case "number": {
      const mode = document.getElementById(`f-${field.name}-mode`);
      if (mode && mode.value !== "number") return mode.value === "" ? null : mode.value;
      if (node.value.trim() === "") return field.required ? "" : undefined;
      const n = Number(node.value);
      return Number.isNaN(n) ? node.value : n; // a non-number is sent as typed: the API names the field
    }
    case "list": {
      const items = node.value.split(/[\s,]+/).filter(Boolean);
      return items.length ? items : undefined;
    }
    default:
      return node.value === "" ? (field.required ? "" : undefined) : node.value;
  }
}

function clearErrors() {
  for (const node of form.querySelectorAll(".ft-error")) node.textContent = "";
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  formError.textContent = "";
}

// An API error next to the field it names (its folded group opened), or above the button.
function showFieldError(error) {
  if (error.status === 402) {
    showPayment(error.message);
    return;
  }
  const target = error.param && document.getElementById(`err-${error.param}`);
  if (!target) {
    formError.textContent = error.message;
    return;
  }
  target.textContent = error.message;
  const control = input(error.param);
  control.setAttribute("aria-invalid", "true");
  const group = control.closest("details");
  if (group) group.open = true;
}

function showPayment(message) {
  payment.hidden = !message;
  document.getElementById("payment-message").textContent = message || "";
}

// --- the quote -------------------------------------------------------------------------------------------------

let quoteTimer = null;
let quoteSeq = 0;
form.addEventListener("input", scheduleQuote);
form.addEventListener("change", scheduleQuote);
scheduleQuote();

function scheduleQuote() {
  clearTimeout(quoteTimer);
  quoteTimer = setTimeout(quote, QUOTE_DELAY_MS);
}

async function quote() {
  const body = config();
  if (!body.dataset || !body.repo || !body.base_model) return;
  const seq = ++quoteSeq;
  try {
    const answer = await api("/v1/finetuning/jobs/quote", { method: "POST", body });
    if (seq !== quoteSeq) return; // a later change asked again
    clearErrors();
    showQuote(answer);
  } catch (error) {
    if (seq !== quoteSeq) return;
    clearErrors();
    showPayment(null);
    quoteBody.replaceChildren(h("p", { class: "muted" }, "No quote for this config: see the message by its field."));
    showFieldError(error);
  }
}

function showQuote(q) {
  const auto = Object.entries(q.auto).map(([name, value]) => h("li", {}, h("code", {}, name), ` → ${JSON.stringify(value)}`));
  quoteBody.replaceChildren(
    h("p", { class: "ft-price", id: "quote-price" }, `${q.estimate.cost.usd} estimated`),
    h("p", { class: "muted" }, `for ${q.estimate.tokens.toLocaleString()} trained tokens`),
    auto.length ? h("p", {}, "Chosen for “auto”:") : null,
    auto.length ? h("ul", { class: "ft-auto" }, auto) : null,
    ...q.warnings.map((w) => h("p", { class: "ft-warning" }, w)),
    h("p", { class: q.can_start ? "ok" : "error" }, q.can_start ? "Your credit covers it." : "Your credit does not cover it."),
  );
  showPayment(q.refusal);
}

// --- start -----------------------------------------------------------------------------------------------------

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = document.getElementById("start");
  button.disabled = true;
  clearErrors();
  try {
    const job = await api("/v1/finetuning/jobs", { method: "POST", body: config() });
    window.location.assign(`/jobs/${encodeURIComponent(job.id)}`);
  } catch (error) {
    showFieldError(error);
    button.disabled = false;
  }
});

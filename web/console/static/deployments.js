// The deployments list: the create form posts its fields to POST /v1/deployments and opens the new deployment; an
// error of the API is shown beside the field it names. readFields/showApiError also serve the update form
// (deployment.js).
import { api, h } from "/static/console.js";

// The form's config fields as the API's JSON: numbers as numbers, a list from comma-separated text. With
// `changedOnly`, only the fields whose value differs from the one the page was rendered with (a PATCH).
// Returns null (and says why beside the field) when a number field holds no number.
export function readFields(form, { changedOnly = false } = {}) {
  clearErrors(form);
  const body = {};
  let ok = true;
  for (const input of form.querySelectorAll("[data-kind]")) {
    if (changedOnly && input.value === input.dataset.initial) continue;
    const kind = input.dataset.kind;
    if (kind === "number") {
      if (input.value.trim() === "" || input.validity.badInput || Number.isNaN(Number(input.value))) {
        fieldError(form, input.name, `${input.name}: enter a number`);
        ok = false;
        continue;
      }
      body[input.name] = Number(input.value);
    } else if (kind === "list") {
      body[input.name] = input.value.split(/[\s,]+/).filter((x) => x);
    } else {
      body[input.name] = input.value;
    }
  }
  return ok ? body : null;
}

// An API error: beside the field it names when the form has it, else in `status`.
export function showApiError(form, status, error) {
  const shown = error.param && fieldError(form, error.param, error.message);
  status.replaceChildren(h("span", { class: "error", role: "alert" },
                           shown ? `Not accepted: see ${error.param} above.` : error.message || String(error)));
}

function fieldError(form, name, message) {
  const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
  if (!slot) return false;
  slot.replaceChildren(message);
  const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
  input.setAttribute("aria-invalid", "true");
  input.focus();
  return true;
}

export function clearErrors(form) {
  for (const slot of form.querySelectorAll("[data-error-for]")) slot.replaceChildren();
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

const createForm = document.getElementById("create-form");
if (createForm) {
  const status = document.getElementById("create-status");
  createForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.replaceChildren();
    const body = readFields(createForm);
    if (body === null) return;
    const button = createForm.querySelector("button[type=submit]");
    button.disabled = true;
    status.replaceChildren("Creating…");
    try {
      const created = await api("/v1/deployments", { method: "POST", body });
      window.location.assign(`/deployments/${encodeURIComponent(created.name)}`);
    } catch (error) {
      showApiError(createForm, status, error);
    } finally {
      button.disabled = false;
    }
  });
}

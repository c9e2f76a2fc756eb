// The adapters pages: create a repo (POST /v1/repos), import a PEFT adapter into one (POST /v1/repos/{name}/versions,
// multipart, with progress). The API's refusals are said beside the field they name.
import { api, upload, showError } from "/static/console.js";

const create = document.getElementById("create-repo");
if (create) createRepo(create);
const importer = document.getElementById("import-adapter");
if (importer) importAdapter(importer);

function fieldErrors(form, prefix) {
  const all = [...form.querySelectorAll(`[id^="${prefix}-"][id$="-error"]`)];
  return {
    clear: () => all.forEach((target) => target.replaceChildren()),
    // The field's own place, or `fallback`'s: a refusal may name a file ("adapter_config.json") or a key.
    show: (error, fallback) => showError(
      document.getElementById(`${prefix}-${error.param}-error`) || document.getElementById(`${prefix}-${fallback}-error`),
      error),
  };
}

function createRepo(form) {
  const errors = fieldErrors(form, "repo");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    errors.clear();
    const body = { name: form.elements.name.value.trim(), description: form.elements.description.value };
    try {
      const repo = await api("/v1/repos", { method: "POST", body });
      location.assign(`/adapters/${encodeURIComponent(repo.name)}`);
    } catch (error) {
      errors.show(error, "name");
      (form.elements[error.param] || form.elements.name).focus();
    }
  });
}

function importAdapter(form) {
  const errors = fieldErrors(form, "import");
  const progress = document.getElementById("import-progress");
  const status = document.getElementById("import-status");
  const repo = form.dataset.repo;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    errors.clear();
    const data = new FormData();
    data.append("base_model", form.elements.base_model.value);
    for (const file of form.elements.files.files) data.append("files", file);
    if (form.elements.archive.files.length) data.append("archive", form.elements.archive.files[0]);
    progress.hidden = false;
    progress.value = 0;
    status.textContent = "Uploading and checking the adapter…";
    try {
      const { data: version } = await upload(
        `/v1/repos/${encodeURIComponent(repo)}/versions`, data, (fraction) => (progress.value = fraction));
      status.textContent = `Imported ${version.name}.`;
      location.assign(`/adapters/${encodeURIComponent(repo)}#v${version.version}`);
      location.reload();
    } catch (error) {
      progress.hidden = true;
      status.textContent = "";
      errors.show(error, "files");
    }
  });
}

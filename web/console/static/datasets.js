// The datasets list: upload by drag and drop or the file input (with progress), then the new dataset's row follows
// its validation (GET /v1/datasets/{name}) until it is ready or invalid. The dataset page: waits for validation,
// deletes (a 409 when jobs use it is said beside the button).
import { api, upload, h, showError } from "/static/console.js";

const POLL_MS = 500;
const done = (status) => status === "ready" || status === "invalid";
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const datasetUrl = (name) => `/datasets/${encodeURIComponent(name)}`;

const form = document.getElementById("upload");
if (form) listPage(form);
const facts = document.getElementById("dataset-facts");
if (facts) datasetPage(facts.dataset.name, facts.dataset.status);

function listPage(form) {
  const file = document.getElementById("upload-file");
  const zone = document.getElementById("dropzone");
  const progress = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const errors = {
    name: document.getElementById("upload-name-error"),
    base_model: document.getElementById("upload-base-model-error"),
    file: document.getElementById("upload-file-error"),
  };

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (!e.dataTransfer.files.length) return;
    file.files = e.dataTransfer.files;
    send();
  });
  for (const row of document.querySelectorAll("#dataset-rows tr[data-status='validating']")) {
    follow(row.dataset.name, row);
  }

  async function send() {
    Object.values(errors).forEach((target) => target.replaceChildren());
    if (!file.files.length) {
      showError(errors.file, new Error("file: choose a .jsonl or .csv file, or drop one above"));
      file.focus();
      return;
    }
    const data = new FormData();
    data.append("file", file.files[0]);
    const name = form.elements.name.value.trim();
    if (name) data.append("name", name);
    data.append("base_model", form.elements.base_model.value);
    data.append("wait", "false");
    progress.hidden = false;
    progress.value = 0;
    status.textContent = `Uploading ${file.files[0].name}…`;
    try {
      const { data: dataset } = await upload("/v1/datasets", data, (fraction) => (progress.value = fraction));
      progress.value = 1;
      status.replaceChildren(
        "Uploaded ", h("a", { href: datasetUrl(dataset.name) }, dataset.name), ": validating…");
      file.value = "";
      form.elements.name.value = "";
      follow(dataset.name, addRow(dataset));
    } catch (error) {
      progress.hidden = true;
      status.textContent = "";
      const target = errors[error.param] || errors.file;
      showError(target, error);
    }
  }

  // Poll the dataset until its validation ends; its row and the status line follow it.
  async function follow(name, row) {
    for (;;) {
      await sleep(POLL_MS);
      let dataset;
      try {
        dataset = await api(`/v1/datasets/${encodeURIComponent(name)}`);
      } catch (error) {
        showError(row.cells[1], error);
        return;
      }
      fill(row, dataset);
      if (done(dataset.status)) {
        if (status.textContent.includes(name)) {
          const errorsSaid = dataset.status === "invalid"
            ? `: invalid, ${dataset.stats.error_count ?? dataset.errors.length} bad rows` : ": ready";
          status.replaceChildren(h("a", { href: datasetUrl(name) }, name), errorsSaid);
        }
        return;
      }
    }
  }

  function addRow(dataset) {
    document.getElementById("no-datasets")?.remove();
    const row = h("tr", { "data-name": dataset.name },
      h("td", {}, h("a", { href: datasetUrl(dataset.name) }, dataset.name)),
      h("td"), h("td"), h("td"), h("td"), h("td"));
    document.getElementById("dataset-rows").append(row);
    fill(row, dataset);
    return row;
  }
}

function fill(row, dataset) {
  row.dataset.status = dataset.status;
  row.cells[1].replaceChildren(h("span", { class: `badge ${dataset.status}` }, dataset.status));
  row.cells[2].textContent = dataset.data_format || dataset.file_format;
  row.cells[3].textContent = dataset.base_model;
  row.cells[4].textContent = dataset.stats.rows ?? "—";
  row.cells[5].textContent = dataset.created_at.slice(0, 16).replace("T", " ");
}

function datasetPage(name, status) {
  const path = `/v1/datasets/${encodeURIComponent(name)}`;
  if (status === "validating") {
    (async () => {
      for (;;) {
        await sleep(POLL_MS);
        const dataset = await api(path);
        if (done(dataset.status)) return location.reload();
      }
    })();
  }
  const remove = document.getElementById("delete-dataset");
  const said = document.getElementById("delete-error");
  remove?.addEventListener("click", async () => {
    if (!confirm(`Delete the dataset ${name}? Its file is removed; this cannot be undone.`)) return;
    remove.disabled = true;
    try {
      await api(path, { method: "DELETE" });
      location.assign("/datasets");
    } catch (error) {
      remove.disabled = false;
      showError(said, error);
    }
  });
}

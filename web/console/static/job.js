// A job's page (templates/job.html): follows GET /v1/finetuning/jobs/{id}/events (server-sent events: `status`
// carries the job as GET /v1/finetuning/jobs/{id} answers it, `metric` one row of its metrics) and draws the curves
// as the rows arrive, with the same rows in a table; the step-0 baseline beside the latest evaluation, the confusion
// matrix of a classification dataset, a preference-tuning (DPO) job's reward margins and share of pairs where the
// chosen answer wins, a reinforcement fine-tuning (GRPO) job's rewards (the total and each reward function's, KL to
// the reference) and sample completions with their rewards, checkpoints, estimate vs charge, and cancel while it runs.
import { api, h, lineChart, num, showError } from "/static/console.js";

const FINAL = ["completed", "failed", "cancelled"];
const REDRAW_MS = 150; // rows arrive in bursts: draw at most this often
const EVAL_METRICS = [ // [field of an eval row, label]; a metric the job does not publish (null) is not drawn
  ["token_accuracy", "token accuracy"],
  ["sequence_accuracy", "sequence accuracy"],
  ["char_error_rate", "CER"],
  ["reward_accuracy", "chosen over rejected"],
  ["reward", "mean reward"],
];
const COMPARED = [ // [field, label] of the baseline / latest / best table
  ["loss", "evaluation loss"],
  ["perplexity", "perplexity"],
  ["token_accuracy", "token accuracy"],
  ["sequence_accuracy", "sequence accuracy"],
  ["char_error_rate", "CER"],
  ["reward_accuracy", "chosen over rejected"],
  ["reward_margin", "reward margin"],
  ["chosen_reward", "chosen reward"],
  ["rejected_reward", "rejected reward"],
  ["reward", "mean reward"],
  ["reward_std", "reward spread"],
  ["completion_length", "completion length (tokens)"],
];
const published = (rows, field) => rows.some((r) => r[field] !== null && r[field] !== undefined);

let job = JSON.parse(document.getElementById("page-data").textContent).job;
const $ = (id) => document.getElementById(id);
let train = []; // train rows of the current attempt, in arrival order
let evals = []; // eval rows
const charts = {};
let redrawTimer = null;

showJob(job);
$("cancel").addEventListener("click", async () => {
  $("cancel").disabled = true;
  try {
    showJob(await api(`/v1/finetuning/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }));
  } catch (error) {
    showError($("job-error"), error);
    $("cancel").disabled = false;
  }
});

const events = new EventSource(`/v1/finetuning/jobs/${encodeURIComponent(job.id)}/events`);
events.addEventListener("status", (event) => {
  const next = JSON.parse(event.data);
  if (next.attempts !== job.attempts) { // a retried job starts its curves again
    train = [];
    evals = [];
    $("metrics-table").tBodies[0].replaceChildren();
    scheduleRedraw();
  }
  showJob(next);
  if (FINAL.includes(next.status)) events.close(); // the stream ends here: no reconnect
});
events.addEventListener("metric", (event) => {
  const row = JSON.parse(event.data);
  (row.kind === "eval" ? evals : train).push(row);
  $("metrics-table").tBodies[0].append(tableRow(row));
  scheduleRedraw();
});

// --- the job's facts -----------------------------------------------------------------------------------------

function showJob(next) {
  job = next;
  const status = $("status");
  status.textContent = job.status;
  status.className = `badge ${job.status}`;
  $("cancel").hidden = FINAL.includes(job.status);
  $("job-error").textContent = job.error || "";
  $("version").textContent = job.adapter || (job.version ? `${job.repo}/${job.version}` : "not yet taken");
  showSteps();
  $("charge").textContent = job.charge ? job.charge.usd : "— (charged once completed)";
  for (const [id, at] of [["started", job.started_at], ["finished", job.finished_at]]) {
    $(id).textContent = at ? `${at.slice(0, 19).replace("T", " ")} UTC` : "—";
  }
  showCheckpoints();
  if (job.summary.best) showEvals();
}

function showSteps() {
  const done = job.summary.steps_done ?? (train.length ? train[train.length - 1].step : "—");
  $("steps").textContent = `${done} of ${job.total_steps ?? "—"}`;
}

function showCheckpoints() {
  const list = $("checkpoints");
  if (!job.checkpoints.length) {
    list.replaceChildren(h("li", { class: "muted" }, "None yet."));
    return;
  }
  list.replaceChildren(...job.checkpoints.map((name) => {
    const [repoVersion, number] = name.split("@");
    const version = repoVersion.slice(repoVersion.lastIndexOf("/") + 1);
    const href = `/v1/repos/${encodeURIComponent(job.repo)}/versions/${encodeURIComponent(version)}`
      + `/checkpoints/${encodeURIComponent(number)}/download`;
    return h("li", {}, h("code", {}, name), " ", h("a", { href }, "download"));
  }));
}

// --- curves --------------------------------------------------------------------------------------------------

function tableRow(row) {
  const cells = [row.kind, row.step, num(row.epoch, 2), num(row.loss, 4), row.kind === "train" ? row.learning_rate.toExponential(2) : "—",
    num(row.token_accuracy), num(row.sequence_accuracy), num(row.char_error_rate), num(row.reward_margin, 4),
    num(row.reward_accuracy), num(row.reward, 4), num(row.kl, 4), num(row.tokens_per_second, 0)];
  return h("tr", { "data-kind": row.kind }, cells.map((c) => h("td", {}, c)));
}

function scheduleRedraw() {
  if (redrawTimer === null) redrawTimer = setTimeout(redraw, REDRAW_MS);
}

function redraw() {
  redrawTimer = null;
  $("points").textContent = `${train.length} training steps, ${evals.length} evaluations`;
  $("points").dataset.trainPoints = String(train.length);
  const steps = [...new Set([...train, ...evals].map((r) => r.step))].sort((a, b) => a - b);
  const trainLoss = new Map(train.map((r) => [r.step, r.loss]));
  const evalLoss = new Map(evals.map((r) => [r.step, r.loss]));
  draw("loss", "Loss", steps, [
    { label: "training loss", values: steps.map((s) => trainLoss.get(s) ?? null) },
    { label: "evaluation loss", values: steps.map((s) => evalLoss.get(s) ?? null) },
  ]);
  if (train.length) {
    // Drawn in units of its power of ten (x 1e-3): the axis then reads 0 to 1, not "0.001" at every tick.
    const peak = Math.max(...train.map((r) => r.learning_rate));
    const exponent = peak > 0 ? Math.floor(Math.log10(peak)) : 0;
    const values = train.map((r) => r.learning_rate / 10 ** exponent);
    draw("lr", `Learning rate (× 1e${exponent})`, train.map((r) => r.step), [{ label: "learning rate", values }]);
  }
  if (published(train, "reward_margin") || published(evals, "reward_margin")) { // preference tuning (DPO)
    const trainMargin = new Map(train.map((r) => [r.step, r.reward_margin]));
    const evalMargin = new Map(evals.map((r) => [r.step, r.reward_margin]));
    $("chart-rewards").hidden = false;
    draw("rewards", "Reward margin (chosen − rejected)", steps, [
      { label: "training margin", values: steps.map((s) => trainMargin.get(s) ?? null) },
      { label: "evaluation margin", values: steps.map((s) => evalMargin.get(s) ?? null) },
    ]);
  }
  if (published(train, "reward") || published(evals, "reward")) { // reinforcement fine-tuning (GRPO)
    const at = (rows, value) => { const m = new Map(rows.map((r) => [r.step, value(r)])); return steps.map((s) => m.get(s) ?? null); };
    const graders = [...new Set(train.flatMap((r) => Object.keys((r.rewards && r.rewards.graders) || {})))];
    $("chart-rewards").hidden = false;
    draw("rewards", "Reward (weighted total, and each reward function's mean)", steps, [
      { label: "training reward", values: at(train, (r) => r.reward) },
      { label: "evaluation reward", values: at(evals, (r) => r.reward) },
      ...graders.map((g) => ({ label: g, values: at(train, (r) => (r.rewards && r.rewards.graders[g] ? r.rewards.graders[g].mean : null)) })),
    ]);
    if (published(train, "kl")) {
      $("chart-kl").hidden = false;
      draw("kl", "KL to the reference model", train.map((r) => r.step), [{ label: "KL", values: train.map((r) => r.kl ?? null) }]);
    }
  }
  if (evals.length) {
    const shown = EVAL_METRICS.filter(([field]) => published(evals, field));
    const series = shown.map(([field, label]) => ({ label, values: evals.map((r) => r[field] ?? null) }));
    if (evals.some((r) => r.classification)) {
      series.push({ label: "label accuracy", values: evals.map((r) => (r.classification ? r.classification.accuracy : null)) });
    }
    if (series.length) draw("eval", "Evaluation", evals.map((r) => r.step), series);
    showEvals();
  }
  showSteps();
}

// One chart per name, made on its first data; remade when its title or series change (a metric appears), else
// updated.
function draw(name, title, xs, series) {
  const key = [title, ...series.map((s) => s.label)].join("|");
  const existing = charts[name];
  if (existing && existing.key === key) {
    existing.plot.setData([xs, ...series.map((s) => s.values)]);
    return;
  }
  if (existing) existing.plot.destroy();
  const target = $(`chart-${name}`);
  target.replaceChildren();
  charts[name] = { key, plot: lineChart(target, { title, xs, series }) };
}

// --- evaluations ----------------------------------------------------------------------------------------------

function showEvals() {
  const baseline = evals.find((r) => r.step === 0) || job.summary.baseline;
  const latest = evals.length ? evals[evals.length - 1] : job.summary.final;
  const best = job.summary.best;
  const columns = [["step 0 (baseline)", baseline], [`latest (step ${latest ? latest.step : "—"})`, latest]];
  if (best) columns.push([`best (step ${best.step}, published)`, best]);
  const shown = columns.filter(([, row]) => row && row.step !== undefined);
  if (!shown.length) return;
  const accuracy = (row) => (row && row.classification ? row.classification.accuracy : null);
  const rows = COMPARED.filter(([field]) => shown.some(([, row]) => row[field] !== null && row[field] !== undefined))
    .map(([field, label]) => [label, ...shown.map(([, row]) => num(row[field], 4))]);
  if (shown.some(([, row]) => accuracy(row) !== null)) rows.push(["label accuracy", ...shown.map(([, row]) => num(accuracy(row), 4))]);
  $("evals").replaceChildren(h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Scrollable table" }, h("table", { id: "eval-table" },
    h("caption", { class: "muted" }, "Before training (step 0) and after"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"), shown.map(([label]) => h("th", { scope: "col" }, label)))),
    h("tbody", {}, rows.map(([label, ...cells]) => h("tr", {}, h("th", { scope: "row" }, label), cells.map((c) => h("td", {}, c))))),
  )));
  showConfusion(latest && latest.classification ? latest : null);
  showSamples(latest && latest.samples ? latest : null);
}

function showSamples(row) { // a GRPO evaluation's sample completions, with their rewards
  const target = $("samples");
  if (!row) {
    target.replaceChildren();
    return;
  }
  const graders = Object.keys(row.samples.length ? row.samples[0].scores : {});
  const score = (v) => (typeof v === "number" ? num(v, 3) : `failed: ${v}`);
  target.replaceChildren(
    h("h3", {}, `Sample completions at step ${row.step}`),
    h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Scrollable table" }, h("table", { id: "samples-table" },
      h("thead", {}, h("tr", {}, ["Prompt", "Completion", "Reward", ...graders].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, row.samples.map((s) => h("tr", {}, h("td", {}, s.prompt), h("td", {}, h("pre", {}, s.completion)),
        h("td", {}, num(s.reward, 3)), graders.map((g) => h("td", {}, score(s.scores[g])))))),
    )),
  );
}

function showConfusion(row) {
  const target = $("confusion");
  if (!row) {
    target.replaceChildren();
    return;
  }
  const matrix = row.classification.confusion_matrix;
  target.replaceChildren(
    h("h3", {}, `Confusion matrix at step ${row.step}`),
    h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Scrollable table" }, h("table", { id: "confusion-table", class: "ft-confusion" },
      h("caption", { class: "muted" }, "Rows: the reference label; columns: the label answered"),
      h("thead", {}, h("tr", {}, h("td", {}), matrix.columns.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, matrix.rows.map((label, i) => h("tr", {}, h("th", { scope: "row" }, label),
        matrix.counts[i].map((n, j) => h("td", { class: i === j ? "ft-diagonal" : null }, n))))),
    )),
  );
}

window.addEventListener("pagehide", () => events.close());

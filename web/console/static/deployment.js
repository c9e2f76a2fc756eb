// One deployment: its status, replicas and status history, refreshed from the API every few seconds with the
// health charts (GET /v1/deployments/{name}/metrics); stop, standby and delete; the update form (PATCH).
import { api, h, lineChart, num, showError } from "/static/console.js";
import { readFields, showApiError } from "/static/deployments.js";

const { name } = JSON.parse(document.getElementById("page-data").textContent);
const path = `/v1/deployments/${encodeURIComponent(name)}`;
const EVERY_MS = 3000;
const $ = (id) => document.getElementById(id);
let polling = true;

// ---- the charts: what each shows of a metrics point (web/routers/deployments.py `metrics`) -------------------

// perAdapter: the figure of each adapter's own points beside the total; zero: the value of an adapter without a
// point in that interval (no request then: 0 req/s, but no inference time).
const CHARTS = [
  { id: "chart-requests", title: "Requests/s", key: "requests_per_second", perAdapter: true, zero: 0 },
  { id: "chart-tokens", title: "Generated tokens/s", key: "generated_tokens_per_second", perAdapter: true, zero: 0 },
  { id: "chart-inference", title: "Mean inference time (ms)", key: "inference_time_ms", perAdapter: true, zero: null },
  { id: "chart-queue", title: "Mean queue duration (ms)", key: "queue_duration_ms", perAdapter: true, zero: null },
  { id: "chart-replicas", title: "Replicas up (mean)", series: [["replicas", (p) => p.replicas]] },
  { id: "chart-utilization", title: "Utilization (%)", series: [
    ["busy", (p) => percent(p.utilization)], ["CPU", (p) => percent(p.cpu_utilization)]] },
];
const plots = new Map(); // chart id -> {labels, plot}

const percent = (x) => (x === null || x === undefined ? null : Math.round(x * 1000) / 10);

function seriesOf(chart, metrics) {
  const points = metrics.points;
  if (!chart.perAdapter) return chart.series.map(([label, pick]) => ({ label, values: points.map(pick) }));
  const adapters = Object.entries(metrics.adapters);
  // The total beside the adapters' own lines when there are several (with one, it is that adapter's line).
  const series = adapters.length === 1 ? [] : [{ label: "all", values: points.map((p) => p[chart.key]) }];
  for (const [adapter, own] of adapters) {
    const at = new Map(own.map((p) => [p.t, p[chart.key]]));
    series.push({ label: adapter, values: points.map((p) => (at.has(p.t) ? at.get(p.t) : chart.zero)) });
  }
  return series;
}

function drawCharts(metrics) {
  $("interval").textContent = String(metrics.interval_seconds);
  const now = Date.now();
  const xs = metrics.points.map((p) => Math.round((Date.parse(p.t) - now) / 1000));
  for (const chart of CHARTS) {
    const box = $(chart.id);
    const series = seriesOf(chart, metrics);
    box.dataset.points = String(xs.length);
    box.dataset.nonzero = String(xs.filter((_, i) => series.some((s) => s.values[i] > 0)).length);
    const kept = plots.get(chart.id);
    if (series.every((s) => s.values.every((v) => v === null || v === undefined))) {
      // Nothing to draw (no point yet, or no request in the window): uPlot cannot scale an axis on no value.
      if (kept) kept.plot.destroy();
      plots.delete(chart.id);
      box.replaceChildren(h("p", { class: "muted" }, `${chart.title}: no figures yet.`));
      continue;
    }
    const labels = series.map((s) => s.label).join("\n");
    if (kept && kept.labels === labels) {
      kept.plot.setData([xs, ...series.map((s) => s.values)]);
      continue;
    }
    if (kept) kept.plot.destroy();
    const target = h("div");
    box.replaceChildren(target);
    const plot = lineChart(target, { title: chart.title, xs, series, xLabel: "seconds from now" });
    if (chart.zero === null) {
      // Times exist only where requests were served: draw every point, or a lone one between gaps shows nothing.
      // (Set before uPlot's first draw, which it defers to a microtask; every later draw reads it too.)
      for (const s of plot.series.slice(1)) s.points.show = () => true;
    }
    plots.set(chart.id, { labels, plot });
  }
}

// Per adapter over the points shown: requests, errors, tokens, and the request-weighted mean times.
function drawAdapters(metrics) {
  const rows = [];
  for (const [adapter, points] of Object.entries(metrics.adapters)) {
    let requests = 0, errors = 0, tokens = 0, inference = 0, queue = 0;
    for (const p of points) {
      requests += p.requests;
      errors += p.errors;
      tokens += p.generated_tokens_per_second * metrics.interval_seconds;
      inference += (p.inference_time_ms || 0) * p.requests;
      queue += (p.queue_duration_ms || 0) * p.requests;
    }
    rows.push(h("tr", {}, h("th", { scope: "row" }, adapter), h("td", {}, String(requests)),
                h("td", {}, String(errors)), h("td", {}, String(Math.round(tokens))),
                h("td", {}, requests ? num(inference / requests, 1) : "—"),
                h("td", {}, requests ? num(queue / requests, 1) : "—")));
  }
  $("adapter-rows").replaceChildren(...(rows.length ? rows
    : [h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No request yet."))]));
}

// ---- status, replicas, history -------------------------------------------------------------------------------

const when = (iso) => (iso ? iso.slice(0, 19).replace("T", " ") : "—");

// Stop: while it is not Stopped; Standby: what a Stopped or Errored deployment is moved to (to run again).
function enableActions(status) {
  $("stop").disabled = status === "Stopped";
  $("standby").disabled = !["Stopped", "Errored"].includes(status);
}

function drawDeployment(d) {
  enableActions(d.status);
  const status = $("status");
  status.textContent = d.status;
  status.className = `badge ${d.status.toLowerCase()}`;
  $("status-reason").textContent = d.status_reason;
  $("suspended").textContent = d.suspended_reason || "";
  $("suspended").hidden = !d.suspended_reason;
  $("replicas").textContent = String(d.replicas);
  $("range").textContent = `${d.min_replicas} / ${d.max_replicas}`;
  $("load").textContent = `${d.live.in_flight} / ${d.live.waiting}`;
  $("cold-start").textContent = d.cold_start_ms === null ? "—" : `${num(d.cold_start_ms / 1000, 1)} s`;
  const replicas = d.live.replicas.map((r) => h("tr", {},
    h("td", { class: "mono" }, r.id.slice(0, 8)), h("td", {}, r.state), h("td", {}, String(r.in_flight)),
    h("td", {}, String(r.served)), h("td", {}, r.adapters.join(", ") || "—"), h("td", {}, String(r.up_seconds)),
    h("td", {}, r.start_seconds === null ? "—" : String(r.start_seconds))));
  $("replica-rows").replaceChildren(...(replicas.length ? replicas
    : [h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No replica up."))]));
}

function drawTransitions(transitions) {
  $("transition-rows").replaceChildren(...transitions.map((t) => h("tr", {},
    h("td", {}, when(t.at)), h("td", {}, t.from_status || "—"), h("td", {}, t.to_status),
    h("td", {}, t.replicas === null ? "" : String(t.replicas)), h("td", {}, t.reason))));
}

async function refresh() {
  try {
    const [d, transitions, metrics] = await Promise.all([
      api(path), api(`${path}/transitions`), api(`${path}/metrics?minutes=15`)]);
    drawDeployment(d);
    drawTransitions(transitions);
    drawCharts(metrics);
    drawAdapters(metrics);
    $("metrics-status").replaceChildren();
  } catch (error) {
    if (error.status === 404) {
      polling = false;
      $("metrics-status").replaceChildren(h("span", { role: "alert" }, "This deployment was deleted."));
    } else {
      showError($("metrics-status"), error);
    }
  }
}

async function poll() {
  if (!document.hidden) await refresh();
  if (polling) setTimeout(poll, EVERY_MS);
}

// ---- actions and the update form -----------------------------------------------------------------------------

async function act(button, run) {
  const status = $("action-status");
  button.disabled = true;
  status.replaceChildren(`${button.textContent}…`);
  try {
    await run();
    status.replaceChildren(`${button.textContent}: done.`);
    await refresh();
  } catch (error) {
    showError(status, error);
  } finally {
    button.disabled = false;
    enableActions($("status").textContent);
  }
}

$("stop").addEventListener("click", (e) => act(e.currentTarget, () => api(`${path}/stop`, { method: "POST" })));
$("standby").addEventListener("click", (e) => act(e.currentTarget, () => api(`${path}/standby`, { method: "POST" })));
$("delete").addEventListener("click", (e) => {
  if (!window.confirm(`Delete the deployment ${name}? Requests in flight finish, then its replicas stop.`)) return;
  act(e.currentTarget, async () => {
    polling = false;
    try {
      await api(`${path}?wait=30`, { method: "DELETE" });
    } catch (error) {
      polling = true;
      setTimeout(poll, EVERY_MS);
      throw error;
    }
    window.location.assign("/deployments");
  });
});

const form = $("update-form");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("update-status");
  status.replaceChildren();
  const body = readFields(form, { changedOnly: true });
  if (body === null) return;
  if (Object.keys(body).length === 0) {
    status.replaceChildren("Nothing changed.");
    return;
  }
  try {
    const d = await api(path, { method: "PATCH", body });
    for (const input of form.querySelectorAll("[data-kind]")) input.dataset.initial = input.value;
    status.replaceChildren(h("span", { class: "ok" }, `Saved (${Object.keys(body).join(", ")}).`));
    drawDeployment(d);
  } catch (error) {
    showApiError(form, status, error);
  }
});

enableActions($("status").textContent);
poll();

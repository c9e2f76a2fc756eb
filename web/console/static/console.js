// What every page's script shares: calls to the API signed in by the console's session (the cookie, and the
// session's token in X-CSRF-Token on anything but a GET), DOM built from text (never innerHTML: names, rows and
// errors from users are shown as text), live events, charts (uPlot, static/vendor), money and numbers.

export const csrfToken = document.querySelector('meta[name="csrf-token"]').content;

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
    this.body = body;
  }
}

// fetch() of an API route: JSON in and out; `form` (a FormData) instead of `body` for uploads. Throws ApiError.
export async function api(path, { method = "GET", body, form } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: form !== undefined ? form : body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// An upload with progress (fetch has no upload progress): onProgress(fraction). Resolves to {status, data}.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    request.setRequestHeader("X-CSRF-Token", csrfToken);
    request.setRequestHeader("Accept", "application/json");
    request.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    request.onload = () => {
      const data = request.responseText ? JSON.parse(request.responseText) : null;
      if (request.status >= 400) reject(new ApiError(request.status, data));
      else resolve({ status: request.status, data });
    };
    request.onerror = () => reject(new Error("the upload was interrupted"));
    request.send(form);
  });
}

// Read an SSE body of a POST (fetch: EventSource cannot POST): onData(parsed JSON) for every `data:` line but
// [DONE]. Resolves when the stream ends; `signal` (an AbortController's) stops it, rejecting with an AbortError.
export async function postStream(path, body, onData, signal) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin", signal,
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken, Accept: "text/event-stream" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data && data !== "[DONE]") onData(JSON.parse(data));
      }
    }
  }
}

// h("td", {class: "x"}, "text", child): an element whose text is set as text.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function showError(target, error) {
  target.replaceChildren(h("span", { class: "error", role: "alert" }, error.message || String(error)));
}

export const usd = (micro) => `$${(micro / 1e6).toFixed(micro !== 0 && Math.abs(micro) < 10000 ? 4 : 2)}`;
export const num = (x, digits = 3) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));

// A line chart over x: series is [{label, values}], values aligned with xs. Resizes with its container.
export function lineChart(target, { title, xs, series, xLabel = "step" }) {
  const width = () => Math.max(280, target.clientWidth || 600);
  const colors = ["#0b5cad", "#b54708", "#067647", "#b42318", "#6941c6", "#475467"];
  const options = {
    title, width: width(), height: 220,
    scales: { x: { time: false } },
    axes: [{ label: xLabel }, {}],
    series: [{ label: xLabel }, ...series.map((s, i) => ({ label: s.label, stroke: colors[i % colors.length],
                                                          width: 2, spanGaps: true }))],
  };
  const plot = new window.uPlot(options, [xs, ...series.map((s) => s.values)], target);
  new ResizeObserver(() => plot.setSize({ width: width(), height: 220 })).observe(target);
  return plot;
}

// The billing portal: the usage bars (widths from the numbers the page carries), and the buttons to Stripe
// Checkout (a card, a top-up) and to Stripe's customer portal: each calls the API and goes to the URL it returns,
// or says the API's error beside the button.
import { api, h } from "/static/console.js";

// Each chart's bars: by cost; while nothing in it was charged (the free tier), by tokens.
for (const figure of document.querySelectorAll("figure.bars")) {
  const bars = [...figure.querySelectorAll(".bar")];
  const costs = bars.map((b) => Number(b.dataset.micro));
  const byCost = costs.some((c) => c > 0);
  const values = byCost ? costs : bars.map((b) => Number(b.dataset.tokens));
  const most = Math.max(0, ...values);
  if (!byCost) figure.querySelector("figcaption").textContent = most > 0 ? "Tokens (nothing charged yet)" : "No usage";
  bars.forEach((bar, i) => { bar.style.width = most > 0 ? `${(100 * values[i]) / most}%` : "0"; });
}

// A form whose button asks the API for a Stripe URL and goes there.
function toStripe(form, path, body) {
  const out = form.querySelector(".out");
  const button = form.querySelector("button");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    out.replaceChildren();
    form.querySelectorAll("[aria-invalid]").forEach((input) => input.removeAttribute("aria-invalid"));
    button.disabled = true;
    try {
      const { url } = await api(path, { method: "POST", body: body() });
      out.replaceChildren(h("span", { class: "muted" }, "Opening Stripe…"));
      window.location.assign(url);
    } catch (error) {
      const input = error.param && form.querySelector(`[name="${CSS.escape(error.param)}"]`);
      if (input) input.setAttribute("aria-invalid", "true");
      out.replaceChildren(h("span", { class: "error", role: "alert" }, error.message || String(error)));
      button.disabled = false;
    }
  });
}

toStripe(document.getElementById("add-card"), "/v1/billing/checkout", () => ({ purpose: "card" }));
const amount = document.getElementById("topup-amount");
toStripe(document.getElementById("topup"), "/v1/billing/checkout", () =>
  amount.value.trim() ? { purpose: "topup", amount_usd: amount.value.trim() } : { purpose: "topup" });
toStripe(document.getElementById("portal"), "/v1/billing/portal", () => undefined);

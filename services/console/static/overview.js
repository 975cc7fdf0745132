// Overview: live figures and the last hour per minute from the relay's performance view (server-side,
// every request of every relay), and spend today from the usage rollups. Refreshes every 5 s.
import { api, field, fmt, h, table, ApiError } from "./lib.js";
import { timeChart, update } from "./charts.js";

const REFRESH_MS = 5000;
const FAULTS = ["caller", "policy", "provider", "gateway"];
const MEASURES = [
  ["Latency", "latency_ms"],
  ["Gateway overhead", "overhead_ms"],
  ["Time to first byte (streams)", "stream_ttfb_ms"],
];

function tile(label, id) {
  return h("div", { class: "tile" }, h("span", { class: "label" }, label), h("span", { class: "value", id }, "–"));
}

// A percentile of the view, "–" when its group saw no sample.
const pct = (group, key) => (group && group.count ? fmt.ms(group[key]) : "–");

export async function overview({ main }) {
  const trafficBox = h("div", { class: "chart", id: "traffic-chart" });
  const latencyBox = h("div", { class: "chart", id: "latency-chart" });
  const minutesBox = h("div", { id: "minutes-table" });
  const faults = h("div", { id: "faults" });
  const pcts = h("div", { id: "percentiles" });
  const source = h("p", { class: "hint", id: "overview-source" });
  const windowSelect = h("select", { id: "overview-window" }, ["1m", "5m", "1h"].map((w) => h("option", { value: w }, `last ${w}`)));
  main.append(
    h(
      "section",
      { class: "tiles", "aria-label": "Live figures" },
      tile("Requests per second", "ov-rps"),
      tile("Error rate", "ov-error-rate"),
      tile("Active streams", "ov-streams"),
      tile("Spend today", "ov-spend"),
    ),
    h("div", { class: "filters" }, field("Window", windowSelect), source),
    h("div", { class: "grid2" }, h("section", {}, h("h2", {}, "Errors by fault class"), faults), h("section", {}, h("h2", {}, "Latency percentiles"), pcts)),
    h(
      "div",
      { class: "grid2" },
      h("section", {}, h("h2", {}, "Traffic per minute, last hour"), trafficBox),
      h("section", {}, h("h2", {}, "Latency per minute, last hour"), latencyBox),
    ),
    h("details", {}, h("summary", {}, "Per-minute figures"), minutesBox),
  );
  const opened = Date.now();
  const traffic = timeChart(trafficBox, { series: [{ label: "requests" }, { label: "errors" }], yLabel: "per minute", fromMs: opened - 3600_000, toMs: opened, format: fmt.num });
  const latency = timeChart(latencyBox, { series: [{ label: "p50" }, { label: "p99" }], yLabel: "ms", fromMs: opened - 3600_000, toMs: opened, format: fmt.num });

  async function refresh() {
    const now = Date.now();
    const midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    const [spend, perf] = await Promise.all([
      api.get("usage", { granularity: "hour", since_ms: midnight.getTime(), until_ms: now + 3600_000 }),
      api.get("performance").catch((err) => {
        // 503: a relay that keeps no performance windows.
        if (err instanceof ApiError && err.status === 503) return null;
        throw err;
      }),
    ]);
    const spent = (spend.buckets || []).reduce((n, b) => n + Number(b.cost_micros || 0), 0);
    document.getElementById("ov-spend").textContent = fmt.money(spent);
    if (!perf) {
      source.textContent = "This relay keeps no performance windows: no live figures.";
      return;
    }
    const w = perf.windows[windowSelect.value];
    document.getElementById("ov-rps").textContent = fmt.num(w.requests_per_s);
    document.getElementById("ov-error-rate").textContent = fmt.pct(w.errors.rate);
    document.getElementById("ov-streams").textContent = fmt.int(perf.now.active_streams);
    source.textContent = `From the performance view (last ${windowSelect.value}, ${perf.now.relays} relay${perf.now.relays === 1 ? "" : "s"}); refreshed ${new Date().toLocaleTimeString()}.`;
    faults.replaceChildren(
      table(
        [
          { label: "Fault class", cell: (f) => f },
          { label: "Requests", num: true, cell: (f) => fmt.int(w.errors.by_fault[f]?.count) },
          { label: "Error rate", num: true, cell: (f) => fmt.pct(w.errors.by_fault[f]?.rate) },
        ],
        FAULTS,
      ),
    );
    pcts.replaceChildren(
      table(
        [
          { label: "Measure", cell: (m) => m[0] },
          { label: "p50", num: true, cell: (m) => pct(w[m[1]], "p50") },
          { label: "p95", num: true, cell: (m) => pct(w[m[1]], "p95") },
          { label: "p99", num: true, cell: (m) => pct(w[m[1]], "p99") },
        ],
        MEASURES,
      ),
    );
    const minutes = perf.minutes || [];
    const x = minutes.map((m) => m.at_ms);
    const from = x.length ? x[0] : now - 3600_000;
    const to = x.length ? x[x.length - 1] + 60_000 : now;
    update(traffic, x, [minutes.map((m) => m.requests), minutes.map((m) => m.errors.count)], from, to);
    update(latency, x, [minutes.map((m) => (m.requests ? m.latency_ms.p50 : null)), minutes.map((m) => (m.requests ? m.latency_ms.p99 : null))], from, to);
    // What the charts show, for tests and tools: points drawn and the requests they add up to.
    trafficBox.dataset.points = String(x.length);
    trafficBox.dataset.requests = String(minutes.reduce((n, m) => n + m.requests, 0));
    const seen = minutes.filter((m) => m.requests).reverse();
    minutesBox.replaceChildren(
      table(
        [
          { label: "Minute", cell: (m) => new Date(m.at_ms).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" }) },
          { label: "Requests", num: true, cell: (m) => fmt.int(m.requests) },
          { label: "Errors", num: true, cell: (m) => fmt.int(m.errors.count) },
          { label: "p50", num: true, cell: (m) => fmt.ms(m.latency_ms.p50) },
          { label: "p99", num: true, cell: (m) => fmt.ms(m.latency_ms.p99) },
        ],
        seen,
        { caption: "Minutes with traffic, newest first", empty: "No requests in the last hour." },
      ),
    );
  }

  windowSelect.addEventListener("change", () => refresh().catch(() => {}));
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), REFRESH_MS);
  return () => clearInterval(timer);
}

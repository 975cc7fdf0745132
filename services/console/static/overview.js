// Overview: live figures (the relay's performance view; from the recent request logs on a relay that
// keeps no performance windows), spend today, and traffic per minute. Refreshes every 5 s.
import { api, field, fmt, h, percentile, table, ApiError } from "./lib.js";
import { timeChart, update } from "./charts.js";

const WINDOW_MS = 30 * 60 * 1000;
const REFRESH_MS = 5000;
const FAULTS = ["caller", "policy", "provider", "gateway"];

function tile(label, id) {
  return h("div", { class: "tile" }, h("span", { class: "label" }, label), h("span", { class: "value", id }, "–"));
}

function count(log) {
  return Number(log.aggregated) || 1;
}

// Figures over the last minute of logs (a fallback: the logger sees requests a moment after they end).
function figuresFromLogs(logs, now) {
  const recent = logs.filter((l) => Number(l.occurred_at_ms) >= now - 60_000);
  const requests = recent.reduce((n, l) => n + count(l), 0);
  const byFault = Object.fromEntries(FAULTS.map((f) => [f, 0]));
  for (const l of recent) if (l.error_type) byFault[l.error_type] = (byFault[l.error_type] || 0) + count(l);
  const served = recent.filter((l) => !l.aggregated);
  const pick = (fn) => served.map(fn).filter((v) => Number.isFinite(v) && v >= 0);
  const pcts = (values) => ({ p50: percentile(values, 50), p95: percentile(values, 95), p99: percentile(values, 99) });
  return {
    source: "request logs of the last minute",
    rps: requests / 60,
    requests,
    byFault,
    latency: pcts(pick((l) => Number(l.latency_ms))),
    overhead: pcts(pick((l) => (Number(l.upstream_ms) ? Number(l.latency_ms) - Number(l.upstream_ms) : NaN))),
    ttfb: pcts(pick((l) => (l.stream && Number(l.ttfb_ms) ? Number(l.ttfb_ms) : NaN))),
    activeStreams: null,
  };
}

// The relay's performance view (GET /admin/v1/performance; its shape is in the README, "Performance
// view"): one window of it, merged across every relay.
function figuresFromPerformance(perf, windowName) {
  const w = perf.windows[windowName];
  const group = (g) => (g && g.count ? { p50: g.p50, p95: g.p95, p99: g.p99 } : { p50: NaN, p95: NaN, p99: NaN });
  return {
    source: `the performance view (last ${windowName}, ${perf.now.relays} relay${perf.now.relays === 1 ? "" : "s"})`,
    rps: w.requests_per_s,
    requests: w.requests,
    byFault: Object.fromEntries(FAULTS.map((f) => [f, w.errors.by_fault[f]?.count ?? 0])),
    latency: group(w.latency_ms),
    overhead: group(w.overhead_ms),
    ttfb: group(w.stream_ttfb_ms),
    activeStreams: perf.now.active_streams,
  };
}

export async function overview({ main }) {
  const chartBox = h("div", { class: "chart", id: "traffic-chart" });
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
    h("section", {}, h("h2", {}, "Traffic per minute, last 30 minutes"), chartBox),
  );
  const opened = Date.now();
  const chart = timeChart(chartBox, { series: [{ label: "requests" }, { label: "errors" }], yLabel: "per minute", fromMs: opened - WINDOW_MS, toMs: opened, format: fmt.num });
  let usePerformance = true;

  async function refresh() {
    const now = Date.now();
    const midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    const [logsPage, spend, perf] = await Promise.all([
      api.get("logs", { since_ms: now - WINDOW_MS, limit: 1000 }),
      api.get("usage", { granularity: "hour", since_ms: midnight.getTime(), until_ms: now + 3600_000 }),
      usePerformance
        ? api.get("performance").catch((err) => {
            // 404: a relay older than the view; 503: one that keeps no performance windows.
            if (err instanceof ApiError && (err.status === 404 || err.status === 503)) usePerformance = false;
            return null;
          })
        : null,
    ]);
    const logs = logsPage.logs || [];
    const figures = perf ? figuresFromPerformance(perf, windowSelect.value) : figuresFromLogs(logs, now);
    const errorsTotal = Object.values(figures.byFault).reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
    const rate = figures.requests ? errorsTotal / figures.requests : 0;
    document.getElementById("ov-rps").textContent = fmt.num(figures.rps);
    document.getElementById("ov-error-rate").textContent = fmt.pct(rate);
    document.getElementById("ov-streams").textContent = Number.isFinite(figures.activeStreams) ? fmt.int(figures.activeStreams) : "–";
    const spent = (spend.buckets || []).reduce((n, b) => n + Number(b.cost_micros || 0), 0);
    document.getElementById("ov-spend").textContent = fmt.money(spent);
    source.textContent = `From ${figures.source}; refreshed ${new Date().toLocaleTimeString()}.`;
    faults.replaceChildren(
      table(
        [
          { label: "Fault class", cell: (r) => r },
          { label: "Requests", num: true, cell: (r) => fmt.int(figures.byFault[r]) },
          { label: "Error rate", num: true, cell: (r) => fmt.pct(figures.requests ? figures.byFault[r] / figures.requests : 0) },
        ],
        FAULTS,
      ),
    );
    pcts.replaceChildren(
      table(
        [
          { label: "Measure", cell: (r) => r[0] },
          { label: "p50", num: true, cell: (r) => fmt.ms(r[1].p50) },
          { label: "p95", num: true, cell: (r) => fmt.ms(r[1].p95) },
          { label: "p99", num: true, cell: (r) => fmt.ms(r[1].p99) },
        ],
        [["Latency", figures.latency], ["Gateway overhead", figures.overhead], ["Time to first byte (streams)", figures.ttfb]],
      ),
    );
    const start = Math.floor((now - WINDOW_MS) / 60_000) * 60_000;
    const x = [];
    for (let t = start; t <= now; t += 60_000) x.push(t);
    const req = x.map(() => 0);
    const err = x.map(() => 0);
    for (const l of logs) {
      const i = Math.floor((Number(l.occurred_at_ms) - start) / 60_000);
      if (i < 0 || i >= x.length) continue;
      req[i] += count(l);
      if (l.error_type) err[i] += count(l);
    }
    update(chart, x, [req, err], now - WINDOW_MS, now);
  }

  windowSelect.addEventListener("change", () => refresh().catch(() => {}));
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), REFRESH_MS);
  return () => clearInterval(timer);
}

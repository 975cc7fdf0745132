// Overview: live figures (the performance view when the relay has it, else figures computed from the
// recent request logs), spend today, and traffic per minute. Refreshes every 5 s.
import { api, fmt, h, percentile, table, ApiError } from "./lib.js";
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

function num(v) {
  return v === undefined || v === null ? NaN : Number(v);
}

// The relay's performance view (GET /admin/v1/performance), read leniently: figures it lacks show "–".
function figuresFromPerformance(perf) {
  const group = (g) => ({ p50: num(g?.p50 ?? g?.p50_ms), p95: num(g?.p95 ?? g?.p95_ms), p99: num(g?.p99 ?? g?.p99_ms) });
  const errors = perf.errors_by_fault ?? perf.error_rate_by_fault ?? perf.errors ?? {};
  const requests = num(perf.requests ?? perf.requests_total);
  const byFault = {};
  for (const f of FAULTS) byFault[f] = num(errors[f] ?? 0);
  return {
    source: "the relay's performance view",
    rps: num(perf.rps ?? perf.requests_per_second),
    requests,
    byFault,
    faultsAreRates: perf.errors_by_fault === undefined && perf.errors === undefined,
    latency: group(perf.latency_ms ?? perf.latency),
    overhead: group(perf.overhead_ms ?? perf.overhead),
    ttfb: group(perf.ttfb_ms ?? perf.ttfb),
    activeStreams: num(perf.active_streams ?? perf.streams_active),
  };
}

export async function overview({ main }) {
  const chartBox = h("div", { class: "chart", id: "traffic-chart" });
  const faults = h("div", { id: "faults" });
  const pcts = h("div", { id: "percentiles" });
  const source = h("p", { class: "hint", id: "overview-source" });
  main.append(
    h(
      "section",
      { class: "tiles", "aria-label": "Live figures" },
      tile("Requests per second", "ov-rps"),
      tile("Error rate", "ov-error-rate"),
      tile("Active streams", "ov-streams"),
      tile("Spend today", "ov-spend"),
    ),
    source,
    h("div", { class: "grid2" }, h("section", {}, h("h2", {}, "Errors by fault class"), faults), h("section", {}, h("h2", {}, "Latency percentiles"), pcts)),
    h("section", {}, h("h2", {}, "Traffic per minute, last 30 minutes"), chartBox),
  );
  const chart = timeChart(chartBox, { series: [{ label: "requests" }, { label: "errors" }], yLabel: "per minute" });
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
            if (err instanceof ApiError && err.status === 404) usePerformance = false;
            return null;
          })
        : null,
    ]);
    const logs = logsPage.logs || [];
    const figures = perf ? figuresFromPerformance(perf) : figuresFromLogs(logs, now);
    const errorsTotal = Object.values(figures.byFault).reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
    const rate = figures.faultsAreRates ? errorsTotal : figures.requests ? errorsTotal / figures.requests : 0;
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
          { label: figures.faultsAreRates ? "Rate" : "Requests", num: true, cell: (r) => (figures.faultsAreRates ? fmt.pct(figures.byFault[r]) : fmt.int(figures.byFault[r])) },
          { label: "Share", num: true, cell: (r) => (figures.faultsAreRates ? "–" : fmt.pct(figures.requests ? figures.byFault[r] / figures.requests : 0)) },
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
    update(chart, x, [req, err]);
  }

  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), REFRESH_MS);
  return () => clearInterval(timer);
}

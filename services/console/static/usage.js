// Usage: spend and tokens per hour or day, by key, user or model (chart, table, CSV export).
import { act, api, csv, directory, download, field, fmt, h, table } from "./lib.js";
import { timeChart, update } from "./charts.js";

const RANGES = { "24h": 24 * 3600_000, "7d": 7 * 86400_000, "30d": 30 * 86400_000 };
const TOP_SERIES = 6;
// Buckets read per range at most (pages of 10,000); beyond it the page says the figures are partial.
const MAX_BUCKETS = 100_000;
// Rows the table draws; the chart and the CSV export take every bucket read.
const TABLE_ROWS = 1000;

export async function usage({ main }) {
  const granularity = h("select", { id: "usage-granularity" }, h("option", { value: "hour" }, "hour"), h("option", { value: "day" }, "day"));
  const groupBy = h("select", { id: "usage-group" }, ["model", "key", "user"].map((g) => h("option", { value: g }, g)));
  const range = h("select", { id: "usage-range" }, Object.keys(RANGES).map((r) => h("option", { value: r }, `last ${r}`)));
  const measure = h("select", { id: "usage-measure" }, h("option", { value: "cost" }, "spend"), h("option", { value: "tokens" }, "tokens"), h("option", { value: "requests" }, "requests"));
  const exportButton = h("button", { type: "button", id: "usage-export" }, "Export CSV");
  const form = h("form", { class: "filters", "aria-label": "Usage filters" }, field("Per", granularity), field("By", groupBy), field("Range", range), field("Chart", measure), h("button", { type: "submit", class: "primary" }, "Show"), exportButton);
  const chartBox = h("div", { class: "chart", id: "usage-chart" });
  const tableBox = h("div", { id: "usage-table" });
  const note = h("p", { id: "usage-note", class: "hint", role: "status" });
  const count = h("p", { id: "usage-count", class: "hint", role: "status" });
  main.append(form, note, h("section", {}, h("h2", {}, "Over time"), chartBox), h("section", {}, h("h2", {}, "Buckets"), count, tableBox));

  let rows = [];
  // Names for the ids the rollups carry, read once for this page.
  let names = null;
  const counts = [
    { label: "Requests", num: true, cell: (b) => fmt.int(b.requests), raw: (b) => b.requests },
    { label: "Failed", num: true, cell: (b) => fmt.int(b.failed_requests), raw: (b) => b.failed_requests },
    { label: "Prompt tokens", num: true, cell: (b) => fmt.int(b.prompt_tokens), raw: (b) => b.prompt_tokens },
    { label: "Completion tokens", num: true, cell: (b) => fmt.int(b.completion_tokens), raw: (b) => b.completion_tokens },
    { label: "Spend", num: true, cell: (b) => fmt.money(b.cost_micros), raw: (b) => (Number(b.cost_micros) / 1e6).toFixed(6) },
  ];
  const start = { label: "Start", cell: (b) => fmt.time(b.bucket_start_ms), raw: (b) => new Date(Number(b.bucket_start_ms)).toISOString() };
  // On the page: the name, with the id beside it; in the CSV: the id (stable), then the name.
  const columns = [
    start,
    { label: "Group", cell: (b) => h("span", { title: b.group }, b.name || "(none)") },
    { label: "Id", cell: (b) => (b.name === b.group ? "" : h("code", {}, b.group)) },
    ...counts,
  ];
  const csvColumns = [start, { label: "Group", raw: (b) => b.group }, ...counts, { label: "Name", raw: (b) => b.name }];
  exportButton.addEventListener("click", () => download(`usage-${groupBy.value}-${granularity.value}.csv`, csv(rows, csvColumns)));

  async function buckets(query) {
    let found = [];
    let cursor = "";
    do {
      const answer = await api.get("usage", { ...query, limit: 10000, cursor });
      found = found.concat(answer.buckets || []);
      cursor = answer.next_cursor || "";
    } while (cursor && found.length < MAX_BUCKETS);
    return { found, partial: Boolean(cursor) };
  }

  async function load() {
    const now = Date.now();
    const dim = groupBy.value;
    const step = granularity.value === "day" ? 86400_000 : 3600_000;
    const fromMs = Math.floor((now - RANGES[range.value]) / step) * step;
    const [{ found, partial }, known] = await Promise.all([
      buckets({ group_by: dim, granularity: granularity.value, since_ms: now - RANGES[range.value], until_ms: now + 3600_000 }),
      names || directory(),
    ]);
    names = known;
    rows = found.map((b) => {
      const group = b[`${dim}_id`] ?? b[dim] ?? "";
      return { ...b, group, name: names.name(dim, group) };
    });
    rows.sort((a, b) => Number(a.bucket_start_ms) - Number(b.bucket_start_ms) || a.name.localeCompare(b.name));
    note.textContent = partial ? `Partial: only the first ${fmt.int(found.length)} buckets of this range are shown; choose a shorter range or per day.` : "";
    count.textContent =
      rows.length > TABLE_ROWS
        ? `${fmt.int(rows.length)} buckets; the table shows the first ${fmt.int(TABLE_ROWS)}, the CSV export has them all.`
        : `${fmt.int(rows.length)} buckets.`;
    tableBox.replaceChildren(table(columns, rows.slice(0, TABLE_ROWS), { caption: `Usage per ${granularity.value} by ${dim}`, empty: "No usage in this range." }));
    const value = {
      cost: (b) => Number(b.cost_micros) / 1e6,
      tokens: (b) => Number(b.prompt_tokens) + Number(b.completion_tokens),
      requests: (b) => Number(b.requests),
    }[measure.value];
    const totals = new Map();
    for (const b of rows) totals.set(b.group, (totals.get(b.group) || 0) + value(b));
    const groups = [...totals.entries()].sort((a, b) => b[1] - a[1]).slice(0, TOP_SERIES).map(([g]) => g);
    // Every bucket of the range, used or not: an hour without requests is a zero on the chart, not a
    // straight line from the hour before it to the next one that had some.
    const x = [];
    for (let t = fromMs; t <= now; t += step) x.push(t);
    const index = new Map(x.map((t, i) => [t, i]));
    const series = groups.map((g) => {
      const values = x.map(() => 0);
      for (const b of rows) {
        const i = index.get(Number(b.bucket_start_ms));
        if (b.group === g && i !== undefined) values[i] += value(b);
      }
      return values;
    });
    const yLabel = { cost: "spend (units)", tokens: "tokens", requests: "requests" }[measure.value];
    const format = measure.value === "cost" ? (v) => fmt.money(v * 1e6) : fmt.int;
    const chart = timeChart(chartBox, {
      series: groups.map((g) => ({ label: names.name(dim, g) || "(none)" })),
      yLabel,
      format,
      fromMs,
      toMs: now,
    });
    update(chart, x, series);
    chartBox.dataset.points = String(x.length);
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(load);
  });
  await load();
}

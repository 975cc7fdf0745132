// Time-series charts with the vendored uPlot (static/vendor). A chart keeps its box's size, so
// refreshing data never moves the page; the x axis spans the period asked for, not just the data.

const PALETTE = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#4b5563"];

// fromMs/toMs: the period shown; format: how the y axis writes a value.
export function timeChart(box, { series, yLabel, fromMs, toMs, format, height = 220 }) {
  box.replaceChildren();
  const width = Math.max(320, box.clientWidth - 16 || 640);
  const period = { from: fromMs / 1000, to: toMs / 1000 };
  const opts = {
    width,
    height,
    scales: {
      x: { time: true, range: () => [period.from, period.to] },
      y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
    },
    axes: [{}, { label: yLabel, size: 80, values: (u, splits) => splits.map((v) => format(v)) }],
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: PALETTE[i % PALETTE.length], width: 2, points: { show: true, size: 5 } }))],
    legend: { live: false },
  };
  return { chart: new window.uPlot(opts, [[], ...series.map(() => [])], box), period, series };
}

// x: timestamps in ms; each series' values aligned with x; fromMs/toMs move the period (live charts).
export function update(handle, x, valuesBySeries, fromMs, toMs) {
  if (fromMs !== undefined) {
    handle.period.from = fromMs / 1000;
    handle.period.to = toMs / 1000;
  }
  handle.chart.setData([x.map((ms) => ms / 1000), ...valuesBySeries]);
}

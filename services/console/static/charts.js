// Time-series charts with the vendored uPlot (static/vendor). A chart keeps its box's size, so
// refreshing data never moves the page.

const PALETTE = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#4b5563"];

export function timeChart(box, { series, yLabel, height = 220 }) {
  box.replaceChildren();
  const width = Math.max(320, box.clientWidth || 640);
  const opts = {
    width,
    height,
    scales: { x: { time: true } },
    axes: [{}, { label: yLabel, size: 70 }],
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: PALETTE[i % PALETTE.length], width: 2, points: { show: true, size: 4 } }))],
    legend: { live: false },
  };
  return { chart: new window.uPlot(opts, [[], ...series.map(() => [])], box), series };
}

// x: timestamps in ms; each series' values aligned with x.
export function update(handle, x, valuesBySeries) {
  handle.chart.setData([x.map((ms) => ms / 1000), ...valuesBySeries]);
}

// Charts as plain SVG, written here rather than vendored: the console needs three shapes (time series, bars and
// intervals with error bars), each a few dozen lines, and SVG text and titles are readable by screen readers.
const NS = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f5fbf", "#b3261e", "#1b7f3b", "#a45a00", "#6b3fa0"];

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((m) => m >= v);
}

const fmtTick = (v) => Number.isInteger(v) ? String(v) : Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(1) : v.toPrecision(2);

function frame(title, width, height) {
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  svg.append(s("title", {}, title));
  return svg;
}

function yAxis(svg, max, { left, top, plotW, plotH, unit }) {
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    svg.append(s("line", { x1: left, x2: left + plotW, y1: y, y2: y, stroke: "#e4e7ee" }));
    svg.append(s("text", { x: left - 4, y: y + 4, "text-anchor": "end" }, fmtTick((max * i) / 4)));
  }
  if (unit) svg.append(s("text", { x: 4, y: top - 6 }, unit));
}

/**
 * A time-series line chart. series: [{name, points: [[epochSeconds, value|null], …]}]; gaps where value is null.
 * Returns an <svg> (role=img, titled) or null when no series has a value.
 */
export function lineChart(title, series, { unit = "", width = 640, height = 220 } = {}) {
  const values = series.flatMap((x) => x.points.map((p) => p[1])).filter((v) => v !== null && v !== undefined);
  if (!values.length) return null;
  const ts = series.flatMap((x) => x.points.map((p) => p[0]));
  const t0 = Math.min(...ts), t1 = Math.max(...ts, t0 + 1);
  const max = niceMax(Math.max(...values));
  const left = 48, top = 22, plotW = width - left - 12, plotH = height - top - 42;
  const svg = frame(title, width, height);
  yAxis(svg, max, { left, top, plotW, plotH, unit });
  const x = (t) => left + ((t - t0) / (t1 - t0)) * plotW;
  const y = (v) => top + plotH - (v / max) * plotH;
  for (const frac of [0, 0.5, 1]) {
    const t = t0 + frac * (t1 - t0);
    const short = t1 - t0 < 3600;  // within an hour: seconds matter, the day does not
    const label = new Date(t * 1000).toLocaleString([], short ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
      : { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
    svg.append(s("text", { x: x(t), y: top + plotH + 14, "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle" }, label));
  }
  series.forEach((ser, i) => {
    let d = "", pen = false;
    for (const [t, v] of ser.points) {
      if (v === null || v === undefined) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    }
    svg.append(s("path", { d, fill: "none", stroke: COLOURS[i % COLOURS.length], "stroke-width": 1.6 }));
    svg.append(s("rect", { x: left + i * 110, y: height - 16, width: 10, height: 10, fill: COLOURS[i % COLOURS.length] }));
    svg.append(s("text", { x: left + 14 + i * 110, y: height - 7 }, ser.name));
  });
  return svg;
}

/**
 * Horizontal bars with optional 95% intervals drawn as error bars.
 * items: [{label, value, lo?, hi?}]; a value of null is drawn as "no data".
 */
export function barChart(title, items, { unit = "", width = 640, rowH = 30, colour = COLOURS[0] } = {}) {
  if (!items.length) return null;
  const extents = items.flatMap((it) => [it.value, it.hi, it.lo]).filter((v) => v !== null && v !== undefined);
  const min = Math.min(0, ...extents);
  const max = niceMax(Math.max(...extents.map(Math.abs), 1e-9));
  const lo = min < 0 ? -max : 0;
  const left = 150, top = 24, plotW = width - left - 60, height = top + items.length * rowH + 24;
  const svg = frame(title, width, height);
  const x = (v) => left + ((v - lo) / (max - lo)) * plotW;
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((max - lo) * i) / 4;
    svg.append(s("line", { x1: x(v), x2: x(v), y1: top - 4, y2: height - 20, stroke: "#e4e7ee" }));
    svg.append(s("text", { x: x(v), y: height - 6, "text-anchor": "middle" }, fmtTick(v)));
  }
  if (unit) svg.append(s("text", { x: width - 4, y: 12, "text-anchor": "end" }, unit));
  if (lo < 0) svg.append(s("line", { x1: x(0), x2: x(0), y1: top - 4, y2: height - 20, stroke: "#5b6475" }));
  items.forEach((it, i) => {
    const yMid = top + i * rowH + rowH / 2;
    svg.append(s("text", { x: left - 6, y: yMid + 4, "text-anchor": "end" }, it.label));
    if (it.value === null || it.value === undefined) {
      svg.append(s("text", { x: left + 4, y: yMid + 4 }, "no data"));
      return;
    }
    const a = x(Math.min(0, it.value)), b = x(Math.max(0, it.value));
    svg.append(s("rect", { x: a, y: yMid - 8, width: Math.max(1, b - a), height: 16, fill: it.colour || colour, opacity: 0.8 }));
    if (it.lo !== undefined && it.hi !== undefined && it.lo !== null && it.hi !== null) {
      const err = s("g", { stroke: "#1d2330", "stroke-width": 1.5 });
      err.append(s("line", { x1: x(it.lo), x2: x(it.hi), y1: yMid, y2: yMid }));
      err.append(s("line", { x1: x(it.lo), x2: x(it.lo), y1: yMid - 6, y2: yMid + 6 }));
      err.append(s("line", { x1: x(it.hi), x2: x(it.hi), y1: yMid - 6, y2: yMid + 6 }));
      err.append(s("title", {}, `${it.label}: ${fmtTick(it.value)} (95% interval ${fmtTick(it.lo)} to ${fmtTick(it.hi)})`));
      svg.append(err);
    }
    svg.append(s("text", { x: Math.max(b, it.hi !== undefined && it.hi !== null ? x(it.hi) : b) + 6, y: yMid + 4 }, fmtTick(it.value)));
  });
  return svg;
}

// Device: identity and slots, its named models (each with its own slots and update), update history with reason
// codes and timings, telemetry charts over a chosen range, and drift per input against the calibration data of the
// version it runs.
import { api } from "../api.js";
import { lineChart } from "../charts.js";
import { badge, empty, field, fmtAgo, fmtBytes, fmtNum, fmtTime, h, select, table } from "../ui.js";

const RANGES = [["3600", "last hour"], ["86400", "last day"], ["604800", "last week"]];

export async function render(main, [id, initialRange], ctx) {
  const t0 = performance.now();
  const identity = h("div", { class: "panel" });
  const models = h("div");
  const charts = h("div", { class: "grid2", "aria-busy": "true" });
  const history = h("div");
  const drift = h("div");
  const range = select("range", RANGES, RANGES.some(([v]) => v === initialRange) ? initialRange : "86400");
  main.append(h("h1", {}, `Device ${id}`), identity, h("h2", {}, "Models"), models,
    h("h2", {}, "Telemetry"), h("div", { class: "row" }, field("Time range", range)), charts,
    h("h2", {}, "Update history"), history, h("h2", {}, "Drift per input"), drift);
  range.addEventListener("change", () => loadCharts());

  async function loadCharts() {
    const since = Date.now() / 1000 - Number(range.value);
    const doc = await api(`/v1/console/devices/${encodeURIComponent(id)}/series`, { params: { since, points: 300 } });
    drawCharts(charts, doc);
    charts.setAttribute("aria-busy", "false");
    if (!window.consoleTimings) window.consoleTimings = {};
    window.consoleTimings.deviceCharts = performance.now() - t0;  // read by bench/console_bench.py
  }
  ctx.poll(async () => {
    const [d, hist] = await Promise.all([api(`/v1/devices/${encodeURIComponent(id)}`),
      api(`/v1/console/devices/${encodeURIComponent(id)}/history`)]);
    identity.replaceChildren(identityList(d, hist));
    models.replaceChildren(modelsTable(d));
    history.replaceChildren(historyTable(hist));
  }, 3000);
  ctx.poll(loadCharts, 10000);
  ctx.poll(async () => {
    const doc = await api(`/v1/console/devices/${encodeURIComponent(id)}/drift`);
    drift.replaceChildren(...(doc.models && doc.models.length ? doc.models : [doc]).map(driftTable));  // one per model
  }, 15000);
}

function identityList(d, hist) {
  const labels = [d.active_version, ...(d.models || []).map((m) => m.active_version)];
  const running = (m) => labels.includes(m.version) || labels.includes(`${m.model} ${m.version}`);
  const previous = hist.find((m) => (m.status === "installed" || m.status === "rolled_back") && !running(m));
  const rows = [["Profile", d.profile], ["Tags", d.tags.join(", ") || "—"], ["Agent", d.agent_version || "—"],
    ["Connection", badge(d.online ? "online" : "offline")], ["Last seen", `${fmtAgo(d.last_seen)} (${fmtTime(d.last_seen)})`],
    ["Active slot", d.active_version ? `${d.active_version} (${(d.active_sha256 || "").slice(0, 12)}…)`
      : d.active_sha256 ? `sha256 ${d.active_sha256.slice(0, 12)}… (version not reported)` : "no model yet"],
    ["Previous slot", previous ? `${previous.model} ${previous.version} (from the update history)` : "—"],
    ["Enrolled", fmtTime(d.enrolled_at)]];
  if (d.decommissioned_at) rows.push(["Decommissioned", fmtTime(d.decommissioned_at)]);
  return h("dl", { class: "ident" }, rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
}

// one row per named model (agents before several models per device report one, named by its label's first word)
function modelsTable(d) {
  return table([
    { label: "Model", value: (m) => m.name },
    { label: "Version", value: (m) => m.active_version || "—" },
    { label: "Slot", value: (m) => m.active_slot ? `${m.active_slot} (${(m.active_sha256 || "").slice(0, 12)}…)` : "—" },
    { label: "Update", value: (m) => m.job ? h("span", {}, badge(m.update_state), ` job ${m.job}`) : badge(m.update_state) },
    { label: "Reported", value: (m) => fmtAgo(m.updated_at) },
  ], d.models || [], { emptyText: "This device has not reported any model yet." });
}

function drawCharts(box, doc) {
  const s = doc.series;
  if (!s.length) {
    box.replaceChildren(empty("No telemetry in this range yet: the agent reports every telemetry interval once it runs a model."));
    return;
  }
  const pts = (key) => s.map((b) => [b.t, b[key]]);
  const panel = (title, chart, none) => h("div", { class: "panel" }, h("h3", {}, title), chart || empty(none || `No ${title.toLowerCase()} reported.`));
  box.replaceChildren(
    panel("Latency p50 / p99", lineChart("Latency p50 and p99 over time", [{ name: "p50", points: pts("p50_ms") }, { name: "p99", points: pts("p99_ms") }], { unit: "ms" })),
    panel("Error rate", lineChart("Error rate over time", [{ name: "error rate %", points: s.map((b) => [b.t, b.error_rate === null ? null : 100 * b.error_rate]) }], { unit: "%" })),
    panel("CPU", lineChart("CPU over time", [{ name: "CPU %", points: pts("cpu_percent") }], { unit: "%" })),
    panel("Memory (RSS)", lineChart("Resident memory over time", [{ name: "RSS MB", points: pts("rss_mb") }], { unit: "MB" })),
    panel("Temperature", lineChart("Temperature over time", [{ name: "°C", points: pts("temperature_c") }], { unit: "°C" }),
      "No temperature reported in this range (devices without a thermal zone report none)."));
  box.parentNode.querySelector(".series-note")?.remove();
  box.after(h("p", { class: "small muted series-note" }, `${doc.windows.toLocaleString()} telemetry windows in ${s.length} points; percentiles from merged histograms.`));
}

function historyTable(hist) {
  return table([
    { label: "Rollout", value: (m) => h("a", { href: `#/rollouts/${m.rollout_id}` }, `#${m.rollout_id} ${m.rollout || ""}`) },
    { label: "Version", value: (m) => `${m.model} ${m.version}` },
    { label: "Status", value: (m) => badge(m.status) },
    { label: "Reason", value: (m) => m.reason ? h("code", {}, m.reason) : "—" },
    { label: "Detail", value: (m) => m.detail || "" },
    { label: "Delivery", value: (m) => m.delivery ? `${m.delivery}, ${fmtBytes(m.bytes_offered)}` : "—" },
    { label: "Offered", value: (m) => fmtTime(m.offered_at) },
    { label: "Took", value: (m) => m.offered_at && m.finished_at ? `${fmtNum(m.finished_at - m.offered_at, 1)} s` : "—", num: true },
    { label: "Timings (ms)", value: (m) => Object.entries(m.timings || {}).map(([k, v]) => `${k} ${Math.round(v)}`).join(", ") || "—" },
  ], hist, { emptyText: "This device has not been part of any rollout yet." });
}

function driftTable(doc) {
  const rows = Object.entries(doc.inputs).map(([name, r]) => ({ name, ...r }));
  if (!rows.length) return empty(doc.model_version ? `No input statistics from ${doc.model_version} in the last hour.` : "No recent telemetry with input statistics.");
  return table([
    { label: "Input", value: (r) => r.name },
    { label: "PSI", value: (r) => fmtNum(r.psi, 3), num: true },
    { label: "Level", value: (r) => badge(r.level) },
    { label: "Values seen", value: (r) => r.values.toLocaleString(), num: true },
  ], rows, { caption: `${doc.model_version}: population stability index against its calibration data (< 0.1 stable, ≥ 0.25 drift)` });
}

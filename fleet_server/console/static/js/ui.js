// Small DOM helpers: elements are built with textContent (never innerHTML), so nothing a device reports can inject
// markup.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v);  // CSSOM: allowed by the page's CSP, unlike style=""
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

let ids = 0;
export const uid = (prefix) => `${prefix}-${++ids}`;

/** A labelled control: <label for=id>text</label> + the control, in one wrapper. */
export function field(text, control, hint) {
  control.id = control.id || uid("f");
  const hintEl = hint ? h("span", { class: "small muted", id: `${control.id}-hint` }, hint) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  return h("label", { for: control.id }, text, control, hintEl);
}

export function select(name, options, value) {
  return h("select", { name }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

export const badge = (text) => h("span", { class: `badge ${String(text).replace(/[^a-z_]/gi, "")}` }, text);
export const empty = (...text) => h("div", { class: "empty" }, ...text);

/** A table from column specs [{label, value: row => node|text, num}] and rows; an empty state when none. */
export function table(columns, rows, { caption, emptyText = "Nothing here yet." } = {}) {
  if (!rows.length) return empty(emptyText);
  return h("table", {}, caption ? h("caption", { class: "muted small" }, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : "" }, c.label)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : "" }, c.value(r)))))));
}

export function fmtTime(value) {
  if (value === null || value === undefined) return "—";
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return isNaN(d) ? "—" : d.toLocaleString();
}
export function fmtAgo(value) {
  if (!value) return "never";
  const s = (Date.now() - new Date(value).getTime()) / 1000;
  if (s < 90) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}
export const fmtBytes = (n) => n === null || n === undefined ? "—" : n < 1024 ? `${n} B`
  : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(2)} MiB`;
export const fmtNum = (n, digits = 2) => n === null || n === undefined ? "—" : Number(n).toFixed(digits);
export const fmtPct = (n) => n === null || n === undefined ? "—" : `${(100 * n).toFixed(1)}%`;

export function toast(text) {
  const box = document.getElementById("toast");
  const item = h("div", {}, text);
  box.append(item);
  setTimeout(() => item.remove(), 5000);
}

/** A confirmation in a modal <dialog>: resolves true when the operator confirms. */
export function confirmAction(text, okLabel = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    document.getElementById("confirm-ok").focus();
  });
}

/** Status counts as a stacked bar with its legend. */
export const STATUS_COLOURS = { installed: "#1b7f3b", offered: "#1f5fbf", pending: "#9aa3b2", failed: "#b3261e",
  rolled_back: "#a45a00", skipped: "#c9a227" };
export function statusBar(counts) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  const order = Object.keys(STATUS_COLOURS).filter((k) => counts[k]).concat(Object.keys(counts).filter((k) => !(k in STATUS_COLOURS)));
  const label = order.map((k) => `${k} ${counts[k]}`).join(", ") || "no devices";
  return h("div", {},
    h("div", { class: "bar", role: "img", "aria-label": label }, order.map((k) => h("span", {
      style: { width: `${(100 * counts[k]) / total}%`, background: STATUS_COLOURS[k] || "#5b6475" }, title: `${k}: ${counts[k]}` }))),
    h("div", { class: "legend" }, order.map((k) => h("span", {}, h("span", { class: "swatch", style: { background: STATUS_COLOURS[k] || "#5b6475" } }), `${k} ${counts[k]}`))));
}

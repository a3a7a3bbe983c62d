// Fleet: counts, devices per profile and version, open alerts, running rollouts, and the filtered device table
// (paged on the server: one page of 50 is read whatever the fleet's size).
import { api } from "../api.js";
import { barChart } from "../charts.js";
import { badge, empty, field, fmtAgo, h, select, statusBar, table } from "../ui.js";

const PAGE = 50;
// the empty fleet's hint names this server, so it can be copied as it is
const enrollHint = () => `No devices yet: enroll one with \`fleet-agent enroll --server ${location.origin} --token <enrollment token>\` (an admin creates enrollment tokens on the Admin page).`;

export async function render(main, _params, ctx) {
  const cards = h("div", { class: "cards", "aria-live": "polite" });
  const charts = h("div", { class: "grid2" });
  const running = h("div");
  const filters = { q: "", profile: "", tag: "", version: "", online: "", offset: 0 };
  const results = h("div", { "aria-live": "polite" });
  const tagList = h("datalist", { id: "tag-list" });
  const profileSel = select("profile", [["", "any profile"]], "");
  const versionSel = select("version", [["", "any version"]], "");
  main.append(h("h1", {}, "Fleet"), cards, charts, h("h2", {}, "Running rollouts"), running,
    h("h2", { id: "devices-title" }, "Devices"), filterForm(filters, profileSel, versionSel, tagList, () => loadDevices()),
    tagList, results);

  let known = { profiles: "", versions: "" };
  ctx.poll(async () => {
    const f = await api("/v1/console/fleet");
    cards.replaceChildren(card(f.total, "devices"), card(f.online, "online"), card(f.offline, "offline"),
      card(f.open_alerts, "open drift alerts", "#/alerts"), card(f.rollouts.length, "running or paused rollouts", "#/rollouts"));
    const byProfile = Object.entries(f.profiles).sort((a, b) => b[1] - a[1]);
    const byVersion = Object.entries(f.versions).sort((a, b) => b[1] - a[1]).map(([k, v]) => [k === "none" ? "no model yet" : k, v]);
    charts.replaceChildren(
      h("div", { class: "panel" }, h("h2", {}, "Devices per profile"),
        barChart("Devices per profile", byProfile.map(([k, v]) => ({ label: k, value: v }))) || empty(enrollHint())),
      h("div", { class: "panel" }, h("h2", {}, "Devices per running model version"),
        barChart("Devices per running model version", byVersion.map(([k, v]) => ({ label: k, value: v, colour: "#1b7f3b" }))) || empty(enrollHint())));
    running.replaceChildren(f.rollouts.length ? table([
      { label: "Rollout", value: (r) => h("a", { href: `#/rollouts/${r.id}` }, `#${r.id} ${r.name || ""}`) },
      { label: "Version", value: (r) => `${r.model} ${r.version}` },
      { label: "State", value: (r) => badge(r.state) },
      { label: "Progress", value: (r) => statusBar(r.counts) },
    ], f.rollouts) : empty("No rollout is running."));
    // the filter choices follow the fleet (a new profile or version appears without a reload)
    const p = Object.keys(f.profiles).sort().join(), v = Object.keys(f.versions).sort().join();
    if (p !== known.profiles) refill(profileSel, "any profile", Object.keys(f.profiles).sort());
    if (v !== known.versions) refill(versionSel, "any version", Object.keys(f.versions).sort());
    known = { profiles: p, versions: v };
  }, 3000);
  api("/v1/console/tags").then((tags) => tagList.replaceChildren(...tags.map((t) => h("option", { value: t }))));

  async function loadDevices() {
    const page = await api("/v1/console/devices", { params: { ...filters, limit: PAGE } });
    results.replaceChildren(devicesTable(page, filters), pager(page, (offset) => { filters.offset = offset; loadDevices(); }));
  }
  ctx.poll(loadDevices, 5000);
}

function refill(sel, anyLabel, values) {
  const current = sel.value;
  sel.replaceChildren(h("option", { value: "" }, anyLabel), ...values.map((v) => h("option", { value: v, selected: v === current }, v)));
}

function card(n, label, href) {
  const body = [h("div", { class: "n" }, String(n)), h("div", { class: "l" }, label)];
  return h("div", { class: "card" }, href ? h("a", { href }, ...body) : body);
}

function filterForm(filters, profileSel, versionSel, tagList, reload) {
  const q = h("input", { type: "search", name: "q", placeholder: "part of an id" });
  const tag = h("input", { type: "text", name: "tag", list: "tag-list", placeholder: "site:lab" });
  const online = select("online", [["", "online or not"], ["true", "online"], ["false", "offline"]], "");
  const form = h("form", { class: "filters", role: "search", "aria-labelledby": "devices-title", onsubmit: (ev) => {
    ev.preventDefault();
    Object.assign(filters, { q: q.value.trim(), tag: tag.value.trim(), profile: profileSel.value,
      version: versionSel.value, online: online.value, offset: 0 });
    reload();
  } }, field("Device id", q), field("Profile", profileSel), field("Tag", tag), field("Running version", versionSel),
  field("Connection", online), h("button", { type: "submit" }, "Filter"));
  return form;
}

function devicesTable(page, filters) {
  const filtered = filters.q || filters.tag || filters.profile || filters.version || filters.online;
  const none = filtered ? "No device matches these filters."
    : enrollHint();
  return table([
    { label: "Device", value: (d) => h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id) },
    { label: "Profile", value: (d) => d.profile },
    { label: "Tags", value: (d) => d.tags.join(", ") },
    { label: "Running", value: running },
    { label: "Connection", value: (d) => badge(d.online ? "online" : "offline") },
    { label: "Last seen", value: (d) => fmtAgo(d.last_seen) },
  ], page.items, { emptyText: none, caption: `${page.total.toLocaleString()} device(s)` });
}

// every model's label (a device serves several named models); the device's own label when it listed no model
function running(d) {
  const labels = (d.models || []).map((m) => m.active_version).filter(Boolean);
  return labels.length ? labels.join(", ") : d.active_version || "—";
}

function pager(page, go) {
  const last = Math.min(page.offset + page.limit, page.total);
  return h("div", { class: "pager" },
    h("button", { type: "button", class: "secondary", disabled: page.offset === 0, onclick: () => go(Math.max(0, page.offset - page.limit)) }, "Previous"),
    h("span", { "aria-live": "polite" }, page.total ? `${page.offset + 1}–${last} of ${page.total.toLocaleString()}` : ""),
    h("button", { type: "button", class: "secondary", disabled: last >= page.total, onclick: () => go(page.offset + page.limit) }, "Next"));
}

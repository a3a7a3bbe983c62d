// A/B tests (create; report with 95% intervals as error bars), drift alerts, and the admin page (API tokens,
// enrollment tokens, the audit log).
import { api, can } from "../api.js";
import { barChart } from "../charts.js";
import { badge, confirmAction, empty, field, fmtNum, fmtPct, fmtTime, h, select, table, toast } from "../ui.js";

export async function renderAbTests(main, _params, ctx) {
  const list = h("div");
  const report = h("div", { "aria-live": "polite" });
  let chosen = null;
  main.append(h("h1", {}, "A/B tests"), list, report);
  const versions = await api("/v1/models");
  if (can("operator") && versions.length >= 2) main.append(abForm(versions));
  ctx.poll(async () => {
    const tests = await api("/v1/abtests");
    list.replaceChildren(table([
      { label: "Test", value: (t) => h("button", { type: "button", class: "secondary", onclick: () => { chosen = t.id; draw(); } }, `#${t.id} ${t.name || ""}`) },
      { label: "Split on B", value: (t) => `${t.split_percent}%` },
      { label: "Devices A / B", value: (t) => `${t.devices_a.length} / ${t.devices_b.length}` },
      { label: "Rollouts", value: (t) => h("span", {}, h("a", { href: `#/rollouts/${t.rollout_a_id}` }, `A #${t.rollout_a_id}`), " ", h("a", { href: `#/rollouts/${t.rollout_b_id}` }, `B #${t.rollout_b_id}`)) },
    ], tests, { emptyText: "No A/B tests yet: ship two versions of a model to a split cohort with the form below." }));
    if (chosen) await draw();
  }, 4000);
  async function draw() {
    const r = await api(`/v1/abtests/${chosen}/report`);
    const arm = (a) => ({ label: `${a.version}`, value: a.error_rate === null ? null : 100 * a.error_rate,
      lo: a.error_rate_ci95 ? 100 * a.error_rate_ci95[0] : null, hi: a.error_rate_ci95 ? 100 * a.error_rate_ci95[1] : null });
    const d = r.difference || {};
    report.replaceChildren(h("h2", {}, `Report: #${r.id} ${r.name || ""}`),
      h("div", { class: "grid2" },
        h("div", { class: "panel" }, h("h3", {}, "Error rate per arm (95% interval)"), barChart("Error rate per arm with 95% intervals", [{ ...arm(r.a), label: `A ${r.a.version}` }, { ...arm(r.b), label: `B ${r.b.version}`, colour: "#a45a00" }], { unit: "%" })),
        h("div", { class: "panel" }, h("h3", {}, "Differences B − A (95% interval)"),
          barChart("Differences between the arms with 95% intervals", [
            d.latency_mean_ms ? { label: "mean latency ms", value: d.latency_mean_ms.b_minus_a, lo: d.latency_mean_ms.ci95[0], hi: d.latency_mean_ms.ci95[1] } : { label: "mean latency ms", value: null },
            d.error_rate ? { label: "error rate %", value: 100 * d.error_rate.b_minus_a, lo: 100 * d.error_rate.ci95[0], hi: 100 * d.error_rate.ci95[1], colour: "#a45a00" } : { label: "error rate %", value: null }]))),
      table([{ label: "Arm", value: (x) => x[0] }, { label: "Version", value: (x) => x[1].version },
        { label: "Devices (reporting)", value: (x) => `${x[1].devices} (${x[1].reporting_devices})`, num: true },
        { label: "Requests", value: (x) => x[1].requests.toLocaleString(), num: true }, { label: "Error rate", value: (x) => fmtPct(x[1].error_rate), num: true },
        { label: "Latency mean / p50 / p99 ms", value: (x) => `${fmtNum(x[1].latency_mean_ms)} / ${fmtNum(x[1].latency_p50_ms)} / ${fmtNum(x[1].latency_p99_ms)}`, num: true }],
      [["A", r.a], ["B", r.b]]), h("p", { class: "small muted" }, r.note));
  }
}

function abForm(versions) {
  const opts = versions.map((v) => [`${v.name}|${v.version}`, `${v.name} ${v.version}`]);
  const c = { name: h("input", { name: "name" }), a: select("a", opts, opts[0][0]), b: select("b", opts, opts[1][0]),
    tags: h("input", { name: "tags", placeholder: "site:lab" }), split: h("input", { type: "number", name: "split", value: 50, min: 1, max: 99 }) };
  const problem = h("p", { class: "error", role: "alert" });
  const ref = (sel) => { const [model, version] = sel.value.split("|"); return { model, version }; };
  return h("form", { class: "panel", "aria-labelledby": "ab-title", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const t = await api("/v1/abtests", { method: "POST", body: { name: c.name.value, a: ref(c.a), b: ref(c.b), split_percent: Number(c.split.value),
        selector: { tags: c.tags.value.split(/[\s,]+/).filter(Boolean) } } });
      toast(`A/B test #${t.id} started: ${t.devices_a.length} devices on A, ${t.devices_b.length} on B.`);
      problem.textContent = "";
    } catch (e) { problem.textContent = e.message; }
  } }, h("h2", { id: "ab-title" }, "New A/B test"),
  h("div", { class: "row" }, field("Name", c.name), field("Arm A", c.a), field("Arm B", c.b), field("Tags (cohort)", c.tags), field("Share on B %", c.split),
    h("button", { type: "submit" }, "Start A/B test")), problem);
}

export async function renderAlerts(main, _params, ctx) {
  const openOnly = h("input", { type: "checkbox", name: "open", checked: true });
  const list = h("div");
  main.append(h("h1", {}, "Alerts"), h("label", { class: "inline" }, openOnly, "Open alerts only"), list);
  const versions = Object.fromEntries((await api("/v1/models")).map((v) => [v.id, `${v.name} ${v.version}`]));
  const load = async () => {
    const alerts = await api("/v1/alerts", { params: { open: openOnly.checked } });
    list.replaceChildren(table([
      { label: "Model version", value: (a) => versions[a.model_version_id] || `#${a.model_version_id}` },
      { label: "Input", value: (a) => a.input_name },
      { label: "PSI", value: (a) => fmtNum(a.psi, 3), num: true },
      { label: "Level", value: (a) => badge(a.level) },
      { label: "Devices", value: (a) => a.devices, num: true },
      { label: "State", value: (a) => badge(a.open ? "open" : "closed") },
      { label: "First / last seen", value: (a) => `${fmtTime(a.first_seen)} / ${fmtTime(a.last_seen)}` },
    ], alerts, { emptyText: "No drift alerts: every model input looks like its calibration data." }));
  };
  openOnly.addEventListener("change", load);
  ctx.poll(load, 5000);
}

export async function renderAdmin(main) {
  main.append(h("h1", {}, "Admin"));
  if (!can("admin")) { main.append(empty("Managing tokens and enrollment needs the admin role.")); return; }
  const tokens = h("div");
  const shown = h("div", { "aria-live": "polite" });
  const reveal = (label, secret) => shown.replaceChildren(h("div", { class: "panel" }, h("strong", {}, label), " (shown once, copy it now): ", h("code", { class: "secret" }, secret)));
  const loadTokens = async () => tokens.replaceChildren(table([
    { label: "Token", value: (t) => `#${t.id} ${t.name}` }, { label: "Role", value: (t) => t.role },
    { label: "Created", value: (t) => `${fmtTime(t.created_at)} by ${t.created_by}` },
    { label: "State", value: (t) => t.revoked_at ? badge("revoked") : badge("ok") },
    { label: "", value: (t) => t.revoked_at ? "" : h("button", { type: "button", class: "danger", "aria-label": `Revoke token ${t.name}`, onclick: async () => {
      if (!(await confirmAction(`Revoke the token "${t.name}"? Whoever uses it is signed out at once.`, "Revoke"))) return;
      try { await api(`/v1/tokens/${t.id}`, { method: "DELETE" }); toast(`Token ${t.name} revoked.`); loadTokens(); } catch (e) { toast(e.message); }
    } }, "Revoke") },
  ], await api("/v1/tokens")));
  const tName = h("input", { name: "token_name", required: true });
  const tRole = select("role", [["viewer", "viewer"], ["operator", "operator"], ["admin", "admin"]], "viewer");
  const eUses = h("input", { type: "number", name: "max_uses", value: 10, min: 1 });
  const eProfile = h("input", { name: "profile", placeholder: "any (the device says)" });
  const eTags = h("input", { name: "tags", placeholder: "site:lab" });
  const eHours = h("input", { type: "number", name: "hours", value: 168, min: 1 });
  const audit = h("div");
  main.append(shown, h("h2", {}, "API tokens"), tokens,
    h("form", { class: "row", "aria-label": "New API token", onsubmit: async (ev) => {
      ev.preventDefault();
      try { const t = await api("/v1/tokens", { method: "POST", body: { name: tName.value, role: tRole.value } }); reveal(`API token ${t.name} (${t.role})`, t.token); loadTokens(); } catch (e) { toast(e.message); }
    } }, field("Name", tName), field("Role", tRole), h("button", { type: "submit" }, "Create API token")),
    h("h2", {}, "Enrollment tokens"),
    h("form", { class: "row", "aria-label": "New enrollment token", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const t = await api("/v1/enrollment-tokens", { method: "POST", body: { max_uses: Number(eUses.value), profile: eProfile.value || null,
          tags: eTags.value.split(/[\s,]+/).filter(Boolean), expires_in_s: Number(eHours.value) * 3600 } });
        reveal(`Enrollment token #${t.id} for ${t.max_uses} device(s), until ${fmtTime(t.expires_at)}`, t.token);
      } catch (e) { toast(e.message); }
    } }, field("Devices it may enroll", eUses), field("Profile", eProfile), field("Tags", eTags), field("Valid for (hours)", eHours),
    h("button", { type: "submit" }, "Create enrollment token")),
    h("p", { class: "small muted" }, "A device enrolls with: fleet-agent enroll --server URL --token <enrollment token>"),
    h("h2", {}, "Audit log (latest 50)"), audit);
  await loadTokens();
  audit.replaceChildren(table([
    { label: "When", value: (a) => fmtTime(a.ts) }, { label: "Who", value: (a) => a.actor }, { label: "Action", value: (a) => a.action },
    { label: "Target", value: (a) => a.target }, { label: "Outcome", value: (a) => badge(a.outcome === "ok" ? "ok" : "failed") }, { label: "Detail", value: (a) => a.detail },
  ], await api("/v1/audit", { params: { limit: 50 } })));
}

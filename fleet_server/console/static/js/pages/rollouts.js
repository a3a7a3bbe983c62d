// Rollouts: the list, the create form with a live selector preview, and one rollout live: progress per stage and
// status, the gate verdict with its evidence, the operator's actions (confirmed), and the device table.
import { api, can } from "../api.js";
import { barChart, lineChart } from "../charts.js";
import { badge, confirmAction, empty, field, fmtBytes, fmtNum, fmtPct, fmtTime, h, select, statusBar, table, toast } from "../ui.js";

export async function renderList(main, _params, ctx) {
  const list = h("div");
  main.append(h("div", { class: "row" }, h("h1", {}, "Rollouts"),
    can("operator") ? h("a", { href: "#/rollouts/new" }, "New rollout") : h("span", { class: "small muted" }, "Creating a rollout needs the operator role.")), list);
  ctx.poll(async () => {
    const rows = await api("/v1/rollouts", { params: { limit: 100 } });
    list.replaceChildren(table([
      { label: "Rollout", value: (r) => h("a", { href: `#/rollouts/${r.id}` }, `#${r.id} ${r.name || "(unnamed)"}`) },
      { label: "Version", value: (r) => `${r.model} ${r.version}` },
      { label: "State", value: (r) => badge(r.state) },
      { label: "Stage", value: (r) => stageName(r), },
      { label: "Devices", value: (r) => statusBar(r.counts) },
    ], rows, { emptyText: "No rollouts yet: register a model version, convert it, then create a rollout here." }));
  });
}

function stages(r) {
  const s = r.strategy || {};
  return [`canary ${s.canary_percent}%`, ...(s.waves_percent || []).map((w) => `wave to ${w}%`)];
}
const stageName = (r) => { const all = stages(r); return all[Math.min(r.stage, all.length - 1)] || `stage ${r.stage}`; };

// ------------------------------------------------------------------------------------------------ create

const num = (name, value, attrs = {}) => h("input", { type: "number", name, value, step: "any", ...attrs });

export async function renderCreate(main) {
  main.append(h("h1", {}, "New rollout"));
  if (!can("operator")) { main.append(empty("Creating a rollout needs the operator role; you are signed in as a viewer.")); return; }
  const versions = await api("/v1/models");
  if (!versions.length) { main.append(empty("No model versions yet: register one on the Models page first.")); return; }
  const profiles = Object.keys((await api("/v1/console/fleet")).profiles).sort();
  const { strategy: st, gates: g, on_gate_failure: onFail, suggested } = await api("/v1/console/rollout-defaults");
  const orOff = (v) => (v === null || v === undefined ? "" : v);
  const c = {
    name: h("input", { name: "name", maxlength: 100 }),
    // the newest registered version is the one an operator most likely means to roll out
    version: select("version", versions.map((v) => [`${v.name}|${v.version}`, `${v.name} ${v.version}`]),
      ((n) => `${n.name}|${n.version}`)(versions.reduce((a, b) => (b.created_at > a.created_at ? b : a)))),
    tags: h("input", { name: "tags", placeholder: "site:lab line:3", list: "tag-list" }),
    devices: h("textarea", { name: "devices", rows: 2, placeholder: "device ids, one per line (optional)" }),
    // the API's own defaults, so the form creates what a REST client sending nothing would
    canary: num("canary_percent", st.canary_percent, { min: 0.1, max: 100 }), waves: h("input", { name: "waves", value: st.waves_percent.join(", ") }),
    rate: num("rate_per_minute", st.rate_per_minute, { min: 1 }), soak: num("soak_s", st.soak_s, { min: 0 }),
    timeout: num("stage_timeout_s", st.stage_timeout_s, { min: 1 }),
    approval: h("input", { type: "checkbox", name: "require_approval", checked: Boolean(st.require_approval) }),
    maxFail: num("max_failure_share", g.max_failure_share, { min: 0, max: 1 }), minFinished: num("min_finished", g.min_finished, { min: 1 }),
    maxErr: num("max_error_rate", orOff(g.max_error_rate), { min: 0, max: 1, placeholder: "off" }),
    maxP99: num("max_p99_ratio", orOff(g.max_p99_ratio), { min: 0, placeholder: "off" }), minReq: num("min_requests", g.min_requests, { min: 1 }),
    minFid: num("min_fidelity", orOff(g.min_fidelity), { min: -1, max: 1, placeholder: "off" }),
    onFail: select("on_gate_failure", [["pause", "pause the rollout"], ["abort", "abort and roll back"]], onFail),
    encrypt: h("input", { type: "checkbox", name: "encrypt" }), start: h("input", { type: "checkbox", name: "start", checked: true }),
  };
  const profileBoxes = profiles.map((p) => h("input", { type: "checkbox", name: "profiles", value: p }));
  const preview = h("div", { class: "panel", "aria-live": "polite", id: "preview" }, "…");
  const problem = h("p", { class: "error", role: "alert" });
  const tagList = h("datalist", { id: "tag-list" });
  api("/v1/console/tags").then((tags) => tagList.replaceChildren(...tags.map((t) => h("option", { value: t }))));
  const selector = () => ({
    profiles: profileBoxes.filter((b) => b.checked).map((b) => b.value),
    tags: c.tags.value.split(/[\s,]+/).filter(Boolean),
    devices: c.devices.value.split(/[\s,]+/).filter(Boolean),
  });
  let pending = null;
  const refresh = () => { clearTimeout(pending); pending = setTimeout(updatePreview, 250); };
  async function updatePreview() {
    const sel = selector();
    const [m, v] = c.version.value.split("|");
    try {
      const p = await api("/v1/console/selector-preview", { params: { model: m, version: v, profile: sel.profiles, tag: sel.tags, device: sel.devices } });
      preview.replaceChildren(h("strong", { id: "preview-count" }, `${p.matches} device(s) match`), " — ",
        Object.entries(p.by_profile).map(([k, n]) => `${k}: ${n}`).join(", ") || "none",
        p.without_artifact.length ? h("p", { class: "error" }, `No releasable artifact of ${m} ${v} for: ${p.without_artifact.join(", ")} (those devices are skipped: convert for them first).`)
          : h("p", { class: "muted small" }, `Releasable for: ${(p.releasable_profiles || []).join(", ") || "no profile"}.`));
    } catch (e) { preview.replaceChildren(h("span", { class: "error" }, e.message)); }
  }
  const form = h("form", { "aria-labelledby": "create-title", onsubmit: async (ev) => {
    ev.preventDefault();
    problem.textContent = "";
    const [m, v] = c.version.value.split("|");
    const opt = (input) => input.value === "" ? null : Number(input.value);
    const body = { name: c.name.value, model: m, version: v, selector: selector(),
      strategy: { canary_percent: Number(c.canary.value), waves_percent: c.waves.value.split(/[\s,]+/).filter(Boolean).map(Number),
        rate_per_minute: Number(c.rate.value), soak_s: Number(c.soak.value), stage_timeout_s: Number(c.timeout.value),
        require_approval: c.approval.checked },
      gates: { max_failure_share: Number(c.maxFail.value), min_finished: Number(c.minFinished.value), max_error_rate: opt(c.maxErr),
        max_p99_ratio: opt(c.maxP99), min_requests: Number(c.minReq.value), min_fidelity: opt(c.minFid) },
      on_gate_failure: c.onFail.value, encrypt: c.encrypt.checked, start: c.start.checked };
    try {
      const r = await api("/v1/rollouts", { method: "POST", body });
      toast(`Rollout #${r.id} created (${r.state}).`);
      location.hash = `#/rollouts/${r.id}`;
    } catch (e) { problem.textContent = e.message; }
  } },
  h("fieldset", {}, h("legend", {}, "What"), h("div", { class: "row" }, field("Name", c.name), field("Model version", c.version))),
  h("fieldset", {}, h("legend", {}, "Which devices"),
    h("div", { class: "row" }, h("span", { class: "small muted", id: "profiles-label" }, "Profiles (none: all)"),
      h("div", { class: "row", role: "group", "aria-labelledby": "profiles-label" }, profileBoxes.map((b) => h("label", { class: "inline" }, b, b.value)))),
    h("div", { class: "row" }, field("Tags (all must match)", c.tags), field("Devices", c.devices)), tagList, preview),
  h("fieldset", {}, h("legend", {}, "Strategy"), h("div", { class: "row" }, field("Canary %", c.canary), field("Waves % (comma separated)", c.waves),
    field("Offers per minute", c.rate), field("Soak after each stage (s)", c.soak, `${suggested.soak_s} lets telemetry gather`), field("Stage timeout (s)", c.timeout),
    h("label", { class: "inline" }, c.approval, "An operator approves each wave after the canary"))),
  h("fieldset", {}, h("legend", {}, "Health gates"), h("div", { class: "row" }, field("Max failure share (0–1)", c.maxFail),
    field("Min finished devices to judge", c.minFinished), field("Max error rate (0–1)", c.maxErr, `empty: not judged; ${suggested.max_error_rate} is usual`),
    field("Max p99 latency ratio", c.maxP99, `after ÷ before; empty: not judged; ${suggested.max_p99_ratio} is usual`), field("Min requests to judge", c.minReq),
    field("Min fidelity (cosine)", c.minFid, `the artifact's report; empty: not judged; ${suggested.min_fidelity} is usual`),
    field("When a gate fails", c.onFail))),
  h("div", { class: "row" }, h("label", { class: "inline" }, c.encrypt, "Encrypt each artifact to its device"),
    h("label", { class: "inline" }, c.start, "Start at once")),
  h("p", {}, h("button", { type: "submit" }, "Create rollout")), problem);
  form.addEventListener("input", refresh);
  form.addEventListener("change", refresh);
  main.append(form);
  updatePreview();
}

// ------------------------------------------------------------------------------------------------ one rollout

const ACTIONS = [
  ["pause", ["running"], "Pause", "Pause this rollout? Devices keep what they run; no new offers are made."],
  ["resume", ["paused"], "Resume", "Resume this rollout?"],
  ["abort", ["draft", "running", "paused"], "Abort", "Abort this rollout? No new offers; devices keep what they run."],
  ["rollback", ["running", "paused", "aborted", "completed"], "Roll back", "Roll back: abort, and order every device this rollout updated back to its previous model?"],
  ["start", ["draft"], "Start", "Start this rollout?"],
  ["approve", ["running", "paused"], "Approve the next wave", "Approve the wave this rollout waits at? Its devices get their offers."],
  ["retry", ["paused", "completed", "aborted"], "Retry failed devices", "Retry this rollout's failed devices as a new rollout (a paused one stops)?"],
];

export async function renderDetail(main, [id], ctx) {
  const head = h("div");
  const actions = h("div", { class: "row", role: "group", "aria-label": "Rollout actions" });
  const progress = h("div", { class: "panel" });
  const gate = h("div", { class: "grid2" });
  const trend = h("div", { class: "panel" });
  const notes = h("div");
  const devices = h("div");
  main.append(head, actions, progress, h("h2", {}, "Health gates"), gate, trend, h("h2", {}, "Devices"), devices, h("h2", {}, "Notes"), notes);
  let last = null;
  const act = async (op, text) => {
    if (!(await confirmAction(text, ACTIONS.find((a) => a[0] === op)[2]))) return;
    try {
      const r = await api(`/v1/rollouts/${id}/${op}`, { method: "POST" });
      if (op === "retry") { toast(`Rollout #${r.id} retries #${id}'s failed devices.`); location.hash = `#/rollouts/${r.id}`; return; }
      last = r;
      toast(`Rollout #${id}: ${op} done, now ${last.state}.`);
      draw(last);
    } catch (e) { toast(e.message); actions.append(h("p", { class: "error", role: "alert" }, e.message)); }
  };
  function draw(r) {
    head.replaceChildren(h("h1", {}, `Rollout #${r.id} ${r.name || ""} `, badge(r.state)),
      h("p", { class: "muted" }, `${r.model} ${r.version} · on gate failure: ${r.on_gate_failure}${r.encrypt ? " · encrypted" : ""} · ${describeSelector(r.selector)}`));
    const operator = can("operator");
    const failed = r.counts.failed || 0;
    const shown = ([op]) => (op !== "start" || r.state === "draft") && (op !== "approve" || r.waiting_for_approval !== null)
      && (op !== "retry" || failed > 0);
    actions.replaceChildren(...ACTIONS.filter(shown).map(([op, states, label, text]) =>
      h("button", { type: "button", class: op === "abort" || op === "rollback" ? "danger" : "", disabled: !operator || !states.includes(r.state),
        "data-action": op, title: operator ? "" : "needs the operator role", onclick: () => act(op, text) }, label)),
    ...(operator ? [] : [h("span", { class: "small muted", id: "role-note" }, "Pausing, aborting and rolling back need the operator role; you are signed in as a viewer.")]));
    const all = stages(r);
    progress.replaceChildren(h("h2", {}, "Progress"),
      h("ol", { class: "row", "aria-label": "Stages" }, all.map((name, i) => h("li", {}, i < r.stage || r.state === "completed" ? badge("completed") : i === r.stage ? badge(r.state) : badge("pending"), " ", name))),
      ...[r.waiting_for_approval !== null ? h("p", { class: "warn", role: "status", id: "awaiting-approval" }, `Waiting for an operator's approval of stage ${r.waiting_for_approval}.`) : null,
        r.retry_of ? h("p", { class: "muted" }, "Retries the failed devices of ", h("a", { href: `#/rollouts/${r.retry_of}` }, `rollout #${r.retry_of}`), ".") : null].filter(Boolean),
      statusBar(r.counts));
    drawGate(gate, r);
    notes.replaceChildren(r.notes.length ? h("ul", {}, r.notes.map((n) => h("li", {}, n))) : empty("No notes yet."));
  }
  ctx.poll(async () => {
    const [r, members] = await Promise.all([api(`/v1/rollouts/${id}`), api(`/v1/rollouts/${id}/devices`, { params: { limit: 1000 } })]);
    last = r;
    draw(r);
    devices.replaceChildren(memberTable(members));
  });
  ctx.poll(async () => {
    const t = await api("/v1/telemetry", { params: { rollout: id, bucket_s: 10, since: Date.now() / 1000 - 1800 } });
    const chart = lineChart("p99 latency of this rollout's devices over time", [
      { name: "p50", points: t.series.map((b) => [b.start, b.p50_ms]) }, { name: "p99", points: t.series.map((b) => [b.start, b.p99_ms]) }],
      { unit: "ms", width: 1280, height: 260 });  // a full-width panel: drawn at its size, so its text is not scaled up
    trend.replaceChildren(h("h3", {}, "Latency of this rollout's devices (last 30 min)"), chart || empty("No telemetry from these devices yet."));
  }, 5000);
}

function describeSelector(sel) {
  const parts = [];
  if (sel.profiles && sel.profiles.length) parts.push(`profiles ${sel.profiles.join(", ")}`);
  if (sel.tags && sel.tags.length) parts.push(`tags ${sel.tags.join(" + ")}`);
  if (sel.devices && sel.devices.length) parts.push(`${sel.devices.length} named device(s)`);
  return parts.length ? `devices with ${parts.join("; ")}` : "every device";
}

function drawGate(box, r) {
  const ev = r.evaluation || {};
  const f = ev.figures || {};
  const g = r.gates || {};
  const verdict = h("div", { class: "panel" }, h("h3", {}, "Verdict: ", badge(ev.verdict || "not judged yet")),
    h("ul", {}, (ev.reasons || []).map((x) => h("li", {}, x))),
    table([{ label: "Evidence", value: (x) => x[0] }, { label: "Value", value: (x) => x[1], num: true }, { label: "Limit", value: (x) => x[2], num: true }], [
      ["finished devices", f.finished ?? "—", `≥ ${g.min_finished}`], ["failed devices", f.failed ?? "—", ""],
      ["failure share", fmtPct(f.failure_share), `≤ ${fmtPct(g.max_failure_share)}`],
      ["error rate after", fmtPct(f.error_rate), g.max_error_rate === null ? "not judged" : `≤ ${fmtPct(g.max_error_rate)}`],
      ["p99 ratio (after ÷ before)", fmtNum(f.p99_ratio), g.max_p99_ratio === null ? "not judged" : `≤ ${g.max_p99_ratio}`],
    ]), ev.at ? h("p", { class: "small muted" }, `judged ${fmtTime(ev.at)}`) : null);
  const p99 = f.p99_before_ms !== undefined ? barChart("p99 latency before and after the update", [
    { label: "before", value: f.p99_before_ms, colour: "#1b7f3b" }, { label: "after", value: f.p99_after_ms, colour: f.p99_ratio > (g.max_p99_ratio || Infinity) ? "#b3261e" : "#1f5fbf" }], { unit: "ms" }) : null;
  box.replaceChildren(verdict, h("div", { class: "panel" }, h("h3", {}, "p99 latency before / after"),
    p99 || empty(g.max_p99_ratio === null ? "The p99 gate is off for this rollout." : "Not enough latency samples yet.")));
}

function memberTable(members) {
  return table([
    { label: "Device", value: (m) => h("a", { href: `#/devices/${encodeURIComponent(m.device_id)}` }, m.device_id) },
    { label: "Status", value: (m) => badge(m.status) },
    { label: "Reason", value: (m) => m.reason ? h("code", {}, m.reason) : "—" },
    { label: "Detail", value: (m) => m.detail },
    { label: "Delivery", value: (m) => m.delivery || "—" },
    { label: "Bytes", value: (m) => fmtBytes(m.bytes_offered), num: true },
    { label: "Offered", value: (m) => fmtTime(m.offered_at) },
    { label: "Took", value: (m) => m.offered_at && m.finished_at ? `${fmtNum(m.finished_at - m.offered_at, 1)} s` : "—", num: true },
  ], members, { emptyText: "No device has joined yet (the engine adds matching devices within seconds)." });
}

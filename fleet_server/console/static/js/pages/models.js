// Models: versions, each with its per-profile artifacts and conversion reports, conversion jobs (live progress and
// log), registering a new version (source + calibration data, then a conversion), and artifact downloads.
import { api, can, download } from "../api.js";
import { badge, empty, field, fmtBytes, fmtNum, fmtTime, h, select, table, toast } from "../ui.js";

export async function render(main, _params, ctx) {
  const list = h("div");
  const detail = h("div", { "aria-live": "polite" });
  // the job whose log is open: it lives outside the detail (rebuilt on every poll) and follows the job while it runs
  const jobLog = { id: null, live: false, view: h("pre", { class: "log", hidden: true, "aria-label": "Job log", tabindex: "0", id: "job-log" }),
    title: h("h3", { hidden: true, id: "job-log-title" }) };
  let chosen = null;
  main.append(h("h1", {}, "Models"), list, detail);
  // once registered, the new version opens with its conversion job's log following the job
  const opened = async (mv, jobId) => { chosen = mv; jobLog.id = jobId; jobLog.live = jobId !== null; await showDetail(); };
  if (can("operator")) main.append(await registerForm(opened));
  else main.append(h("p", { class: "small muted" }, "Registering and converting models needs the operator role."));
  ctx.poll(async () => {
    const versions = await api("/v1/models");
    list.replaceChildren(table([
      { label: "Model", value: (v) => h("button", { type: "button", class: "secondary", onclick: () => { chosen = v; showDetail(); } }, `${v.name} ${v.version}`) },
      { label: "Source", value: (v) => v.source_format },
      { label: "Inputs", value: (v) => v.inputs.join("; ") },
      { label: "Registered", value: (v) => `${fmtTime(v.created_at)} by ${v.created_by || "?"}` },
    ], versions, { emptyText: "No model versions yet: register one below (an ONNX model and an .npz of calibration inputs)." }));
    if (chosen) await showDetail();
  }, 3000);

  async function showDetail() {
    const d = await api(`/v1/console/models/${encodeURIComponent(chosen.name)}/${encodeURIComponent(chosen.version)}`);
    const mv = d.model, base = `${chosen.name}-${chosen.version}`;
    const get = (label, sha, file) => sha ? h("button", { type: "button", class: "secondary", onclick: () => download(sha, file) }, label) : null;
    detail.replaceChildren(h("h2", {}, `${chosen.name} ${chosen.version}`),
      h("div", { class: "row" }, get("Download the source model", mv.source_sha256, `${base}.${mv.source_format}`),
        get("Download the calibration data", mv.calibration_sha256, `${base}.calibration.npz`),
        get("Download the evaluation data", mv.evaluation_sha256, `${base}.evaluation.npz`),
        can("operator") ? convertForm(chosen, () => showDetail()) : null),
      h("h3", {}, "Artifacts per profile"), artifactTable(d.artifacts, chosen),
      h("h3", {}, "Conversion jobs"), jobTable(d.jobs, (id) => { jobLog.id = id; followLog(); }, async (id) => {
        try { await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); toast(`Job #${id} cancelled`); showDetail(); } catch (e) { toast(e.message); }
      }), jobLog.title, jobLog.view);
    if (jobLog.id !== null && jobLog.live) await followLog();  // until it has shown the job's end
  }

  async function followLog() {  // called on open, then on each poll while the job runs
    const job = await api(`/v1/jobs/${jobLog.id}`);
    const live = jobLog.live = job.status === "queued" || job.status === "running";
    jobLog.title.hidden = jobLog.view.hidden = false;
    jobLog.title.textContent = `Log of job #${job.id} (${job.status}${live ? ", updating" : ""})`;
    const atEnd = jobLog.view.scrollTop + jobLog.view.clientHeight >= jobLog.view.scrollHeight - 4;
    jobLog.view.textContent = job.log || "(empty log)";
    if (atEnd) jobLog.view.scrollTop = jobLog.view.scrollHeight;  // follow the tail unless the reader scrolled up
  }
}

function artifactTable(arts, mv) {
  return table([
    { label: "Profile", value: (a) => a.profile },
    { label: "Format", value: (a) => a.format },
    { label: "Status", value: (a) => badge(a.status) },
    { label: "Size", value: (a) => `${fmtBytes(a.size)}${a.report && a.report.size ? ` (${fmtNum(a.report.size.ratio, 3)}×)` : ""}`, num: true },
    { label: "Fidelity", value: (a) => fidelity(a), num: true },
    { label: "Float nodes (why)", value: (a) => floatNodes(a.report) },
    { label: "Latency FP32→INT8", value: (a) => a.report && a.report.latency ? `${fmtNum(a.report.latency.fp32_ms)}→${fmtNum(a.report.latency.int8_ms)} ms (${fmtNum(a.report.latency.ratio)}×)` : "—" },
    { label: "Reasons", value: (a) => (a.reasons || []).join("; ") || "—" },
    { label: "Download", value: (a) => h("div", { class: "row" },
      a.artifact_sha256 ? h("button", { type: "button", class: "secondary", "aria-label": `Download the ${a.profile} artifact`, onclick: () => download(a.artifact_sha256, `${mv.name}-${mv.version}-${a.profile}.${a.format}`) }, "artifact") : null,
      a.probe_sha256 ? h("button", { type: "button", class: "secondary", "aria-label": `Download the ${a.profile} probe`, onclick: () => download(a.probe_sha256, `${mv.name}-${mv.version}-${a.profile}.probe.npz`) }, "probe") : null,
      h("button", { type: "button", class: "secondary", "aria-label": `Download the ${a.profile} report`, onclick: () => download(a.report_sha256, `${mv.name}-${mv.version}-${a.profile}.report.json`) }, "report")) },
  ], arts, { emptyText: "No artifacts yet: request a conversion for the fleet's profiles." });
}

function fidelity(a) {
  const f = a.report && a.report.fidelity;
  if (f && f.length) return f.map((o) => `${o.name}: cos ${fmtNum(o.cosine, 5)}${o.top1_agreement !== null && o.top1_agreement !== undefined ? `, top-1 ${(100 * o.top1_agreement).toFixed(1)}%` : ""}`).join("; ");
  return a.fidelity !== null && a.fidelity !== undefined ? fmtNum(a.fidelity, 5) : "—";
}

function floatNodes(report) {
  if (!report) return "—";
  if (report.mixed_precision) return `${report.mixed_precision.float_nodes.length}: ${report.mixed_precision.why}`;
  if (report.tflite && report.tflite.float_ops.length) return `ops: ${report.tflite.float_ops.join(", ")}`;
  return "0";
}

function jobTable(jobs, showLog, cancel) {
  const live = (j) => j.status === "queued" || j.status === "running";
  return table([
    { label: "Job", value: (j) => `#${j.id}` },
    { label: "Profiles", value: (j) => j.profiles.join(", ") },
    { label: "Status", value: (j) => badge(j.status) },
    // on the job queue: one part per profile, each on a worker (attempts > 1: retried, or taken over from a dead one)
    { label: "Parts", value: (j) => (j.parts || []).map((p) => `${p.profile}: ${p.status}${p.worker ? ` on ${p.worker}` : ""}${p.attempts > 1 ? ` (attempt ${p.attempts})` : ""}`).join("; ") || "—" },
    { label: "Progress", value: (j) => j.progress || "—" },
    { label: "Error", value: (j) => j.error || "" },
    { label: "Started", value: (j) => fmtTime(j.started_at) },
    { label: "Actions", value: (j) => h("div", { class: "row" },
      h("button", { type: "button", class: "secondary", onclick: () => showLog(j.id) }, `Show log #${j.id}`),
      live(j) && can("operator") ? h("button", { type: "button", class: "secondary", "aria-label": `Cancel job #${j.id}`, onclick: () => cancel(j.id) }, "Cancel") : null) },
  ], jobs, { emptyText: "No conversion job for this version." });
}

function convertForm(mv, refresh) {
  const profiles = h("input", { name: "profiles", value: "rpi5, jetson-orin-nano", size: 30 });
  return h("form", { class: "row", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const job = await api(`/v1/models/${encodeURIComponent(mv.name)}/${encodeURIComponent(mv.version)}/conversions`, { method: "POST",
        body: { profiles: profiles.value.split(/[\s,]+/).filter(Boolean) } });
      toast(`Conversion job #${job.id} queued.`);
      refresh();
    } catch (e) { toast(e.message); }
  } }, field("Convert for profiles", profiles), h("button", { type: "submit" }, "Convert"));
}

async function registerForm(opened) {
  const c = { name: h("input", { name: "name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._-]{0,63}" }),
    version: h("input", { name: "version", required: true, placeholder: "1.0.0" }),
    format: select("source_format", [["onnx", "ONNX"], ["pt2", "PyTorch export (.pt2)"]], "onnx"),
    source: h("input", { type: "file", name: "source", required: true, accept: ".onnx,.pt2" }),
    calibration: h("input", { type: "file", name: "calibration", required: true, accept: ".npz" }),
    evaluation: h("input", { type: "file", name: "evaluation", accept: ".npz" }),
    profiles: h("input", { name: "profiles", placeholder: "rpi5, jetson-orin-nano (optional)" }) };
  const status = h("p", { role: "status" });
  const upload = async (input) => (await api("/v1/artifacts", { method: "POST", body: input.files[0] })).sha256;
  return h("form", { class: "panel", "aria-labelledby": "register-title", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      status.textContent = "Uploading the source…";
      const body = { name: c.name.value, version: c.version.value, source_format: c.format.value, source_sha256: await upload(c.source) };
      status.textContent = "Uploading the calibration data…";
      body.calibration_sha256 = await upload(c.calibration);
      if (c.evaluation.files.length) body.evaluation_sha256 = await upload(c.evaluation);
      status.textContent = "Validating the model in the sandbox…";
      await api("/v1/models", { method: "POST", body });
      const profiles = c.profiles.value.split(/[\s,]+/).filter(Boolean);
      const job = profiles.length ? await api(`/v1/models/${encodeURIComponent(body.name)}/${encodeURIComponent(body.version)}/conversions`, { method: "POST", body: { profiles } }) : null;
      status.textContent = `Registered ${body.name} ${body.version}${job ? `; converting for ${profiles.join(", ")} (job #${job.id})` : ""}.`;
      await opened({ name: body.name, version: body.version }, job ? job.id : null);
    } catch (e) { status.textContent = e.message; status.className = "error"; }
  } }, h("h2", { id: "register-title" }, "Register a model version"),
  h("div", { class: "row" }, field("Name", c.name), field("Version", c.version), field("Source format", c.format)),
  h("div", { class: "row" }, field("Source model", c.source), field("Calibration data (.npz)", c.calibration), field("Evaluation data (.npz, optional)", c.evaluation)),
  h("div", { class: "row" }, field("Convert for profiles", c.profiles), h("button", { type: "submit" }, "Register")), status);
}

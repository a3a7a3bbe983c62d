// The console's shell: sign-in, navigation (hash routes), and the polling that keeps a page live without reloads.
import { api, ApiError, session } from "./api.js";
import { h, field } from "./ui.js";
import * as fleet from "./pages/fleet.js";
import * as device from "./pages/device.js";
import * as models from "./pages/models.js";
import * as rollouts from "./pages/rollouts.js";
import * as misc from "./pages/misc.js";

const ROUTES = [
  [/^#\/fleet$/, fleet.render],
  [/^#\/devices\/([^/?]+)(?:\?range=(\d+))?$/, device.render],
  [/^#\/models$/, models.render],
  [/^#\/rollouts$/, rollouts.renderList],
  [/^#\/rollouts\/new$/, rollouts.renderCreate],
  [/^#\/rollouts\/(\d+)$/, rollouts.renderDetail],
  [/^#\/abtests$/, misc.renderAbTests],
  [/^#\/alerts$/, misc.renderAlerts],
  [/^#\/admin$/, misc.renderAdmin],
];
const POLL_MS = 2000;
const main = document.getElementById("main");
let timers = [];
let generation = 0;

function banner(text) {
  const el = document.getElementById("banner");
  el.hidden = !text;
  el.textContent = text || "";
}

/** What a page gets: poll(fn) runs fn now and every POLL_MS while the page is shown; errors go to the banner. */
function context(gen) {
  return {
    poll(fn, ms = POLL_MS) {
      const run = async () => {
        if (gen !== generation) return;
        try { await fn(); banner(""); } catch (e) { if (e.status !== 401) banner(e.message); }
      };
      run();
      timers.push(setInterval(run, ms));
    },
    alive: () => gen === generation,
  };
}

function signIn(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("who").textContent = "";
  const token = h("input", { type: "password", name: "token", autocomplete: "off", required: true, placeholder: "eft_…" });
  const problem = h("p", { class: "error", role: "alert" }, message || "");
  const form = h("form", { class: "panel signin", "aria-labelledby": "signin-title", onsubmit: async (ev) => {
    ev.preventDefault();
    session.token = token.value.trim();
    try {
      await start();
    } catch (e) {
      problem.textContent = e.status === 401 || e.message === "signed out" ? "This token is unknown or revoked." : e.message;
    }
  } },
  h("h1", { id: "signin-title" }, "Sign in to edgefleet"),
  h("p", { class: "muted" }, "Use an API token (fleet-server tokens create NAME --role viewer|operator|admin). ",
    "A viewer sees everything; an operator also acts on rollouts and models; an admin manages tokens."),
  field("API token", token), h("p", {}, h("button", { type: "submit" }, "Sign in")), problem);
  main.replaceChildren(form);
  token.focus();
}

async function start() {
  session.me = await api("/v1/console/me");
  document.getElementById("who").textContent = `${session.me.name} (${session.me.role})`;
  document.getElementById("nav").hidden = false;
  document.getElementById("signout").hidden = false;
  if (!location.hash || location.hash === "#/") location.hash = "#/fleet";
  else route();
}

function route() {
  timers.forEach(clearInterval);
  timers = [];
  const gen = ++generation;
  banner("");
  if (!session.token || !session.me) { signIn(); return; }
  const hash = location.hash || "#/fleet";
  for (const a of document.querySelectorAll("nav a")) {
    const current = hash.startsWith(a.getAttribute("href"));
    current ? a.setAttribute("aria-current", "page") : a.removeAttribute("aria-current");
  }
  for (const [pattern, render] of ROUTES) {
    const m = hash.match(pattern);
    if (m) {
      main.replaceChildren();
      Promise.resolve(render(main, m.slice(1).map(decodeURIComponent), context(gen))).catch((e) => {
        if (e instanceof ApiError && e.status === 401) return;
        main.replaceChildren(h("h1", {}, "Cannot show this page"), h("p", { class: "error" }, e.message));
      });
      main.focus({ preventScroll: true });
      return;
    }
  }
  main.replaceChildren(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/fleet" }, "Back to the fleet")));
}

window.addEventListener("hashchange", route);
window.addEventListener("signed-out", (ev) => { session.me = null; timers.forEach(clearInterval); signIn(ev.detail); });
document.getElementById("signout").addEventListener("click", () => {
  session.token = null; session.me = null; timers.forEach(clearInterval); signIn("Signed out.");
});

if (session.token) start().catch(() => signIn("Your token expired or was revoked: sign in again."));
else signIn();

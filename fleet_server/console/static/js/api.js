// The API client: every call carries the signed-in token; a 401 signs the console out (expired or revoked token),
// a 403 is an ApiError whose message says which role the action needs (the server's own words).
const KEY = "edgefleet.token";

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export const session = {
  get token() { return sessionStorage.getItem(KEY); },
  set token(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
  me: null,  // {name, role} once signed in
};

const RANK = { viewer: 0, operator: 1, admin: 2 };
export const can = (role) => session.me !== null && RANK[session.me.role] >= RANK[role];

function detail(body, status) {
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
  return `the server answered ${status}`;
}

/** fetch JSON (or, with raw, the Response) from the API. body: an object (sent as JSON), a Blob/File, or nothing. */
export async function api(path, { method = "GET", body, raw = false, params } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  let payload = body;
  if (body !== undefined && !(body instanceof Blob)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let url = path;
  if (params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      for (const one of Array.isArray(v) ? v : [v]) if (one !== undefined && one !== null && one !== "") q.append(k, one);
    }
    if ([...q].length) url += `?${q}`;
  }
  let response;
  try {
    response = await fetch(url, { method, headers, body: payload });
  } catch (e) {
    throw new ApiError(0, "the server cannot be reached; retrying");
  }
  if (response.status === 401) {
    session.token = null;
    window.dispatchEvent(new CustomEvent("signed-out", { detail: "Your token expired or was revoked: sign in again." }));
    throw new ApiError(401, "signed out");
  }
  if (!response.ok) {
    let doc = null;
    try { doc = await response.json(); } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, detail(doc, response.status));
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

/** Download an artifact (the route needs the token, so a plain link cannot): fetched, then saved from a blob URL. */
export async function download(sha256, filename) {
  const response = await api(`/v1/artifacts/${sha256}`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename || sha256;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// The JSON API, with the API key kept for this browser session.

const KEY = "scen-console-api-key";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && typeof body.error === "string" ? body.error : `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.type = body && body.error_type;
  }
}

const authListeners = [];
// fn(error) is called on every 401 and 403.
export function onAuthError(fn) {
  authListeners.push(fn);
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, { error: `the service cannot be reached (${err.message})`, error_type: "network" });
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text.slice(0, 300) };
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 || response.status === 403) authListeners.forEach((fn) => fn(error));
    throw error;
  }
  return data;
}

const id = (editId) => encodeURIComponent(editId);

export const listEdits = ({ q, status, actor, limit, offset }) => {
  const params = new URLSearchParams({ limit, offset });
  if (q) params.set("q", q);
  if (status) params.set("status", status);
  if (actor) params.set("actor", actor);
  return api(`/edits?${params}`);
};
export const getEdit = (editId) => api(`/edits/${id(editId)}`);
export const rollback = (editId, reason) => api(`/edits/${id(editId)}/rollback`, { method: "POST", body: { reason } });
export const restore = (editId, reason) => api(`/edits/${id(editId)}/restore`, { method: "POST", body: { reason } });
export const generate = (prompt, maxNewTokens) =>
  api("/generate", { method: "POST", body: { prompt, max_new_tokens: maxNewTokens } });

// An edit's audit events, or null where the service has no such endpoint (404).
export async function getEvents(editId) {
  try {
    const data = await api(`/edits/${id(editId)}/events`);
    if (Array.isArray(data)) return data;
    return (data && (data.items || data.events)) || [];
  } catch (err) {
    if (err.status === 404 || err.status === 405) return null;
    throw err;
  }
}

// What this service offers beyond the basic API, read once from its OpenAPI document:
// POST /edits/{id}/restore, and the actor filter of GET /edits.
let features;
export function getFeatures() {
  features ??= api("/openapi.json").then(
    (doc) => {
      const paths = Object.entries(doc.paths || {});
      const params = doc.paths?.["/edits"]?.get?.parameters || [];
      return {
        restore: paths.some(([path, ops]) => /^\/edits\/\{[^}]+\}\/restore$/.test(path) && ops.post),
        actorFilter: params.some((p) => p.name === "actor" && p.in === "query"),
      };
    },
    () => {
      features = undefined; // asked again later, perhaps with a key
      return { restore: false, actorFilter: false };
    },
  );
  return features;
}

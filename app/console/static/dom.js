// Building the page from data. Text always goes in as text nodes, never parsed as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  return fill(el, ...children);
}

// Replaces el's children.
export function fill(el, ...children) {
  el.replaceChildren(
    ...children.flat(Infinity)
      .filter((c) => c !== null && c !== undefined && c !== false)
      .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))),
  );
  return el;
}

export const $ = (id) => document.getElementById(id);

export const DASH = "\u2014";

export function when(iso) {
  if (!iso) return DASH;
  const date = new Date(iso);
  return h("time", { datetime: iso, title: iso }, date.toLocaleString());
}

export function num(value, digits = 3) {
  return typeof value === "number" ? String(Number(value.toFixed(digits))) : DASH;
}

export function editLink(id, text) {
  return h("a", { href: `#/edits/${encodeURIComponent(id)}` }, text ?? h("code", {}, id));
}

const STATUSES = new Set(["queued", "training", "active", "failed", "rolled_back", "superseded"]);

export function statusBadge(edit) {
  const known = STATUSES.has(edit.status) ? edit.status : "unknown";
  const label = String(edit.status).replace("_", " ");
  const unserved = edit.status === "active" && edit.live === false;
  return h("span", { class: `badge status-${known}${unserved ? " unserved" : ""}`, "data-status": edit.status },
    unserved ? `${label} (not served)` : label);
}

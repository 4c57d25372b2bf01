// The list of edits: search, status filter, pages. Its state lives in the URL's hash.

import { getFeatures, listEdits } from "./api.js";
import { $, DASH, editLink, fill, h, num, statusBadge, when } from "./dom.js";

export const PAGE_SIZE = 25;

export function listHash({ q = "", status = "", actor = "", page = 0 } = {}) {
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if (status) params.set("status", status);
  if (actor) params.set("actor", actor);
  if (page) params.set("page", page);
  const query = params.toString();
  return query ? `#/?${query}` : "#/";
}

function metricsSummary(metrics) {
  if (!metrics) return DASH;
  const parts = [];
  if (typeof metrics.activation === "number") parts.push(`activation ${num(metrics.activation)}`);
  if (typeof metrics.steps === "number") parts.push(`${metrics.steps} steps`);
  if (typeof metrics.seconds === "number") parts.push(`${num(metrics.seconds, 1)} s`);
  if (typeof metrics.loss === "number") parts.push(`loss ${num(metrics.loss, 4)}`);
  return parts.length ? parts.join(" \u00b7 ") : DASH;
}

// Shown only when the API reports who made an edit.
const actorOf = (edit) => edit.actor ?? edit.created_by ?? null;
const hasActor = (edit) => "actor" in edit || "created_by" in edit;

export async function showList(state, isCurrent) {
  $("search-q").value = state.q;
  $("search-status").value = state.status;
  $("search-actor").value = state.actor;
  $("list-summary").textContent = "Loading\u2026";
  const features = await getFeatures();
  $("actor-filter").hidden = !features.actorFilter;
  const actor = features.actorFilter ? state.actor : "";
  const data = await listEdits({ ...state, actor, limit: PAGE_SIZE, offset: state.page * PAGE_SIZE });
  if (!isCurrent()) return;
  const withActor = data.items.some(hasActor);
  const headings = ["Status", "Prompt", "Target", ...(withActor ? ["Actor"] : []), "Created", "Activated", "Metrics"];
  fill($("edits").tHead, h("tr", {}, headings.map((name) => h("th", { scope: "col" }, name))));
  fill($("edits").tBodies[0], data.items.map((edit) => h("tr", { "data-edit-id": edit.id },
    h("td", {}, statusBadge(edit)),
    h("td", { class: "text" }, editLink(edit.id, edit.prompt)),
    h("td", { class: "text target" }, edit.target),
    withActor ? h("td", {}, actorOf(edit) ?? DASH) : null,
    h("td", {}, when(edit.created_at)),
    h("td", {}, when(edit.activated_at)),
    h("td", { class: "metrics" }, metricsSummary(edit.metrics)),
  )));
  const first = state.page * PAGE_SIZE;
  $("list-summary").textContent = data.items.length
    ? `Edits ${first + 1}\u2013${first + data.items.length} of ${data.total}, newest first`
    : data.total ? `No edits on this page (${data.total} in all)` : "No edits match.";
  $("prev-page").disabled = state.page === 0;
  $("next-page").disabled = first + data.items.length >= data.total;
}

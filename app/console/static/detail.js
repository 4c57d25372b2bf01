// One edit: its fields, rephrases and activations, metrics, events, and rollback / restore.

import { getEdit, getEvents, getFeatures, restore, rollback } from "./api.js";
import { $, DASH, editLink, fill, h, num, statusBadge, when } from "./dom.js";

const ROLLBACK_FROM = new Set(["queued", "training", "active", "superseded"]);
const POLL_WHILE = new Set(["queued", "training"]);

function field(label, ...value) {
  return [h("dt", {}, label), h("dd", {}, ...value)];
}

function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function ids(list) {
  if (!Array.isArray(list) || !list.length) return DASH;
  return list.flatMap((id, i) => [i ? ", " : null, editLink(String(id))]);
}

function fields(edit) {
  const m = edit.metrics || {};
  return h("dl", { class: "fields" },
    field("Status", statusBadge(edit), edit.status === "active" ? (edit.live ? " served here" : " not served") : null),
    field("Prompt", h("span", { class: "text" }, edit.prompt)),
    field("Target", h("span", { class: "text target" }, edit.target)),
    field("Subject", edit.subject ?? (m.subject ? `${m.subject} (inferred)` : DASH)),
    "actor" in edit || "created_by" in edit ? field("Actor", edit.actor ?? edit.created_by ?? DASH) : null,
    field("Created", when(edit.created_at)),
    field("Started", when(edit.started_at)),
    field("Activated", when(edit.activated_at)),
    field("Finished", when(edit.finished_at)),
    field("Rolled back", when(edit.rolled_back_at)),
    edit.superseded_by ? field("Superseded by", editLink(edit.superseded_by)) : null,
    edit.error ? field("Error", h("span", { class: "error" }, edit.error)) : null,
    field("Attempts", String(edit.attempts ?? DASH), edit.worker ? ` (last worker: ${edit.worker})` : null),
    field("Id", h("code", {}, edit.id)),
    edit.expert_sha256 ? field("Expert sha256", h("code", {}, edit.expert_sha256)) : null,
    Object.keys(edit.metadata || {}).length ? field("Metadata", json(edit.metadata)) : null,
  );
}

function activations(edit) {
  const m = edit.metrics || {};
  const rows = [["Prompt", edit.prompt, m.activation], ...edit.rephrases.map((text, i) =>
    [`Rephrase ${i + 1}`, text, (m.rephrase_activations || [])[i]])];
  return [
    h("h3", {}, "Rephrases and activations"),
    h("table", { class: "activations" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, ""), h("th", { scope: "col" }, "Text"),
        h("th", { scope: "col" }, "Activation"))),
      h("tbody", {}, rows.map(([kind, text, act]) =>
        h("tr", {}, h("th", { scope: "row" }, kind), h("td", { class: "text" }, text), h("td", {}, num(act)))))),
    edit.rephrases.length ? null : h("p", { class: "muted" }, "No rephrases were posted."),
  ];
}

const SHOWN = new Set(["activation", "rephrase_activations", "subject", "fires_on_prompt", "overrides"]);

function metrics(edit) {
  const m = edit.metrics;
  if (!m) return [h("h3", {}, "Training"), h("p", { class: "muted" }, "Not trained yet.")];
  const other = Object.entries(m).filter(([key]) => !SHOWN.has(key));
  return [
    h("h3", {}, "Training"),
    h("dl", { class: "fields" },
      other.map(([key, value]) => field(key.replaceAll("_", " "), typeof value === "number" ? num(value, 4)
        : typeof value === "object" && value !== null ? json(value) : String(value))),
      field("Live edits firing on its prompt", ids(m.fires_on_prompt)),
      field("Overrides", ids(m.overrides)),
    ),
  ];
}

function eventItem(event) {
  if (typeof event !== "object" || event === null) return h("li", {}, String(event));
  const at = event.at ?? event.created_at ?? event.time ?? event.timestamp;
  const kind = event.kind ?? event.type ?? event.event ?? event.action ?? "event";
  const known = new Set(["at", "created_at", "time", "timestamp", "kind", "type", "event", "action", "id", "edit_id"]);
  const rest = Object.entries(event).filter(([key, value]) => !known.has(key) && value !== null && value !== "");
  return h("li", {}, when(at), " ", h("strong", {}, String(kind)),
    rest.map(([key, value]) => [" \u00b7 ", `${key}: `,
      h("span", { class: "text" }, typeof value === "object" ? JSON.stringify(value) : String(value))]));
}

function events(list) {
  return h("section", { id: "events", "aria-labelledby": "events-title" },
    h("h3", { id: "events-title" }, "Events"),
    list.length ? h("ol", { class: "events" }, list.map(eventItem)) : h("p", { class: "muted" }, "No events."));
}

function actions(edit, restorable, onDone) {
  const canRollback = ROLLBACK_FROM.has(edit.status);
  const canRestoreIt = restorable && edit.status === "rolled_back";
  if (!canRollback && !canRestoreIt) return null;
  const reason = h("input", { id: "action-reason", type: "text", required: true, maxlength: 1000,
    placeholder: "why, for the audit trail" });
  const message = h("p", { id: "action-message", "aria-live": "polite" });
  const run = (name, call) => async (event) => {
    event.preventDefault();
    if (!reason.value.trim()) {
      fill(message, "Give a reason first.");
      reason.focus();
      return;
    }
    for (const button of form.querySelectorAll("button")) button.disabled = true;
    fill(message, `${name}\u2026`);
    try {
      await call(edit.id, reason.value.trim());
      onDone(`${name} done.`);
    } catch (err) {
      fill(message, h("span", { class: "error" }, `${name} failed (${err.status || "network"}): ${err.message}`));
      for (const button of form.querySelectorAll("button")) button.disabled = false;
    }
  };
  const form = h("form", { id: "actions", class: "panel actions" },
    h("h3", {}, canRollback ? "Roll back" : "Restore"),
    h("label", { for: "action-reason" }, "Reason"), reason,
    h("div", { class: "row" },
      canRollback ? h("button", { type: "submit", id: "rollback", class: "danger", onclick: run("Rollback", rollback) },
        edit.status === "active" ? "Roll back: stop routing to it" : "Roll back") : null,
      canRestoreIt ? h("button", { type: "submit", id: "restore", onclick: run("Restore", restore) }, "Restore") : null),
    message);
  return form;
}

export async function showDetail(editId, isCurrent, notice = null) {
  const target = $("detail");
  const [edit, features] = await Promise.all([getEdit(editId), getFeatures()]);
  if (!isCurrent()) return;
  document.title = `Edit ${edit.id} \u00b7 SCEN console`;
  const again = (message) => showDetail(editId, isCurrent, message);
  fill(target,
    notice ? h("p", { class: "done", role: "status" }, notice) : null,
    fields(edit),
    actions(edit, features.restore, again),
    activations(edit),
    metrics(edit));
  const list = await getEvents(editId);
  if (list !== null && isCurrent()) target.append(events(list));
  if (POLL_WHILE.has(edit.status)) poll(editId, isCurrent);
}

// Follows a waiting edit until it is trained, without wiping a reason being typed.
function poll(editId, isCurrent) {
  setTimeout(() => {
    if (!isCurrent()) return;
    if ($("action-reason")?.value) poll(editId, isCurrent);
    else showDetail(editId, isCurrent).catch(() => {});
  }, 2000);
}

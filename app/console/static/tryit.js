// "Try a prompt": one POST /generate, and which edit answered.

import { generate, getEdit } from "./api.js";
import { $, editLink, fill, h, num } from "./dom.js";

export async function tryPrompt() {
  const out = $("try-result");
  const prompt = $("try-prompt").value;
  if (!prompt.trim()) {
    fill(out, h("p", { class: "error" }, "Write a prompt first."));
    return;
  }
  const button = $("try-form").querySelector("button");
  button.disabled = true;
  fill(out, h("p", { class: "muted" }, "Generating\u2026"));
  try {
    const answer = await generate(prompt, Number($("try-tokens").value) || 32);
    const editId = answer.routing.edit_id;
    const by = h("dd", { id: "try-routed" }, editId ? ["edit ", editLink(editId)] : "the base model (no edit fired)");
    fill(out, h("dl", { class: "fields answer" },
      h("dt", {}, "Answer"), h("dd", {}, h("span", { id: "try-text", class: "text" }, answer.text)),
      h("dt", {}, "Answered by"), by,
      h("dt", {}, "Activation"), h("dd", { id: "try-activation" }, num(answer.routing.activation)),
      h("dt", {}, "Model version"), h("dd", {}, String(answer.model_version))));
    if (editId) {
      // What that edit says, for context; the answer stands without it.
      getEdit(editId).then((edit) => by.append(" \u2014 ", h("span", { class: "text" }, edit.prompt), " \u2192 ",
        h("span", { class: "text target" }, edit.target)), () => {});
    }
  } catch (err) {
    fill(out, h("p", { class: "error" }, `Generation failed (${err.status || "network"}): ${err.message}`));
  } finally {
    button.disabled = false;
  }
}

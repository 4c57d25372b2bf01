// The console's entry point: the API key, the notice line, and the two views (#/ and #/edits/<id>).

import { apiKey, onAuthError } from "./api.js";
import { showDetail } from "./detail.js";
import { $, fill, h } from "./dom.js";
import { listHash, showList } from "./list.js";
import { tryPrompt } from "./tryit.js";

let view = 0; // bumped on every navigation: late answers for an older view are dropped
let lastList = "#/";

function notify(message) {
  const notice = $("notice");
  fill(notice, message);
  notice.hidden = !message;
}

onAuthError((err) => {
  const why = err.status === 401
    ? "The service asks for an API key, or did not accept the one given"
    : "This API key is not allowed to do that";
  notify([`${why} (${err.status}): ${err.message}. `,
    h("button", { type: "button", class: "link", onclick: () => $("api-key").focus() }, "Enter a key"), " at the top."]);
});

function showKeyState() {
  $("key-state").textContent = apiKey.get() ? "key set for this browser session" : "no key";
  $("api-key").value = "";
}

function listState(query) {
  const params = new URLSearchParams(query);
  return {
    q: params.get("q") || "",
    status: params.get("status") || "",
    actor: params.get("actor") || "",
    page: Math.max(0, Number(params.get("page")) || 0),
  };
}

async function route() {
  const current = ++view;
  const isCurrent = () => current === view;
  const hash = location.hash.startsWith("#/") ? location.hash : "#/";
  const detail = /^#\/edits\/([^/?]+)$/.exec(hash);
  $("list-view").hidden = Boolean(detail);
  $("detail-view").hidden = !detail;
  try {
    if (detail) {
      fill($("detail"), h("p", { class: "muted" }, "Loading\u2026"));
      $("detail-view").querySelector("a").href = lastList;
      await showDetail(decodeURIComponent(detail[1]), isCurrent);
    } else {
      lastList = hash;
      document.title = "Edits \u00b7 SCEN console";
      await showList(listState(hash.split("?")[1] || ""), isCurrent);
    }
    if (isCurrent()) notify("");
  } catch (err) {
    if (!isCurrent()) return;
    if (err.status !== 401 && err.status !== 403) notify(`Could not load (${err.status || "network"}): ${err.message}`);
    if (detail) fill($("detail"), h("p", { class: "error" }, err.message));
    else $("list-summary").textContent = "";
  }
}

function search(page = 0) {
  const state = { q: $("search-q").value.trim(), status: $("search-status").value, actor: $("search-actor").value.trim(), page };
  const hash = listHash(state);
  if (hash === location.hash) route();
  else location.hash = hash;
}

function currentPage() {
  return listState(location.hash.split("?")[1] || "").page;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) apiKey.set(key);
  showKeyState();
  route();
});
$("forget-key").addEventListener("click", () => {
  apiKey.clear();
  showKeyState();
});
$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
$("search-status").addEventListener("change", () => search());
$("prev-page").addEventListener("click", () => search(Math.max(0, currentPage() - 1)));
$("next-page").addEventListener("click", () => search(currentPage() + 1));
$("try-form").addEventListener("submit", (event) => {
  event.preventDefault();
  tryPrompt();
});
window.addEventListener("hashchange", () => {
  if (!location.hash.startsWith("#/")) return; // an in-page link such as "Skip to content"
  route();
  (location.hash.startsWith("#/edits/") ? $("detail-title") : $("list-title")).focus({ preventScroll: true });
});

showKeyState();
route();

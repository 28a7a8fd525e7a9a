// Entry point: hash routes (#/, #/new, #/c/<id>), the API key dialog, and one place that shows errors.

import { apiKey, onUnauthorized, ApiError } from "./api.js";
import { h, replace } from "./dom.js";
import { listView } from "./list.js";
import { createView } from "./create.js";
import { detailView } from "./detail.js";

const main = document.getElementById("main");
const keyButton = document.getElementById("key-button");
let leave = null;  // the current view's cleanup (timers, object URLs, webcam)
let banner = null;
let firstRoute = true;

// --- API key ---------------------------------------------------------------------------------------
const dialog = document.getElementById("key-dialog");
const keyInput = document.getElementById("key-input");
let pendingKey = null;  // several requests may hit 401 at once: they share one prompt

function promptForKey(reason) {
  if (pendingKey) return pendingKey;
  document.getElementById("key-reason").textContent = reason || "This server needs an API key.";
  keyInput.value = "";
  dialog.showModal();
  keyInput.focus();
  pendingKey = new Promise((resolve) => {
    const done = (ok) => { dialog.close(); pendingKey = null; resolve(ok); };
    const form = document.getElementById("key-form");
    const onSubmit = (e) => {
      e.preventDefault();
      const key = keyInput.value.trim();
      if (!key) { keyInput.focus(); return; }
      apiKey.set(key);
      keyButton.hidden = false;
      cleanup(); done(true);
    };
    const onCancel = (e) => { if (e) e.preventDefault(); cleanup(); done(false); };
    const onForget = () => { apiKey.set(""); cleanup(); done(false); location.reload(); };
    const cancelButton = document.getElementById("key-cancel"), forgetButton = document.getElementById("key-forget");
    function cleanup() {
      form.removeEventListener("submit", onSubmit);
      dialog.removeEventListener("cancel", onCancel);
      cancelButton.removeEventListener("click", onCancel);
      forgetButton.removeEventListener("click", onForget);
    }
    form.addEventListener("submit", onSubmit);
    dialog.addEventListener("cancel", onCancel);
    cancelButton.addEventListener("click", onCancel);
    forgetButton.addEventListener("click", onForget);
  });
  return pendingKey;
}

onUnauthorized((message) => promptForKey(apiKey.get() ? `The key was refused: ${message}` : "This server needs an API key."));
keyButton.hidden = !apiKey.get();
keyButton.addEventListener("click", async () => { if (await promptForKey("Enter a new API key.")) route(); });

// --- errors ----------------------------------------------------------------------------------------
function report(exc) {
  console.error(exc);
  if (banner) banner.remove();
  const text = exc instanceof ApiError
    ? exc.status === 401
      ? apiKey.get() ? `The API key was not accepted (${exc.message}).` : "An API key is needed to use this server."
      : `${exc.message}`
    : `Something went wrong: ${exc.message}`;
  const actions = [];
  if (exc instanceof ApiError && exc.status === 401) {
    actions.push(h("button", { type: "button", onclick: async () => { if (await promptForKey()) route(); } }, "Enter API key"));
  }
  banner = h("div", { class: "error banner", role: "alert", id: "error-banner" }, h("span", {}, text), " ", actions,
    h("button", { type: "button", class: "quiet", "aria-label": "Dismiss", onclick: () => { banner.remove(); banner = null; } }, "×"));
  main.prepend(banner);
}

// --- routing ---------------------------------------------------------------------------------------
function route() {
  if (leave) { leave(); leave = null; }
  banner = null;
  const hash = location.hash || "#/";
  const ctx = { report };
  const match = hash.match(/^#\/c\/([^/]+)$/);
  if (hash === "#/new") leave = createView(main, ctx);
  else if (match) leave = detailView(main, ctx, decodeURIComponent(match[1]));
  else if (hash === "#/" || hash === "#") leave = listView(main, ctx);
  else replace(main, h("h1", { tabindex: "-1" }, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the classifiers")));
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.getAttribute("href") === hash) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const heading = main.querySelector("h1");
  if (heading && !firstRoute) heading.focus();  // keyboard and screen-reader users land on the new page
  firstRoute = false;
}

window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (e) => report(e.reason instanceof Error ? e.reason : new Error(String(e.reason))));
route();

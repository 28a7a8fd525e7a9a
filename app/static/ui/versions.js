// A classifier that evolves: its versions (which serves, accuracy, what changed), "Serve this version",
// "Add images / add a class", "Add a class by name", "Retrain with feedback", and the "Wrong? The right
// label is …" form under each Try-it answer. detail.js mounts the section and asks for the feedback form.

import { ApiError, getJSON, request, upload } from "./api.js";
import { h, replace, pct, when, toast } from "./dom.js";

const enc = encodeURIComponent;
const POLL_MS = 700;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const SOURCES = { build: "first build", update: "update", class_by_name: "class by name", rollback: "rollback" };

const paths = (id) => ({
  versions: `v1/classifiers/${enc(id)}/versions`,
  serve: (v) => `v1/classifiers/${enc(id)}/versions/${enc(v)}/serve`,
  classes: `v1/classifiers/${enc(id)}/classes`,
  feedback: `v1/classifiers/${enc(id)}/feedback`,
});

function changeText(v) {
  const c = v.change || {};
  const bits = [];
  if (c.added_class_by_name) bits.push(`added “${c.added_class_by_name}” by name`);
  if (c.added_images) bits.push(`+${c.added_images} images`);
  if (c.feedback_images) bits.push(`+${c.feedback_images} from feedback`);
  if (c.added_classes && c.added_classes.length) bits.push(`new classes: ${c.added_classes.join(", ")}`);
  if (c.removed_classes && c.removed_classes.length) bits.push(`removed: ${c.removed_classes.join(", ")}`);
  if (c.reason) bits.push(c.reason);
  if (v.warm_start) bits.push("mask warm-started from its parent");
  return bits.join("; ") || SOURCES[v.source] || v.source;
}

export function versionsSection(id, { onServed } = {}) {
  const p = paths(id);
  let alive = true;
  let labels = [];
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  const list = h("tbody", { id: "versions-rows" });
  const table = h("table", { class: "versions" },
    h("thead", {}, h("tr", {}, ["", "Version", "Made by", "Created", "Accuracy", "Images", "What changed", ""].map((t) => h("th", {}, t)))),
    list);
  const status = h("p", { id: "versions-status", role: "status", "aria-live": "polite", class: "muted" });

  // add images (one label for the chosen files: a new label adds a class)
  const files = h("input", { type: "file", id: "update-files", accept: "image/*", multiple: true, "aria-label": "Images to add" });
  const label = h("input", { type: "text", id: "update-label", list: "version-labels", placeholder: "label (new = a new class)", "aria-label": "Label of the added images" });
  const force = h("input", { type: "checkbox", id: "update-force" });
  const addForm = h("form", { id: "update-form", class: "row" }, files, label,
    h("label", {}, force, " serve even if worse"),
    h("button", { type: "submit", id: "update-button" }, "Add images / add a class"));
  addForm.addEventListener("submit", (e) => { e.preventDefault(); addImages(); });

  const className = h("input", { type: "text", id: "class-name", placeholder: "e.g. zebra", "aria-label": "Class name" });
  const classForm = h("form", { id: "class-form", class: "row" }, className,
    h("button", { type: "submit", id: "class-button" }, "Add a class by name"));
  classForm.addEventListener("submit", (e) => { e.preventDefault(); addClassByName(); });

  const feedbackCount = h("span", { id: "feedback-count", class: "muted" });
  const retrain = h("button", { type: "button", id: "retrain-button", onclick: () => retrainWithFeedback() }, "Retrain with feedback");
  const datalist = h("datalist", { id: "version-labels" });

  const section = h("section", { class: "card", id: "versions", "aria-labelledby": "versions-title", hidden: true },
    h("h2", { id: "versions-title" }, "Versions"),
    h("p", { class: "muted" }, "Exactly one version answers classify (marked ●). A new version serves only if it is not worse on the same held-out images."),
    h("div", { class: "scroll" }, table), status, addForm, classForm, h("div", { class: "row" }, retrain, feedbackCount), datalist);

  async function load() {
    const [got, feedback] = await Promise.all([getJSON(p.versions), getJSON(p.feedback)]);
    if (!alive) return;
    section.hidden = false;
    const finals = got.versions.filter((v) => v.final);
    const serving = got.versions.find((v) => v.serving);
    labels = serving ? serving.labels : [];
    replace(datalist, labels.map((l) => h("option", { value: l })));
    replace(list, finals.map((v) => h("tr", { class: v.serving ? "serving" : "", "data-version": v.version_id },
      h("td", {}, v.serving ? h("span", { title: "serving", "aria-label": "serving" }, "●") : ""),
      h("td", {}, h("code", {}, v.version_id)),
      h("td", {}, SOURCES[v.source] || v.source),
      h("td", {}, when(v.created_at)),
      h("td", {}, pct(v.published_accuracy ?? (v.change && v.change.new_accuracy), 1)),
      h("td", {}, Object.entries(v.images || {}).map(([k, n]) => `${k} ${n}`).join(", ")),
      h("td", {}, changeText(v)),
      h("td", {}, v.serving ? "serving" : h("button", { type: "button", class: "serve-button", onclick: () => serve(v.version_id) }, "Serve this version")))));
    const n = feedback.feedback.length;
    feedbackCount.textContent = n ? `${n} feedback image${n === 1 ? "" : "s"} recorded` : "no feedback recorded yet";
    retrain.disabled = n === 0;
  }

  async function serve(versionId) {
    try {
      await request(p.serve(versionId), { method: "POST" });
      await load();
      status.textContent = `Version ${versionId} serves now.`;
      if (onServed) onServed();
    } catch (exc) { status.textContent = `Could not serve it: ${exc.message}`; }
  }

  async function follow(created) {
    status.textContent = "Training the new version… the serving one keeps answering meanwhile.";
    for (;;) {
      const job = await getJSON(`v1/jobs/${enc(created.job_id)}`);
      if (!alive) return;
      if (FINISHED.has(job.status)) {
        const u = job.update || {};
        await load();  // the list first: the status line below announces a list that already shows it
        status.textContent = job.status === "succeeded"
          ? `${u.served ? "The new version serves" : "The new version was kept but does not serve"}: ${u.reason || ""}`
          : `The update ${job.status}: ${(job.error && job.error.message) || ""}`;
        if (u.served && onServed) onServed();
        return;
      }
      await sleep(POLL_MS);
    }
  }

  async function queue(form) {
    try {
      await follow(await upload(p.versions, form));
    } catch (exc) { status.textContent = `Could not start the update: ${exc.message}`; }
  }

  function addImages() {
    const chosen = [...files.files];
    const name = label.value.trim();
    if (!chosen.length || !name) { status.textContent = "Choose images and give their label."; return; }
    const form = new FormData();
    for (const f of chosen) { form.append("files", f, f.name); form.append("labels", name); }
    if (force.checked) form.append("config", JSON.stringify({ force: true }));
    files.value = "";
    queue(form);
  }

  function retrainWithFeedback() {
    const form = new FormData();
    form.append("include_feedback", "true");
    if (force.checked) form.append("config", JSON.stringify({ force: true }));
    queue(form);
  }

  async function addClassByName() {
    const name = className.value.trim();
    if (!name) { status.textContent = "Give the new class a name."; return; }
    try {
      const response = await request(p.classes, { method: "POST", body: JSON.stringify({ name }),
        headers: { "Content-Type": "application/json" } });
      const version = await response.json();
      className.value = "";
      await load();
      status.textContent = `Class “${name}” added by name: version ${version.version_id} serves now.`;
      if (onServed) onServed();
    } catch (exc) {
      status.textContent = exc instanceof ApiError && exc.code === "class_exists"
        ? `There is already a class “${name}”.` : `Could not add the class: ${exc.message}`;
    }
  }

  // Under a Try-it answer: record the right label of the image just classified.
  function feedbackForm(file, predicted) {
    const right = h("input", { type: "text", id: "feedback-label", list: "version-labels", "aria-label": "The right label" });
    const note = h("span", { class: "muted", id: "feedback-note", role: "status" });
    const form = h("form", { class: "row feedback", id: "feedback-form" },
      h("label", { for: "feedback-label" }, "Wrong? The right label is "), right,
      h("button", { type: "submit", id: "feedback-button" }, "Record"), note);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const value = right.value.trim();
      if (!value) { note.textContent = "Type the right label."; return; }
      const body = new FormData();
      body.append("file", file, file.name || "image.png");
      body.append("label", value);
      if (predicted) body.append("prediction", predicted);
      try {
        await request(p.feedback, { method: "POST", body });
        note.textContent = "Recorded. “Retrain with feedback” uses it.";
        toast("Feedback recorded");
        await load();
      } catch (exc) { note.textContent = `Not recorded: ${exc.message}`; }
    });
    return form;
  }

  return { section, load, feedbackForm, close: () => { alive = false; } };
}

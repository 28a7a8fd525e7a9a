// The classifier list: name, status, classes, published model and accuracy; open or delete each.

import { api } from "./api.js";
import { h, replace, pct, when, badge, toast, confirmDialog } from "./dom.js";

const ACTIVE = new Set(["queued", "running"]);
const MAX_CHIPS = 6;

export function listView(main, ctx) {
  let alive = true;
  let timer = null;
  const body = h("div", { id: "classifier-list", "aria-busy": "true" }, h("p", { class: "muted" }, "Loading…"));

  replace(main,
    h("div", { class: "row spread" }, h("h1", { tabindex: "-1" }, "Classifiers"),
      h("a", { class: "button primary", href: "#/new" }, "New classifier")),
    body);

  function labelChips(labels) {
    const shown = labels.slice(0, MAX_CHIPS).map((l) => h("li", { class: "chip", title: l }, l));
    if (labels.length > MAX_CHIPS) shown.push(h("li", { class: "chip more" }, `+${labels.length - MAX_CHIPS} more`));
    return h("ul", { class: "chips", "aria-label": `${labels.length} classes` }, shown);
  }

  function row(c) {
    const v = c.validation || {};
    const accuracy = v.published_accuracy ?? v.tuned_accuracy;
    const model = v.published ?? (c.status === "ready" ? c.method : null);
    const name = c.name || c.classifier_id;
    return h("tr", { dataset: { id: c.classifier_id } },
      h("th", { scope: "row" }, h("a", { href: `#/c/${encodeURIComponent(c.classifier_id)}` }, name)),
      h("td", {}, badge(c.status)),
      h("td", {}, labelChips(c.labels)),
      h("td", {}, model ?? "–"),
      h("td", {}, accuracy !== undefined ? pct(accuracy, 1) : "–"),
      h("td", {}, when(c.created_at)),
      h("td", {}, h("button", { type: "button", class: "quiet danger-text", "aria-label": `Delete ${name}`,
        onclick: () => remove(c, name) }, "Delete")));
  }

  async function remove(c, name) {
    if (!(await confirmDialog("Delete this classifier?", `“${name}”, its images and its model will be deleted. This cannot be undone.`))) return;
    try {
      await api.remove(c.classifier_id);
      toast(`Deleted “${name}”.`);
      refresh();
    } catch (exc) { ctx.report(exc); }
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const page = await api.list(200);
      if (!alive) return;
      body.setAttribute("aria-busy", "false");
      if (!page.items.length) {
        replace(body, h("div", { class: "empty card" }, h("p", {}, "No classifiers yet."),
          h("a", { class: "button primary", href: "#/new" }, "Create your first classifier")));
      } else {
        replace(body, h("div", { class: "scroll" }, h("table", { class: "list" },
          h("caption", { class: "visually-hidden" }, "Your classifiers, newest first"),
          h("thead", {}, h("tr", {}, ["Name", "Status", "Classes", "Model", "Accuracy", "Created", ""].map((t) =>
            h("th", { scope: "col" }, t)))),
          h("tbody", {}, page.items.map(row)))),
          page.total > page.items.length ? h("p", { class: "muted" }, `Showing ${page.items.length} of ${page.total}.`) : null);
      }
      if (page.items.some((c) => ACTIVE.has(c.status))) timer = setTimeout(refresh, 2000);  // follow running jobs
    } catch (exc) {
      if (!alive) return;
      replace(body, h("p", { class: "muted" }, "Could not load the classifiers."));
      ctx.report(exc);
    }
  }

  refresh();
  return () => { alive = false; clearTimeout(timer); };
}

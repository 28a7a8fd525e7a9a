// The create page: classes by name, images per class (drop, pick, or one zip), thumbnails, settings, upload.

import { api, ApiError } from "./api.js";
import { h, replace, bytes, toast } from "./dom.js";
import { readZip } from "./zip.js";

const FALLBACK_INFO = {
  methods: ["r-amt", "amt", "r-pmt", "pmt", "r-mmt", "mmt"], backbones: [], default_backbone: null,
  defaults: { method: "r-amt", epochs: 30, min_steps: 300 }, limits: { max_label_length: 100 },
};
const ADVANCED = [  // [field, label, input type, step, help]
  ["min_steps", "Minimum optimizer steps", "number", "1", "Small uploads train at least this many steps (epochs are raised)."],
  ["learning_rate", "Learning rate", "number", "any", ""],
  ["batch_size", "Batch size", "number", "1", ""],
  ["holdout", "Held-out fraction", "number", "0.05", "Part of each class (5+ images) kept back for the validation report."],
  ["seed", "Seed", "number", "1", ""],
  ["prompt_template", "Prompt template", "text", null, "The text prompt; {} is replaced by the class name."],
];
const INTEGER = new Set(["min_steps", "batch_size", "seed", "epochs"]);

let nextId = 1;

function isImage(file) {
  return file.type.startsWith("image/") || /\.(png|jpe?g|gif|webp|bmp|tiff?)$/i.test(file.name);
}
const isZip = (file) => /zip/.test(file.type) || /\.zip$/i.test(file.name);

export function createView(main, ctx) {
  const state = { classes: [], busy: false };
  const urls = new Set();  // every thumbnail's object URL, revoked when the page goes
  let info = FALLBACK_INFO;

  const status = h("p", { class: "form-status", role: "status", "aria-live": "polite" });
  const errorBox = h("div", { class: "error", role: "alert", hidden: true });
  const classList = h("div", { class: "classes" });
  const nameInput = h("input", { id: "clf-name", name: "name", type: "text", maxlength: "200", placeholder: "e.g. shapes" });

  function showError(message) {
    errorBox.hidden = !message;
    replace(errorBox, message || "");
  }

  function thumb(cls, item, index) {
    return h("li", { class: "thumb" },
      h("img", { src: item.url, alt: `${cls.label || "unnamed class"} image ${index + 1}: ${item.file.name}`, loading: "lazy" }),
      h("button", {
        type: "button", class: "remove", "aria-label": `Remove image ${index + 1} (${item.file.name}) from ${cls.label || "this class"}`,
        title: "Remove this image", onclick: () => removeImage(cls, item),
      }, "×"));
  }

  function refreshClass(cls) {
    replace(cls.grid, cls.images.map((item, i) => thumb(cls, item, i)));
    cls.count.textContent = `${cls.images.length} image${cls.images.length === 1 ? "" : "s"}`;
    updateSummary();
  }

  function removeImage(cls, item) {
    cls.images = cls.images.filter((x) => x !== item);
    URL.revokeObjectURL(item.url);
    urls.delete(item.url);
    refreshClass(cls);
    cls.pick.focus();
  }

  async function addFiles(cls, files) {
    const skipped = [], broken = [], candidates = [];
    for (const file of files) {
      if (isZip(file)) { addZip(file); continue; }
      if (!isImage(file)) { skipped.push(file.name); continue; }
      candidates.push(file);
    }
    // Decode each image here before it is kept: a file the browser cannot decode would be a broken thumbnail
    // and, uploaded, fail the whole create on the server.
    const decoded = await Promise.all(candidates.map((file) => decodes(file)));
    candidates.forEach((file, i) => {
      if (!decoded[i]) { broken.push(file.name); return; }
      const url = URL.createObjectURL(file);
      urls.add(url);
      cls.images.push({ file, url });
    });
    if (skipped.length) toast(`Skipped ${skipped.length} file(s) that are not images: ${skipped.slice(0, 3).join(", ")}`);
    if (broken.length) {
      showError(`${broken.length} image(s) could not be decoded and were not added: ${broken.join(", ")}`);
    }
    refreshClass(cls);
  }

  async function decodes(file) {
    if (/tiff?$/i.test(file.type) || /\.tiff?$/i.test(file.name)) return true;  // the server decodes TIFF, browsers do not
    try {
      const bitmap = await createImageBitmap(file);
      bitmap.close();
      return true;
    } catch {  // the browser cannot decode it: reported by name in the caller
      return false;
    }
  }

  async function addZip(file) {
    status.textContent = `Reading ${file.name}…`;
    try {
      const members = await readZip(file, info.limits.max_files);
      const byClass = new Map();
      for (const m of members) {
        if (!byClass.has(m.parts[0])) byClass.set(m.parts[0], []);
        byClass.get(m.parts[0]).push(m.file);
      }
      for (const cls of state.classes.filter((c) => !c.images.length && !byClass.has(c.label))) removeClass(cls, false);
      for (const [label, files] of byClass) {
        const cls = state.classes.find((c) => c.label === label) || addClass(label);
        addFiles(cls, files);
      }
      status.textContent = `${file.name}: ${members.length} images in ${byClass.size} classes.`;
    } catch (exc) {
      status.textContent = "";
      showError(`Could not read ${file.name}: ${exc.message}`);
    }
  }

  function dropZone(target, onFiles, label) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); target.classList.add("over"); });
    target.addEventListener("dragleave", () => target.classList.remove("over"));
    target.addEventListener("drop", (e) => {
      e.preventDefault();
      target.classList.remove("over");
      onFiles([...e.dataTransfer.files]);
    });
    target.setAttribute("aria-label", label);
  }

  function addClass(label = "") {
    const cls = { id: nextId++, label, images: [] };
    const labelId = `class-label-${cls.id}`, fileId = `class-files-${cls.id}`;
    const input = h("input", {
      id: labelId, type: "text", value: label, required: true, maxlength: String(info.limits.max_label_length || 100),
      class: "class-name", oninput: (e) => { cls.label = e.target.value; updateSummary(); },
    });
    const files = h("input", {
      id: fileId, type: "file", multiple: true, accept: "image/*,.zip", class: "visually-hidden",
      onchange: (e) => { addFiles(cls, [...e.target.files]); e.target.value = ""; },
    });
    cls.pick = h("button", { type: "button", onclick: () => files.click() }, "Add images…");
    cls.count = h("span", { class: "muted" }, "0 images");
    cls.grid = h("ul", { class: "thumbs", "aria-label": "Images" });
    const zone = h("div", { class: "drop" }, h("p", { class: "muted" }, "Drop images here, or ", cls.pick), files, cls.grid);
    cls.card = h("section", { class: "card class-card", "aria-labelledby": labelId, dataset: { classId: cls.id } },
      h("div", { class: "row" },
        h("label", { for: labelId, class: "visually-hidden" }, "Class name"),
        input, cls.count,
        h("button", { type: "button", class: "quiet", "aria-label": "Remove this class", onclick: () => removeClass(cls) }, "Remove class")),
      zone);
    dropZone(zone, (list) => addFiles(cls, list), "Drop images for this class");
    state.classes.push(cls);
    classList.append(cls.card);
    updateSummary();
    return cls;
  }

  function removeClass(cls, focus = true) {
    for (const item of cls.images) { URL.revokeObjectURL(item.url); urls.delete(item.url); }
    state.classes = state.classes.filter((c) => c !== cls);
    cls.card.remove();
    updateSummary();
    if (focus) addButton.focus();
  }

  const summary = h("p", { class: "muted", id: "create-summary" });
  function updateSummary() {
    const n = state.classes.reduce((a, c) => a + c.images.length, 0);
    const size = state.classes.reduce((a, c) => a + c.images.reduce((b, i) => b + i.file.size, 0), 0);
    summary.textContent = `${state.classes.length} classes, ${n} images (${bytes(size)}).`;
  }

  const addButton = h("button", { type: "button", onclick: () => addClass("").card.querySelector("input").focus() }, "Add a class");
  const zipInput = h("input", { id: "zip-input", type: "file", accept: ".zip,application/zip", class: "visually-hidden",
    onchange: (e) => { if (e.target.files[0]) addZip(e.target.files[0]); e.target.value = ""; } });

  // Settings
  const method = h("select", { id: "cfg-method", name: "method", onchange: (e) => { e.target.dataset.touched = "1"; } });
  const backbone = h("select", { id: "cfg-backbone", name: "backbone" });
  const weights = h("select", { id: "cfg-pretrained", name: "pretrained" });
  const touched = (e) => { e.target.dataset.touched = "1"; };
  const epochs = h("input", { id: "cfg-epochs", name: "epochs", type: "number", min: "1", step: "1", oninput: touched });
  const advancedInputs = {};
  const select = h("select", { id: "cfg-select", name: "select", onchange: (e) => { e.target.dataset.touched = "1"; } });
  const unknown = h("input", { id: "cfg-unknown", name: "unknown", type: "checkbox" });
  const extra = h("textarea", { id: "cfg-extra", rows: "3", spellcheck: "false", placeholder: '{"leak": 0.5}' });
  const advanced = h("details", { class: "advanced" }, h("summary", {}, "Advanced settings"),
    h("div", { class: "grid2" }, ADVANCED.map(([field, label, type, step, help]) => {
      const input = h("input", { id: `cfg-${field}`, name: field, type, step: step || undefined, "aria-describedby": help ? `help-${field}` : undefined });
      advancedInputs[field] = input;
      return h("div", { class: "field" }, h("label", { for: `cfg-${field}` }, label), input,
        help ? h("small", { id: `help-${field}`, class: "muted" }, help) : null);
    })),
    h("div", { class: "grid2" },
      h("div", { class: "field" }, h("label", { for: "cfg-select" }, "Model to publish"), select,
        h("small", { class: "muted" }, "auto: the best candidate on validation images (ties go to the simpler one).")),
      h("div", { class: "field check" }, unknown, h("label", { for: "cfg-unknown" }, "Answer “unknown” when unsure"),
        h("small", { class: "muted" }, "A minimum score is chosen on validation images; below it classify says unknown."))),
    h("div", { class: "field" }, h("label", { for: "cfg-extra" }, "Extra settings (JSON object, merged last)"), extra));

  function fillSettings() {
    const chosen = method.dataset.touched ? method.value : info.defaults.method;
    replace(method, info.methods.map((m) => h("option", { value: m, selected: m === chosen }, m)));
    const backbones = info.backbones.length ? info.backbones : [];
    const chosenBackbone = backbone.value;
    replace(backbone, backbones.length ? backbones.map((b) => h("option", { value: b, selected: b === chosenBackbone }, b))
      : [h("option", { value: "" }, "server default")]);
    if (!epochs.dataset.touched) epochs.value = info.defaults.epochs ?? 30;
    const chosenWeights = weights.value;
    const options = (info.pretrained || []).map((p) => (p === null ? "none" : p));
    replace(weights, h("option", { value: "" }, "server default"), options.map((p) =>
      h("option", { value: p, selected: p === chosenWeights }, p === "none" ? "none (random init)" : p)));
    weights.closest(".field").hidden = !options.length;
    const candidates = info.candidates || [];
    select.closest(".field").hidden = !candidates.length;  // an older server: no selection to pin
    unknown.closest(".field").hidden = !("unknown" in info.defaults);
    if (!select.dataset.touched) {
      replace(select, ["auto", ...candidates].map((c) => h("option", { value: c, selected: c === (info.defaults.select || "auto") },
        c === "auto" ? "auto (best on validation)" : c)));
    }
    for (const [field, input] of Object.entries(advancedInputs)) {
      const d = info.defaults[field];
      input.placeholder = d === undefined ? "" : String(d);
    }
  }

  function buildConfig() {
    const config = { method: method.value };
    if (backbone.value) config.backbone = backbone.value;
    if (weights.value) config.pretrained = weights.value === "none" ? null : weights.value;
    const parse = (field, raw) => (INTEGER.has(field) ? parseInt(raw, 10) : Number(raw));
    if (epochs.value !== "") config.epochs = parse("epochs", epochs.value);
    for (const [field, input] of Object.entries(advancedInputs)) {
      if (input.value.trim() === "") continue;
      config[field] = input.type === "number" ? parse(field, input.value) : input.value;
    }
    if (select.value && select.value !== "auto" && !select.closest(".field").hidden) config.select = select.value;
    if (unknown.checked) config.unknown = true;
    if (extra.value.trim()) {
      let more;
      try { more = JSON.parse(extra.value); } catch (exc) { throw new Error(`Extra settings are not valid JSON: ${exc.message}`); }
      if (!more || typeof more !== "object" || Array.isArray(more)) throw new Error("Extra settings must be a JSON object.");
      Object.assign(config, more);
    }
    return config;
  }

  function validate() {
    const labels = state.classes.map((c) => c.label.trim());
    if (state.classes.length < 2) return "Add at least two classes.";
    if (labels.some((l) => !l)) return "Every class needs a name.";
    const dup = labels.find((l, i) => labels.indexOf(l) !== i);
    if (dup !== undefined) return `Two classes are both called "${dup}"; class names must differ.`;
    const long = labels.find((l) => l.length > (info.limits.max_label_length || Infinity));
    if (long) return `The class name "${long.slice(0, 40)}…" is longer than ${info.limits.max_label_length} characters.`;
    const empty = state.classes.find((c) => !c.images.length);
    if (empty) return `Class "${empty.label}" has no images yet.`;
    // the server's limits (GET /v1/info), checked here so a big upload is not sent only to be refused
    const { max_files: maxFiles, max_image_bytes: maxImage, max_upload_bytes: maxUpload, max_classes: maxClasses } = info.limits;
    const images = state.classes.flatMap((c) => c.images.map((i) => i.file));
    if (maxClasses && state.classes.length > maxClasses) return `${state.classes.length} classes; this server takes at most ${maxClasses}.`;
    if (maxFiles && images.length > maxFiles) return `${images.length} images; this server takes at most ${maxFiles} per classifier.`;
    const big = maxImage && images.find((f) => f.size > maxImage);
    if (big) return `${big.name} is ${bytes(big.size)}; this server takes images up to ${bytes(maxImage)}. Remove it or make it smaller.`;
    const total = images.reduce((a, f) => a + f.size, 0);
    if (maxUpload && total > maxUpload) return `The images add up to ${bytes(total)}; this server takes up to ${bytes(maxUpload)} in one upload.`;
    return null;
  }

  const submit = h("button", { type: "submit", class: "primary", id: "create-submit" }, "Train");
  const progress = h("progress", { id: "upload-progress", max: "1", value: "0", hidden: true, "aria-label": "Upload progress" });
  async function onSubmit(e) {
    e.preventDefault();
    if (state.busy) return;
    showError(null);
    const problem = validate();
    if (problem) { showError(problem); return; }
    let config;
    try { config = buildConfig(); } catch (exc) { showError(exc.message); return; }
    const form = new FormData();
    if (nameInput.value.trim()) form.append("name", nameInput.value.trim());
    form.append("config", JSON.stringify(config));
    for (const cls of state.classes) {
      for (const item of cls.images) { form.append("files", item.file, item.file.name); form.append("labels", cls.label.trim()); }
    }
    state.busy = true;
    submit.disabled = true;
    const count = form.getAll("files").length;
    status.textContent = `Uploading ${count} images…`;
    progress.hidden = false;
    progress.value = 0;
    try {
      const created = await api.create(form, (fraction) => {
        progress.value = fraction;
        status.textContent = fraction < 1 ? `Uploading ${count} images… ${Math.round(fraction * 100)}%`
          : "Uploaded; checking the images…";
      });
      status.textContent = "Created; training is queued.";
      location.hash = `#/c/${encodeURIComponent(created.classifier_id)}`;
    } catch (exc) {
      status.textContent = "";
      showError(exc instanceof ApiError ? `${exc.message} (${exc.code})` : exc.message);
    } finally {
      state.busy = false;
      submit.disabled = false;
      progress.hidden = true;
    }
  }

  replace(main,
    h("h1", { tabindex: "-1" }, "New classifier"),
    h("p", { class: "muted" }, "Name a class for each kind of thing to recognise and give each a few example images ",
      "(5 or more per class also gives you a validation report). Or drop one zip with a folder per class."),
    h("form", { id: "create-form", onsubmit: onSubmit, novalidate: true },
      h("div", { class: "field" }, h("label", { for: "clf-name" }, "Classifier name (optional)"), nameInput),
      h("h2", {}, "Classes"),
      classList,
      h("div", { class: "row" }, addButton,
        h("button", { type: "button", onclick: () => zipInput.click() }, "Load a zip (folder per class)…"), zipInput),
      summary,
      h("h2", {}, "Settings"),
      h("div", { class: "grid3" },
        h("div", { class: "field" }, h("label", { for: "cfg-method" }, "Method"), method),
        h("div", { class: "field" }, h("label", { for: "cfg-epochs" }, "Epochs"), epochs),
        h("div", { class: "field" }, h("label", { for: "cfg-backbone" }, "Backbone"), backbone),
        h("div", { class: "field" }, h("label", { for: "cfg-pretrained" }, "Weights"), weights)),
      advanced,
      errorBox,
      h("div", { class: "row" }, submit, status), progress));

  fillSettings();
  addClass("Class 1");
  addClass("Class 2");
  api.info().then((got) => {
    info = { ...FALLBACK_INFO, ...got, defaults: { ...FALLBACK_INFO.defaults, ...(got.defaults || {}) },
             limits: { ...FALLBACK_INFO.limits, ...(got.limits || {}) } };
    fillSettings();
  }).catch((exc) => { if (!(exc instanceof ApiError && exc.status === 404)) ctx.report(exc); });

  return () => { for (const url of urls) URL.revokeObjectURL(url); urls.clear(); };
}

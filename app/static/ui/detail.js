// One classifier: live training (progress, ETA, curve, cancel), the validation report, "try it", downloads.
// Every field of the API's answers is optional here: what the server does not send is simply not shown.

import { api, ApiError, apiKey, baseURL, download, imageURL } from "./api.js";
import { TrainingChart, CHART_LEGEND } from "./chart.js";
import { versionsSection } from "./versions.js";
import { h, replace, append, pct, num, duration, bytes, when, badge, toast, confirmDialog, copyText } from "./dom.js";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 700;

export function detailView(main, ctx, id) {
  let alive = true;
  let clf = null;
  let shownWarnings = new Set();  // the job's warnings, already on the page: the report does not repeat them
  let info = null;
  const urls = new Set();
  const track = (url) => { urls.add(url); return url; };
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // --- page skeleton -------------------------------------------------------------------------------
  const title = h("h1", { tabindex: "-1" }, "Classifier");
  const headStatus = h("span", { id: "clf-status" });
  const meta = h("dl", { class: "meta" });
  const labels = h("ul", { class: "chips", "aria-label": "Classes" });
  const deleteButton = h("button", { type: "button", class: "danger", id: "delete-button", onclick: onDelete }, "Delete");

  const jobStatus = h("p", { id: "job-status", role: "status", "aria-live": "polite" });
  const bar = h("progress", { id: "job-progress", max: "1", value: "0", "aria-label": "Training progress" });
  const barText = h("p", { id: "job-progress-text", class: "muted" });
  const stats = h("dl", { class: "stats", id: "job-stats" });
  const canvas = h("canvas", { id: "curve", class: "curve", role: "img", "aria-label": "Training loss and accuracy per step" });
  const chart = new TrainingChart(canvas);
  const legend = h("p", { class: "legend muted" }, CHART_LEGEND.map((s) =>
    h("span", { class: `key key-${s.key}` }, s.label, s.axis === "left" ? " (left axis)" : " (right axis, %)")));
  const cancelButton = h("button", { type: "button", id: "cancel-button", onclick: onCancel, hidden: true }, "Cancel training");
  const jobWarnings = h("ul", { class: "warnings" });
  const training = h("section", { class: "card", "aria-labelledby": "training-title" },
    h("h2", { id: "training-title" }, "Training"), jobStatus, bar, barText, stats, canvas, legend, jobWarnings,
    h("div", { class: "row" }, cancelButton));

  const report = h("section", { class: "card", id: "report", "aria-labelledby": "report-title", hidden: true });
  const versions = versionsSection(id, { onServed: () => api.classifier(id).then((got) => { clf = got; renderHeader(); }) });
  const tryIt = tryItSection();
  const use = h("section", { class: "card", id: "use", "aria-labelledby": "use-title", hidden: true });

  replace(main,
    h("p", {}, h("a", { href: "#/" }, "← All classifiers")),
    h("div", { class: "row spread" }, h("div", {}, title, headStatus), deleteButton),
    labels, meta, training, report, tryIt.section, versions.section, use);

  // --- header --------------------------------------------------------------------------------------
  function renderHeader() {
    title.textContent = clf.name || clf.classifier_id;
    replace(headStatus, badge(clf.status));
    replace(labels, clf.labels.map((l) => h("li", { class: "chip", title: l }, l)));
    const rows = [["Id", clf.classifier_id], ["Images", clf.n_images], ["Method", clf.method],
      ["Backbone", clf.backbone], ["Created", when(clf.created_at)]];
    if (clf.ready_at) rows.push(["Ready", when(clf.ready_at)]);
    replace(meta, rows.filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
  }

  // --- training ------------------------------------------------------------------------------------
  function renderJob(job) {
    const p = job.progress || {};
    if (clf && !FINISHED.has(job.status) && clf.status !== job.status) {  // the header follows the live job
      clf.status = job.status;
      replace(headStatus, badge(job.status));
    }
    replace(jobStatus, "Job ", badge(job.status), job.cancel_requested && !FINISHED.has(job.status) ? " (cancelling…)" : "",
      job.preview && job.preview.model && !FINISHED.has(job.status) ? ` · preview model: ${job.preview.model}` : "");
    if (p.total_steps) { bar.max = p.total_steps; bar.value = p.step || 0; }
    else if (job.status === "succeeded") { bar.max = 1; bar.value = 1; }
    else bar.removeAttribute("value");  // indeterminate while queued
    const parts = [];
    // steps are what the form and the schedule speak of; epochs were raised to reach them, so they say nothing
    if (p.total_steps) parts.push(`Step ${p.step ?? 0} of ${p.total_steps}`);
    if (p.stop_reason) parts.push(`stopped early: ${p.stop_reason}`);
    else if (!FINISHED.has(job.status) && typeof p.eta_seconds === "number") {
      parts.push(`about ${duration(p.eta_seconds)} left${p.eta_basis === "pre-flip estimate" ? " (estimate)" : ""}`);
    }
    if (job.status === "queued") parts.push("waiting for a worker");
    barText.textContent = parts.join(" · ");
    const s = [["Loss", num(p.loss)], ["Train accuracy", pct(p.train_accuracy)], ["Masked weights", pct(p.sparsity, 2)]];
    replace(stats, s.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    cancelButton.hidden = FINISHED.has(job.status) || job.cancel_requested;
    if (job.error) append(jobStatus, h("span", { class: "error-text" }, ` ${job.error.message}`));
    const warnings = [...(job.warnings || [])].map(String).filter((w, i, all) => all.indexOf(w) === i);
    shownWarnings = new Set(warnings);
    replace(jobWarnings, warnings.map((w) => h("li", {}, w)));
    if (typeof p.step === "number") chart.push(p, p.total_steps);
  }

  async function watch(jobId) {
    let failures = 0;
    while (alive) {
      let job;
      try {
        job = await api.job(jobId);
        failures = 0;
      } catch (exc) {
        if (!alive) return;
        if (exc instanceof ApiError && (exc.status === 404 || exc.status === 401)) { ctx.report(exc); return; }
        failures++;
        jobStatus.textContent = `Lost contact with the server (${exc.message}); retrying…`;
        await sleep(Math.min(10000, POLL_MS * 2 ** failures));
        continue;
      }
      if (!alive) return;
      renderJob(job);
      if (FINISHED.has(job.status)) return job;
      await sleep(POLL_MS);
    }
  }

  async function onCancel() {
    cancelButton.disabled = true;
    try {
      renderJob(await api.cancel(clf.job_id));
      toast("Cancelling: the job stops within seconds.");
    } catch (exc) { ctx.report(exc); } finally { cancelButton.disabled = false; }
  }

  async function onDelete() {
    const name = clf ? clf.name || clf.classifier_id : id;
    if (!(await confirmDialog("Delete this classifier?", `“${name}”, its images and its model will be deleted. This cannot be undone.`))) return;
    try {
      await api.remove(id);
      toast(`Deleted “${name}”.`);
      location.hash = "#/";
    } catch (exc) { ctx.report(exc); }
  }

  // --- report --------------------------------------------------------------------------------------
  async function renderReport() {
    const v = clf.validation || {};
    let full = null;  // report.json: training history and the confusion matrix
    try { full = await api.report(id); } catch { /* older or partial artifacts: show what the classifier has */ }
    if (!alive) return;
    const fv = { ...((full && full.validation) || {}), ...v };
    if (full && Array.isArray(full.history)) chart.set(full.history, full.history.length ? full.history[full.history.length - 1].total_steps : null);

    const published = fv.published ?? fv.published_candidate;
    const accuracy = fv.published_accuracy ?? fv.tuned_accuracy;
    const isNum = (x) => typeof x === "number" && isFinite(x);
    const summary = [
      ["Published model", published ?? (clf.method ? `mask-tuned (${clf.method})` : null)],
      ["Validation accuracy", isNum(accuracy) ? pct(accuracy, 1) : null],
      ["Zero-shot accuracy", isNum(fv.zero_shot_accuracy) ? pct(fv.zero_shot_accuracy, 1) : null],
      ["Mask-tuned accuracy", isNum(fv.tuned_accuracy) && published !== undefined && published !== "mask" ? pct(fv.tuned_accuracy, 1) : null],
      ["Held out for the mask", fv.n_holdout || null],
      ["Validation", validatedBy(fv.validated_by)],
      ["Why this model", typeof fv.why === "string" ? fv.why : null],
      ["Calibration error (ECE)", isNum(fv.ece_after)
        ? `${num(fv.ece_after)}${fv.temperature && fv.temperature !== 1 ? " after temperature scaling" : ""}`
          + `${isNum(fv.ece_before) && fv.ece_before !== fv.ece_after ? ` (${num(fv.ece_before)} before)` : ""}`
          + `${isNum(fv.ece_n) ? ` on ${fv.ece_n} images` : ""}${isNum(fv.mean_top_score) ? `, mean top score ${pct(fv.mean_top_score, 1)}` : ""}`
          + `${isNum(fv.ece_floor) ? ` (a perfectly calibrated model would read about ${num(fv.ece_floor)} on that many images)` : ""}` : null],
      ["Default min score", isNum(fv.min_score) ? pct(fv.min_score, 1) : null],
      ["Default max outlier score", isNum(fv.max_outlier) ? pct(fv.max_outlier, 1) : null],
      ["Own images the defaults call unknown", unknownRate(fv.unknown_defaults)],
      ["Masked weights", isNum(clf.sparsity) ? pct(clf.sparsity, 3) : null],
      ["Mask size", clf.artifacts && clf.artifacts.mask_bytes ? bytes(clf.artifacts.mask_bytes) : null],
    ].filter(([, value]) => value !== null && value !== undefined);

    const children = [h("h2", { id: "report-title" }, "Validation report"),
      h("dl", { class: "meta", id: "report-summary" }, summary.map(([k, value]) => [h("dt", {}, k), h("dd", {}, String(value))]))];
    if (!clf.validation) children.push(h("p", { class: "muted" }, "No held-out images: give each class at least 5 images to get a validation report."));

    const warnings = [...(clf.warnings || []), ...(fv.warnings || [])].map((w) => (typeof w === "string" ? w : JSON.stringify(w)))
      .filter((w, i, all) => all.indexOf(w) === i && !shownWarnings.has(w));  // each warning appears once on the page
    if (warnings.length) children.push(h("h3", {}, "Warnings"), h("ul", { class: "warnings", id: "report-warnings" }, warnings.map((w) => h("li", {}, w))));

    const candidates = candidateRows(fv.candidates, published);
    if (candidates.length) {
      children.push(h("h3", {}, "Candidates"), h("div", { class: "scroll" }, h("table", { id: "candidates" },
        h("thead", {}, h("tr", {}, ["Candidate", "Accuracy", "Judged by", "Published"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, candidates.map((c) => h("tr", { class: c.published ? "published" : null },
          h("th", { scope: "row" }, c.name), h("td", {}, pct(c.accuracy, 1)), h("td", {}, c.how || "–"),
          h("td", {}, c.published ? "✓ published" : "")))))));
    }

    const matrix = fv.confusion_matrix;
    const names = fv.labels || clf.labels;
    const perClass = perClassRows(fv.per_class_accuracy ?? fv.per_class, matrix, names);
    if (perClass.length) {
      children.push(h("h3", {}, "Accuracy per class"), h("ul", { class: "bars", id: "per-class" }, perClass.map(([label, acc]) => scoreRow(label, acc))));
    }
    if (Array.isArray(matrix) && matrix.length) children.push(h("h3", {}, "Confusion matrix"), confusionTable(matrix, names));

    const wrong = fv.misclassified || fv.errors;
    if (Array.isArray(wrong) && wrong.length) {
      const list = h("ul", { class: "thumbs wrong", id: "misclassified" });
      children.push(h("h3", {}, "Images it got wrong out of sample"), list);
      for (const item of wrong.slice(0, 60)) list.append(misclassified(item));
    } else if (Array.isArray(wrong)) {
      children.push(h("p", { class: "muted" }, "Every image was classified correctly out of sample."));
    }

    const files = (clf.artifacts && clf.artifacts.files) || [];
    const pictures = ["confusion.png", "reliability.png", "curve.png"].filter((f) => files.includes(f));
    if (pictures.length) {
      const box = h("div", { class: "pictures" });
      children.push(h("details", {}, h("summary", {}, "Charts drawn by the server"), box));
      for (const name of pictures) {
        imageURL(api.artifactPath(id, name)).then((url) => {
          if (alive) box.append(h("figure", {}, h("img", { src: track(url), alt: `${name} from the server` }), h("figcaption", {}, name)));
        }).catch(() => {});
      }
    }
    replace(report, children);
    report.hidden = false;
  }

  function validatedBy(v) {
    if (typeof v === "string") return v;
    if (!v || typeof v !== "object" || !v.method) return null;
    const rows = v.method === "augmented views" ? "views" : "images";
    return `${v.method}${v.n ? ` on ${v.n} ${rows}` : ""}${v.folds ? `, ${v.folds} folds` : ""}${v.repeats > 1 ? ` × ${v.repeats} repeats` : ""}`;
  }

  function candidateRows(raw, published) {
    if (!raw) return [];
    const rows = Array.isArray(raw)
      ? raw.map((c) => (typeof c === "object" && c ? { name: c.name ?? c.candidate ?? "?", accuracy: c.accuracy ?? c.score,
        published: c.published, how: [validatedBy({ method: c.method, n: c.n }), c.refit ? `refit on ${c.refit}` : ""].filter(Boolean).join("; ") } : null)).filter(Boolean)
      : Object.entries(raw).map(([name, value]) => ({ name, accuracy: typeof value === "object" && value ? value.accuracy ?? value.score : value }));
    for (const r of rows) r.published = r.published ?? (published !== undefined && r.name === published);
    return rows;
  }

  function perClassRows(raw, matrix, names) {
    if (raw && typeof raw === "object" && !Array.isArray(raw)) return Object.entries(raw).map(([k, val]) => [k, typeof val === "object" ? val.accuracy : val]);
    if (Array.isArray(raw)) return raw.map((r, i) => (typeof r === "object" && r ? [r.label ?? names[i], r.accuracy] : [names[i], r]));
    if (Array.isArray(matrix) && matrix.length) {
      return matrix.map((row, i) => { const n = row.reduce((a, b) => a + b, 0); return [names[i] ?? `class ${i}`, n ? row[i] / n : null]; })
        .filter(([, acc]) => acc !== null);
    }
    return [];
  }

  function confusionTable(matrix, names) {
    const max = Math.max(1, ...matrix.map((row) => Math.max(...row.map((value) => Number(value) || 0))));
    const cell = (value, i, j) => {
      const td = h("td", { class: i === j ? "diag" : value ? "off" : null }, num(Number(value)));
      td.style.setProperty("--strength", String((Number(value) || 0) / max));  // CSSOM, allowed under the CSP
      return td;
    };
    const table = h("table", { class: "confusion", id: "confusion", "aria-describedby": "confusion-help" },
      h("thead", {}, h("tr", {}, h("td", {}), names.map((n) => h("th", { scope: "col" }, n)))),
      h("tbody", {}, matrix.map((row, i) => h("tr", {}, h("th", { scope: "row" }, names[i] ?? `class ${i}`),
        row.map((value, j) => cell(value, i, j))))));
    return h("div", { class: "scroll" },
      h("p", { class: "muted small", id: "confusion-help" }, "Rows: true class. Columns: predicted class. Cells: images judged out of sample (each by a model that did not train on it)."),
      table);
  }

  function misclassified(item) {
    const truth = item.true ?? item.label ?? item.true_label ?? "?";
    const guess = item.predicted ?? item.prediction ?? item.predicted_label ?? "?";
    const caption = h("figcaption", {}, h("span", {}, `is ${truth}`), h("br"), h("span", {}, `said ${guess}`),
      typeof item.score === "number" ? ` (${pct(item.score)})` : "");
    const figure = h("li", { class: "thumb" }, h("figure", {}, caption));
    const path = item.url ?? (Number.isInteger(item.index) ? api.samplePath(id, item.index) : null);
    if (typeof path === "string" && /^\/?v1\//.test(path)) {  // only this API's own paths
      imageURL(path).then((url) => {
        if (alive) figure.firstChild.prepend(h("img", { src: track(url), alt: `${truth} image classified as ${guess} out of sample` }));
      }).catch(() => {});
    }
    return figure;
  }

  // --- try it --------------------------------------------------------------------------------------
  function tryItSection() {
    const preview = h("img", { id: "try-preview", alt: "The image being classified", hidden: true });
    const results = h("ul", { class: "bars", id: "predictions", "aria-label": "Predictions" });
    const note = h("p", { id: "try-status", role: "status", "aria-live": "polite", class: "muted" });
    const outlierText = h("p", { id: "try-outlier", class: "muted" });
    const verdict = h("p", { id: "try-verdict", class: "verdict" });
    let last = null;  // the last answer: { top, outlier, label }, re-judged when a slider moves
    const slider = (name, label, help) => {
      const input = h("input", { type: "range", id: `try-${name}`, min: "0", max: "1", step: "0.01", value: name === "min-score" ? "0" : "1",
        "aria-describedby": `try-${name}-help`, oninput: () => { output.textContent = pct(Number(input.value), 0); judge(); } });
      const output = h("output", { for: `try-${name}`, id: `try-${name}-value` }, pct(Number(input.value), 0));
      return { input, output, row: h("div", { class: "slider" }, h("label", { for: `try-${name}` }, label), input, output,
        h("span", { class: "muted small", id: `try-${name}-help` }, help)) };
    };
    const minScore = slider("min-score", "Min score", "below this top score: unknown");
    const maxOutlier = slider("max-outlier", "Max outlier score", "above this outlier score: unknown");
    let touched = false;  // once the user moves a slider, answers no longer reset it to the classifier's defaults
    for (const s of [minScore, maxOutlier]) s.input.addEventListener("input", () => { touched = true; });

    function judge() {
      if (!last) { verdict.textContent = ""; return; }
      const lo = Number(minScore.input.value), hi = Number(maxOutlier.input.value);
      const reasons = [];
      if (last.top < lo) reasons.push(`top score ${pct(last.top, 1)} is below ${pct(lo, 0)}`);
      if (typeof last.outlier === "number" && last.outlier > hi) reasons.push(`outlier score ${pct(last.outlier, 1)} is above ${pct(hi, 0)}`);
      verdict.textContent = reasons.length ? `Answer: unknown (${reasons.join("; ")}).` : `Answer: ${last.label}.`;
      verdict.classList.toggle("unknown", reasons.length > 0);
    }
    const feedbackSlot = h("div", { id: "feedback-slot" });
    const picker = h("input", { id: "try-file", type: "file", accept: "image/*", class: "visually-hidden",
      onchange: (e) => { if (e.target.files[0]) classify(e.target.files[0]); e.target.value = ""; } });
    const pick = h("button", { type: "button", onclick: () => picker.click() }, "Choose an image…");
    const video = h("video", { id: "webcam", autoplay: true, muted: true, playsinline: true, hidden: true });
    const snap = h("button", { type: "button", hidden: true, onclick: snapshot }, "Take snapshot");
    const camera = h("button", { type: "button", id: "camera-button", onclick: toggleCamera,
      hidden: !(navigator.mediaDevices && navigator.mediaDevices.getUserMedia) }, "Use webcam");
    let stream = null;
    const zone = h("div", { class: "drop try-drop", id: "try-drop", "aria-label": "Drop or paste an image to classify" },
      h("p", { class: "muted" }, "Drop an image here, paste one (Ctrl+V), or ", pick), picker,
      h("div", { class: "row" }, camera, snap), video);
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault(); zone.classList.remove("over");
      const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0];
      if (file) classify(file);
    });
    const onPaste = (e) => {
      const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
      if (file) { e.preventDefault(); classify(file); }
    };
    document.addEventListener("paste", onPaste);

    async function classify(file) {
      replace(feedbackSlot);
      const url = track(URL.createObjectURL(file));
      preview.src = url;
      preview.hidden = false;
      note.textContent = "Classifying…";
      replace(results);
      outlierText.textContent = "";
      last = null;
      judge();
      try {
        const answer = await api.classify(id, file, 5);
        if (!alive) return;
        const preds = answer.predictions || (answer.results && answer.results[0] && answer.results[0].predictions) || [];
        replace(results, preds.map((p) => scoreRow(p.label ?? "unknown", p.score)));
        replace(feedbackSlot, versions.feedbackForm(file, preds[0] && preds[0].label));
        const first = (answer.results && answer.results[0]) || {};
        const field = (name) => (answer[name] !== undefined ? answer[name] : first[name]);
        const outlier = first.outlier_score;
        outlierText.textContent = typeof outlier === "number"
          ? `Outlier score ${pct(outlier, 1)}: how unlike the training images this image is (0% = like them).`
          : "No outlier score: this classifier was built before they existed.";
        if (!touched) {  // start from the thresholds the server applied (the classifier's defaults)
          minScore.input.value = String(typeof answer.min_score === "number" ? answer.min_score : 0);
          maxOutlier.input.value = String(typeof answer.max_outlier === "number" ? answer.max_outlier : 1);
          for (const s of [minScore, maxOutlier]) s.output.textContent = pct(Number(s.input.value), 0);
        }
        last = preds.length ? { top: preds[0].score, outlier, label: preds[0].label } : null;
        judge();
        const bits = [`Top ${preds.length} of ${clf ? clf.labels.length : "?"} classes.`];
        if (field("model")) bits.push(`Answered by ${field("final") === false ? "the preview model (still training)" : "the model"}: ${field("model")}.`);
        if (answer.version_id) bits.push(`Version ${answer.version_id}.`);
        note.textContent = bits.join(" ");
      } catch (exc) {
        if (!alive) return;
        const status = clf && clf.status;
        note.textContent = exc instanceof ApiError && exc.code === "not_ready"
          ? status === "queued" || status === "running"
            ? "Not ready to classify yet: the model is still training. Try again when it has finished."
            : `Not ready to classify: the training ${status === "cancelled" ? "was cancelled" : "did not finish"}, so there is no model.`
          : exc instanceof ApiError && exc.status === 409 ? `Not ready to classify yet: ${exc.message}` : `Could not classify: ${exc.message}`;
      }
    }

    async function toggleCamera() {
      if (stream) { stopCamera(); return; }
      try {
        stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
        video.srcObject = stream;
        video.hidden = false; snap.hidden = false;
        camera.textContent = "Stop webcam";
        snap.focus();
      } catch (exc) {
        note.textContent = `The webcam is not available here (${exc.message}).`;
      }
    }

    function stopCamera() {
      if (stream) for (const t of stream.getTracks()) t.stop();
      stream = null;
      video.srcObject = null;
      video.hidden = true; snap.hidden = true;
      camera.textContent = "Use webcam";
    }

    function snapshot() {
      const c = document.createElement("canvas");
      c.width = video.videoWidth || 224; c.height = video.videoHeight || 224;
      c.getContext("2d").drawImage(video, 0, 0, c.width, c.height);
      c.toBlob((blob) => { if (blob) classify(new File([blob], "webcam.png", { type: "image/png" })); }, "image/png");
    }

    const section = h("section", { class: "card", id: "try", "aria-labelledby": "try-title" },
      h("h2", { id: "try-title" }, "Try it"), zone, note,
      h("div", { class: "try-result" }, preview, h("div", {}, results, outlierText, verdict)),
      h("div", { class: "sliders", id: "try-sliders" }, minScore.row, maxOutlier.row), feedbackSlot);
    const ready = () => { if (/^Not ready/.test(note.textContent)) note.textContent = "The model is ready: try that image again."; };
    return { section, classify, ready, close: () => { stopCamera(); document.removeEventListener("paste", onPaste); } };
  }

  // --- use it --------------------------------------------------------------------------------------
  function renderUse() {
    const origin = baseURL();
    const auth = apiKey.get() || (info && info.auth_required);
    const header = auth ? ' \\\n  -H "Authorization: Bearer $RMT_API_KEY"' : "";
    const curl = `curl -sS${header} \\\n  -F file=@photo.jpg \\\n  "${origin}/v1/classifiers/${id}/classify?top_k=3"`;
    const python = [
      "from rmt_client import Client",
      "",
      `with Client("${origin}"${auth ? ', api_key=os.environ["RMT_API_KEY"]' : ""}) as rmt:`,
      `    for result in rmt.classify("${id}", "photo.jpg", top_k=3):  # or a folder`,
      `        print(result["filename"], result["predictions"])`,
      `    rmt.export("${id}", "model-bundle.zip")  # ONNX + labels + README`,
    ];
    const cli = `${auth ? "RMT_API_KEY=... " : ""}rmt remote classify ${id} photo.jpg --top-k 3 --url ${origin}`;
    if (auth) python.unshift("import os");
    const modelName = `${(clf.name || id).replace(/[^\w.-]+/g, "_")}`;
    const status = h("p", { role: "status", "aria-live": "polite", class: "muted" });
    const get = (path, filename) => async (e) => {
      e.target.disabled = true;
      status.textContent = `Downloading ${filename}…`;
      try { status.textContent = `Downloaded ${filename} (${bytes(await download(path, filename))}).`; }
      catch (exc) { status.textContent = exc.status === 404 ? `${filename}: this server does not offer it (${exc.message}).` : `Download failed: ${exc.message}`; }
      finally { e.target.disabled = false; }
    };
    const snippet = (label, text, idName) => {
      const pre = h("pre", { id: idName, tabindex: "0" }, h("code", {}, text));
      return h("div", { class: "snippet" }, h("div", { class: "row spread" }, h("h3", {}, label),
        h("button", { type: "button", class: "quiet", onclick: (e) => copyText(text, e.target) }, `Copy ${label}`)), pre);
    };
    replace(use, h("h2", { id: "use-title" }, "Use it"),
      h("div", { class: "row" },
        h("button", { type: "button", id: "download-onnx", onclick: get(api.modelPath(id), `${modelName}.onnx`) }, "Download ONNX model"),
        h("button", { type: "button", id: "download-export", onclick: get(api.exportPath(id), `${modelName}-export.zip`) }, "Download export bundle (zip)")),
      status,
      snippet("curl", curl, "snippet-curl"),
      snippet("Python", python.join("\n"), "snippet-python"),
      snippet("CLI", cli, "snippet-cli"));
    use.hidden = false;
  }

  // --- lifecycle -----------------------------------------------------------------------------------
  async function load() {
    clf = await api.classifier(id);
    if (!alive) return;
    renderHeader();
    if (clf.status === "queued" || clf.status === "running") {
      training.hidden = false;
      const job = await watch(clf.job_id);
      if (!alive || !job) return;
      return load();  // finished: re-read the classifier (report, artifacts)
    }
    try { renderJob(await api.job(clf.job_id)); } catch { training.hidden = true; }
    if (clf.status === "ready") {
      tryIt.ready();
      versions.load().catch(() => {});
      await renderReport();
      renderUse();
    } else if (clf.error) {
      append(jobStatus, h("span", { class: "error-text" }, ` ${clf.error.message}`));
    }
  }

  api.info().then((got) => { info = got; }).catch(() => {});
  load().catch((exc) => alive && ctx.report(exc));

  return () => {
    alive = false;
    chart.destroy();
    tryIt.close();
    versions.close();
    for (const url of urls) URL.revokeObjectURL(url);
  };
}

function unknownRate(defaults) {
  const r = defaults && defaults.rejected_in_distribution;
  if (!r) return null;
  const share = typeof r.either === "number" ? r.either : r.by_outlier;
  if (typeof share !== "number") return null;
  return `${pct(share, 1)}${typeof r.n === "number" ? ` of ${r.n}` : ""} (out of sample)`;
}

function scoreRow(label, score) {
  const fill = h("span", { class: "fill" });
  fill.style.setProperty("width", `${Math.max(0, Math.min(1, Number(score) || 0)) * 100}%`);
  return h("li", {}, h("span", { class: "bar-label" }, String(label)), h("span", { class: "bar", "aria-hidden": "true" }, fill),
    h("span", { class: "bar-value" }, pct(score, 1)));
}

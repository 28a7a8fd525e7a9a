// Building DOM without markup strings: every piece of data becomes a text node or a property, never HTML.
// Labels, names and error messages are user input; nothing here ever assigns innerHTML.

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "innerHTML" || key === "outerHTML") throw new Error("h(): markup strings are not allowed");
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "value" || key === "checked" || key === "selected" || key === "disabled") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));  // a string becomes a text node
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function replace(el, ...children) {
  return append(clear(el), children);
}

export const pct = (x, digits = 0) => (typeof x === "number" && isFinite(x) ? `${(x * 100).toFixed(digits)}%` : "–");

export function num(x, digits = 3) {
  if (typeof x !== "number" || !isFinite(x)) return "–";
  return Math.abs(x) >= 100 || Number.isInteger(x) ? String(Math.round(x * 1000) / 1000) : x.toPrecision(digits);
}

export function duration(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds) || seconds < 0) return "–";
  const whole = Math.round(seconds);  // round once, then split: 359.6 s is "6 min 0 s", never "5 min 60 s"
  if (whole < 60) return `${whole} s`;
  const m = Math.floor(whole / 60), s = whole % 60;
  if (m < 60) return `${m} min ${s} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function bytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

let toastTimer = null;
export function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 4000);
}

// A modal yes/no built on <dialog> (keyboard and focus handled by the browser; Esc cancels).
export function confirmDialog(title, text, okLabel = "Delete") {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// A status word with a colour class; the colour is never the only signal (the word is there).
export function badge(status) {
  return h("span", { class: `badge badge-${String(status).replace(/[^a-z]/g, "")}` }, String(status));
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    if (button) { const old = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = old; }, 1500); }
  } catch {
    toast("Copy failed: select the text and copy it by hand.");
  }
}

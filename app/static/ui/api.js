// The v1 API over fetch. The API key lives in sessionStorage (this tab only) and travels only in the
// Authorization header; it is never put in a URL, so it does not end up in logs, history or Referer.

const KEY_STORAGE = "rmt.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE) || "",
  set: (key) => (key ? sessionStorage.setItem(KEY_STORAGE, key) : sessionStorage.removeItem(KEY_STORAGE)),
};

let askForKey = null;  // async (message) => true when a (new) key was entered
export function onUnauthorized(handler) { askForKey = handler; }

async function errorOf(response) {
  let code = "http_" + response.status, message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
    else if (body && typeof body.detail === "string") message = body.detail;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, code, message);
}

// fetch with the key; on 401 asks for a key once and retries. Returns the Response (ok) or throws ApiError.
export async function request(path, { method = "GET", body, headers = {} } = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = apiKey.get();
    const all = { ...headers };
    if (key) all.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, { method, body, headers: all, cache: "no-store", credentials: "same-origin" });
    } catch (exc) {
      throw new ApiError(0, "network", `The server did not answer (${exc.message}). Is it running?`);
    }
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401 && attempt === 0 && askForKey && (await askForKey(error.message))) continue;
    throw error;
  }
}

// A POST of a large form with upload progress (fetch cannot report it): XMLHttpRequest, same key handling.
export function upload(path, form, onProgress) {
  const send = () => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    const key = apiKey.get();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.responseType = "text";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, (body && body.error && body.error.code) || `http_${xhr.status}`,
        (body && body.error && body.error.message) || `${xhr.status} ${xhr.statusText}`));
    };
    xhr.onerror = () => reject(new ApiError(0, "network", "The upload did not reach the server. Is it running?"));
    xhr.send(form);
  });
  return send().catch(async (error) => {
    if (error.status === 401 && askForKey && (await askForKey(error.message))) return send();
    throw error;
  });
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function sendJSON(path, method, body) {
  const response = await request(path, { method, body });
  return response.status === 204 ? null : response.json();
}

// A file the browser should save: fetched with the auth header, handed over as a blob URL.
export async function download(path, filename) {
  const blob = await (await request(path)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return blob.size;
}

// An image behind auth (artifacts), as an object URL the caller revokes.
export async function imageURL(path) {
  return URL.createObjectURL(await (await request(path)).blob());
}

const enc = encodeURIComponent;
// Paths are relative to the page, so the UI also works behind a proxy that serves the API under a prefix.
export const baseURL = () => new URL(".", location.href).href.replace(/\/$/, "");
export const api = {
  info: () => getJSON("v1/info"),
  list: (limit = 100) => getJSON(`v1/classifiers?limit=${limit}`),
  classifier: (id) => getJSON(`v1/classifiers/${enc(id)}`),
  remove: (id) => sendJSON(`v1/classifiers/${enc(id)}`, "DELETE"),
  job: (id) => getJSON(`v1/jobs/${enc(id)}`),
  cancel: (id) => sendJSON(`v1/jobs/${enc(id)}`, "DELETE"),
  create: (form, onProgress) => upload("v1/classifiers", form, onProgress),
  classify: (id, file, topK = 5) => {
    const form = new FormData();
    form.append("file", file, file.name || "image.png");
    return sendJSON(`v1/classifiers/${enc(id)}/classify?top_k=${topK}`, "POST", form);
  },
  report: (id) => getJSON(`v1/classifiers/${enc(id)}/artifacts/report.json`),
  artifactPath: (id, name) => `v1/classifiers/${enc(id)}/artifacts/${enc(name)}`,
  modelPath: (id) => `v1/classifiers/${enc(id)}/model.onnx`,
  samplePath: (id, index) => `v1/classifiers/${enc(id)}/samples/${index}`,
  exportPath: (id) => `v1/classifiers/${enc(id)}/export`,
};

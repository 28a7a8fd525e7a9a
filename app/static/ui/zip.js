// Reading a zip in the browser (no library): the central directory gives the names, DecompressionStream
// ("deflate-raw") inflates the members. Used to turn "one zip, one folder per class" into per-class images
// the user can look at and prune before uploading.

const IMAGE_EXT = /\.(png|jpe?g|gif|webp|bmp|tiff?)$/i;
const MIME = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp",
               bmp: "image/bmp", tif: "image/tiff", tiff: "image/tiff" };

function findEnd(view) {
  for (let i = view.byteLength - 22; i >= Math.max(0, view.byteLength - 65557); i--) {
    if (view.getUint32(i, true) === 0x06054b50) return i;
  }
  throw new Error("not a zip file (no end-of-directory record)");
}

async function inflate(bytes) {
  if (typeof DecompressionStream === "undefined") throw new Error("this browser cannot inflate zip members");
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// The zip rule, the same as the server's (app/uploads.py; README "Zip rules"): folder entries, __MACOSX/ and
// anything under a name starting with "." are left out, and so is every file without an image extension
// (Thumbs.db, desktop.ini, notes.txt); one wrapper folder is looked through; every image must be in a class
// folder and every class folder must hold an image.
const hidden = (parts) => !parts.length || parts[0] === "__MACOSX" || parts.some((p) => p.startsWith("."));
const isImageEntry = (e) => !e.dir && IMAGE_EXT.test(e.parts[e.parts.length - 1]);
// A file beside the class folders is not a class folder.
const inFolders = (entries) => entries.filter((e) => e.dir || e.parts.length >= 2 || isImageEntry(e));

// [{path: "cat/1.png", parts: ["cat", "1.png"], file: File}] for the images, by the rule above.
export async function readZip(file, maxFiles = 2000) {
  const buffer = await file.arrayBuffer();
  const view = new DataView(buffer);
  const end = findEnd(view);
  const count = view.getUint16(end + 10, true);
  let offset = view.getUint32(end + 16, true);
  if (count === 0xffff || offset === 0xffffffff) throw new Error("zip64 archives are not read in the browser");
  const decoder = new TextDecoder();
  let entries = [];
  for (let n = 0; n < count; n++) {
    if (view.getUint32(offset, true) !== 0x02014b50) throw new Error("corrupt zip directory");
    const flags = view.getUint16(offset + 8, true), method = view.getUint16(offset + 10, true);
    const compressed = view.getUint32(offset + 20, true);
    const nameLen = view.getUint16(offset + 28, true), extraLen = view.getUint16(offset + 30, true);
    const commentLen = view.getUint16(offset + 32, true), local = view.getUint32(offset + 42, true);
    const path = decoder.decode(new Uint8Array(buffer, offset + 46, nameLen));
    offset += 46 + nameLen + extraLen + commentLen;
    const parts = path.split("/").filter(Boolean);
    if (hidden(parts)) continue;
    entries.push({ path, parts, dir: path.endsWith("/"), flags, method, compressed, local });
  }
  entries = inFolders(entries);
  let images = entries.filter(isImageEntry);
  if (images.length > maxFiles) throw new Error(`${images.length} images in the zip; the server takes ${maxFiles}`);
  // One wrapper folder around the class folders (a zipped directory) is common: look through it.
  if (images.length && new Set(entries.map((e) => e.parts[0])).size === 1 && images.every((e) => e.parts.length >= 3)) {
    entries = inFolders(entries.filter((e) => e.parts.length > 1).map((e) => ({ ...e, parts: e.parts.slice(1) })));
    images = entries.filter(isImageEntry);
  }
  const loose = images.find((e) => e.parts.length < 2);
  if (loose) throw new Error(`${loose.path} is not inside a class folder; put each class's images in a folder named after the class`);
  const withImages = new Set(images.map((e) => e.parts[0]));
  const empty = entries.map((e) => e.parts[0]).filter((name) => !withImages.has(name)).sort()[0];
  if (empty !== undefined) throw new Error(`class folder ${empty} has no images`);
  const members = [];
  for (const { path, parts, flags, method, compressed, local } of images) {
    if (flags & 1) throw new Error(`${path} is encrypted`);
    const dataStart = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    const raw = new Uint8Array(buffer, dataStart, compressed);
    let data;
    if (method === 0) data = raw;
    else if (method === 8) data = await inflate(raw);
    else throw new Error(`${path} uses zip compression method ${method}; use deflate or store`);
    const ext = path.split(".").pop().toLowerCase();
    members.push({ path, parts, file: new File([data], parts[parts.length - 1], { type: MIME[ext] || "" }) });
  }
  return members;
}

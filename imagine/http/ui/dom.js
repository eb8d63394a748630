// Small DOM helpers. Text from the service (prompts, chat) only ever goes in as text nodes or properties, never as HTML.

export const $ = (id) => document.getElementById(id);

/** An element with properties set (`text` becomes its textContent) and children appended (strings as text). */
export function el(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") element.textContent = value;
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (key.startsWith("aria-") || key === "role") element.setAttribute(key, value);
    else element[key] = value;
  }
  element.append(...children);
  return element;
}

export function say(target, text) {
  target.textContent = text || "";
}

/** A base64 string (no data: prefix) as a Blob: images are shown from blob: URLs, never from data: URLs. */
export function base64Blob(base64, type = "image/png") {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type });
}

export function dataUrlBlob(dataUrl) {
  const [head, base64] = dataUrl.split(",", 2);
  const type = head.slice("data:".length).split(";")[0] || "image/png";
  return base64Blob(base64, type);
}

export function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

/** Object URLs that belong together (a gallery page, a result) and are revoked together. */
export class UrlSet {
  constructor() { this.urls = []; }
  add(blob) {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }
  revoke() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

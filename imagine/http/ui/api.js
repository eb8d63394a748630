// The service's public API, called with the tab's bearer token; errors become ApiError with the contract's `detail`.

const TOKEN_KEY = "imagine.token";

/** The base path (e.g. "/imagine"): this module is served at <base>/ui/api.js. */
export const base = new URL("../", import.meta.url).pathname.replace(/\/$/, "");

// sessionStorage: the token lives as long as the tab, is never sent by the browser on its own (unlike a cookie).
export const token = () => sessionStorage.getItem(TOKEN_KEY);
export const setToken = (value) => sessionStorage.setItem(TOKEN_KEY, value);
export const clearToken = () => sessionStorage.removeItem(TOKEN_KEY);

let unauthorized = () => {};
/** Called with the message whenever the service answers 401: the page asks for a token again. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not the contract's JSON (a proxy's page): the status line must do.
  }
  let message = typeof body?.detail === "string" ? body.detail : `${response.status} ${response.statusText}`;
  const fields = body?.error?.details?.errors;
  if (Array.isArray(fields) && fields.length > 1) {
    message += ": " + fields.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
  }
  const reason = body?.error?.details?.reason;
  if (response.status === 401 && reason) message += ` (${reason})`;
  const wait = response.headers.get("Retry-After");
  if (wait && (response.status === 429 || response.status === 503)) message += `. Try again in ${wait} s.`;
  return new ApiError(response.status, message, body);
}

/** fetch() under the base path with the token; resolves to the Response when it is 2xx, else throws ApiError. */
export async function call(path, { method = "GET", json, headers = {}, signal } = {}) {
  const sent = new Headers(headers);
  sent.set("Authorization", `Bearer ${token()}`);
  let body;
  if (json !== undefined) {
    sent.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(base + path, { method, headers: sent, body, signal, cache: "no-store", credentials: "omit" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `The service cannot be reached (${error.message})`);
  }
  if (response.ok) return response;
  const error = await errorOf(response);
  if (response.status === 401) unauthorized(error.message);
  throw error;
}

export async function getJson(path, options) {
  return (await call(path, options)).json();
}

export async function sendJson(path, json, options = {}) {
  const response = await call(path, { method: "POST", json, ...options });
  return response.status === 204 ? null : response.json();
}

export async function pngBlob(imageId) {
  return (await call(`/gallery/${encodeURIComponent(imageId)}.png`)).blob();
}

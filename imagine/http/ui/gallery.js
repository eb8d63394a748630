// The Gallery panel: a page of the caller's images with search, model filter and paging; one image's details.

import { call, getJson } from "./api.js";
import { $, UrlSet, base64Blob, el, say } from "./dom.js";

const PAGE_SIZE = 12;

const grid = $("gallery-grid");
const dialog = $("image-dialog");
const message = $("gallery-message");
const pageUrls = new UrlSet();
let query = { q: "", model: "" };
let offset = 0;
let total = 0;
let stale = true;
let shown = null; // {item, blob}
let handlers = {};

function describe(item) {
  const p = item.parameters || {};
  const rows = [
    ["Prompt", item.prompt],
    ["Negative prompt", item.negative_prompt],
    ["Model", item.model],
    ["Seed", item.seed],
    ["Size", `${item.width}×${item.height}`],
    ["Steps", p.num_inference_steps],
    ["Guidance", p.guidance_scale],
    ["Scheduler", p.scheduler],
    ["LoRAs", (p.loras || []).map((l) => `${l.name} (${l.weight})`).join(", ")],
    ["Strength", p.strength],
    ["Created", new Date(item.created_at).toLocaleString()],
    ["Generation time", `${item.generation_time.toFixed(2)} s`],
    ["Id", item.id],
  ];
  return rows
    .filter(([, value]) => value !== undefined && value !== null && value !== "")
    .flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: String(value) })]);
}

function open(item, url, blob) {
  shown = { item, blob };
  $("dialog-image").src = url;
  $("dialog-image").alt = item.prompt;
  $("dialog-params").replaceChildren(...describe(item));
  $("dialog-download").href = url;
  $("dialog-download").download = item.filename;
  $("dialog-confirm").hidden = true;
  say($("dialog-message"), "");
  dialog.showModal();
}

function tile(item) {
  const url = pageUrls.add(base64Blob(item.image_data));
  const button = el(
    "button",
    { type: "button", className: "tile", dataset: { imageId: item.id } },
    el("img", { src: url, alt: item.prompt, loading: "lazy" }),
  );
  button.addEventListener("click", () => open(item, url, base64Blob(item.image_data)));
  return el("li", {}, button);
}

/** Load the current page; images come with the listing (include_data), one request per page. */
export async function loadPage() {
  say(message, "");
  const params = new URLSearchParams({ limit: PAGE_SIZE, offset, include_data: "true", ...query });
  let page;
  try {
    page = await getJson(`/gallery?${params}`);
  } catch (error) {
    say(message, error.message);
    return;
  }
  total = page.total_count;
  if (offset > 0 && offset >= total) {
    // The last page emptied (a delete): show the one before.
    offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
    return loadPage();
  }
  pageUrls.revoke();
  grid.replaceChildren(...page.images.filter((item) => item.image_data).map(tile));
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  const current = Math.floor(offset / PAGE_SIZE) + 1;
  say($("gallery-page"), `Page ${current} of ${pages}`);
  say($("gallery-summary"), total === 1 ? "1 image" : `${total} images`);
  $("gallery-prev").disabled = offset === 0;
  $("gallery-next").disabled = offset + PAGE_SIZE >= total;
  stale = false;
}

/** Show the gallery: reloaded when something was generated or deleted since it was last shown. */
export function showGallery() {
  if (stale) loadPage();
}

export function markStale() {
  stale = true;
}

async function remove() {
  const { item } = shown;
  try {
    await call(`/gallery/${encodeURIComponent(item.id)}`, { method: "DELETE" });
  } catch (error) {
    say($("dialog-message"), error.message);
    return;
  }
  dialog.close();
  await loadPage();
  say($("gallery-summary"), `Deleted ${item.id}. ${$("gallery-summary").textContent}`);
}

export function setupGallery(modelNames, { useSettings, useInputImage }) {
  handlers = { useSettings, useInputImage };
  $("gallery-model").append(...modelNames.map((name) => el("option", { value: name, text: name })));
  $("gallery-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    query = { q: $("gallery-q").value, model: $("gallery-model").value };
    offset = 0;
    loadPage();
  });
  $("gallery-prev").addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE_SIZE);
    loadPage();
  });
  $("gallery-next").addEventListener("click", () => {
    offset += PAGE_SIZE;
    loadPage();
  });
  $("dialog-close").addEventListener("click", () => dialog.close());
  $("dialog-delete").addEventListener("click", () => {
    $("dialog-confirm").hidden = false;
    $("dialog-delete-yes").focus();
  });
  $("dialog-delete-no").addEventListener("click", () => ($("dialog-confirm").hidden = true));
  $("dialog-delete-yes").addEventListener("click", remove);
  $("dialog-use").addEventListener("click", () => {
    dialog.close();
    handlers.useSettings(shown.item);
  });
  $("dialog-input").addEventListener("click", async () => {
    dialog.close();
    await handlers.useInputImage(shown.item, shown.blob);
  });
}

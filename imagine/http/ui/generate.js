// The Generate panel: the form (filled from /models), the job it starts, its progress, previews and result.

import { sendJson } from "./api.js";
import { $, UrlSet, dataUrlBlob, el, readAsDataUrl, say } from "./dom.js";
import { cancelJob, followJob, submitJob } from "./jobs.js";
import { MaskEditor } from "./mask.js";

const form = $("generate-form");
const fields = {
  model: $("model"),
  prompt: $("prompt"),
  negative: $("negative_prompt"),
  width: $("width"),
  height: $("height"),
  steps: $("steps"),
  guidance: $("guidance"),
  seed: $("seed"),
  count: $("num_images"),
  scheduler: $("scheduler"),
  strength: $("strength"),
};
const status = $("job-status");
const progress = $("job-progress");
const preview = $("job-preview");
const results = $("results");
const message = $("generate-message");

let models = {};
let loraRows = [];
let initImage = null; // {value: data URL or "gallery:<id>", name}
let job = null; // {id, controller, finished}
let onStored = () => {};
const resultUrls = new UrlSet();
const previewUrls = new UrlSet();
const mask = new MaskEditor($("mask-editor"), $("mask-image"), $("mask-canvas"), $("brush"));

function number(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function option(value, label = value, selected = false) {
  return el("option", { value, text: label, selected });
}

function applyModel(name) {
  const model = models[name];
  const defaults = model.defaults || {};
  const limits = model.limits || {};
  for (const input of [fields.width, fields.height]) {
    input.min = limits.min_size ?? 8;
    input.max = limits.max_size ?? 2048;
  }
  fields.width.value = defaults.width ?? "";
  fields.height.value = defaults.height ?? "";
  fields.steps.max = limits.max_steps ?? 1000;
  fields.steps.value = defaults.steps ?? "";
  fields.guidance.value = defaults.guidance ?? "";
  fields.scheduler.replaceChildren(
    ...(limits.schedulers || []).map((s) => option(s, s, s === defaults.scheduler)),
  );
  fields.scheduler.disabled = !limits.schedulers?.length;
  const facts = [];
  if (limits.min_size) facts.push(`size ${limits.min_size}–${limits.max_size}, multiples of 8`);
  if (limits.max_steps) facts.push(`steps up to ${limits.max_steps}`);
  facts.push(model.loaded ? "loaded" : "loads on first use");
  say($("model-info"), `${model.description || ""} (${facts.join("; ")})`);
  say($("steps-hint"), limits.step_choices ? `This model runs ${limits.step_choices.join(", ")} steps only.` : "");
  $("loras").hidden = !Array.isArray(model.loras);
  $("lora-rows").replaceChildren();
  loraRows = [];
  for (const lora of model.default_loras || []) addLora(lora.name, lora.weight);
  const inputs = model.inputs || ["text"];
  $("image-input").hidden = !inputs.includes("image");
  mask.setEnabled(inputs.includes("mask"));
  if (!inputs.includes("image")) removeInitImage();
}

function addLora(name = "", weight = 0.8) {
  const model = models[fields.model.value];
  const index = loraRows.length + 1;
  const select = el("select", { id: `lora-name-${index}` }, ...(model.loras || []).map((l) => option(l, l, l === name)));
  const input = el("input", { id: `lora-weight-${index}`, type: "number", min: -2, max: 2, step: 0.05, value: weight });
  const row = el(
    "li",
    {},
    el("label", { htmlFor: select.id, text: `LoRA ${index}` }),
    select,
    el("label", { htmlFor: input.id, text: "weight" }),
    input,
  );
  const remove = el("button", { type: "button", className: "quiet", text: "Remove" });
  const entry = { select, input };
  remove.addEventListener("click", () => {
    row.remove();
    loraRows = loraRows.filter((r) => r !== entry);
  });
  row.append(remove);
  loraRows.push(entry);
  $("lora-rows").append(row);
}

async function chooseInitImage(value, blob, name) {
  initImage = { value, name };
  say($("init-name"), `Input: ${name}`);
  $("init-chosen").hidden = false;
  await mask.load(blob);
}

function removeInitImage() {
  initImage = null;
  $("init-file").value = "";
  $("init-chosen").hidden = true;
  mask.clear();
}

async function body() {
  const request = {
    prompt: fields.prompt.value,
    negative_prompt: fields.negative.value,
    model: fields.model.value,
    width: number(fields.width),
    height: number(fields.height),
    num_inference_steps: number(fields.steps),
    guidance_scale: number(fields.guidance),
    seed: number(fields.seed),
    num_images: number(fields.count),
    scheduler: fields.scheduler.disabled ? undefined : fields.scheduler.value || undefined,
    response_format: "json",
  };
  if (!$("loras").hidden) {
    request.loras = loraRows.map((r) => ({ name: r.select.value, weight: Number(r.input.value) }));
  }
  if (initImage) {
    request.init_image = initImage.value;
    request.strength = number(fields.strength);
    const painted = await mask.maskDataUrl();
    if (painted) request.mask_image = painted;
  }
  return request;
}

function showPreview(dataUrl) {
  previewUrls.revoke();
  preview.src = previewUrls.add(dataUrlBlob(dataUrl));
  preview.hidden = false;
}

function showResult(result) {
  resultUrls.revoke();
  const figures = result.images.map((image, i) => {
    const url = resultUrls.add(dataUrlBlob(image));
    const id = result.ids?.[i];
    const seed = result.seeds?.[i] ?? result.seed;
    const link = el("a", { href: url, download: `${id || `image-${seed}`}.png`, className: "button", text: "Download" });
    return el(
      "figure",
      { dataset: { imageId: id || "" } },
      el("img", { src: url, alt: `Generated image ${i + 1}: ${result.prompt}` }),
      el("figcaption", {}, el("span", { text: `Seed ${seed}${id ? ` · ${id}` : ""}` }), link),
    );
  });
  results.replaceChildren(...figures);
  preview.hidden = true;
}

function onEvent(type, data) {
  if (type === "queued") {
    say(status, `Waiting: position ${data.position} in the queue, about ${Math.ceil(data.eta_seconds)} s.`);
  } else if (type === "started") {
    progress.max = data.total || 1;
    progress.value = 0;
    say(status, "Running…");
  } else if (type === "progress") {
    progress.max = data.total;
    progress.value = data.step;
    say(status, `Running: step ${data.step} of ${data.total}.`);
    if (data.preview) showPreview(data.preview);
  } else if (type === "succeeded") {
    progress.value = progress.max;
    showResult(data);
    say(status, `Done in ${data.generation_time.toFixed(2)} s (seed ${data.seed}).`);
    finish();
    onStored();
  } else if (type === "failed") {
    say(status, "Failed.");
    say(message, data.detail || "The generation failed.");
    finish();
  } else if (type === "cancelled") {
    say(status, "Cancelled.");
    finish();
  }
}

function finish() {
  if (!job) return;
  job.controller.abort();
  job = null;
  $("generate").disabled = false;
  $("cancel").disabled = true;
}

async function generate(event) {
  event.preventDefault();
  if (job) return;
  say(message, "");
  $("generate").disabled = true;
  say(status, "Sending…");
  progress.hidden = false;
  progress.value = 0;
  try {
    const accepted = await submitJob(await body());
    job = { id: accepted.id, controller: new AbortController() };
    $("cancel").disabled = false;
    onEvent("queued", accepted);
    await followJob(accepted.id, onEvent, job.controller.signal);
  } catch (error) {
    say(status, "Not generated.");
    say(message, error.message);
    finish();
    $("generate").disabled = false;
  }
}

async function cancel() {
  if (!job) return;
  const current = job;
  $("cancel").disabled = true;
  say(status, "Cancelling…");
  try {
    const answer = await cancelJob(current.id);
    // The stream says so too; a job that ended meanwhile keeps its own outcome.
    if (job === current && answer.status === "cancelled") onEvent("cancelled", answer);
  } catch (error) {
    say(message, error.message);
    if (job === current) $("cancel").disabled = false;
  }
}

async function enhance() {
  const button = $("enhance");
  button.disabled = true;
  say(message, "");
  try {
    const answer = await sendJson("/prompt/enhance", { prompt: fields.prompt.value, model: fields.model.value });
    fields.prompt.value = answer.prompt;
  } catch (error) {
    say(message, error.message);
  } finally {
    button.disabled = false;
  }
}

/** Fill the form from a gallery item ("use these settings"). */
export function useSettings(item) {
  if (!(item.model in models)) {
    say(message, `The model ${item.model} is not offered here any more.`);
    return;
  }
  fields.model.value = item.model;
  applyModel(item.model);
  const p = item.parameters || {};
  fields.prompt.value = item.prompt;
  fields.negative.value = item.negative_prompt || "";
  fields.width.value = p.width ?? item.width;
  fields.height.value = p.height ?? item.height;
  if (p.num_inference_steps !== undefined) fields.steps.value = p.num_inference_steps;
  if (p.guidance_scale !== undefined) fields.guidance.value = p.guidance_scale;
  if (p.scheduler) fields.scheduler.value = p.scheduler;
  fields.seed.value = item.seed;
  fields.count.value = 1;
  if (!$("loras").hidden) {
    $("lora-rows").replaceChildren();
    loraRows = [];
    for (const lora of p.loras || []) addLora(lora.name, lora.weight);
  }
  say(message, "");
}

/** Start the next generation from a gallery image ("use as input image"). */
export async function useInputImage(item, blob) {
  if ($("image-input").hidden) {
    say(message, `The model ${fields.model.value} does not take an input image.`);
    return;
  }
  await chooseInitImage(`gallery:${item.id}`, blob, `${item.id} (from the gallery)`);
}

export function setupGenerate(listing, { assistant, stored }) {
  models = listing;
  onStored = stored;
  fields.model.replaceChildren(...Object.keys(models).map((name) => option(name)));
  if (fields.model.options.length) applyModel(fields.model.value);
  fields.model.addEventListener("change", () => applyModel(fields.model.value));
  $("add-lora").addEventListener("click", () => addLora());
  form.addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("enhance").hidden = !assistant;
  $("enhance").addEventListener("click", enhance);
  $("init-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) await chooseInitImage(await readAsDataUrl(file), file, file.name);
  });
  $("remove-init").addEventListener("click", removeInitImage);
  $("clear-mask").addEventListener("click", () => mask.clear());
  $("mask-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) await mask.useFile(file);
  });
}

// The page's entry point: the token prompt, then the panels, filled from /models and /status.

import { clearToken, getJson, onUnauthorized, setToken, token } from "./api.js";
import { $, say } from "./dom.js";
import { setupChat } from "./chat.js";
import { markStale, setupGallery, showGallery } from "./gallery.js";
import { setupGenerate, useInputImage, useSettings } from "./generate.js";

const PANELS = ["generate-panel", "gallery-panel", "chat-panel"];
let started = false;

function showPanel(id) {
  for (const panel of PANELS) $(panel).hidden = panel !== id;
  for (const button of $("tabs").querySelectorAll("button")) {
    if (button.dataset.panel === id) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (id === "gallery-panel") showGallery();
}

function askForToken(text = "") {
  clearToken();
  for (const panel of PANELS) $(panel).hidden = true;
  $("tabs").hidden = true;
  $("sign-out").hidden = true;
  $("token-panel").hidden = false;
  say($("token-message"), text);
  $("token-input").value = "";
  $("token-input").focus();
}

async function start() {
  let listing, status;
  try {
    [listing, status] = await Promise.all([getJson("/models"), getJson("/status")]);
  } catch (error) {
    if (error.status !== 401) askForToken(error.message);
    return;
  }
  $("token-panel").hidden = true;
  $("tabs").hidden = false;
  $("sign-out").hidden = false;
  if (!started) {
    started = true;
    const models = { ...listing.local_models };
    for (const [name, cloud] of Object.entries(listing.cloud_models || {})) {
      if (cloud.configured) models[name] = cloud;
    }
    // seed 004's /status names the assistant among its models when one is configured.
    const assistant = status.models?.ollama === true;
    setupGenerate(models, { assistant, stored: markStale });
    setupGallery(Object.keys(models), {
      useSettings: (item) => {
        useSettings(item);
        showPanel("generate-panel");
        $("prompt").focus();
      },
      useInputImage: async (item, blob) => {
        showPanel("generate-panel");
        await useInputImage(item, blob);
      },
    });
    $("chat-tab").hidden = !assistant;
    if (assistant) setupChat();
  } else {
    markStale(); // another token may see another gallery
  }
  showPanel("generate-panel");
}

onUnauthorized((message) => askForToken(`The token was refused: ${message}. Paste a valid one.`));

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
  if (!value) return;
  setToken(value);
  $("token-input").value = "";
  say($("token-message"), "");
  start();
});
$("sign-out").addEventListener("click", () => askForToken());
for (const button of $("tabs").querySelectorAll("button")) {
  button.addEventListener("click", () => showPanel(button.dataset.panel));
}

if (token()) start();
else askForToken();

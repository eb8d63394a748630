// The Assistant panel (POST /chat): shown only when /status says the assistant is configured.

import { call, pngBlob } from "./api.js";
import { $, UrlSet, el, say } from "./dom.js";
import { sseEvents } from "./sse.js";

const SESSION_KEY = "imagine.chat-session";
const IMAGE_ID = /\bimg_[A-Za-z0-9_-]{22}(?![A-Za-z0-9_-])/;

const log = $("chat-log");
const input = $("chat-input");
const message = $("chat-message");
const urls = new UrlSet();

function sessionId() {
  let id = sessionStorage.getItem(SESSION_KEY);
  if (!id) {
    id = `ui-${crypto.randomUUID()}`;
    sessionStorage.setItem(SESSION_KEY, id);
  }
  return id;
}

function bubble(role, text) {
  const body = el("p", { text });
  const item = el("li", { className: `chat-${role}` }, el("span", { className: "who", text: role === "user" ? "You" : "Assistant" }), body);
  log.append(item);
  item.scrollIntoView({ block: "end" });
  return { item, body };
}

async function attachImage(item, answer) {
  const id = answer.image_id || answer.response.match(IMAGE_ID)?.[0];
  if (!id) return;
  try {
    const image = el("img", { src: urls.add(await pngBlob(id)), alt: `Generated image ${id}`, className: "chat-image" });
    item.append(image);
    await image.decode();
    item.scrollIntoView({ block: "end" });
  } catch (error) {
    say(message, error.message);
  }
}

async function send(event) {
  event.preventDefault();
  const text = input.value;
  if (!text.trim()) return;
  say(message, "");
  $("chat-send").disabled = true;
  bubble("user", text);
  input.value = "";
  const reply = bubble("assistant", "…");
  try {
    const response = await call("/chat", {
      method: "POST",
      json: { message: text, session_id: sessionId(), stream: true },
      headers: { Accept: "text/event-stream, application/json" },
    });
    let answer;
    if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      let written = "";
      for await (const sse of sseEvents(response)) {
        const data = JSON.parse(sse.data);
        if (sse.type === "token") {
          written += data.text;
          say(reply.body, written);
        } else if (sse.type === "done") {
          answer = data;
        } else if (sse.type === "error" || sse.type === "failed") {
          throw new Error(data.detail || "The assistant failed");
        }
      }
    } else {
      answer = await response.json();
    }
    if (answer) {
      say(reply.body, answer.response);
      await attachImage(reply.item, answer);
    }
  } catch (error) {
    reply.item.remove();
    say(message, error.message);
  } finally {
    $("chat-send").disabled = false;
  }
}

export function setupChat() {
  $("chat-form").addEventListener("submit", send);
  $("chat-new").addEventListener("click", () => {
    sessionStorage.removeItem(SESSION_KEY);
    urls.revoke();
    log.replaceChildren();
  });
}

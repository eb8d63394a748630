// One job through the public job routes: submit with previews, follow its event stream (resuming by Last-Event-ID), cancel.

import { ApiError, call, sendJson } from "./api.js";
import { sleep } from "./dom.js";
import { sseEvents } from "./sse.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const RECONNECTS = 5;

export function submitJob(body) {
  return sendJson("/jobs", { ...body, preview: true });
}

export async function cancelJob(jobId) {
  return (await call(`/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" })).json();
}

/** Calls onEvent(type, data) for every event until the job ends; a dropped stream resumes where it stopped. */
export async function followJob(jobId, onEvent, signal) {
  let lastId = null;
  let failures = 0;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await call(`/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal });
      for await (const event of sseEvents(response)) {
        if (event.id !== null) lastId = event.id;
        failures = 0;
        onEvent(event.type, JSON.parse(event.data));
        if (TERMINAL.has(event.type)) return;
      }
    } catch (error) {
      if (signal.aborted || error.name === "AbortError") return;
      // Only a lost connection is worth another try; the service's own refusals are final.
      if (error instanceof ApiError && error.status !== 0 && error.status !== 502 && error.status !== 503) throw error;
    }
    failures += 1;
    if (failures > RECONNECTS) throw new ApiError(0, "Lost the job's progress stream");
    await sleep(500 * failures);
  }
}

// Painting an inpainting mask over the input image: white (repaint) where painted, black (keep) elsewhere.

import { UrlSet, readAsDataUrl } from "./dom.js";

export class MaskEditor {
  constructor(container, image, canvas, brush) {
    this.container = container;
    this.image = image;
    this.canvas = canvas;
    this.brush = brush;
    this.enabled = false;
    this.painted = false;
    this.maskFile = null;
    this.urls = new UrlSet();
    this.context = canvas.getContext("2d");
    canvas.addEventListener("pointerdown", (event) => this.start(event));
    canvas.addEventListener("pointermove", (event) => this.paint(event));
    canvas.addEventListener("pointerup", () => (this.drawing = false));
    canvas.addEventListener("pointercancel", () => (this.drawing = false));
  }

  setEnabled(enabled) {
    this.enabled = enabled;
    this.container.hidden = !enabled || !this.image.src;
  }

  async load(blob) {
    this.urls.revoke();
    this.image.src = this.urls.add(blob);
    await this.image.decode();
    this.canvas.width = this.image.naturalWidth;
    this.canvas.height = this.image.naturalHeight;
    this.brush.max = Math.max(4, Math.round(this.canvas.width / 4));
    this.brush.value = Math.max(2, Math.round(this.canvas.width / 16));
    this.clear();
    this.container.hidden = !this.enabled;
  }

  clear() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
    this.maskFile = null;
  }

  async useFile(file) {
    this.clear();
    this.maskFile = file;
  }

  start(event) {
    this.drawing = true;
    this.canvas.setPointerCapture(event.pointerId);
    this.paint(event);
  }

  paint(event) {
    if (!this.drawing) return;
    const scale = this.canvas.width / this.canvas.clientWidth;
    this.context.fillStyle = "#fff";
    this.context.beginPath();
    this.context.arc(event.offsetX * scale, event.offsetY * scale, Number(this.brush.value), 0, 2 * Math.PI);
    this.context.fill();
    this.painted = true;
  }

  /** The mask to send as mask_image, or null when nothing was painted or chosen. */
  async maskDataUrl() {
    if (!this.enabled) return null;
    if (this.maskFile) return readAsDataUrl(this.maskFile);
    if (!this.painted) return null;
    const mask = document.createElement("canvas");
    mask.width = this.canvas.width;
    mask.height = this.canvas.height;
    const context = mask.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, mask.width, mask.height);
    context.drawImage(this.canvas, 0, 0);
    return mask.toDataURL("image/png");
  }
}

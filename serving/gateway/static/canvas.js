// The drawing surface of the page: an init image, an inpainting mask painted over it, and
// rectangles that each get a prompt (regional prompts). Three stacked canvases at the image's
// pixel size: the picture, the mask (painted strokes) and the regions (outlines); the top one
// takes the pointer. Masks leave as PNGs in the gateway's rule: transparent pixels are the
// selected ones (repaint, or inside the region).

const MASK_COLOUR = "rgba(255, 40, 90, 1)";
const DEFAULT_SIZE = [512, 512];  // width, height with no image and size "auto"

export class Surface {
  constructor({ picture, mask, regions, list, tool, brush, onChange }) {
    this.picture = picture;
    this.mask = mask;
    this.regionsCanvas = regions;
    this.list = list;
    this.tool = tool;  // () => "mask" | "erase" | "region"
    this.brush = brush;  // () => brush diameter in screen pixels
    this.onChange = onChange || (() => {});
    this.image = null;  // the init image's PNG base64, or null
    this.painted = false;
    this.regions = [];  // {x, y, w, h, prompt} in image pixels
    this.resize(...DEFAULT_SIZE);
    this._listen();
  }

  get width() { return this.picture.width; }
  get height() { return this.picture.height; }

  resize(width, height) {
    for (const canvas of [this.picture, this.mask, this.regionsCanvas]) {
      canvas.width = width;
      canvas.height = height;
    }
    this.painted = false;
    this.regions = [];
    this._drawPicture(null);
    this._renderRegions();
  }

  async loadImage(file) {
    const bitmap = await createImageBitmap(file);
    this.resize(bitmap.width, bitmap.height);
    this._drawPicture(bitmap);
    this.image = this.picture.toDataURL("image/png").split(",")[1];
    this.onChange();
  }

  removeImage() {
    this.image = null;
    this.resize(this.width, this.height);
    this.onChange();
  }

  clearMask() {
    this.mask.getContext("2d").clearRect(0, 0, this.width, this.height);
    this.painted = false;
    this.onChange();
  }

  // base64 PNG of the mask (transparent = repaint), or null when nothing is painted
  maskPng() {
    if (!this.painted) return null;
    return this._selection((ctx) => {
      ctx.globalCompositeOperation = "destination-out";
      ctx.drawImage(this.mask, 0, 0);
    });
  }

  // [{prompt, mask}] with each mask a base64 PNG (transparent = inside the region)
  regionInputs() {
    return this.regions.filter((r) => r.prompt.trim()).map((r) => ({
      prompt: r.prompt,
      mask: this._selection((ctx) => ctx.clearRect(r.x, r.y, r.w, r.h)),
    }));
  }

  _selection(cut) {
    const canvas = document.createElement("canvas");
    canvas.width = this.width;
    canvas.height = this.height;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    cut(ctx);
    return canvas.toDataURL("image/png").split(",")[1];
  }

  _drawPicture(bitmap) {
    const ctx = this.picture.getContext("2d");
    ctx.fillStyle = "#222";
    ctx.fillRect(0, 0, this.width, this.height);
    if (bitmap) ctx.drawImage(bitmap, 0, 0);
  }

  _point(event) {
    const box = this.regionsCanvas.getBoundingClientRect();
    return {
      x: Math.round(((event.clientX - box.left) / box.width) * this.width),
      y: Math.round(((event.clientY - box.top) / box.height) * this.height),
    };
  }

  _listen() {
    const canvas = this.regionsCanvas;
    let start = null;
    let last = null;
    canvas.addEventListener("pointerdown", (event) => {
      canvas.setPointerCapture(event.pointerId);
      start = last = this._point(event);
      if (this.tool() !== "region") this._stroke(last, last);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!start) return;
      const point = this._point(event);
      if (this.tool() === "region") this._renderRegions(rectangle(start, point));
      else this._stroke(last, point);
      last = point;
    });
    const finish = (event) => {
      if (!start) return;
      if (this.tool() === "region") {
        const rect = rectangle(start, this._point(event));
        if (rect.w >= 2 && rect.h >= 2) this._addRegion(rect);
        else this._renderRegions();
      }
      start = last = null;
      this.onChange();
    };
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
  }

  _stroke(from, to) {
    const ctx = this.mask.getContext("2d");
    ctx.globalCompositeOperation = this.tool() === "erase" ? "destination-out" : "source-over";
    ctx.strokeStyle = MASK_COLOUR;
    ctx.lineWidth = this.brush() * (this.width / this.regionsCanvas.getBoundingClientRect().width);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    if (this.tool() !== "erase") this.painted = true;
  }

  _addRegion(rect) {
    this.regions.push({ ...rect, prompt: "" });
    this._renderRegions();
    this._renderList();
    const inputs = this.list.querySelectorAll("input");
    inputs[inputs.length - 1].focus();
  }

  _renderRegions(dragging) {
    const ctx = this.regionsCanvas.getContext("2d");
    ctx.clearRect(0, 0, this.width, this.height);
    const scale = this.width / 256;
    ctx.lineWidth = Math.max(1, 2 * scale);
    ctx.font = `${Math.max(10, Math.round(14 * scale))}px sans-serif`;
    this.regions.forEach((r, i) => {
      ctx.strokeStyle = ctx.fillStyle = "#ffd400";
      ctx.strokeRect(r.x, r.y, r.w, r.h);
      ctx.fillText(String(i + 1), r.x + 4 * scale, r.y + 16 * scale);
    });
    if (dragging) {
      ctx.setLineDash([6 * scale, 4 * scale]);
      ctx.strokeStyle = "#fff";
      ctx.strokeRect(dragging.x, dragging.y, dragging.w, dragging.h);
      ctx.setLineDash([]);
    }
  }

  _renderList() {
    this.list.replaceChildren(...this.regions.map((region, i) => {
      const item = document.createElement("li");
      const input = document.createElement("input");
      input.className = "region-prompt";
      input.placeholder = `prompt for region ${i + 1}`;
      input.value = region.prompt;
      input.addEventListener("input", () => { region.prompt = input.value; });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "remove";
      remove.addEventListener("click", () => {
        this.regions.splice(i, 1);
        this._renderRegions();
        this._renderList();
        this.onChange();
      });
      item.append(input, remove);
      return item;
    }));
  }
}

function rectangle(a, b) {
  return { x: Math.min(a.x, b.x), y: Math.min(a.y, b.y), w: Math.abs(a.x - b.x), h: Math.abs(a.y - b.y) };
}

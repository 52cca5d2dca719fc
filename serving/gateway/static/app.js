// The page's controller: the form -> POST /v1/generations (its SSE stream drives the progress
// bar, the live preview and the steer log), edits while it runs -> POST .../steer (debounced),
// Cancel -> DELETE /v1/generations/{id}, results -> the gallery (PNG with its parameters). The
// model menu is filled from GET /v1/models, the sampler menu from GET /v1/samplers?model=, the
// LoRA picker (a checkbox and a weight per adapter) from GET /v1/loras?model=.
import { Surface } from "./canvas.js";
import { fromBase64, withText } from "./png.js";
import { readEvents } from "./sse.js";

const STEER_DEBOUNCE_MS = 300;
const STEERABLE = ["prompt", "negative_prompt", "guidance_scale"];
// fields an error may name -> the control that sets them (to point at it)
const CONTROL_OF = { mask: "canvas_box", "regions.prompt": "regions", "regions.mask": "regions",
                     "regions.negative_prompt": "regions", region_mode: "regions" };
const LORA_MAX_WEIGHT = 4;

const $ = (id) => document.getElementById(id);
const form = $("controls");

let run = null;  // the generation in flight: {id, controller, sent, steers, step, totalSteps, steerTimer, params}

const surface = new Surface({
  picture: $("picture"), mask: $("mask_view"), regions: $("regions_view"), list: $("regions"),
  tool: () => form.querySelector("input[name=tool]:checked").value,
  brush: () => Number($("brush").value),
});

// ---- the form ----------------------------------------------------------------------------

function showValue(input, output, digits) {
  const update = () => { output.textContent = Number(input.value).toFixed(digits); };
  input.addEventListener("input", update);
  update();
}
showValue($("steps"), $("steps_value"), 0);
showValue($("guidance_scale"), $("guidance_value"), 1);
showValue($("strength"), $("strength_value"), 2);

$("random_seed").addEventListener("change", () => { $("seed").disabled = $("random_seed").checked; });

// ---- the sampler menu (GET /v1/samplers) ---------------------------------------------------

let samplerLabels = {};  // option value -> A1111-style name, for the PNG's parameters text
let defaultSamplerLabel = "DDIM";

// One option per A1111 name (the API takes them), and our name for a sampler without one;
// samplers that do not fit the served model are shown disabled.
async function loadSamplers() {
  let list;
  try {
    const model = $("model").value;
    const response = await fetch("/v1/samplers" + (model ? `?model=${encodeURIComponent(model)}` : ""), { headers: headers() });
    if (!response.ok) return;  // e.g. 401 until an API key is given: the menu keeps "server default"
    list = await response.json();
  } catch (_) {
    return;
  }
  const menu = $("sampler");
  const chosen = menu.value;
  const options = [];
  samplerLabels = {};
  for (const sampler of list.data) {
    const fits = sampler.fits_served_model !== false;
    const names = sampler.a1111_names.length ? sampler.a1111_names : [sampler.name];
    for (const name of names) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name === sampler.name ? name : `${name} (${sampler.name})`;
      option.title = sampler.description + (fits ? "" : ` (does not fit the served model: ${sampler.fits})`);
      option.disabled = !fits;
      option.dataset.sampler = sampler.name;
      options.push(option);
      samplerLabels[name] = name;
    }
  }
  const byPair = list.data.find((s) => s.name === list.default_sampler);
  if (byPair) {
    const karras = list.default_sigma_schedule === "karras";
    defaultSamplerLabel = byPair.a1111_names.find((n) => n.endsWith(" Karras") === karras) || byPair.name;
  }
  const first = document.createElement("option");
  first.value = "";
  first.textContent = `server default (${defaultSamplerLabel})`;
  menu.replaceChildren(first, ...options);
  menu.value = chosen;
  menu.dataset.loaded = "true";
}
// ---- the model menu (GET /v1/models) -------------------------------------------------------

// One option per served model, the default first and chosen; its samplers follow the choice.
async function loadModels() {
  let list;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) return;  // e.g. 401 until an API key is given: the menu keeps "server default"
    list = await response.json();
  } catch (_) {
    return;
  }
  const menu = $("model");
  const chosen = menu.value;
  const options = list.data.map((model) => {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = `${model.id} (${model.family}, ${model.native_size} px${model.default ? ", default" : ""})`;
    option.title = `tasks: ${model.tasks.join(", ")}; sizes up to ${model.max_size} px`;
    option.dataset.nativeSize = model.native_size;
    return option;
  });
  if (!options.length) return;
  menu.replaceChildren(...options);
  menu.value = list.data.some((m) => m.id === chosen) ? chosen : list.data.find((m) => m.default)?.id || list.data[0].id;
  menu.dataset.loaded = "true";
}

// ---- the LoRA picker (GET /v1/loras) -------------------------------------------------------

// One row per adapter of the chosen model: a checkbox (use it) and its weight; the choices made
// are kept across reloads of the list.
async function loadLoras() {
  let list;
  try {
    const model = $("model").value;
    const response = await fetch("/v1/loras" + (model ? `?model=${encodeURIComponent(model)}` : ""), { headers: headers() });
    if (!response.ok) return;  // e.g. 401 until an API key is given
    list = await response.json();
  } catch (_) {
    return;
  }
  const shown = [...$("lora_list").querySelectorAll(".lora")].map((row) => row.dataset.name);
  if (shown.length && shown.join("\n") === list.data.map((adapter) => adapter.id).join("\n")) {
    // The same adapters: the rows stay, so a box or weight being set meanwhile is not lost.
    const labels = $("lora_list").querySelectorAll(".lora label");
    list.data.forEach((adapter, i) => { labels[i].title = loraTitle(adapter); });
    $("loras").dataset.loaded = "true";
    return;
  }
  const chosen = Object.fromEntries(chosenLoras().map((l) => [l.name, l.weight]));
  const rows = list.data.map((adapter) => loraRow(adapter, chosen[adapter.id]));
  $("lora_list").replaceChildren(...rows);
  $("lora_hint").hidden = rows.length > 0;
  $("loras").dataset.loaded = "true";
}

function loraRow(adapter, weight) {
  const row = document.createElement("div");
  row.className = "lora";
  row.dataset.name = adapter.id;
  const use = document.createElement("input");
  use.type = "checkbox";
  use.id = `lora_${adapter.id}`;
  use.checked = weight !== undefined;
  const label = document.createElement("label");
  label.htmlFor = use.id;
  label.textContent = adapter.id;
  label.title = loraTitle(adapter);
  const value = document.createElement("input");
  value.type = "number";
  value.min = -LORA_MAX_WEIGHT;
  value.max = LORA_MAX_WEIGHT;
  value.step = "0.05";
  value.value = weight !== undefined ? weight : 1;
  value.title = `weight in [-${LORA_MAX_WEIGHT}, ${LORA_MAX_WEIGHT}]`;
  value.addEventListener("input", () => { use.checked = true; });
  row.append(use, label, value);
  return row;
}

function loraTitle(adapter) {
  return `adapts ${adapter.model}${adapter.resident ? " (in memory)" : ""}; also <lora:${adapter.id}:weight> in the prompt`;
}

// [{name, weight}] of the checked adapters, in the list's order.
function chosenLoras() {
  return [...$("lora_list").querySelectorAll(".lora")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({ name: row.dataset.name, weight: Number(row.querySelector("input[type=number]").value) }));
}

function setLoras(loras) {
  const weights = Object.fromEntries((loras || []).map((l) => [l.name, l.weight]));
  for (const row of $("lora_list").querySelectorAll(".lora")) {
    const weight = weights[row.dataset.name];
    row.querySelector("input[type=checkbox]").checked = weight !== undefined;
    if (weight !== undefined) row.querySelector("input[type=number]").value = weight;
  }
}

async function loadMenus() {
  await loadModels();
  await Promise.all([loadSamplers(), loadLoras()]);
}
loadMenus();
$("api_key").addEventListener("change", loadMenus);
$("model").addEventListener("change", loadSamplers);
$("model").addEventListener("change", loadLoras);
$("init_image").addEventListener("change", async () => {
  const file = $("init_image").files[0];
  if (file) await surface.loadImage(file);
});
$("clear_mask").addEventListener("click", () => surface.clearMask());
$("clear_image").addEventListener("click", () => {
  $("init_image").value = "";
  surface.removeImage();
});
$("size").addEventListener("change", () => {
  const size = parseSize($("size").value);
  if (size && !surface.image) surface.resize(...size);
});

function parseSize(text) {
  const match = /^(\d+)x(\d+)$/i.exec(text.trim());
  return match ? [Number(match[1]), Number(match[2])] : null;
}

function currentValues() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    guidance_scale: Number($("guidance_scale").value),
  };
}

// The JSON body of POST /v1/generations from the form: GenerateRequest's fields (images as
// base64 PNG), with size as "WxH".
function requestBody() {
  const values = currentValues();
  const steps = Number($("steps").value);
  const body = { prompt: values.prompt, steps, guidance_scale: values.guidance_scale, progress_every: 1,
                 preview_every: Math.max(1, Math.round(steps / 12)), output_format: "png" };
  if (values.negative_prompt) body.negative_prompt = values.negative_prompt;
  if ($("sampler").value) body.sampler = $("sampler").value;
  if ($("model").value) body.model = $("model").value;
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  if (!$("random_seed").checked && $("seed").value !== "") body.seed = Number($("seed").value);
  const size = $("size").value.trim();
  if (size && size !== "auto") body.size = size;
  if (surface.image) {
    body.init_image = surface.image;
    body.strength = Number($("strength").value);
    const mask = surface.maskPng();
    if (mask) body.mask = mask;
  }
  const regions = surface.regionInputs();
  if (regions.length) {
    body.regions = regions;
    // region masks are at the surface's size: generate at that size
    if (!body.size && !surface.image) body.size = `${surface.width}x${surface.height}`;
  }
  return body;
}

function headers() {
  const key = $("api_key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

// ---- errors and status ----------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  box.hidden = false;
  box.textContent = error.param ? `${error.param}: ${error.message}` : error.message;
  const param = error.param && error.param.startsWith("loras") ? "loras" : error.param;
  const control = param && $(CONTROL_OF[param] || param);
  if (control) control.classList.add("invalid");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const element of document.querySelectorAll(".invalid")) element.classList.remove("invalid");
}

// The OpenAI-shaped error of a failed response (or a plain one when the body is not JSON).
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return { message: `HTTP ${response.status} ${response.statusText}` };
}

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  document.body.classList.toggle("running", running);
}

// ---- a generation ---------------------------------------------------------------------------

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!run) generate();
});

async function generate() {
  clearError();
  $("steers").replaceChildren();
  const body = requestBody();
  const controller = new AbortController();
  run = { id: null, controller, sent: currentValues(), steers: new Map(), step: 0, totalSteps: body.steps,
          steerTimer: null, params: body, cancelled: false };
  const mine = run;
  setRunning(true);
  setStatus("starting…", "starting");
  $("progress").value = 0;
  try {
    const response = await fetch("/v1/generations", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                       signal: controller.signal });
    if (!response.ok) {
      showError(await errorOf(response));
      setStatus("failed", "failed");
      return;
    }
    mine.id = response.headers.get("X-Generation-Id");
    let finished = false;
    for await (const { event, data } of readEvents(response)) {
      finished = onEvent(mine, event, data) || finished;
    }
    if (!finished) setStatus(mine.cancelled ? `cancelled at step ${mine.step}` : "the stream ended early", mine.cancelled ? "cancelled" : "failed");
  } catch (error) {
    if (error.name === "AbortError") setStatus(`cancelled at step ${mine.step}`, "cancelled");
    else {
      showError({ message: String(error.message || error) });
      setStatus("failed", "failed");
    }
  } finally {
    clearTimeout(mine.steerTimer);
    run = null;
    setRunning(false);
  }
}

// Handles one SSE event; true when it ended the generation.
function onEvent(mine, event, data) {
  switch (event) {
    case "generation.created":
      mine.id = data.id;
      mine.seed = data.seed;
      mine.totalSteps = data.total_steps;
      $("progress").max = data.total_steps;
      setStatus(`step 0 / ${data.total_steps}`, "running");
      return false;
    case "generation.progress":
      mine.step = data.step;
      $("progress").max = data.total_steps;
      $("progress").value = data.step;
      setStatus(`step ${data.step} / ${data.total_steps}`, "running");
      if (data.preview_b64) $("preview").src = `data:image/png;base64,${data.preview_b64}`;
      return false;
    case "generation.steered":
      steerItem(mine, data.steer_id).applied(data.step);
      return false;
    case "generation.completed":
      $("progress").value = $("progress").max;
      $("preview").src = `data:image/png;base64,${data.b64_json}`;
      setStatus(`done in ${data.timings ? data.timings.total_s.toFixed(2) : "?"} s`, "done");
      addResult(mine, data);
      return true;
    case "error":
      if (mine.cancelled || (data.error && data.error.code === "cancelled")) {
        setStatus(`cancelled at step ${mine.step}`, "cancelled");
      } else {
        showError(data.error || { message: "the generation failed" });
        setStatus("failed", "failed");
      }
      return true;
    default:
      return false;
  }
}

$("cancel").addEventListener("click", async () => {
  const mine = run;
  if (!mine) return;
  mine.cancelled = true;
  setStatus("cancelling…", "cancelling");
  if (mine.id) {
    try {
      const response = await fetch(`/v1/generations/${encodeURIComponent(mine.id)}`, { method: "DELETE", headers: headers() });
      if (response.ok) return;  // the stream ends with the generation's cancelled error
    } catch (_) { /* closing the stream below cancels it too */ }
  }
  mine.controller.abort();
});

// ---- steering -------------------------------------------------------------------------------

for (const id of STEERABLE) {
  $(id).addEventListener("input", () => {
    if (!run || !run.id) return;
    clearTimeout(run.steerTimer);
    run.steerTimer = setTimeout(() => steer(run), STEER_DEBOUNCE_MS);
  });
}

// Sends what changed since the last steer (or the request).
async function steer(mine) {
  if (!mine || mine !== run) return;
  const values = currentValues();
  const change = {};
  for (const name of STEERABLE) if (values[name] !== mine.sent[name]) change[name] = values[name];
  if (!Object.keys(change).length) return;
  mine.sent = values;
  let response;
  try {
    response = await fetch(`/v1/generations/${encodeURIComponent(mine.id)}/steer`, {
      method: "POST", headers: headers(), body: JSON.stringify(change) });
  } catch (error) {
    refusedSteer(`steer not sent: ${error.message || error}`);
    return;
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 409) refusedSteer(`steer too late (${describe(change)}): ${error.message}`);
    else {
      refusedSteer(`steer refused (${describe(change)})`);
      showError(error);
    }
    return;
  }
  const { steer_id: steerId } = await response.json();
  steerItem(mine, steerId).acknowledged(change);
}

function refusedSteer(text) {
  const li = document.createElement("li");
  li.dataset.state = "refused";
  li.textContent = text;
  $("steers").append(li);
}

// The steer log's line for one steer; the ack and the applied event may come in either order.
function steerItem(mine, steerId) {
  let item = mine.steers.get(steerId);
  if (item) return item;
  const li = document.createElement("li");
  li.dataset.steerId = steerId;
  const state = { change: null, step: null, ackedAt: null };
  const render = () => {
    const what = state.change ? ` (${describe(state.change)})` : "";
    li.textContent = state.step === null ? `steer ${steerId} acknowledged at step ${state.ackedAt}${what}`
      : `steer ${steerId} applied at step ${state.step}${what}`;
    li.title = state.ackedAt === null ? "" : `acknowledged when ${state.ackedAt} steps were done`;
    li.dataset.state = state.step === null ? "acknowledged" : "applied";
  };
  item = {
    state,
    acknowledged(change) { state.change = change; state.ackedAt = mine.step; render(); },
    applied(step) { state.step = step; render(); },
  };
  mine.steers.set(steerId, item);
  render();
  $("steers").append(li);
  return item;
}

function describe(change) {
  return Object.entries(change).map(([name, value]) => `${name}: ${typeof value === "string" ? JSON.stringify(value) : value}`).join(", ");
}

// ---- results --------------------------------------------------------------------------------

// The parameters a result was made with: the request's, then each steer at the step it applied.
function resultParams(mine, data) {
  const params = { ...mine.params, seed: data.seed, id: mine.id };
  delete params.init_image;
  delete params.mask;
  if (params.regions) params.regions = params.regions.map((r) => r.prompt);
  const steers = [...mine.steers.entries()].filter(([, s]) => s.state.step !== null)
    .map(([steerId, s]) => ({ steer_id: steerId, step: s.state.step, ...s.state.change }));
  if (steers.length) params.steers = steers;
  return params;
}

// A1111's "parameters" text: prompt, then negative prompt, then the settings line.
function a1111Text(params) {
  const lines = [params.prompt];
  if (params.negative_prompt) lines.push(`Negative prompt: ${params.negative_prompt}`);
  const sampler = params.sampler ? samplerLabels[params.sampler] || params.sampler : defaultSamplerLabel;
  const settings = [`Steps: ${params.steps}`, `Sampler: ${sampler}`, `CFG scale: ${params.guidance_scale}`, `Seed: ${params.seed}`];
  if (params.size) settings.push(`Size: ${params.size}`);
  if (params.model) settings.push(`Model: ${params.model}`);
  if (params.loras) settings.push(`Lora: ${params.loras.map((l) => `${l.name}:${l.weight}`).join(" ")}`);
  if (params.strength !== undefined) settings.push(`Denoising strength: ${params.strength}`);
  for (const s of params.steers || []) settings.push(`Steer ${s.steer_id} at step ${s.step}: ${describe(s).replace(/steer_id: \d+, step: \d+(, )?/, "")}`);
  lines.push(settings.join(", "));
  return lines.join("\n");
}

function addResult(mine, data) {
  const params = resultParams(mine, data);
  const png = withText(fromBase64(data.b64_json), { parameters: a1111Text(params), "ldm-serving": JSON.stringify(params) });
  const url = URL.createObjectURL(new Blob([png], { type: "image/png" }));
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.dataset.generationId = mine.id || "";
  card.querySelector("img").src = url;
  const list = card.querySelector(".params");
  for (const [name, value] of Object.entries(params)) {
    if (name === "progress_every" || name === "preview_every" || name === "output_format") continue;
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = name === "loras" ? value.map((l) => `${l.name}:${l.weight}`).join(", ")
      : name === "steers" ? value.map((s) => `${s.steer_id}@${s.step} ${describe(s).replace(/steer_id: \d+, step: \d+(, )?/, "")}`).join("; ")
      : Array.isArray(value) ? value.join("; ") : String(value);
    list.append(term, detail);
  }
  const link = card.querySelector(".download");
  link.href = url;
  link.download = `ldm-${params.seed}-${(mine.id || "image").slice(0, 12)}.png`;
  card.querySelector(".reuse").addEventListener("click", () => reuse(params));
  $("gallery").prepend(card);
}

function reuse(params) {
  $("prompt").value = params.prompt;
  $("negative_prompt").value = params.negative_prompt || "";
  $("seed").value = params.seed;
  $("random_seed").checked = false;
  $("seed").disabled = false;
  $("steps").value = params.steps;
  $("guidance_scale").value = params.guidance_scale;
  $("size").value = params.size || "auto";
  if (params.model && [...$("model").options].some((o) => o.value === params.model)) $("model").value = params.model;
  $("sampler").value = params.sampler || "";
  setLoras(params.loras);
  $("model").dispatchEvent(new Event("change"));  // its samplers and adapters (the chosen ones kept)
  for (const id of ["steps", "guidance_scale"]) $(id).dispatchEvent(new Event("input"));
}

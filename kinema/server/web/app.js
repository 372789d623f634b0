// Kinema's web page: a form that builds a small ComfyUI API prompt (KinemaPipelineLoader -> KinemaGenerate ->
// KinemaSaveVideo, plus LoadImage / KinemaLoadVideo for the task's inputs) and talks only ComfyUI's API:
// POST /prompt, GET /queue, /history, /view, /object_info, POST /upload/image, /interrupt, ws /ws?clientId=.
"use strict";

const TASK_INPUTS = { t2v: [], i2v: ["image"], flf2v: ["first_frame", "last_frame"], t2i: [], v2v: ["video"], extend: ["video"] };
const EXTEND_FIELDS = ["extend_frames", "overlap_frames", "colour_match", "overlap_join", "loop"];
const GRAPH = { loader: "1", generate: "2", save: "3", image: "4", first_frame: "5", last_frame: "6", video: "7" };
const KINEMA_NODES = ["KinemaPipelineLoader", "KinemaGenerate", "KinemaSaveVideo", "KinemaLoadVideo"];
const VIDEO_MIME = /^video\//;

const params = new URLSearchParams(location.search);
const token = params.get("token") || sessionStorage.getItem("kinema-token") || "";
if (params.get("token")) sessionStorage.setItem("kinema-token", token);
const clientId = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());

const state = {
  task: "t2v",
  uploads: {},          // input name -> uploaded file name (as LoadImage / KinemaLoadVideo take it)
  mine: new Set(),      // prompt ids this page queued
  running: null,        // prompt id running now
  loaded: null,         // a loaded workflow waiting to be queued: {prompt, extra_data, label}
  objectInfo: {},
  ws: null,
  wsDelay: 500,
  shown: null,          // prompt id whose result is shown
  reported: new Set(),  // prompt ids whose error is already on the page
};

const $ = (id) => document.getElementById(id);

// -- HTTP --------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(message, status, body) { super(message); this.status = status; this.body = body; }
}

function withToken(url) {
  if (!token) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

async function api(path, { method = "GET", json, body } = {}) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  let res;
  try {
    res = await fetch(path, { method, headers, body });
  } catch (e) {
    throw new ApiError(`the server did not answer ${method} ${path} (${e.message})`, 0, null);
  }
  const text = await res.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* a plain-text reply */ }
  if (!res.ok) throw new ApiError(describeError(data, res.status), res.status, data);
  return data;
}

// ComfyUI's 400 body: {error: {type, message, details}, node_errors: {id: {class_type, errors: [...]}}}
function describeError(data, status) {
  if (data && typeof data === "object") {
    const lines = [];
    const err = data.error;
    if (err && typeof err === "object") lines.push([err.message, err.details].filter(Boolean).join(": "));
    else if (typeof err === "string") lines.push(err);
    else if (data.detail) lines.push(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    else if (data.message) lines.push(data.message);
    for (const [id, ne] of Object.entries(data.node_errors || {})) {
      for (const e of ne.errors || []) {
        lines.push(`node ${id} (${ne.class_type}): ${[e.message, e.details].filter(Boolean).join(": ")}`);
      }
    }
    if (lines.length) return lines.join("\n");
  }
  if (typeof data === "string" && data.trim()) return `${status}: ${data.trim().slice(0, 500)}`;
  return `the server answered ${status}`;
}

// -- messages ----------------------------------------------------------------------------------
function message(text, kind = "error") {
  const box = $("messages");
  const div = document.createElement("div");
  div.className = "message " + kind;
  const span = document.createElement("span");
  span.textContent = text;
  const close = document.createElement("button");
  close.type = "button"; close.className = "quiet"; close.textContent = "×"; close.title = "dismiss";
  close.onclick = () => div.remove();
  div.append(span, close);
  box.prepend(div);
  while (box.children.length > 6) box.lastChild.remove();
  if (kind !== "error") setTimeout(() => div.remove(), 6000);
  return div;
}

function guard(fn) {  // every handler: an exception becomes a message, never a broken page
  return async (...args) => {
    try { return await fn(...args); } catch (e) { console.error(e); message(e.message || String(e)); }
  };
}

// -- combos from /object_info --------------------------------------------------------------------
function comboOf(cls, input) {
  const node = state.objectInfo[cls];
  if (!node) return null;
  const spec = (node.input.required || {})[input] || (node.input.optional || {})[input];
  return spec && Array.isArray(spec[0]) ? { options: spec[0], default: (spec[1] || {}).default } : null;
}

function fillSelect(id, combo, labels = {}) {
  const sel = $(id);
  const keep = sel.value;
  sel.replaceChildren();
  for (const v of combo ? combo.options : []) {
    const o = document.createElement("option");
    o.value = v; o.textContent = labels[v] || v;
    sel.append(o);
  }
  if (combo && combo.options.includes(keep)) sel.value = keep;
  else if (combo && combo.default !== undefined && combo.options.includes(combo.default)) sel.value = combo.default;
}

async function loadObjectInfo() {
  const info = {};
  const missing = [];
  for (const cls of KINEMA_NODES) {
    try {
      Object.assign(info, await api("/object_info/" + cls));
    } catch (e) {
      if (e.status === 401 || e.status === 0) throw e;
      missing.push(cls);
    }
  }
  state.objectInfo = info;
  if (missing.length) message(`this server lacks Kinema's nodes (${missing.join(", ")}); the form cannot run here.`);
  fillSelect("solver", comboOf("KinemaGenerate", "solver"));
  fillSelect("cache", comboOf("KinemaGenerate", "cache"));
  fillSelect("vae_tile", comboOf("KinemaGenerate", "vae_tile"));
  fillSelect("colour_match", comboOf("KinemaGenerate", "colour_match"));
  fillSelect("overlap_join", comboOf("KinemaGenerate", "overlap_join"));
  fillSelect("upscale", comboOf("KinemaGenerate", "upscale"), { off: "off", 2: "x2", 4: "x4" });
  fillSelect("ckpt", comboOf("KinemaPipelineLoader", "ckpt"), { builtin: "built-in model" });
  fillSelect("lora", comboOf("KinemaPipelineLoader", "lora_1"));
  fillSelect("quantization", comboOf("KinemaPipelineLoader", "quantization"));
  fillSelect("dtype", comboOf("KinemaPipelineLoader", "dtype"));
  fillSelect("attention", comboOf("KinemaPipelineLoader", "attention"));
  fillSelect("format", comboOf("KinemaSaveVideo", "format"));
}

// -- the form ----------------------------------------------------------------------------------
function setTask(task) {
  state.task = task;
  for (const b of document.querySelectorAll("#tasks [role=tab]")) b.setAttribute("aria-selected", String(b.dataset.task === task));
  for (const el of document.querySelectorAll("[data-tasks]")) el.hidden = !el.dataset.tasks.split(" ").includes(task);
  for (const el of document.querySelectorAll("[data-hide-tasks]")) el.hidden = el.dataset.hideTasks.split(" ").includes(task);
}

function num(id, empty) {
  const text = $(id).value.trim();
  if (text === "") return empty;
  const v = Number(text);
  if (!Number.isFinite(v)) throw new Error(`${id.replace("_", " ")} ${JSON.stringify(text)} is not a number`);
  return v;
}

function formValues() {
  return {
    task: state.task,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: Math.round(num("width", 0)),
    height: Math.round(num("height", 0)),
    frame_num: state.task === "t2i" ? 1 : Math.round(num("frame_num", 0)),
    steps: Math.round(num("steps", 0)),
    seed: Math.round(num("seed", 0)),
    guide_scale: num("guide_scale", -1),
    shift: num("shift", 0),
    solver: $("solver").value,
    cache: $("cache").value || "off",
    vae_tile: $("vae_tile").value || "auto",
    denoise: num("denoise", 1),
    extend_frames: Math.round(num("extend_frames", 32)),
    overlap_frames: Math.round(num("overlap_frames", 9)),
    colour_match: $("colour_match").value || "overlap",
    overlap_join: $("overlap_join").value || "blend",
    loop: $("loop").checked,
    slg: $("slg").value.trim() || "off",
    feta: num("feta", 0),
    cfg_zero_star: $("cfg_zero_star").checked,
    upscale: $("upscale").value || "off",
  };
}

function buildPrompt() {
  const v = formValues();
  if (!v.prompt.trim()) throw new Error("write a prompt first");
  if (v.task !== "extend" && (v.width === 0) !== (v.height === 0)) throw new Error("set both width and height, or leave both empty for the model's size");
  const loader = {
    ckpt: $("ckpt").value || "builtin", dtype: $("dtype").value || "default",
    quantization: $("quantization").value || "disabled", attention: $("attention").value || "auto",
    blocks_to_swap: Math.round(num("blocks_to_swap", 0)),
  };
  const lora = $("lora").value;
  if (lora && lora !== "none") { loader.lora_1 = lora; loader.strength_1 = num("lora_strength", 1); }
  const gen = { pipeline: [GRAPH.loader, 0], ...v };
  if (v.task !== "v2v") delete gen.denoise;
  if (v.task === "t2i") gen.frame_num = 1;
  if (v.task === "extend") Object.assign(gen, { width: 0, height: 0, frame_num: 0 });  // the video's size, and more frames
  else for (const k of EXTEND_FIELDS) delete gen[k];
  const prompt = {
    [GRAPH.loader]: { class_type: "KinemaPipelineLoader", inputs: loader },
    [GRAPH.generate]: { class_type: "KinemaGenerate", inputs: gen },
  };
  for (const input of TASK_INPUTS[v.task]) {
    const name = state.uploads[input];
    if (!name) throw new Error(`${v.task} needs ${input.replace("_", " ")}: choose a file for it first`);
    const id = GRAPH[input];
    prompt[id] = input === "video"
      // v2v samples the frames it is given (4n + 1); extend continues the video's very last frame: all of them
      ? { class_type: "KinemaLoadVideo", inputs: { video: name, frame_load_cap: 0, force_4n1: v.task !== "extend" } }
      : { class_type: "LoadImage", inputs: { image: name } };
    gen[input] = [id, 0];
  }
  const format = v.task === "t2i" ? "png" : ($("format").value || "h264-mp4");
  prompt[GRAPH.save] = {
    class_type: "KinemaSaveVideo",
    inputs: { images: [GRAPH.generate, 0], fps: [GRAPH.generate, 1], settings: [GRAPH.generate, 2], format,
              filename_prefix: $("filename_prefix").value || "kinema" },
  };
  return prompt;
}

// Fill the form from a KinemaGenerate node's inputs, a prompt, or a Kinema settings record.
function setField(id, value) {
  if (value === undefined || value === null) return;
  const el = $(id);
  if (el.tagName === "SELECT") {
    if (![...el.options].some((o) => o.value === String(value))) {
      const o = document.createElement("option"); o.value = o.textContent = String(value); el.append(o);
    }
    el.value = String(value);
  } else el.value = value;
}

function fillForm(values) {
  if (TASK_INPUTS[values.task]) setTask(values.task);
  setField("prompt", values.prompt);
  setField("negative_prompt", values.negative_prompt);
  for (const [id, empty] of [["width", 0], ["height", 0], ["frame_num", 0], ["steps", 0], ["guide_scale", -1], ["shift", 0]]) {
    if (values[id] !== undefined) setField(id, values[id] === empty ? "" : values[id]);
  }
  if (values.seed !== undefined) setField("seed", values.seed);
  if (values.solver) setField("solver", values.solver);
  if (values.cache !== undefined) setField("cache", values.cache || "off");
  if (values.vae_tile) setField("vae_tile", values.vae_tile);
  if (values.denoise !== undefined && values.denoise < 1) setField("denoise", values.denoise);
  for (const k of ["extend_frames", "overlap_frames", "colour_match", "overlap_join"]) setField(k, values[k]);
  if (values.loop !== undefined) $("loop").checked = Boolean(values.loop);
  // a settings record names only the extras a run used: the others were off
  const record = values.kinema_version !== undefined;
  if (values.slg !== undefined || record) setField("slg", !values.slg || values.slg === "off" ? "" : values.slg);
  if (values.feta !== undefined || record) setField("feta", !values.feta ? "" : values.feta);
  if (values.cfg_zero_star !== undefined || record) $("cfg_zero_star").checked = Boolean(values.cfg_zero_star);
  if (values.upscale !== undefined || record) setField("upscale", String(values.upscale || "off"));
  if (values.quantization) setField("quantization", values.quantization);
  if (values.format && values.task !== "t2i") setField("format", values.format);
}

function fillFromPrompt(prompt) {
  const nodes = Object.values(prompt || {});
  const gen = nodes.find((n) => n && n.class_type === "KinemaGenerate");
  if (!gen) return false;
  const v = {};
  for (const [k, x] of Object.entries(gen.inputs || {})) if (!Array.isArray(x)) v[k] = x;
  fillForm(v);
  const loader = nodes.find((n) => n && n.class_type === "KinemaPipelineLoader");
  if (loader) {
    const i = loader.inputs || {};
    for (const k of ["ckpt", "dtype", "quantization", "attention", "blocks_to_swap"]) setField(k, i[k]);
    setField("lora", i.lora_1 || "none");
    if (i.strength_1 !== undefined) setField("lora_strength", i.strength_1);
  }
  const save = nodes.find((n) => n && n.class_type === "KinemaSaveVideo");
  if (save && save.inputs) {
    if (save.inputs.format && v.task !== "t2i") setField("format", save.inputs.format);
    if (typeof save.inputs.filename_prefix === "string") setField("filename_prefix", save.inputs.filename_prefix);
  }
  for (const input of TASK_INPUTS[v.task] || []) {
    const link = (gen.inputs || {})[input];
    const src = Array.isArray(link) && prompt[link[0]];
    const name = src && src.inputs && (src.inputs.image || src.inputs.video);
    if (typeof name === "string") showUpload(input, name);
  }
  return true;
}

// -- uploads -----------------------------------------------------------------------------------
function viewUrl(file) {
  const q = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder || "", type: file.type || "output" });
  return withToken("/view?" + q.toString());
}

function showUpload(input, name) {
  state.uploads[input] = name;
  const box = document.querySelector(`.upload[data-for="${input}"]`);
  const slash = name.lastIndexOf("/");
  const file = { filename: name.slice(slash + 1), subfolder: slash > 0 ? name.slice(0, slash) : "", type: "input" };
  box.querySelector(".status").textContent = name;
  const thumb = box.querySelector(".thumb");
  thumb.src = viewUrl(file);
  thumb.hidden = false;
}

async function upload(input, file) {
  const box = document.querySelector(`.upload[data-for="${input}"]`);
  box.querySelector(".status").textContent = "uploading…";
  delete state.uploads[input];
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("type", "input");
  try {
    const r = await api("/upload/image", { method: "POST", body: form });
    showUpload(input, r.subfolder ? `${r.subfolder}/${r.name}` : r.name);
  } catch (e) {
    box.querySelector(".status").textContent = "not uploaded";
    throw new ApiError(`uploading ${file.name}: ${e.message}`, e.status, e.body);
  }
}

// -- queueing ----------------------------------------------------------------------------------
async function queuePrompt(prompt, extra = {}) {
  const body = { prompt, client_id: clientId, extra_data: extra };
  const r = await api("/prompt", { method: "POST", json: body });
  if (r && r.node_errors && Object.keys(r.node_errors).length) message(describeError(r, 200));
  state.mine.add(r.prompt_id);
  setProgress(0, 1, "queued");
  refreshQueue();
  return r.prompt_id;
}

const submit = guard(async (ev) => {
  ev.preventDefault();
  const prompt = buildPrompt();
  await queuePrompt(prompt, { extra_pnginfo: { kinema_page: { task: state.task } } });
});

// -- progress, previews, results ---------------------------------------------------------------
function setProgress(value, max, text) {
  const bar = $("progress");
  bar.max = max || 1;
  bar.value = value;
  $("progress-text").textContent = text;
}

function outputsOf(entry) {
  const files = [];
  let settings = null;
  for (const out of Object.values((entry && entry.outputs) || {})) {
    for (const f of [...(out.gifs || []), ...(out.images || []), ...(out.videos || []), ...(out.video || [])]) {
      if (f && f.filename) files.push(f);
    }
    if (out.settings && out.settings[0]) settings = out.settings[0];
  }
  return { files, settings };
}

function isVideo(file) {
  if (file.format && VIDEO_MIME.test(file.format)) return true;
  return /\.(mp4|webm|mov|mkv)$/i.test(file.filename);
}

function mediaElement(file, { controls = true, autoplay = true } = {}) {
  let el;
  if (isVideo(file)) {
    el = document.createElement("video");
    el.muted = true; el.loop = true; el.playsInline = true; el.controls = controls; el.autoplay = autoplay;
    el.preload = "auto";
  } else {
    el = document.createElement("img");
    el.alt = file.filename;
  }
  el.src = viewUrl(file);
  return el;
}

function showResult(promptId, entry) {
  const { files, settings } = outputsOf(entry);
  if (!files.length) return false;
  if (state.shown === promptId) return true;  // already playing (from the "executed" message)
  const file = files[files.length - 1];
  const box = $("result");
  box.classList.remove("empty");
  const el = mediaElement(file);
  el.id = "result-media";
  el.dataset.promptId = promptId;
  box.replaceChildren(el);
  if (el.tagName === "VIDEO") el.play().catch(() => {});
  const a = $("download");
  a.href = viewUrl(file);
  a.download = file.filename;
  a.textContent = "Download " + file.filename;
  a.hidden = false;
  const pre = $("result-settings");
  pre.textContent = settings ? JSON.stringify(settings, null, 1) : "";
  pre.hidden = !settings;
  $("preview").hidden = true;
  state.shown = promptId;
  return true;
}

async function finished(promptId, tries = 5) {
  try {
    const h = await api("/history/" + encodeURIComponent(promptId));
    const entry = h && h[promptId];
    if (!entry && tries > 0) { setTimeout(() => finished(promptId, tries - 1), 400); return; }
    if (entry) {
      const status = entry.status || {};
      if (status.status_str === "error") {
        if (!state.reported.has(promptId)) message(errorOfStatus(status) || "the run failed");
      } else if (state.mine.has(promptId) && !showResult(promptId, entry)) {
        message("the run finished without a file to show", "info");
      }
    }
  } finally {
    refreshHistory();
    refreshQueue();
  }
}

function errorOfStatus(status) {
  for (const [type, data] of status.messages || []) {
    if (type === "execution_error") return `${data.node_type || "node"} ${data.node_id || ""}: ${data.exception_message}`;
    if (type === "execution_interrupted") return "interrupted";
  }
  return null;
}

// -- websocket ---------------------------------------------------------------------------------
function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(withToken(`${proto}//${location.host}/ws?clientId=${encodeURIComponent(clientId)}`));
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => { state.wsDelay = 500; setConnection(true); refreshQueue(); };
  ws.onclose = () => {
    setConnection(false);
    setTimeout(connect, state.wsDelay);
    state.wsDelay = Math.min(state.wsDelay * 2, 10000);
  };
  ws.onmessage = (ev) => {
    try {
      if (typeof ev.data === "string") onMessage(JSON.parse(ev.data));
      else onPreview(ev.data);
    } catch (e) { console.error(e); }
  };
}

function setConnection(up) {
  const el = $("connection");
  el.textContent = up ? "connected" : "disconnected";
  el.classList.toggle("ok", up);
  el.classList.toggle("bad", !up);
}

function onPreview(buf) {
  if (buf.byteLength <= 8) return;
  const view = new DataView(buf);
  if (view.getUint32(0) !== 1) return;  // 1: PREVIEW_IMAGE
  const type = view.getUint32(4) === 2 ? "image/png" : "image/jpeg";
  const img = $("preview");
  const old = img.src;
  img.src = URL.createObjectURL(new Blob([buf.slice(8)], { type }));
  img.hidden = false;
  if (old && old.startsWith("blob:")) URL.revokeObjectURL(old);
}

function onMessage({ type, data }) {
  data = data || {};
  switch (type) {
    case "status": {
      const remaining = (((data.status || {}).exec_info) || {}).queue_remaining;
      if (remaining !== undefined) $("queue-count").textContent = `queue ${remaining}`;
      refreshQueue();
      break;
    }
    case "execution_start":
      state.running = data.prompt_id;
      setProgress(0, 1, "starting");
      refreshQueue();
      break;
    case "execution_cached":
      if ((data.nodes || []).length) $("progress-text").textContent = `${data.nodes.length} nodes from the cache`;
      break;
    case "executing":
      if (data.node === null || data.node === undefined) {  // the end of a prompt, its history written
        if (data.prompt_id) { state.running = null; finished(data.prompt_id); }
      } else {
        const node = nodeLabel(data.prompt_id, data.node);
        $("progress-text").textContent = `running ${node}`;
      }
      break;
    case "progress":
      setProgress(data.value, data.max, `${nodeLabel(data.prompt_id, data.node)}: step ${data.value} / ${data.max}`);
      break;
    case "executed":
      if (data.output && state.mine.has(data.prompt_id)) showResult(data.prompt_id, { outputs: { [data.node]: data.output } });
      break;
    case "execution_success":
      setProgress(1, 1, "done");
      break;
    case "execution_error":
      setProgress(0, 1, "failed");
      state.reported.add(data.prompt_id);
      message(`${data.node_type || "a node"} (${data.node_id ?? "?"}) failed: ${data.exception_message || data.exception_type || "error"}`);
      break;
    case "execution_interrupted":
      setProgress(0, 1, "interrupted");
      state.reported.add(data.prompt_id);
      message("the run was interrupted", "info");
      break;
  }
}

const lastPrompts = {};
function nodeLabel(promptId, node) {
  const p = lastPrompts[promptId];
  const cls = p && p[node] && p[node].class_type;
  return cls ? `${cls} (${node})` : `node ${node}`;
}

// -- queue panel -------------------------------------------------------------------------------
let queueTimer = null;
function refreshQueue() {
  clearTimeout(queueTimer);
  queueTimer = setTimeout(guard(drawQueue), 50);
}

function summary(prompt) {
  const gen = Object.values(prompt || {}).find((n) => n && n.class_type === "KinemaGenerate");
  if (gen && gen.inputs) return `${gen.inputs.task}: ${String(gen.inputs.prompt || "").slice(0, 80)}`;
  return `workflow, ${Object.keys(prompt || {}).length} nodes`;
}

async function drawQueue() {
  const q = await api("/queue");
  const list = $("queue");
  list.replaceChildren();
  const rows = [...(q.queue_running || []).map((i) => [i, true]), ...(q.queue_pending || []).map((i) => [i, false])];
  $("queue-count").textContent = `queue ${rows.length}`;
  if (!rows.length) {
    const li = document.createElement("li"); li.className = "muted"; li.textContent = "empty"; list.append(li);
    return;
  }
  for (const [item, running] of rows) {
    const [number, id, prompt] = item;
    lastPrompts[id] = prompt;
    const li = document.createElement("li");
    li.className = running ? "running" : "pending";
    const span = document.createElement("span");
    span.textContent = `#${number} ${running ? "running" : "waiting"} · ${summary(prompt)}`;
    const b = document.createElement("button");
    b.type = "button"; b.className = "quiet";
    b.textContent = running ? "stop" : "remove";
    b.onclick = guard(async () => {
      if (running) await api("/interrupt", { method: "POST", json: { prompt_id: id } });
      else await api("/queue", { method: "POST", json: { delete: [id] } });
      refreshQueue();
    });
    li.append(span, b);
    list.append(li);
  }
}

// -- history -----------------------------------------------------------------------------------
let historyTimer = null;
function refreshHistory() {
  clearTimeout(historyTimer);
  historyTimer = setTimeout(guard(drawHistory), 50);
}

async function drawHistory() {
  const h = await api("/history?max_items=48");
  const entries = Object.entries(h || {}).filter(([, e]) => e && Array.isArray(e.prompt));
  entries.sort((a, b) => (b[1].prompt[0] ?? 0) - (a[1].prompt[0] ?? 0));
  const box = $("history");
  box.replaceChildren();
  if (!entries.length) {
    const p = document.createElement("p"); p.className = "muted"; p.textContent = "nothing yet"; box.append(p);
    return;
  }
  for (const [id, entry] of entries) box.append(historyCard(id, entry));
}

function historyCard(id, entry) {
  const [number, , prompt, extra] = entry.prompt;
  lastPrompts[id] = prompt;
  const { files, settings } = outputsOf(entry);
  const status = entry.status || {};
  const card = document.createElement("article");
  card.className = "card " + (status.status_str || "");
  card.dataset.promptId = id;
  const media = document.createElement("div");
  media.className = "media";
  if (files.length) {  // still until hovered: a long history must not play dozens of clips at once
    const el = mediaElement(files[files.length - 1], { controls: false, autoplay: false });
    if (el.tagName === "VIDEO") {
      media.onmouseenter = () => el.play().catch(() => {});
      media.onmouseleave = () => el.pause();
    }
    media.append(el);
  }
  else media.textContent = status.status_str === "error" ? "failed" : "no file";
  const title = document.createElement("p");
  title.className = "title";
  title.textContent = `#${number} · ${summary(prompt)}`;
  const info = document.createElement("details");
  const sum = document.createElement("summary");
  const s = settings || {};
  sum.textContent = settings
    ? `${s.extend_frames !== undefined ? `extended by ${s.extend_frames} frames (overlap ${s.overlap_frames})`
        : `${s.width}×${s.height}, ${s.frame_num} frames`}, ${s.steps} steps, seed ${s.seed}, cfg ${s.guide_scale}`
    : (errorOfStatus(status) || status.status_str || "settings");
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(settings || prompt, null, 1);
  info.append(sum, pre);
  const again = document.createElement("button");
  again.type = "button"; again.className = "run-again"; again.textContent = "Run again";
  again.title = "fill the form with these settings and queue the same prompt again";
  again.onclick = guard(async () => {
    fillFromPrompt(prompt);
    await queuePrompt(prompt, extra || {});
  });
  const use = document.createElement("button");
  use.type = "button"; use.className = "quiet"; use.textContent = "Use settings";
  use.onclick = guard(async () => {
    if (!fillFromPrompt(prompt)) throw new Error("this run is not a Kinema page run; load it with “Run again” instead");
    if (settings) fillForm(settings);
    message("settings copied into the form", "info");
  });
  const row = document.createElement("div");
  row.className = "row";
  row.append(again, use);
  if (files.length) {
    const a = document.createElement("a");
    a.href = viewUrl(files[files.length - 1]); a.download = files[files.length - 1].filename; a.textContent = "download";
    row.append(a);
  }
  card.append(media, title, info, row);
  return card;
}

// -- Load: a workflow (UI or API JSON), a settings .json, or a Kinema output file -------------------
function isApiPrompt(obj) {
  const values = Object.values(obj || {});
  return values.length > 0 && values.every((n) => n && typeof n === "object" && typeof n.class_type === "string");
}

function isUiWorkflow(obj) {
  return obj && Array.isArray(obj.nodes) && Array.isArray(obj.links);
}

function offerWorkflow(prompt, extra, label) {
  state.loaded = { prompt, extra, label };
  $("loaded-text").textContent = label;
  $("loaded").hidden = false;
}

function loadJson(obj, name) {
  if (obj && obj.prompt && isApiPrompt(obj.prompt)) obj = obj.prompt;  // a saved POST /prompt body
  if (isUiWorkflow(obj)) {
    offerWorkflow(obj, { extra_pnginfo: { workflow: obj } }, `${name}: a ComfyUI workflow (${obj.nodes.length} nodes, UI format)`);
    return;
  }
  if (isApiPrompt(obj)) {
    const filled = fillFromPrompt(obj);
    offerWorkflow(obj, {}, `${name}: an API-format prompt (${Object.keys(obj).length} nodes)` +
      (filled ? "; its settings are in the form too" : ""));
    return;
  }
  if (obj && typeof obj === "object" && typeof obj.prompt === "string") {
    fillForm(obj);
    message(`${name}: settings loaded into the form`, "info");
    return;
  }
  throw new Error(`${name} is neither a ComfyUI workflow (UI or API JSON) nor Kinema settings`);
}

// The settings JSON a Kinema writer embeds: the mp4 / mov / webm comment tag and the PNG text chunk hold it
// as plain UTF-8, so the object around its "kinema_version" key is found by matching braces.
function findSettings(bytes) {
  const text = new TextDecoder("utf-8", { fatal: false }).decode(bytes);
  let best = null;
  for (let at = text.indexOf('"kinema_version"'); at >= 0; at = text.indexOf('"kinema_version"', at + 1)) {
    for (let start = text.lastIndexOf("{", at); start >= 0 && at - start < 200000; start = text.lastIndexOf("{", start - 1)) {
      const obj = balanced(text, start);
      if (obj && typeof obj === "object" && "kinema_version" in obj) { best = obj; break; }
      if (start === 0) break;
    }
    if (best) break;
  }
  return best;
}

function balanced(text, start) {
  let depth = 0, inString = false;
  for (let i = start; i < text.length && i - start < 400000; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "{") depth++;
    else if (c === "}") {
      depth--;
      if (depth === 0) {
        try { return JSON.parse(text.slice(start, i + 1)); } catch (_) { return null; }
      }
    }
  }
  return null;
}

// ComfyUI's PNGs carry "prompt" / "workflow" tEXt chunks.
function pngText(bytes) {
  const out = {};
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.length < 8 || view.getUint32(0) !== 0x89504e47) return out;
  const latin = new TextDecoder("latin1"), utf8 = new TextDecoder("utf-8");
  for (let p = 8; p + 8 <= bytes.length;) {
    const len = view.getUint32(p), type = latin.decode(bytes.subarray(p + 4, p + 8));
    const data = bytes.subarray(p + 8, p + 8 + len);
    if (type === "tEXt" || type === "iTXt") {
      const zero = data.indexOf(0);
      const key = latin.decode(data.subarray(0, zero));
      let rest = data.subarray(zero + 1);
      if (type === "iTXt") {
        if (rest[0] !== 0) { p += 12 + len; continue; }  // compressed: not read here
        let z = rest.indexOf(0, 2); z = rest.indexOf(0, z + 1);
        rest = rest.subarray(z + 1);
      }
      out[key] = utf8.decode(rest);
    }
    if (type === "IEND") break;
    p += 12 + len;
  }
  return out;
}

const loadFile = guard(async (file) => {
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  if (/\.json$/i.test(file.name) || bytes[0] === 0x7b) {
    let obj;
    try { obj = JSON.parse(new TextDecoder().decode(bytes)); } catch (e) { throw new Error(`${file.name} is not valid JSON (${e.message})`); }
    loadJson(obj, file.name);
    return;
  }
  const settings = findSettings(bytes);
  if (settings) {
    fillForm(settings);
    message(`${file.name}: its settings are in the form (seed ${settings.seed}, ${settings.steps} steps)`, "info");
    return;
  }
  const text = pngText(bytes);
  for (const key of ["workflow", "prompt"]) {
    if (text[key]) {
      try { loadJson(JSON.parse(text[key]), file.name); return; } catch (_) { /* try the next */ }
    }
  }
  const sidecar = /\.(gif|webp)$/i.test(file.name) ? `; a ${file.name.split(".").pop()} keeps its settings in ${file.name}.json beside it: load that` : "";
  throw new Error(`${file.name} holds no Kinema settings or ComfyUI workflow${sidecar}`);
});

// -- wiring ------------------------------------------------------------------------------------
function init() {
  setTask("t2v");
  for (const b of document.querySelectorAll("#tasks [role=tab]")) b.onclick = () => setTask(b.dataset.task);
  $("seed-random").onclick = () => { $("seed").value = Math.floor(Math.random() * 2 ** 48); };
  $("form").addEventListener("submit", submit);
  $("interrupt").onclick = guard(async () => { await api("/interrupt", { method: "POST", json: {} }); });
  $("history-refresh").onclick = refreshHistory;
  for (const box of document.querySelectorAll(".upload")) {
    const input = box.dataset.for;
    box.querySelector("input[type=file]").addEventListener("change", guard(async (ev) => {
      const f = ev.target.files[0];
      if (f) await upload(input, f);
    }));
  }
  $("load-file").addEventListener("change", (ev) => { loadFile(ev.target.files[0]); ev.target.value = ""; });
  $("loaded-dismiss").onclick = () => { state.loaded = null; $("loaded").hidden = true; };
  $("loaded-queue").onclick = guard(async () => {
    if (!state.loaded) return;
    const { prompt, extra } = state.loaded;
    await queuePrompt(prompt, extra);
    state.loaded = null;
    $("loaded").hidden = true;
  });
  window.addEventListener("error", (e) => message(`page error: ${e.message}`));
  window.addEventListener("unhandledrejection", (e) => message(`page error: ${(e.reason && e.reason.message) || e.reason}`));
  guard(loadObjectInfo)();
  refreshHistory();
  connect();
}

document.addEventListener("DOMContentLoaded", init);

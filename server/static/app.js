// streamgen browser client (protocol streamgen-stream/1, see PROTOCOL.md). Plain JS, no build step.
// Keys (the same as `streamgen demo`): W/A/S/D move, arrow keys turn (left/right) and look (up/down),
// drag on the picture to turn. Keys reach the stream while the picture has focus (click it; Start
// focuses it); no pointer lock, so every button stays clickable.
"use strict";
const $ = (id) => document.getElementById(id);
const HEADER = 24;
const TURN = 0.5;            // mouse dx/dy while an arrow key is held (demo: TURN_RATE)
const DRAG_GAIN = 2.0;       // a drag across the whole picture in ~one chunk = mouse 2.0 (demo: DRAG_GAIN)
const MAX_RECORD = 64 << 20; // bytes of fMP4 kept for the download
const sg = window.sg = {
  ws: null, ready: null, seq: 0, sentLog: [], framesDrawn: 0, lastFrame: -1, lastFrameSeq: -1,
  sentAt: new Map(), latencies: [], stats: null, errors: [], keys: new Set(), turns: new Set(), mouse: [0, 0],
  state: "idle", model: null, segments: [], segBytes: 0, recorder: null, chunks: [], startField: true,
};

function token() { return new URLSearchParams(location.search).get("token"); }
function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const t = token();
  return `${proto}//${location.host}/v1/stream` + (t ? `?token=${encodeURIComponent(t)}` : "");
}

function send(obj) {
  if (sg.ws && sg.ws.readyState === WebSocket.OPEN) sg.ws.send(JSON.stringify(obj));
}

function setStatus(text, isError) {
  $("status").textContent = isError ? "" : text;
  $("err").textContent = isError ? text : "";
}

// ---------------------------------------------------------------- actions
const KEYMAP = { KeyW: "W", KeyA: "A", KeyS: "S", KeyD: "D" };
const TURNMAP = { ArrowLeft: [-TURN, 0], ArrowRight: [TURN, 0], ArrowUp: [0, -TURN], ArrowDown: [0, TURN] };

function currentAction() {
  const space = sg.ready ? sg.ready.action_space : { keys: [], mouse: false, mouse_range: 1 };
  const keys = space.keys.filter((k) => sg.keys.has(k));
  const r = space.mouse_range || 1;
  const clamp = (v) => Math.round(Math.max(-r, Math.min(r, v)) * 1e4) / 1e4;
  let mx = sg.mouse[0], my = sg.mouse[1];
  for (const t of sg.turns) { mx += TURNMAP[t][0]; my += TURNMAP[t][1]; }
  const mouse = space.mouse ? [clamp(mx), clamp(my)] : [0, 0];
  return { keys, mouse };
}

let lastSent = "";
function sendAction(force) {
  if (!sg.ready) return;
  const a = currentAction();
  const key = JSON.stringify(a);
  if (key === lastSent && !force) return;
  lastSent = key;
  sg.seq += 1;
  sg.sentAt.set(sg.seq, performance.now());
  sg.sentLog.push({ seq: sg.seq, keys: a.keys, mouse: a.mouse });
  if (sg.sentLog.length > 200) sg.sentLog.shift();
  send({ type: "action", seq: sg.seq, keys: a.keys, mouse: a.mouse });
  renderKeys();
}

function renderKeys() {
  const space = sg.ready ? sg.ready.action_space.keys : ["W", "A", "S", "D"];
  const arrows = [["ArrowLeft", "←"], ["ArrowUp", "↑"], ["ArrowDown", "↓"], ["ArrowRight", "→"]];
  $("keys").innerHTML = space.map((k) => `<span class="${sg.keys.has(k) ? "on" : ""}">${k}</span>`).join("")
    + arrows.map(([c, s]) => `<span class="${sg.turns.has(c) ? "on" : ""}">${s}</span>`).join("");
}

// ---------------------------------------------------------------- media
let ctx = null, mse = null, sb = null, pending = [];
function onFrameMeta(view) {
  const frame = view.getUint32(8, true), seq = view.getUint32(12, true);
  sg.lastFrame = frame;
  if (seq !== 0xFFFFFFFF) {
    sg.lastFrameSeq = seq;
    for (const [s, t] of sg.sentAt) {
      if (s <= seq) { sg.latencies.push(performance.now() - t); sg.sentAt.delete(s); }
    }
    if (sg.latencies.length > 200) sg.latencies.splice(0, sg.latencies.length - 200);
  }
}

async function onBinary(buf) {
  const view = new DataView(buf);
  if (buf.byteLength < HEADER || view.getUint32(0, false) !== 0x53474631) return;  // "SGF1"
  const kind = view.getUint8(4);
  const payload = buf.slice(HEADER);
  if (kind === 1) {
    onFrameMeta(view);
    const bmp = await createImageBitmap(new Blob([payload], { type: "image/jpeg" }));
    ctx.drawImage(bmp, 0, 0, ctx.canvas.width, ctx.canvas.height);
    bmp.close();
    sg.framesDrawn += 1;
  } else if (kind === 2 || kind === 3) {
    if (kind === 3) { onFrameMeta(view); sg.framesDrawn += 1; }
    if (kind === 2 || sg.segBytes + payload.byteLength <= MAX_RECORD) {
      sg.segments.push(payload); sg.segBytes += payload.byteLength;
    }
    pending.push(payload);
    pump();
  }
}

function pump() {
  if (!sb || sb.updating || !pending.length) return;
  sb.appendBuffer(pending.shift());
}

function setupMse() {
  const video = $("video");
  mse = new MediaSource();
  video.src = URL.createObjectURL(mse);
  mse.addEventListener("sourceopen", () => {
    sb = mse.addSourceBuffer('video/mp4; codecs="avc1.42E01E"');
    sb.mode = "sequence";
    sb.addEventListener("updateend", () => {
      const b = video.buffered;
      if (b.length && b.end(b.length - 1) - video.currentTime > 0.5) video.currentTime = b.end(b.length - 1) - 0.05;
      pump();
    });
    pump();
  });
}

// ---------------------------------------------------------------- recording (download)
function startRecorder(fps) {
  sg.chunks = []; sg.recorder = null;
  const c = $("screen");
  if (!c.captureStream || !window.MediaRecorder) return;
  try {
    const rec = new MediaRecorder(c.captureStream(fps), { mimeType: "video/webm" });
    rec.ondataavailable = (e) => { if (e.data && e.data.size) sg.chunks.push(e.data); };
    rec.start(1000);
    sg.recorder = rec;
  } catch (e) { sg.recorder = null; }
}

function saveBlob(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name;
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

function download() {
  const seed = sg.lastSeed ?? "x", n = sg.framesDrawn;
  if (sg.codec === "fmp4" && sg.segments.length) {
    saveBlob(new Blob(sg.segments, { type: "video/mp4" }), `streamgen-seed${seed}-${n}f.mp4`);
  } else if (sg.recorder || sg.chunks.length) {
    const finish = () => saveBlob(new Blob(sg.chunks, { type: "video/webm" }), `streamgen-seed${seed}-recording.webm`);
    if (sg.recorder && sg.recorder.state === "recording") {
      sg.recorder.addEventListener("dataavailable", finish, { once: true });
      sg.recorder.requestData();
    } else finish();
  } else setStatus("nothing to download yet: press Start first", true);
}

function describeDownload() {
  const w = sg.ready ? sg.ready.width : 64, h = sg.ready ? sg.ready.height : 64;
  const c = $("screen");
  $("download").title = sg.codec === "fmp4"
    ? `the H.264 stream as received: an MP4 at the model's ${w}x${h}`
    : `a WebM recording of the picture at ${c.width}x${c.height} (${c.width / w}x nearest-neighbour)`;
  $("download").textContent = sg.codec === "fmp4" ? `Download MP4 (${w}x${h}, as streamed)`
    : `Download WebM (${c.width}x${c.height} recording)`;
}

// ---------------------------------------------------------------- session
function startMessage() {
  const msg = { type: "start", prompt: $("prompt").value, codec: sg.codec };
  const seed = $("seed").value.trim();
  if (seed !== "") msg.seed = Number(seed);
  if (sg.startField) msg.start = $("start-from").value;
  return msg;
}

function start() {
  stop(true);
  const codec = sg.codec = $("codec").value;
  if (codec === "fmp4" && !(window.MediaSource && MediaSource.isTypeSupported('video/mp4; codecs="avc1.42E01E"'))) {
    setStatus("this browser has no MSE H.264; use JPEG", true);
    return;
  }
  const seed = $("seed").value.trim();
  if (seed !== "" && !/^\d+$/.test(seed)) { setStatus("seed must be a whole number >= 0 (or blank: random)", true); return; }
  setStatus("connecting…");
  sg.state = "connecting"; sg.segments = []; sg.segBytes = 0; sg.framesDrawn = 0; sg.lastFrame = -1;
  const ws = sg.ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify(startMessage()));
  ws.onmessage = (ev) => {
    if (ws !== sg.ws) return;
    if (typeof ev.data !== "string") return onBinary(ev.data);
    const m = JSON.parse(ev.data);
    if (m.type === "ready") {
      sg.ready = m; sg.state = "streaming"; sg.lastSeed = m.seed;
      const c = $("screen");
      const k = Math.max(1, Math.floor(256 / Math.max(m.width, m.height)));
      c.width = m.width * k; c.height = m.height * k;
      ctx = c.getContext("2d"); ctx.imageSmoothingEnabled = false;
      $("video").hidden = codec !== "fmp4";
      c.hidden = codec === "fmp4";
      if (codec === "fmp4") setupMse(); else startRecorder(m.fps);
      $("switch").disabled = $("stop").disabled = false;
      const from = m.start || m.start_source || (sg.startField ? $("start-from").selectedOptions[0].text : "noise");
      setStatus(`streaming · seed ${m.seed} · opening frames: ${from}`);
      describeDownload();
      $("stage").focus();
      renderKeys();
      sendAction(true);
    } else if (m.type === "stats") {
      sg.stats = m;
    } else if (m.type === "error") {
      sg.errors.push(m);
      if (m.code === "bad_request" && sg.startField && /start/.test(m.message) && /unknown field/.test(m.message)) {
        sg.startField = false;          // an older server: no opening-frames choice, it starts from noise
        $("start-from").disabled = true;
        $("start-note").textContent = "this server has no opening-frames choice: streams start from noise";
        ws.send(JSON.stringify(startMessage()));
        return;
      }
      setStatus(`${m.code}: ${m.message}`, true);
    } else if (m.type === "end") {
      sg.state = "stopped";
      if (m.reason === "stopped") setStatus(`stopped · ${m.frames} frames`);
      else setStatus(`stream ended: ${m.reason}${m.message ? " (" + m.message + ")" : ""}`, m.reason !== "max_length");
    }
    renderStats();
  };
  ws.onclose = (ev) => {
    if (ws !== sg.ws && sg.ws !== null) return;
    $("switch").disabled = $("stop").disabled = true;
    if (sg.state !== "stopped" && ev.code !== 1000) setStatus(`connection closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`, true);
    else if (sg.state !== "stopped") setStatus("stopped");
    sg.state = "stopped"; sg.ready = null;
    if (sg.recorder && sg.recorder.state === "recording") sg.recorder.requestData();
    renderStats();
  };
}

function stop(quiet) {
  const ws = sg.ws;
  if (ws) {
    if (!quiet) { sg.state = "stopped"; setStatus(`stopped · ${sg.framesDrawn} frames`); }
    send({ type: "stop" });
    // let the server's `end` arrive, then close normally (1000): a stop is not an error
    setTimeout(() => { if (ws.readyState <= WebSocket.OPEN) ws.close(1000, "stopped"); }, 300);
  }
  sg.ws = null; sg.ready = null; sb = null; pending = [];
  $("switch").disabled = $("stop").disabled = true;
  renderStats();
}

function renderStats() {
  const s = sg.stats || {};
  const live = sg.state === "streaming";
  const lat = [...sg.latencies].sort((a, b) => a - b);
  const p = (q) => lat.length ? lat[Math.min(lat.length - 1, Math.round(q * (lat.length - 1)))].toFixed(0) : "-";
  const m = sg.model || {};
  $("stats").textContent = [
    `status       ${sg.state}`,
    `session      ${sg.ready ? sg.ready.session : "-"}  seed ${sg.lastSeed ?? "-"}`,
    `frame        ${sg.lastFrame}`,
    `fps          ${live ? s.fps ?? "-" : "-"}`,
    `chunk ms     ${live ? s.chunk_latency_ms ?? "-" : "-"}`,
    `queue        ${live ? s.queue_depth ?? "-" : "-"} / ${s.max_queue_frames ?? "-"}`,
    `dropped      ${s.dropped_frames ?? "-"}`,
    `batch        ${live ? s.batch ?? "-" : "-"} of ${s.sessions ?? "-"} sessions`,
    `action->frame p50 ${p(0.5)} ms  p90 ${p(0.9)} ms`,
    `last action  #${sg.seq} ${lastSent}`,
    `reflected    #${sg.lastFrameSeq}`,
    `device       ${m.device ?? "-"} · ${m.dtype ?? "-"} · attention ${m.attn_backend ?? "-"}`,
  ].join("\n");
}

async function loadModelInfo() {
  try {
    const t = token();
    const r = await fetch("/v1/models" + (t ? `?token=${encodeURIComponent(t)}` : ""));
    if (!r.ok) return;
    const m = sg.model = (await r.json()).loaded;
    $("model").textContent = `model ${m.source} · ${m.width}x${m.height} @ ${m.fps} fps · ${m.chunk_frames} frames/chunk`
      + ` · ${m.steps} steps · device ${m.device} · ${m.dtype} · attention ${m.attn_backend}`;
    $("untrained").hidden = !!m.trained;
    const world = m.action_space && m.action_space.keys.length > 0;
    $("start-from").value = world ? "world" : "noise";
    $("start-from").querySelector('option[value="world"]').disabled = !world;
    renderStats();
  } catch (e) { /* the page still works without it */ }
}

// ---------------------------------------------------------------- input
const stage = $("stage");
function inGame() { return document.activeElement === stage; }
document.addEventListener("keydown", (ev) => {
  if (!inGame() || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = KEYMAP[ev.code], t = TURNMAP[ev.code] ? ev.code : null;
  if (ev.code === "Escape") { stage.blur(); return; }
  if (!k && !t) return;
  ev.preventDefault();
  if (ev.repeat) return;
  if (k) sg.keys.add(k); else sg.turns.add(t);
  sendAction();
});
document.addEventListener("keyup", (ev) => {
  const k = KEYMAP[ev.code];
  if (k && sg.keys.has(k)) { sg.keys.delete(k); sendAction(); }
  if (sg.turns.has(ev.code)) { sg.turns.delete(ev.code); sendAction(); }
});
const releaseAll = () => { sg.keys.clear(); sg.turns.clear(); sendAction(); };
window.addEventListener("blur", releaseAll);
stage.addEventListener("blur", releaseAll);
let drag = null, dragAcc = [0, 0];
stage.addEventListener("pointerdown", (ev) => {
  stage.focus();
  if (ev.button !== 0) return;
  const r = stage.getBoundingClientRect();
  drag = { id: ev.pointerId, x: ev.clientX, y: ev.clientY, w: Math.max(1, r.width), h: Math.max(1, r.height) };
  ev.preventDefault();
});
document.addEventListener("pointermove", (ev) => {
  if (!drag || drag.id !== ev.pointerId) return;
  dragAcc[0] += (ev.clientX - drag.x) / drag.w; dragAcc[1] += (ev.clientY - drag.y) / drag.h;
  drag.x = ev.clientX; drag.y = ev.clientY;
});
const endDrag = (ev) => { if (drag && drag.id === ev.pointerId) drag = null; };
document.addEventListener("pointerup", endDrag);
document.addEventListener("pointercancel", endDrag);
// drag: the movement of the last 50 ms, as if it lasted ~one chunk (200 ms), scaled by DRAG_GAIN
setInterval(() => {
  const m = [DRAG_GAIN * dragAcc[0] * 4, DRAG_GAIN * dragAcc[1] * 4];
  dragAcc = [0, 0];
  if (m[0] !== sg.mouse[0] || m[1] !== sg.mouse[1]) { sg.mouse = m; sendAction(); }
  renderStats();
}, 50);

$("start").onclick = start;
$("stop").onclick = () => stop(false);
$("switch").onclick = () => send({ type: "prompt", prompt: $("prompt").value });
$("download").onclick = download;
$("codec").onchange = () => { sg.codec = $("codec").value; describeDownload(); };
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter") (sg.ready ? $("switch") : $("start")).click(); });
sg.codec = $("codec").value;
renderKeys();
describeDownload();
const params = new URLSearchParams(location.search);
if (params.get("codec")) $("codec").value = sg.codec = params.get("codec");
loadModelInfo().then(() => { if (params.get("autostart") === "1") start(); });

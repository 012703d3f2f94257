// streamgen browser client (protocol streamgen-stream/1, see PROTOCOL.md). Plain JS, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const HEADER = 24;
const sg = window.sg = {
  ws: null, ready: null, seq: 0, sentLog: [], framesDrawn: 0, lastFrame: -1, lastFrameSeq: -1,
  sentAt: new Map(), latencies: [], stats: null, errors: [], keys: new Set(), mouse: [0, 0],
};

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  return `${proto}//${location.host}/v1/stream` + (token ? `?token=${encodeURIComponent(token)}` : "");
}

function send(obj) {
  if (sg.ws && sg.ws.readyState === WebSocket.OPEN) sg.ws.send(JSON.stringify(obj));
}

function currentAction() {
  const space = sg.ready ? sg.ready.action_space : { keys: [], mouse: false, mouse_range: 1 };
  const keys = space.keys.filter((k) => sg.keys.has(k));
  const r = space.mouse_range || 1;
  const clamp = (v) => Math.max(-r, Math.min(r, v));
  const mouse = space.mouse ? [clamp(sg.mouse[0]), clamp(sg.mouse[1])] : [0, 0];
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
  $("keys").innerHTML = space.map((k) => `<span class="${sg.keys.has(k) ? "on" : ""}">${k}</span>`).join("");
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

// ---------------------------------------------------------------- session
function start() {
  stop();
  const codec = $("codec").value;
  if (codec === "fmp4" && !(window.MediaSource && MediaSource.isTypeSupported('video/mp4; codecs="avc1.42E01E"'))) {
    $("err").textContent = "this browser has no MSE H.264; use JPEG";
    return;
  }
  $("err").textContent = "";
  const ws = sg.ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", prompt: $("prompt").value, codec }));
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") return onBinary(ev.data);
    const m = JSON.parse(ev.data);
    if (m.type === "ready") {
      sg.ready = m;
      const c = $("screen");
      c.width = m.width; c.height = m.height;
      ctx = c.getContext("2d");
      $("video").hidden = codec !== "fmp4";
      c.hidden = codec === "fmp4";
      if (codec === "fmp4") setupMse();
      $("switch").disabled = $("stop").disabled = false;
      renderKeys();
      sendAction(true);
    } else if (m.type === "stats") {
      sg.stats = m;
    } else if (m.type === "error") {
      sg.errors.push(m);
      $("err").textContent = `${m.code}: ${m.message}`;
    } else if (m.type === "end") {
      $("err").textContent = `stream ended: ${m.reason}`;
    }
    renderStats();
  };
  ws.onclose = (ev) => {
    $("switch").disabled = $("stop").disabled = true;
    if (ev.code !== 1000) $("err").textContent += ` (closed ${ev.code} ${ev.reason})`;
    sg.ready = null;
  };
}

function stop() {
  if (sg.ws) { send({ type: "stop" }); sg.ws.close(); }
  sg.ws = null; sg.ready = null; sb = null; pending = [];
}

function renderStats() {
  const s = sg.stats || {};
  const lat = [...sg.latencies].sort((a, b) => a - b);
  const p = (q) => lat.length ? lat[Math.min(lat.length - 1, Math.round(q * (lat.length - 1)))].toFixed(0) : "-";
  $("stats").textContent = [
    `session      ${sg.ready ? sg.ready.session : "-"}`,
    `frame        ${sg.lastFrame}`,
    `fps          ${s.fps ?? "-"}`,
    `chunk ms     ${s.chunk_latency_ms ?? "-"}`,
    `queue        ${s.queue_depth ?? "-"} / ${s.max_queue_frames ?? "-"}`,
    `dropped      ${s.dropped_frames ?? "-"}`,
    `batch        ${s.batch ?? "-"} of ${s.sessions ?? "-"} sessions`,
    `action->frame p50 ${p(0.5)} ms  p90 ${p(0.9)} ms`,
    `last action  #${sg.seq} ${lastSent}`,
    `reflected    #${sg.lastFrameSeq}`,
  ].join("\n");
}

// ---------------------------------------------------------------- input
const KEYMAP = { KeyW: "W", KeyA: "A", KeyS: "S", KeyD: "D", ArrowUp: "W", ArrowLeft: "A", ArrowDown: "S", ArrowRight: "D" };
function keyName(ev) { return KEYMAP[ev.code] || (ev.key && ev.key.length === 1 ? ev.key.toUpperCase() : null); }
function inGame() { return document.activeElement === $("screen") || document.pointerLockElement === $("screen"); }
document.addEventListener("keydown", (ev) => {
  const k = keyName(ev);
  if (!inGame() || !k || ev.repeat) return;
  ev.preventDefault();
  sg.keys.add(k); sendAction();
});
document.addEventListener("keyup", (ev) => {
  const k = keyName(ev);
  if (!k || !sg.keys.has(k)) return;
  sg.keys.delete(k); sendAction();
});
window.addEventListener("blur", () => { sg.keys.clear(); sendAction(); });
$("screen").addEventListener("click", () => { $("screen").focus(); if ($("screen").requestPointerLock) $("screen").requestPointerLock(); });
let mouseAcc = [0, 0], mouseTimer = null;
document.addEventListener("mousemove", (ev) => {
  if (document.pointerLockElement !== $("screen")) return;
  mouseAcc[0] += ev.movementX; mouseAcc[1] += ev.movementY;
});
// mouse: the movement of the last 50 ms scaled to the action space (100 px per 50 ms = full range)
mouseTimer = setInterval(() => {
  const r = sg.ready ? sg.ready.action_space.mouse_range || 1 : 1;
  const m = [mouseAcc[0] / 100 * r, mouseAcc[1] / 100 * r];
  mouseAcc = [0, 0];
  if (m[0] !== sg.mouse[0] || m[1] !== sg.mouse[1]) { sg.mouse = m; sendAction(); }
  renderStats();
}, 50);

$("start").onclick = start;
$("stop").onclick = stop;
$("switch").onclick = () => send({ type: "prompt", prompt: $("prompt").value });
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter") (sg.ready ? $("switch") : $("start")).click(); });
renderKeys();
if (new URLSearchParams(location.search).get("autostart") === "1") start();

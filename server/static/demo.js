() => {
  // The demo page's input capture (W/A/S/D, arrows, drag on the video, on-screen pad) and style.
  // Loaded by streamgen.server.demo (gr.Blocks.load js); __SG_*__ placeholders are filled there.
  if (window.__sgDemo) return; window.__sgDemo = true;
  const st = document.createElement('style'); st.textContent = __SG_CSS__; document.head.appendChild(st);
  if (!__SG_ACTIONS__) return;
  const TURN = __SG_TURN__;
  const keymap = {KeyW: 'W', KeyA: 'A', KeyS: 'S', KeyD: 'D'};
  const turnmap = {ArrowLeft: [-TURN, 0], ArrowRight: [TURN, 0], ArrowUp: [0, -TURN], ArrowDown: [0, TURN]};
  const btnKeys = {'sg-key-W': 'W', 'sg-key-A': 'A', 'sg-key-S': 'S', 'sg-key-D': 'D'};
  const btnTurn = {'sg-turn-left': 'ArrowLeft', 'sg-turn-right': 'ArrowRight'};
  const keys = new Map();   // key -> count of sources holding it (keyboard, button)
  const turns = new Map();
  const drag = [0, 0];
  let dragging = null, timer = null;
  const hold = (m, k, on) => { m.set(k, Math.max(0, (m.get(k) || 0) + (on ? 1 : -1))); };
  function highlight() {
    for (const [id, k] of Object.entries(btnKeys)) {
      const el = document.getElementById(id); if (el) el.classList.toggle('sg-active', (keys.get(k) || 0) > 0);
    }
    for (const [id, k] of Object.entries(btnTurn)) {
      const el = document.getElementById(id); if (el) el.classList.toggle('sg-active', (turns.get(k) || 0) > 0);
    }
  }
  function send() {
    timer = null;
    let tx = 0, ty = 0;
    for (const [k, n] of turns) if (n > 0) { tx += turnmap[k][0]; ty += turnmap[k][1]; }
    const held = [...keys].filter(([k, n]) => n > 0).map(([k]) => k);
    window.__sgInput = JSON.stringify({keys: held, turn: [tx, ty], drag: [drag[0], drag[1]]});
    const b = document.getElementById('sg-send');
    if (b) (b.tagName === 'BUTTON' ? b : b.querySelector('button') || b).click();
    highlight();
  }
  const sendSoon = () => { if (!timer) timer = setTimeout(send, 40); };
  const typing = (e) => { const t = e.target; return t && (t.tagName === 'TEXTAREA' || t.tagName === 'INPUT'
      || t.tagName === 'SELECT' || t.isContentEditable); };
  const kbd = new Set();
  window.addEventListener('keydown', (e) => {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = keymap[e.code], t = turnmap[e.code] ? e.code : null;
    if (!k && !t) return;
    e.preventDefault();
    if (kbd.has(e.code)) return;
    kbd.add(e.code);
    if (k) hold(keys, k, true); else hold(turns, t, true);
    send();
  }, true);
  window.addEventListener('keyup', (e) => {
    if (!kbd.has(e.code)) return;
    kbd.delete(e.code);
    const k = keymap[e.code];
    if (k) hold(keys, k, false); else hold(turns, e.code, false);
    send();
  }, true);
  window.addEventListener('blur', () => { kbd.clear(); keys.clear(); turns.clear(); send(); });
  const pressed = new Map();
  document.addEventListener('pointerdown', (e) => {
    const b = e.target.closest && e.target.closest('#sg-pad button');
    if (b && (btnKeys[b.id] || btnTurn[b.id])) {
      pressed.set(e.pointerId, b.id);
      if (btnKeys[b.id]) hold(keys, btnKeys[b.id], true); else hold(turns, btnTurn[b.id], true);
      send(); return;
    }
    const v = e.target.closest && e.target.closest('#sg-video');
    if (v && e.button === 0) {
      const r = v.getBoundingClientRect();
      dragging = {id: e.pointerId, x: e.clientX, y: e.clientY, w: Math.max(r.width, 1), h: Math.max(r.height, 1)};
      e.preventDefault();
    }
  }, true);
  const release = (e) => {
    const id = pressed.get(e.pointerId);
    if (id) {
      pressed.delete(e.pointerId);
      if (btnKeys[id]) hold(keys, btnKeys[id], false); else hold(turns, btnTurn[id], false);
      send();
    }
    if (dragging && dragging.id === e.pointerId) { dragging = null; send(); }
  };
  document.addEventListener('pointerup', release, true);
  document.addEventListener('pointercancel', release, true);
  document.addEventListener('pointermove', (e) => {
    if (!dragging || dragging.id !== e.pointerId) return;
    drag[0] += (e.clientX - dragging.x) / dragging.w; drag[1] += (e.clientY - dragging.y) / dragging.h;
    dragging.x = e.clientX; dragging.y = e.clientY;
    sendSoon();
  }, true);
  document.addEventListener('dragstart', (e) => { if (e.target.closest && e.target.closest('#sg-video')) e.preventDefault(); }, true);
  const params = new URLSearchParams(window.location.search);
  if (params.get('autostart') === '1') {
    const go = () => { const b = document.getElementById('sg-start'); if (b) b.click(); else setTimeout(go, 100); };
    setTimeout(go, 300);
  }
}

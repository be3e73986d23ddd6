// rmbg-stream page: camera -> server (WebRTC, or the WebSocket where WebRTC fails or is far slower) -> processed
// video.
// URL parameters: token, background (initial, e.g. %23ff00ff), model (initial, one the server runs), transport,
// codec, resolution, autostart=1. The `auto` transport starts on WebRTC and measures it against the WebSocket
// (chooseTransport).
'use strict';

const params = new URLSearchParams(location.search);
const token = params.get('token') || '';
const $ = (id) => document.getElementById(id);
const local = $('local');
const remote = $('remote');
const output = $('output');

// Read by the end-to-end test, and handy in the console.
const state = window.rmbg = {
  status: 'idle', transport: null, codec: null, session: null, background: null, error: null, insecure: false,
  model: null, models: [], frames: 0, matched: 0, sample: null, stats: {},
  settings: null, // the session's controls as the server last reported them: carried over to a new transport
  probe: null, // `auto`: { webrtc, websocket (fps delivered, null: not tried), camera (fps), choice }
};
const PROBE_MS = 3000; // how long each transport is measured for
const CLEARLY_BETTER = 1.3; // the WebSocket must deliver this many times WebRTC's frame rate to be kept

let stream = null;       // the camera
let conn = null;         // the open transport: { send(msg), close() }
let paused = false;
let compositor = null;   // for stacked (transparent) WebRTC frames
let rtt = null;          // control-message round trip, ms
const thumb = document.createElement('canvas');
thumb.width = 32; thumb.height = 24;
const thumbCtx = thumb.getContext('2d', { willReadFrequently: true });

// Camera errors (DOMException names) -> what to do.
const CAMERA_ERRORS = {
  NotAllowedError: 'The camera was not allowed. Allow it for this site (the camera icon in the address bar), then '
    + 'press Start again.',
  NotFoundError: 'No camera was found. Connect one, then press Start again.',
  NotReadableError: 'The camera is in use by another application, or the system blocked it. Close the other '
    + 'application, then press Start again.',
  OverconstrainedError: 'This camera cannot give the chosen resolution. Pick another one.',
};

function setStatus(text, kind = '') {
  state.status = text;
  $('status').textContent = text;
  $('status').classList.toggle('live', kind === 'live');
  $('status').classList.toggle('failed', kind === 'error');
}

function showError(message) {
  state.error = message;
  $('error').textContent = message || '';
  $('error').hidden = !message;
}

// A failure that ends the session: camera off, the reason in the banner, and the header says so too.
function fail(message) {
  stop();
  showError(message);
  setStatus('error', 'error');
}

// Browsers give the camera only to secure pages: https://, or http://localhost / 127.0.0.1 on the same machine.
function insecureMessage() {
  const port = location.port ? `:${location.port}` : '';
  return `The browser blocks the camera on this page because ${location.origin} is not a secure address. `
    + `Open https://${location.host}${location.pathname} instead (start the server with \`--tls self-signed\`, or `
    + `\`--tls-cert FILE --tls-key FILE\`), or http://localhost${port}/ on the machine that runs the server.`;
}

function authHeaders(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

// -- camera

async function openCamera() {
  const [w, h] = $('resolution').value.split('x').map(Number);
  const video = { width: { ideal: w }, height: { ideal: h }, frameRate: { ideal: 30 } };
  if ($('camera').value) video.deviceId = { exact: $('camera').value };
  const s = await navigator.mediaDevices.getUserMedia({ video, audio: false });
  local.srcObject = s;
  await listCameras();
  return s;
}

async function listCameras() {
  const sel = $('camera');
  const current = sel.value;
  const cams = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === 'videoinput');
  sel.replaceChildren(new Option('default', ''), ...cams.map((d, i) => new Option(d.label || `camera ${i + 1}`, d.deviceId)));
  sel.value = current;
}

async function switchCamera() {
  if (!stream) return;
  const old = stream;
  stream = await openCamera();
  if (conn && conn.replaceTrack) await conn.replaceTrack(stream.getVideoTracks()[0]);
  old.getTracks().forEach((t) => t.stop());
}

// -- WebRTC

function gathered(pc) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') resolve(); });
    setTimeout(resolve, 2000); // host candidates are all a LAN needs
  });
}

function connected(pc, ms) {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (pc.connectionState === 'connected') resolve();
      if (['failed', 'closed'].includes(pc.connectionState)) reject(new Error(`WebRTC ${pc.connectionState}`));
    };
    pc.addEventListener('connectionstatechange', check);
    setTimeout(() => reject(new Error('WebRTC did not connect in time')), ms);
    check();
  });
}

async function startWebRTC() {
  const pc = new RTCPeerConnection();
  const channel = pc.createDataChannel('control');
  const transceiver = pc.addTransceiver(stream.getVideoTracks()[0], { direction: 'sendrecv' });
  const codec = $('codec').value;
  if (codec !== 'auto' && transceiver.setCodecPreferences) {
    const all = RTCRtpReceiver.getCapabilities('video').codecs;
    const want = all.filter((c) => c.mimeType.toLowerCase() === `video/${codec.toLowerCase()}`);
    transceiver.setCodecPreferences([...want, ...all.filter((c) => !want.includes(c))]);
  }
  pc.ontrack = (e) => { remote.srcObject = new MediaStream([e.track]); };
  const opened = new Promise((resolve) => { channel.onopen = resolve; });
  channel.onmessage = (e) => onServerMessage(JSON.parse(e.data));

  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  let body;
  try {
    // Unreachable or Refused (token, full, bad offer): a WebSocket would fare no better, so the caller stops.
    body = await request('offer', {
      method: 'POST',
      headers: authHeaders({ 'Content-Type': 'application/json' }),
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
  } catch (err) {
    pc.close();
    throw err;
  }
  state.session = body.session;
  showModels(body.models, body.model);
  await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  try {
    await connected(pc, 10000);
    await opened;
  } catch (err) {
    pc.close();
    throw err;
  }
  try {
    // Keep the frame rate when the CPU or the network is short; the server scales nothing.
    const p = transceiver.sender.getParameters();
    p.degradationPreference = 'maintain-framerate';
    await transceiver.sender.setParameters(p);
  } catch (err) { /* not supported here: fine */ }
  pc.onconnectionstatechange = () => {
    if (['failed', 'closed', 'disconnected'].includes(pc.connectionState) && conn && conn.pc === pc) {
      fail(`The connection to the server was lost (WebRTC ${pc.connectionState}). Press Start to reconnect.`);
    }
  };
  remote.hidden = false;
  let open = true;
  // One loop per connection: a callback still pending from an earlier one would count every frame twice.
  const onFrame = () => { if (open) { onRemoteFrame(); remote.requestVideoFrameCallback(onFrame); } };
  remote.requestVideoFrameCallback(onFrame);
  return {
    kind: 'webrtc', pc,
    send: (msg) => { if (channel.readyState === 'open') channel.send(JSON.stringify(msg)); },
    replaceTrack: (track) => transceiver.sender.replaceTrack(track),
    close: () => { open = false; pc.close(); },
  };
}

function isStacked(w, h) {
  // Colour over alpha: twice as tall as the camera's aspect says.
  const s = stream && stream.getVideoTracks()[0].getSettings();
  const aspect = s && s.width ? s.height / s.width : 0.75;
  return h > 1.5 * w * aspect;
}

function onRemoteFrame() {
  const w = remote.videoWidth;
  const h = remote.videoHeight;
  if (w && h) {
    if (isStacked(w, h)) {
      compositor = compositor || createCompositor(output);
      compositor.draw(remote, w, h);
      output.hidden = false;
      remote.style.visibility = 'hidden';
      remote.style.position = 'absolute';
      countFrame(remote, w, h / 2);
    } else {
      output.hidden = true;
      remote.style.visibility = '';
      remote.style.position = '';
      countFrame(remote, w, h);
    }
  }
}

// -- WebSocket

const HEADER = 16;
const JPEG = 1;

async function startSocket() {
  const url = new URL('ws', location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  if (token) url.searchParams.set('token', token);
  const sock = new WebSocket(url);
  sock.binaryType = 'arraybuffer';
  const opened = await new Promise((resolve) => {
    sock.onopen = () => resolve(true);
    sock.onerror = () => resolve(false);
  });
  if (!opened) {
    // The browser hides why: ask the server over HTTP.
    throw (await diagnose(authHeaders())) || new Error('The server accepted the page but not its WebSocket: a '
      + 'proxy between this browser and the server may not pass WebSockets.');
  }
  const grab = document.createElement('canvas');
  const gctx = grab.getContext('2d');
  const octx = output.getContext('2d');
  let seq = 0;
  let acked = 0;
  let closed = false;

  sock.onmessage = async (e) => {
    if (typeof e.data === 'string') { onServerMessage(JSON.parse(e.data)); return; }
    const view = new DataView(e.data);
    const fmt = view.getUint8(3);
    const n = view.getUint32(4);
    const sent = view.getFloat64(8);
    acked = Math.max(acked, n);
    state.stats.frameRtt = performance.now() - sent;
    const blob = new Blob([e.data.slice(HEADER)], { type: fmt === JPEG ? 'image/jpeg' : 'image/webp' });
    const bmp = await createImageBitmap(blob);
    if (output.width !== bmp.width || output.height !== bmp.height) { output.width = bmp.width; output.height = bmp.height; }
    octx.clearRect(0, 0, bmp.width, bmp.height);
    octx.drawImage(bmp, 0, 0);
    countFrame(bmp, bmp.width, bmp.height);
    bmp.close();
  };
  sock.onclose = () => {
    closed = true;
    if (conn && conn.sock === sock) fail('The connection to the server was lost (WebSocket closed). Press Start to reconnect.');
  };

  // Send the camera at its own rate with at most two frames unanswered: a slow server means dropped frames, not a
  // growing queue in the socket.
  const tick = () => {
    if (closed) return;
    if (!paused && local.videoWidth && seq - acked < 2 && sock.bufferedAmount < 1 << 20) {
      if (grab.width !== local.videoWidth) { grab.width = local.videoWidth; grab.height = local.videoHeight; }
      gctx.drawImage(local, 0, 0);
      const n = ++seq;
      const t = performance.now();
      grab.toBlob(async (blob) => {
        if (!blob || sock.readyState !== WebSocket.OPEN) return;
        const msg = new Uint8Array(HEADER + blob.size);
        const head = new DataView(msg.buffer);
        head.setUint8(0, 0x52); head.setUint8(1, 0x4d); head.setUint8(2, 1); head.setUint8(3, JPEG);
        head.setUint32(4, n); head.setFloat64(8, t);
        msg.set(new Uint8Array(await blob.arrayBuffer()), HEADER);
        sock.send(msg);
      }, 'image/jpeg', 0.8);
    }
    local.requestVideoFrameCallback(tick);
  };
  local.requestVideoFrameCallback(tick);
  // A reply can be lost to latest-wins dropping: forget unanswered frames now and then so sending never stalls.
  const unstick = setInterval(() => { acked = Math.max(acked, seq - 1); }, 500);
  remote.hidden = true;
  output.hidden = false;
  return {
    kind: 'websocket', sock,
    send: (msg) => { if (sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify(msg)); },
    close: () => { clearInterval(unstick); sock.close(); },
  };
}

// -- both transports

function countFrame(source, w, h) {
  state.frames += 1;
  // A pixel at the left edge, half way down: the background in a centred shot (and in the test's clip).
  thumbCtx.drawImage(source, 0, 0, w, h, 0, 0, thumb.width, thumb.height);
  const px = Array.from(thumbCtx.getImageData(1, 12, 1, 1).data.slice(0, 3));
  state.sample = px;
  const bg = state.background;
  if (bg && /^#[0-9a-f]{6}$/i.test(bg)) {
    const want = [1, 3, 5].map((i) => parseInt(bg.slice(i, i + 2), 16));
    if (want.every((v, i) => Math.abs(v - px[i]) <= 40)) state.matched += 1;
  }
}

// The models the server runs (the offer's answer, the socket's hello) and the one this session runs now.
function showModels(models, current) {
  if (Array.isArray(models)) {
    state.models = models;
    const sel = $('model');
    sel.replaceChildren(...models.map((m) => new Option(m, m)));
    sel.disabled = models.length < 2;
  }
  showModel(current);
}

function showModel(name) {
  if (typeof name !== 'string') return;
  state.model = name;
  $('s-model').textContent = name;
  if ($('model').value !== name) $('model').value = name;
}

function setModel(name) {
  send({ type: 'model', value: name });
}

function onServerMessage(msg) {
  if (msg.type === 'hello') { state.session = msg.session; showModels(msg.models, msg.state && msg.state.model); }
  if (msg.type === 'pong' && typeof msg.t === 'number') rtt = performance.now() - msg.t;
  if (msg.type === 'error') {
    showError(msg.error);
    showModel(state.model); // a refused switch: the menu goes back to what runs
  }
  if (msg.state) state.settings = msg.state;
  if (msg.type === 'ok' && msg.state) { state.background = msg.state.background; showModel(msg.state.model); showError(null); }
  if (msg.type === 'stats') {
    Object.assign(state.stats, msg);
    if (msg.state) state.background = msg.state.background;
    showModel(msg.model);
  }
  $('obs').hidden = !state.session;
  if (state.session) $('obs').href = `obs?session=${encodeURIComponent(state.session)}${token ? `&token=${encodeURIComponent(token)}` : ''}`;
}

function send(msg) {
  if (conn) conn.send(msg);
}

function openTransport(kind) {
  setStatus(`connecting (${kind === 'webrtc' ? 'WebRTC' : 'WebSocket'})…`);
  return kind === 'webrtc' ? startWebRTC() : startSocket();
}

function showLive() {
  state.transport = conn.kind;
  $('s-transport').textContent = conn.kind;
  const p = state.probe;
  const other = conn.kind === 'webrtc' ? 'websocket' : 'webrtc';
  const figures = p && p.websocket !== null ? `: ${p[conn.kind]} fps, ${other} ${p[other]} fps` : '';
  setStatus(`live (${conn.kind}${figures})`, 'live');
}

async function start() {
  if (state.insecure) return;
  showError(null);
  $('start').disabled = true;
  try {
    try {
      stream = stream || await openCamera();
    } catch (err) {
      throw new Error(CAMERA_ERRORS[err.name] || `The camera did not start: ${err.message}`);
    }
    const choice = $('transport').value;
    state.probe = null;
    if (choice !== 'websocket') {
      try {
        conn = await openTransport('webrtc');
      } catch (err) {
        if (err instanceof Unreachable || err instanceof Refused || choice === 'webrtc') throw err;
        console.warn('WebRTC failed, falling back to the WebSocket:', err);
      }
    }
    if (!conn) conn = await openTransport('websocket');
    showLive();
    $('stop').disabled = false;
    $('pause').disabled = false;
    const initial = params.get('background');
    if (initial) setBackground(initial);
    const model = params.get('model');
    if (model && model !== state.model) setModel(model);
    if (choice === 'auto' && conn.kind === 'webrtc') await chooseTransport();
  } catch (err) {
    fail(err.message);
  }
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Frames per second that `c` delivers to the page, from its first frame on (after half a second to settle); null
// when it was stopped or replaced meanwhile.
async function measure(c) {
  const first = state.frames;
  for (let waited = 0; state.frames === first && waited < 5000; waited += 100) await sleep(100);
  await sleep(500);
  const n = state.frames;
  const t = performance.now();
  await sleep(PROBE_MS);
  if (conn !== c) return null;
  return Math.round(10000 * (state.frames - n) / (performance.now() - t)) / 10;
}

// Closes the open transport and opens `kind` for the same camera, with the same controls; null when the page was
// stopped meanwhile.
async function switchTo(kind) {
  const camera = stream;
  const settings = state.settings;
  const old = conn;
  conn = null; // its close is not a lost connection
  if (old) old.close(); // none: the previous switch failed
  const next = await openTransport(kind);
  if (stream !== camera || conn !== null) { next.close(); return null; }
  conn = next;
  if (settings) {
    if (settings.background && settings.background !== 'upload') setBackground(settings.background);
    setModel(settings.model);
    send({ type: 'smoothing', value: settings.smoothing });
    send({ type: 'mask_view', value: settings.mask_view });
    if (settings.paused) send({ type: 'pause', value: true });
  }
  return conn;
}

// `auto` on WebRTC: on a loaded machine WebRTC's encoding and jitter buffer can deliver far fewer frames than the
// WebSocket does. Measure WebRTC; where the WebSocket could be clearly better (WebRTC is below the camera's rate by
// that much), measure it too, and keep it only if it is; the choice and both figures are in `state.probe`.
async function chooseTransport() {
  const camera = stream.getVideoTracks()[0].getSettings().frameRate || 30;
  const webrtc = await measure(conn);
  if (webrtc === null) return;
  state.probe = { webrtc, websocket: null, camera: Math.round(camera), choice: null };
  if (webrtc * CLEARLY_BETTER >= camera) { state.probe.choice = 'webrtc'; return; }
  setStatus(`live (webrtc: ${webrtc} fps), trying the WebSocket…`, 'live');
  let websocket = null;
  try {
    const c = await switchTo('websocket');
    if (c === null) return;
    websocket = await measure(c);
    if (websocket === null) return;
  } catch (err) {
    console.warn('the WebSocket failed; back to WebRTC:', err);
    if (!stream) return; // stopped meanwhile
  }
  state.probe.websocket = websocket;
  if (websocket === null || websocket <= CLEARLY_BETTER * webrtc) {
    if (await switchTo('webrtc') === null) return;
  }
  state.probe.choice = conn.kind;
  showLive();
}

// Closes the transport and ends every camera track (the camera's light goes off); the panels go back to idle.
function stop() {
  if (conn) { const c = conn; conn = null; c.close(); }
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
  local.srcObject = null;
  remote.srcObject = null;
  remote.hidden = false;
  remote.style.visibility = '';
  remote.style.position = '';
  output.hidden = true;
  state.transport = null;
  $('model').disabled = true;
  setStatus('idle');
  $('start').disabled = false;
  $('stop').disabled = true;
  $('pause').disabled = true;
}

function setBackground(value) {
  state.background = value;
  send({ type: 'background', value });
  document.querySelectorAll('#backgrounds button').forEach((b) => b.classList.toggle('active', b.dataset.bg === value));
}

async function uploadBackground(file) {
  if (!state.session) return;
  try {
    await request(`session/${encodeURIComponent(state.session)}/background`, {
      method: 'POST', headers: authHeaders({ 'Content-Type': file.type || 'application/octet-stream' }), body: file,
    });
  } catch (err) {
    showError(err.message);
    return;
  }
  showError(null);
  state.background = 'upload';
}

// -- stats

async function updateStats() {
  send({ type: 'ping', t: performance.now() });
  const s = state.stats;
  let fpsIn = s.fps_in;
  let fpsOut = s.fps_out;
  let jitter = 0;
  if (conn && conn.kind === 'webrtc') {
    const stats = await conn.pc.getStats();
    stats.forEach((r) => {
      if (r.type === 'outbound-rtp' && r.kind === 'video' && r.framesPerSecond !== undefined) fpsIn = r.framesPerSecond;
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        if (r.codecId && stats.get(r.codecId)) state.codec = stats.get(r.codecId).mimeType.replace('video/', '');
        if (r.framesPerSecond !== undefined) fpsOut = r.framesPerSecond;
        if (r.jitterBufferEmittedCount) jitter = 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount;
      }
    });
  }
  const fmt = (v, unit = '') => (v === undefined || v === null ? '–' : `${Math.round(v)}${unit}`);
  if (conn) $('s-transport').textContent = conn.kind === 'webrtc' && state.codec ? `webrtc (${state.codec})` : conn.kind;
  $('s-fps-in').textContent = fmt(fpsIn);
  $('s-fps-out').textContent = fmt(fpsOut);
  $('s-dropped').textContent = fmt(s.dropped);
  $('s-batch').textContent = fmt(s.batch);
  if (conn && conn.kind === 'websocket') {
    $('s-rtt').textContent = fmt(s.frameRtt, ' ms');
  } else if (rtt !== null) {
    // Network round trip + the server's time per frame + what the browser buffers before showing it.
    const total = rtt + (s.latency_ms_p50 || 0) + jitter;
    $('s-rtt').textContent = `${fmt(total, ' ms')} (net ${fmt(rtt)} + server ${fmt(s.latency_ms_p50)} + buffer ${fmt(jitter)})`;
  }
  state.stats.rtt = rtt;
  state.stats.fpsIn = fpsIn;
  state.stats.fpsOut = fpsOut;
}

// -- wiring

$('start').onclick = start;
$('stop').onclick = () => stop();
$('camera').onchange = () => switchCamera().catch((e) => showError(e.message));
$('resolution').onchange = () => switchCamera().catch((e) => showError(e.message));
document.querySelectorAll('#backgrounds button').forEach((b) => { b.onclick = () => setBackground(b.dataset.bg); });
$('color').oninput = (e) => setBackground(e.target.value);
$('blur').onchange = (e) => setBackground(`blur:${e.target.value}`);
$('upload').onchange = (e) => { if (e.target.files[0]) uploadBackground(e.target.files[0]); e.target.value = ''; };
$('model').onchange = (e) => setModel(e.target.value);
$('smoothing').onchange = (e) => send({ type: 'smoothing', value: Number(e.target.value) });
$('mask').onchange = (e) => send({ type: 'mask_view', value: e.target.checked });
$('pause').onclick = () => {
  paused = !paused;
  send({ type: 'pause', value: paused });
  $('pause').textContent = paused ? 'Resume' : 'Pause';
};
for (const key of ['transport', 'codec', 'resolution']) {
  const v = params.get(key);
  if (v && [...$(key).options].some((o) => o.value === v)) $(key).value = v;
}
setInterval(updateStats, 1000);
if (!window.isSecureContext || !navigator.mediaDevices) {
  state.insecure = true;
  $('start').disabled = true;
  showError(insecureMessage());
  setStatus('camera blocked', 'error');
} else if (params.get('autostart')) {
  start();
}

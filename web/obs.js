// OBS Browser Source: receives a camera session's output as colour over alpha and draws it with real transparency.
// Reconnects by itself, so it can be set up in OBS before the camera page is opened: at once after a lost
// connection, every 2 s while no camera session is open, backing off to 30 s while the server is unreachable. A
// wrong token or a refused origin will not fix itself, so those stop with a message instead.
// The model of the session it shows (serve --model A B ...; the camera page can switch) is in the page's title, and
// in the corner for 3 s whenever it goes live or the model changes: `label=1` keeps it there, `label=0` never
// shows it (the corner is part of what OBS films). Other status text shows only while there is no picture: the
// canvas holds nothing but frames, and is cleared when they stop.
'use strict';

const params = new URLSearchParams(location.search);
const token = params.get('token') || '';
const video = document.getElementById('video');
const canvas = document.getElementById('canvas');
const statusEl = document.getElementById('status');
const compositor = createCompositor(canvas);
// Read by the end-to-end test: `points` (canvas pixels) are sampled now and then into `samples` as [r, g, b, a].
const state = window.rmbgObs = {
  status: 'connecting', frames: 0, compositor: compositor.kind, points: [], samples: [], model: null,
};
const LABEL = params.get('label'); // '1': always shown, '0': never, else for 3 s after each change
let labelTimer = null;
let pc = null;
let retry = null;
let unreachable = 0; // attempts in a row that got no answer

function setStatus(text, show = true) {
  state.status = text;
  statusEl.textContent = text;
  statusEl.hidden = !show;
}

function showModel(name) {
  if (typeof name !== 'string' || name === state.model) return;
  state.model = name;
  document.title = `rmbg-stream OBS source: ${name}`;
  if (state.status !== 'live' || LABEL === '0') return;
  setStatus('live', true);
  statusEl.textContent = `model: ${name}`;
  clearTimeout(labelTimer);
  if (LABEL !== '1') labelTimer = setTimeout(() => { if (state.status === 'live') statusEl.hidden = true; }, 3000);
}

function noPicture() {
  if (pc) { pc.close(); pc = null; }
  video.srcObject = null;
  compositor.clear(); // a frozen last frame would look live in OBS
}

function scheduleRetry(message, seconds) {
  noPicture();
  setStatus(`${message} Retrying in ${seconds} s…`);
  clearTimeout(retry);
  retry = setTimeout(connect, seconds * 1000);
}

// Unreachable: back off 2, 4, 8, 16, 30 s; refused for good (401, 403): stop; anything else: again in 2 s.
function onError(err) {
  if (err instanceof Unreachable) {
    unreachable += 1;
    scheduleRetry(err.message, Math.min(30, 2 ** unreachable));
  } else if (err instanceof Refused && (err.status === 401 || err.status === 403)) {
    noPicture();
    state.stopped = true;
    setStatus(`${err.message} Stopped: fix the Browser Source's URL, then refresh it.`);
  } else {
    unreachable = 0;
    scheduleRetry(err.message, 2);
  }
}

async function connect() {
  pc = new RTCPeerConnection();
  const me = pc;
  pc.addTransceiver('video', { direction: 'recvonly' });
  // Stats once a second, with the model of the camera session shown.
  const channel = pc.createDataChannel('status');
  channel.onmessage = (e) => { const msg = JSON.parse(e.data); if (msg.type === 'stats') showModel(msg.model); };
  pc.ontrack = (e) => { video.srcObject = new MediaStream([e.track]); state.blocked = false; play(); };
  pc.onconnectionstatechange = () => {
    if (me !== pc) return;
    if (pc.connectionState === 'connected' && video.paused && !state.blocked) {
      setStatus('Connected, starting the video…');
    }
    if (['failed', 'closed', 'disconnected'].includes(pc.connectionState)) {
      scheduleRetry('The connection to the server was lost.', 1);
    }
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    const body = await request('offer', {
      method: 'POST', headers,
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: 'offer', view: 'obs', session: params.get('session') }),
    });
    unreachable = 0;
    showModel(body.model);
    await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  } catch (err) {
    onError(err);
  }
}

function gathered(conn) {
  if (conn.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (conn.iceGatheringState === 'complete') resolve(); };
    conn.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, 2000); // host candidates are enough on a LAN
  });
}

// Chromium starts a muted `autoplay` video by itself only while it is visible, and this one is hidden behind the
// canvas: without play() it stays paused and the canvas blank. Muted, the default autoplay policy allows play(); a
// browser that still refuses gets a click (in OBS: Interact, then click).
function play() {
  video.muted = true;
  video.play().then(() => { state.blocked = false; }, (err) => {
    if (err.name !== 'NotAllowedError' || !video.srcObject) return; // AbortError: a newer stream took over
    state.blocked = true;
    setStatus('The browser did not let the video start by itself: click the page to start it.');
  });
}

video.addEventListener('playing', () => {
  setStatus('live', false);
  const name = state.model;
  state.model = null;
  showModel(name); // the label again for this connection
});
document.addEventListener('click', () => { if (video.srcObject && video.paused) play(); });

function onFrame() {
  if (!video.paused && video.videoWidth && video.videoHeight) {
    compositor.draw(video, video.videoWidth, video.videoHeight);
    state.frames += 1;
    if (state.frames % 10 === 1) state.samples = state.points.map(([x, y]) => compositor.sample(x, y));
  }
  video.requestVideoFrameCallback(onFrame);
}

video.requestVideoFrameCallback(onFrame);
connect();

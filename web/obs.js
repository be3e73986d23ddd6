// OBS Browser Source: receives a camera session's output as colour over alpha and draws it with real transparency.
// Reconnects by itself, so it can be set up in OBS before the camera page is opened.
'use strict';

const params = new URLSearchParams(location.search);
const token = params.get('token') || '';
const video = document.getElementById('video');
const canvas = document.getElementById('canvas');
const statusEl = document.getElementById('status');
const compositor = createCompositor(canvas);
// Read by the end-to-end test: `points` (canvas pixels) are sampled now and then into `samples` as [r, g, b, a].
const state = window.rmbgObs = { status: 'connecting', frames: 0, compositor: compositor.kind, points: [], samples: [] };
let pc = null;
let retry = null;

function setStatus(text, show = true) {
  state.status = text;
  statusEl.textContent = text;
  statusEl.hidden = !show;
}

function scheduleRetry(reason) {
  if (pc) { pc.close(); pc = null; }
  setStatus(`${reason}; retrying…`);
  clearTimeout(retry);
  retry = setTimeout(connect, 2000);
}

async function connect() {
  pc = new RTCPeerConnection();
  const me = pc;
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.ontrack = (e) => { video.srcObject = new MediaStream([e.track]); };
  pc.onconnectionstatechange = () => {
    if (me !== pc) return;
    if (pc.connectionState === 'connected') setStatus('live', false);
    if (['failed', 'closed', 'disconnected'].includes(pc.connectionState)) scheduleRetry('disconnected');
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    const res = await fetch('offer', {
      method: 'POST', headers,
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: 'offer', view: 'obs', session: params.get('session') }),
    });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error || res.statusText);
    await pc.setRemoteDescription(body);
  } catch (err) {
    scheduleRetry(err.message);
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

function onFrame() {
  if (video.videoWidth && video.videoHeight) {
    compositor.draw(video, video.videoWidth, video.videoHeight);
    state.frames += 1;
    if (state.frames % 10 === 1) state.samples = state.points.map(([x, y]) => compositor.sample(x, y));
  }
  video.requestVideoFrameCallback(onFrame);
}

video.requestVideoFrameCallback(onFrame);
connect();

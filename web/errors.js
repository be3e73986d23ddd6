// What went wrong, in words a user can act on: shared by the camera page (app.js) and the OBS page (obs.js).
// A request that gets no answer at all is Unreachable (server down, wrong address, network gone); one the server
// answers with an error is Refused, with the HTTP status. A failed WebSocket tells the page nothing, so
// diagnose() asks the server over HTTP why it would have refused.
'use strict';

class Unreachable extends Error {}

class Refused extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function unreachableMessage() {
  return `Cannot reach the rmbg-stream server at ${location.host}. Is \`rmbg-stream serve\` still running, `
    + 'and is this the address it printed?';
}

// HTTP status -> what to do; the server's own message is added where it says more.
const REFUSALS = {
  401: () => 'Wrong or missing token. Open the address `rmbg-stream serve` printed: it ends in ?token=…',
  403: (error) => `The server refused this page: ${error}`,
  404: (error) => error,
  503: (error) => `${error}.`,
};

function refusalMessage(status, error) {
  const say = REFUSALS[status];
  return say ? say(error) : `The server answered ${status}: ${error}`;
}

// fetch() that turns "no answer" into Unreachable and an error status into Refused; resolves to the JSON body.
async function request(path, options = {}) {
  let res;
  try {
    res = await fetch(path, { cache: 'no-store', ...options });
  } catch (err) {
    throw new Unreachable(unreachableMessage());
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Refused(refusalMessage(res.status, body.error || res.statusText), res.status);
  return body;
}

// Why the server would refuse a session from this page, as an Error (Unreachable or Refused), or null when it
// looks willing: reachable (/healthz), token and origin accepted (/metrics checks both), not full.
async function diagnose(headers) {
  try {
    const health = await request('healthz');
    await request('metrics', { headers });
    if (health.sessions >= health.max_sessions) {
      return new Refused(`The server is full: all ${health.max_sessions} sessions are in use. Try again later.`, 503);
    }
    return null;
  } catch (err) {
    return err;
  }
}

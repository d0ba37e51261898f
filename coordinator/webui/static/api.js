// The API: the stored token, JSON calls with typed errors, and server-sent events read with
// fetch (EventSource cannot send the Authorization header), with the live status indicator.

const TOKEN_KEY = 'alc-console-token';

export class AuthNeeded extends Error {}

export class ApiError extends Error {
  constructor(status, body) {
    const message = (body && (body.error || body.detail)) || `HTTP ${status}`;
    super(typeof message === 'string' ? message : JSON.stringify(message));
    this.status = status;
    this.type = (body && body.type) || null;
  }
}

// -- the token --------------------------------------------------------------------------------

export const getToken = () => localStorage.getItem(TOKEN_KEY) || '';
export const saveToken = (value) => localStorage.setItem(TOKEN_KEY, value);
export const forgetToken = () => localStorage.removeItem(TOKEN_KEY);

// What a 401 does (the entry module shows the token form): set once at start-up, so views
// and streams can ask for a token without importing the entry module.
let onAuthNeeded = () => {};
export function whenAuthNeeded(fn) { onAuthNeeded = fn; }
export function needToken() { onAuthNeeded(); }

// The API's root: the page is served at <root>ui/, so a reverse proxy that mounts the server
// under a prefix (the page at /alc/ui/) keeps the calls under it too (/alc/sessions, ...).
const ROOT = new URL('../', document.baseURI);
export const apiUrl = (path) => new URL(path.replace(/^\//, ''), ROOT);

function headers(extra) {
  const out = { ...extra };
  const token = getToken();
  if (token) out.Authorization = `Bearer ${token}`;
  return out;
}

export async function api(method, path, { body, signal } = {}) {
  const init = { method, signal, cache: 'no-store', headers: headers({ Accept: 'application/json' }) };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(apiUrl(path), init);
  if (res.status === 401) throw new AuthNeeded('the API needs a token');
  let data = null;
  try { data = await res.json(); } catch { data = null; }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// -- the live status --------------------------------------------------------------------------

const liveEl = document.querySelector('[data-testid="live"]');

export function setLive(state) {
  liveEl.dataset.state = state;
  liveEl.textContent = state === 'live' ? 'Live' : state === 'reconnecting' ? 'Reconnecting…' : '';
}

// -- server-sent events over fetch ------------------------------------------------------------

async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = { type: 'message', data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let at;
    while ((at = buffer.search(/\r\n|\r|\n/)) >= 0) {
      if (buffer[at] === '\r' && at === buffer.length - 1) break; // maybe \r\n split in two
      const line = buffer.slice(0, at);
      buffer = buffer.slice(at + (buffer.startsWith('\r\n', at) ? 2 : 1));
      if (line === '') {
        if (event.data.length || event.type !== 'message') {
          onEvent({ type: event.type, id: event.id, data: event.data.join('\n') });
        }
        event = { type: 'message', data: [], id: null };
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') event.type = val;
        else if (field === 'data') event.data.push(val);
        else if (field === 'id') event.id = val;
      }
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/**
 * Follow the event stream at ``path`` until ``signal`` aborts: reconnect with backoff
 * (1 s doubling to 10 s), resume with Last-Event-ID, stop when ``opts.finished()`` says the
 * stream has nothing more to say, or on a 404 (``opts.onGone``).
 */
export async function follow(path, signal, opts) {
  let delay = 1000;
  let lastId = null;
  while (!signal.aborted) {
    try {
      const extra = { Accept: 'text/event-stream' };
      if (lastId) extra['Last-Event-ID'] = lastId;
      const res = await fetch(apiUrl(path), { headers: headers(extra), signal, cache: 'no-store' });
      if (res.status === 401) throw new AuthNeeded('the API needs a token');
      if (res.status === 404 && opts.onGone) {
        res.body?.cancel().catch(() => {});
        opts.onGone();
        return;
      }
      if (!res.ok || !res.body) {
        res.body?.cancel().catch(() => {});
        throw new Error(`HTTP ${res.status}`);
      }
      setLive('live');
      delay = 1000;
      opts.onOpen?.();
      await readEvents(res.body, (event) => {
        if (event.id) lastId = event.id;
        opts.onEvent(event);
      });
      if (opts.finished?.()) {
        setLive('idle');
        return;
      }
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof AuthNeeded) {
        needToken();
        return;
      }
    }
    if (signal.aborted) return;
    setLive('reconnecting');
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 10000);
  }
}

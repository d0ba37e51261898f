// What every view shares: the content area, the document title, debounced refreshes and
// background tasks that must not fail loudly once their view is left.

import { AuthNeeded, needToken } from './api.js';

const APP = 'alc console';

export const main = document.getElementById('content');

export function setTitle(text) {
  document.title = `${text} · ${APP}`;
}

/** Calls ``fn`` once, ``ms`` after the last of a burst of calls. */
export function debounce(fn, ms) {
  let timer = null;
  const call = () => {
    clearTimeout(timer);
    timer = setTimeout(() => { timer = null; fn(); }, ms);
  };
  call.cancel = () => clearTimeout(timer);
  return call;
}

/** Called from any background task; ignores aborts of views already left. */
export function background(signal, promise) {
  promise.catch((err) => {
    if (signal.aborted || err?.name === 'AbortError') return;
    if (err instanceof AuthNeeded) needToken();
    else console.warn(err);
  });
}

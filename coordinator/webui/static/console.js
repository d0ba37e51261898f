// alc-coordinator web console: the entry module (ES modules, no build step, no dependencies).
//
// Hash routes: #/ (sessions), #/sessions/<id>, #/start, #/workers. Every server value is
// put on the page with textContent / createElement, never parsed as markup. API calls send the
// stored bearer token; a 401 shows the token form. Live updates come from server-sent
// events read with fetch (EventSource cannot send the Authorization header).
//
// The modules, one concept each: dom.js (building elements), format.js (numbers, times),
// api.js (token, calls, event streams, the live indicator), page.js (what views share),
// phases.js, one view-*.js per route, session-questions.js (a session's query forms).

import { AuthNeeded, forgetToken, getToken, saveToken, setLive, whenAuthNeeded } from './api.js';
import { fill, h } from './dom.js';
import { keepTimesFresh } from './format.js';
import { main, setTitle } from './page.js';
import { sessionView } from './view-session.js';
import { sessionsView } from './view-sessions.js';
import { startView } from './view-start.js';
import { workersView } from './view-workers.js';

const VIEWS = { sessions: sessionsView, session: sessionView, start: startView, workers: workersView };

// -- routing ----------------------------------------------------------------------------------

let current = null; // the view's AbortController

function parseRoute() {
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query] = hash.split('?');
  const params = new URLSearchParams(query || '');
  const match = path.match(/^\/sessions\/(.+)$/);
  if (match) {
    let sid;
    try { sid = decodeURIComponent(match[1]); } catch { sid = match[1]; }
    return { name: 'session', sid, params };
  }
  if (path === '/start') return { name: 'start', params };
  if (path === '/workers') return { name: 'workers', params };
  return { name: 'sessions', params };
}

function setNav(name) {
  const active = name === 'session' ? 'sessions' : name;
  for (const link of document.querySelectorAll('nav [data-nav]')) {
    if (link.dataset.nav === active) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

async function render({ focus = false } = {}) {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const route = parseRoute();
  setNav(route.name);
  setLive('idle');
  try {
    await VIEWS[route.name](controller.signal, route);
    if (focus && !controller.signal.aborted) main.querySelector('h1')?.focus();
  } catch (err) {
    if (!controller.signal.aborted) showFailure(err);
  }
}

/** A failure that ends a view: the token form on a 401, else the error and a retry. */
function showFailure(err) {
  if (err instanceof AuthNeeded) {
    showTokenForm();
    return;
  }
  console.warn(err);
  current?.abort();
  setLive('idle');
  setTitle('Error');
  fill(main, 
    h('h1', { tabindex: '-1' }, 'Something went wrong'),
    h('div', { class: 'card' },
      h('p', { role: 'alert', class: 'alert' }, `The console could not load this page: ${err.message}`),
      h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => render() }, 'Try again'))),
  );
}

// -- token ------------------------------------------------------------------------------------

function showTokenForm() {
  current?.abort();
  current = new AbortController();
  setLive('idle');
  setTitle('API token');
  const refused = getToken() !== '';
  const input = h('input', { type: 'password', id: 'token-input', name: 'token', autocomplete: 'off',
    spellcheck: 'false', required: true, 'aria-describedby': 'token-hint' });
  const form = h('form', { 'aria-label': 'API token', class: 'card token-card' },
    h('div', { class: 'field' },
      h('label', { for: 'token-input' }, 'API token'),
      input,
      h('span', { class: 'hint', id: 'token-hint' },
        'The token given to “coordinator serve --token”. It is kept in this browser only.')),
    refused ? h('p', { class: 'alert', role: 'alert' }, 'The server refused the saved token. Enter the current one.') : null,
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Save token')));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = input.value.trim();
    if (!value) return;
    saveToken(value);
    render({ focus: true });
  });
  fill(main, 
    h('h1', { tabindex: '-1' }, 'API token needed'),
    h('p', { class: 'muted' }, 'This server asks for a bearer token before it shows sessions.'),
    form);
  input.focus();
}

// -- start-up ---------------------------------------------------------------------------------

whenAuthNeeded(showTokenForm);
keepTimesFresh();
document.getElementById('forget-token').addEventListener('click', () => {
  forgetToken();
  render({ focus: true });
});
document.getElementById('skip').addEventListener('click', (ev) => {
  ev.preventDefault();
  (main.querySelector('h1') || main).focus();
});
window.addEventListener('hashchange', () => render({ focus: true }));
render();

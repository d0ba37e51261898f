// The workers view (#/workers): live workers from their heartbeats and the dead letters;
// refreshed on namespace events and every 10 s (heartbeats are not events).

import { ApiError, api, follow } from './api.js';
import { cell, fill, h, pageHead, table } from './dom.js';
import { enc, fmtNumber, timeEl } from './format.js';
import { background, debounce, main, setTitle } from './page.js';

export async function workersView(signal) {
  setTitle('Workers');
  const refreshBtn = h('button', { type: 'button' }, 'Refresh');
  const alert = h('p', { class: 'alert', role: 'alert' });
  const cols = ['Worker', 'Strategies', 'Concurrency', 'Busy', 'Live', 'Steps', 'Replays', 'Last heartbeat'];
  const live = table('Live workers', cols, { numeric: ['Concurrency', 'Busy', 'Live', 'Steps', 'Replays'] });
  const deadHead = h('h2', { id: 'dead-h' }, 'Dead letters');
  const dead = table('Dead letters', ['When', 'Session', 'Job', 'Reason', 'Error'], { hideCaption: true });
  fill(main, 
    pageHead('Workers', refreshBtn),
    alert,
    h('div', { class: 'card flush table-wrap' }, live.el),
    h('section', { 'aria-labelledby': 'dead-h' }, deadHead, h('div', { class: 'card flush table-wrap' }, dead.el)));

  const load = async () => {
    let data;
    try {
      data = await api('GET', '/workers?dead=20', { signal });
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      alert.textContent = err.status === 404
        ? 'This server has no /workers route (an older version).'
        : `Could not load the workers: ${err.message}`;
      return;
    }
    if (signal.aborted) return;
    alert.textContent = '';
    const workers = data.workers || [];
    fill(live.tbody, ...(workers.length ? workers.map((w) => h('tr', { 'data-worker-id': w.worker_id },
      cell('Worker', h('span', { class: 'id-text' }, w.worker_id), { class: 'lead nowrap' }),
      cell('Strategies', h('span', { class: 'small' }, Array.isArray(w.strategies) ? w.strategies.join(', ') : '—')),
      ...['concurrency', 'busy', 'live', 'steps', 'replays'].map((k, i) =>
        cell(cols[i + 2], fmtNumber(w[k]), { class: 'num' })),
      cell('Last heartbeat', timeEl(w.at)))) : [h('tr', {}, h('td', { colspan: String(cols.length), class: 'muted lead' }, 'No live workers'))]));
    const letters = data.dead_letters || [];
    deadHead.textContent = `Dead letters (${fmtNumber(data.dead_letter_count ?? letters.length)})`;
    // A refresh replaces the rows: keep the keyboard focus on the same session link.
    const focused = dead.tbody.contains(document.activeElement) ? document.activeElement.getAttribute('href') : null;
    fill(dead.tbody, ...(letters.length ? letters.map((d) => h('tr', {},
      cell('When', timeEl(d.at ?? (d.id ? Number(String(d.id).split('-')[0]) : null))),
      cell('Session', d.sid ? h('a', { href: `#/sessions/${enc(d.sid)}`, class: 'id-text' }, d.sid) : '—'),
      cell('Job', h('span', { class: 'id-text' }, d.job ?? '—')),
      cell('Reason', d.reason ?? '—'),
      cell('Error', d.error ?? '—'))) : [h('tr', {}, h('td', { colspan: '5', class: 'muted lead' }, 'No dead letters'))]));
    if (focused) [...dead.tbody.querySelectorAll('a')].find((a) => a.getAttribute('href') === focused)?.focus();
  };
  const refresh = () => background(signal, load());
  const soon = debounce(refresh, 300);
  signal.addEventListener('abort', () => soon.cancel());
  refreshBtn.addEventListener('click', refresh);
  await load();
  const timer = setInterval(refresh, 10000); // heartbeats are not events: a slow refresh
  signal.addEventListener('abort', () => clearInterval(timer));
  follow('/events', signal, { onEvent: soon });
}

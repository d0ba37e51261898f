// The sessions view (#/): counts per phase, filters, one page of sessions, paging; kept
// current by the namespace's event stream.

import { ApiError, api, follow } from './api.js';
import { badge, cell, fill, h, pageHead, table } from './dom.js';
import { enc, plural, timeEl } from './format.js';
import { PHASES } from './phases.js';
import { background, debounce, main, setTitle } from './page.js';

const PAGE_SIZE = 25;

// Kept across visits: coming back to the list shows the same filters and page.
const listState = { phase: '', strategy: '', cursors: [], cursor: null, strategies: new Set() };

function waitingFor(s) {
  if (s.phase === 'paused') {
    const n = s.pending_queries ?? (s.pending || []).length;
    return n ? plural(n, 'answer', 'answers') : 'answers';
  }
  if (s.phase === 'running') return 'a worker';
  return '—';
}

export async function sessionsView(signal) {
  setTitle('Sessions');
  const counts = h('ul', { class: 'counts', 'aria-label': 'Counts' });
  const phaseSel = h('select', { id: 'filter-phase' },
    h('option', { value: '' }, 'All phases'), PHASES.map((p) => h('option', { value: p }, p)));
  const strategySel = h('select', { id: 'filter-strategy' }, h('option', { value: '' }, 'All strategies'));
  phaseSel.value = listState.phase;
  const { el: tableEl, tbody } = table('Sessions',
    ['Session', 'Strategy', 'Phase', 'Waiting for', 'Last activity'], { hideCaption: true });
  const empty = h('div', { class: 'empty', hidden: true });
  const first = h('button', { type: 'button' }, 'First page');
  const next = h('button', { type: 'button' }, 'Next page');
  const pageNo = h('span', { class: 'muted small' });
  const alert = h('p', { class: 'alert', role: 'alert' });

  fill(main, 
    pageHead('Sessions', h('a', { class: 'button primary', href: '#/start' }, 'New session')),
    counts,
    h('div', { class: 'filters' },
      h('div', { class: 'field' }, h('label', { for: 'filter-phase' }, 'Phase'), phaseSel),
      h('div', { class: 'field' }, h('label', { for: 'filter-strategy' }, 'Strategy'), strategySel)),
    alert,
    h('div', { class: 'card flush table-wrap' }, tableEl, empty),
    h('div', { class: 'paging' }, pageNo, first, next),
  );

  const addStrategies = (names) => {
    for (const name of names) {
      if (!name || listState.strategies.has(name)) continue;
      listState.strategies.add(name);
    }
    const have = new Set([...strategySel.options].map((o) => o.value));
    const missing = [...listState.strategies].filter((n) => !have.has(n)).sort();
    for (const name of missing) {
      const after = [...strategySel.options].slice(1).find((o) => o.value > name);
      strategySel.insertBefore(h('option', { value: name }, name), after || null);
    }
  };
  addStrategies(listState.strategy ? [listState.strategy] : []);
  strategySel.value = listState.strategy;

  let nextCursor = null;
  const load = async () => {
    const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (listState.phase) q.set('phase', listState.phase);
    if (listState.strategy) q.set('strategy', listState.strategy);
    if (listState.cursor) q.set('cursor', listState.cursor);
    let page;
    try {
      page = await api('GET', `/sessions?${q}`, { signal });
    } catch (err) {
      if (err instanceof ApiError && listState.cursor) { // a cursor that no longer works
        listState.cursor = null;
        listState.cursors = [];
        return load();
      }
      throw err;
    }
    if (signal.aborted) return;
    alert.textContent = '';
    renderCounts(counts, page.counts || {});
    addStrategies((page.sessions || []).map((s) => s.strategy));
    renderRows(tbody, page.sessions || []);
    nextCursor = page.next_cursor || null;
    next.disabled = !nextCursor;
    first.disabled = !listState.cursor;
    pageNo.textContent = listState.cursors.length ? `Page ${listState.cursors.length + 1}` : '';
    const none = !(page.sessions || []).length;
    tableEl.hidden = none;
    empty.hidden = !none;
    if (none) {
      const total = Object.values(page.counts || {}).reduce((a, b) => a + b, 0);
      fill(empty, ...(total === 0 && !listState.phase && !listState.strategy
        ? [h('p', {}, 'No sessions yet'), h('a', { href: '#/start' }, 'Start the first session')]
        : [h('p', {}, 'No sessions match these filters')]));
    }
  };
  const refresh = () => background(signal, load().catch((err) => {
    if (err instanceof ApiError) alert.textContent = `Could not refresh the list: ${err.message}`;
    else throw err;
  }));
  const soon = debounce(refresh, 300);
  signal.addEventListener('abort', () => soon.cancel());

  phaseSel.addEventListener('change', () => {
    listState.phase = phaseSel.value;
    listState.cursor = null;
    listState.cursors = [];
    refresh();
  });
  strategySel.addEventListener('change', () => {
    listState.strategy = strategySel.value;
    listState.cursor = null;
    listState.cursors = [];
    refresh();
  });
  next.addEventListener('click', () => {
    if (!nextCursor) return;
    listState.cursors.push(listState.cursor);
    listState.cursor = nextCursor;
    refresh();
  });
  first.addEventListener('click', () => {
    listState.cursor = null;
    listState.cursors = [];
    refresh();
  });

  await load();
  background(signal, api('GET', '/strategies', { signal })
    .then((data) => addStrategies((data.strategies || []).map((s) => s.name)))
    .catch((err) => { if (!(err instanceof ApiError)) throw err; }));
  follow('/events', signal, { onEvent: soon, onOpen: soon });
}

function renderCounts(list, counts) {
  const names = [...PHASES, ...Object.keys(counts).filter((p) => !PHASES.includes(p))];
  fill(list, ...names.map((phase) => h('li', { dataset: { phase } },
    h('span', { class: 'label' }, phase), ' ', h('span', { class: 'n' }, String(counts[phase] ?? 0)))));
}

function renderRows(tbody, sessions) {
  const focused = document.activeElement?.closest?.('tr[data-session-id]')?.dataset.sessionId;
  fill(tbody, ...sessions.map((s) => h('tr', { 'data-session-id': s.session_id },
    cell('Session', h('a', { href: `#/sessions/${enc(s.session_id)}`, class: 'id-text' }, s.session_id), { class: 'lead' }),
    cell('Strategy', s.strategy ?? '—'),
    cell('Phase', badge(s.phase)),
    cell('Waiting for', waitingFor(s)),
    cell('Last activity', timeEl(s.last_activity_at)))));
  if (focused) {
    for (const row of tbody.rows) {
      if (row.dataset.sessionId === focused) row.querySelector('a')?.focus();
    }
  }
}

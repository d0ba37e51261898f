// One session's page (#/sessions/<id>): its facts, questions, outcome, input, conversation
// history by round, metrics and logs, kept current by the session's event stream; and the
// Cancel dialog.

import { ApiError, AuthNeeded, api, follow, needToken, setLive } from './api.js';
import { badge, fill, h, pageHead } from './dom.js';
import { enc, fmtDuration, fmtNumber, pretty, timeEl } from './format.js';
import { background, debounce, main, setTitle } from './page.js';
import { FINISHED } from './phases.js';
import { questionsPanel } from './session-questions.js';

export async function sessionView(signal, route) {
  const sid = route.sid;
  setTitle(`Session ${sid}`);
  const url = `/sessions/${enc(sid)}`;
  let snap = null;
  let gone = false;

  const load = async () => {
    let next;
    try {
      next = await api('GET', `${url}?pending=full&history=true`, { signal });
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        gone = true;
        showGone(sid);
        return;
      }
      throw err;
    }
    if (signal.aborted) return;
    snap = next;
    update(page, snap);
  };
  const refresh = () => background(signal, load().catch((err) => {
    if (err instanceof ApiError) page.pageAlert.textContent = `Could not refresh: ${err.message}`;
    else throw err;
  }));
  const soon = debounce(refresh, 200);
  signal.addEventListener('abort', () => soon.cancel());

  const page = layout(sid, questionsPanel(url, signal, refresh));
  wireCancel(page, url, signal, refresh);

  await load();
  if (gone || signal.aborted) return;
  const finished = () => gone || FINISHED.has(snap?.phase);
  if (finished()) return;
  let ended = false;
  follow(`${url}/events`, signal, {
    onEvent: (event) => {
      if (['completed', 'error', 'cancelled'].includes(event.type)) ended = true;
      soon();
    },
    onOpen: soon,
    onGone: () => refresh(),
    finished: () => ended || finished(),
  });
}

/** The page's empty boxes, placed; ``update`` fills them from each snapshot. */
function layout(sid, questions) {
  const page = {
    sid,
    questions,
    facts: h('dl', { class: 'facts' }),
    progress: h('div', { class: 'progress-row', hidden: true }),
    metrics: h('dl', { class: 'metrics' }),
    pageAlert: h('p', { class: 'alert', role: 'alert' }),
    outcome: h('section', { class: 'card', hidden: true, 'aria-labelledby': 'outcome-h' }),
    inputBox: h('section', { class: 'card', hidden: true, 'aria-labelledby': 'input-h' },
      h('h2', { id: 'input-h' }, 'Input')),
    historyList: h('div', { class: 'history-rounds' }),
    historySummary: h('summary', {}, 'Conversation history'),
    logsList: h('ul', { class: 'logs' }),
    cancelBtn: h('button', { type: 'button', class: 'danger', hidden: true }, 'Cancel session'),
    dialog: cancelDialog(),
  };
  page.historyBox = h('section', { class: 'card', hidden: true },
    h('details', {}, page.historySummary, page.historyList));
  fill(main, 
    pageHead(['Session ', h('span', { class: 'id' }, sid)], page.cancelBtn),
    page.pageAlert,
    h('section', { class: 'card', 'aria-label': 'Overview' }, page.facts, page.progress),
    h('div', { class: 'grid' },
      h('div', { class: 'stack' }, page.outcome, questions.el, page.inputBox, page.historyBox),
      h('div', { class: 'stack' },
        h('section', { class: 'card', 'aria-labelledby': 'metrics-h' },
          h('h2', { id: 'metrics-h' }, 'Metrics'), page.metrics),
        h('section', { class: 'card', 'aria-labelledby': 'logs-h' },
          h('h2', { id: 'logs-h' }, 'Recent logs'), page.logsList))),
    page.dialog,
  );
  return page;
}

function update(page, snap) {
  const phase = snap.phase || snap.state;
  const m = snap.metrics || {};
  setTitle(`Session ${page.sid} (${phase})`);
  renderFacts(page.facts, snap, phase);
  renderProgress(page.progress, m.progress);
  renderMetrics(page.metrics, m);
  page.cancelBtn.hidden = FINISHED.has(phase);
  renderOutcome(page.outcome, snap, phase);
  page.questions.update(snap, phase);
  renderInput(page.inputBox, snap);
  renderHistory(page, m.conversation_history);
  renderLogs(page.logsList, m.recent_logs);
}

function showGone(sid) {
  setLive('idle');
  fill(main, 
    pageHead(['Session ', h('span', { class: 'id' }, sid)]),
    h('div', { class: 'card empty' },
      h('p', {}, 'No such session: it never existed here, or it finished and its retention ran out.'),
      h('a', { href: '#/' }, 'Back to sessions')));
}

// -- the parts of the page --------------------------------------------------------------------

function renderFacts(dl, snap, phase) {
  fill(dl, 
    h('dt', {}, 'Strategy'), h('dd', {}, snap.strategy ?? '—'),
    h('dt', {}, 'Phase'), h('dd', {}, badge(phase, { 'data-testid': 'phase' })),
    h('dt', {}, 'Round'), h('dd', {}, String(snap.round ?? '—')),
    h('dt', {}, 'Started'), h('dd', {}, timeEl(snap.started_at)),
    h('dt', {}, 'Last activity'), h('dd', {}, timeEl(snap.last_activity_at)));
}

function renderProgress(box, p) {
  if (!p || typeof p !== 'object') {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const bar = h('progress', { id: 'session-progress' });
  const total = Number(p.total);
  const step = Number(p.step);
  if (Number.isFinite(total) && total > 0 && Number.isFinite(step)) {
    bar.max = total;
    bar.value = Math.min(step, total);
  }
  const words = [Number.isFinite(total) && total > 0 ? `${step} of ${total}` : null, p.message || null]
    .filter(Boolean).join(' · ');
  fill(box, h('label', { for: 'session-progress' }, 'Progress'), bar,
    h('span', { class: 'muted small' }, words));
}

function renderMetrics(dl, m) {
  const tokens = m.tokens && typeof m.tokens === 'object' ? m.tokens.total : m.tokens;
  const items = [
    ['LLM calls', fmtNumber(m.llm_calls)],
    // metrics.rounds counts the rounds whose every answer is in: beside "Round 2" (the round
    // being asked) a bare "Rounds 1" read as a contradiction.
    ['Rounds answered', fmtNumber(m.rounds)],
    ['Tokens', fmtNumber(tokens)],
    ['Elapsed', fmtDuration(m.elapsed_ms)],
  ];
  const left = m.budget_remaining;
  if (left && typeof left === 'object') {
    const parts = [['llm_calls', 'calls'], ['tokens', 'tokens'], ['elapsed_ms', 'ms']]
      .filter(([k]) => typeof left[k] === 'number')
      .map(([k, unit]) => (k === 'elapsed_ms' ? fmtDuration(left[k]) : `${fmtNumber(left[k])} ${unit}`));
    if (parts.length) items.push(['Budget left', parts.join(', ')]);
  }
  fill(dl, ...items.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v))));
}

function renderOutcome(box, snap, phase) {
  box.hidden = !FINISHED.has(phase);
  if (box.hidden) {
    fill(box);
    return;
  }
  if (phase === 'completed') {
    box.className = 'card result-box';
    fill(box, h('h2', { id: 'outcome-h' }, 'Result'),
      h('pre', { 'data-testid': 'result' }, pretty(snap.result ?? null)));
  } else if (phase === 'failed') {
    box.className = 'card';
    fill(box, h('h2', { id: 'outcome-h' }, 'Error'),
      h('div', { class: 'error-box', 'data-testid': 'error' },
        h('div', { class: 'type' }, snap.error_type || 'error'),
        h('p', {}, snap.error || 'The session failed.')),
      snap.traceback ? h('details', {}, h('summary', {}, 'Traceback'), h('pre', {}, snap.traceback)) : null);
  } else {
    box.className = 'card';
    const why = snap.error_type && snap.error_type !== 'cancelled' ? ` (${snap.error_type})` : '';
    fill(box, h('h2', { id: 'outcome-h' }, 'Cancelled'),
      h('p', { class: 'note' }, `This session was cancelled${why}.`),
      snap.error ? h('p', { class: 'muted small' }, snap.error) : null);
  }
}

function renderInput(box, snap) {
  if (!('input' in snap)) return;
  box.hidden = false;
  const pre = box.querySelector('pre') || box.appendChild(h('pre', { 'data-testid': 'input' }));
  pre.textContent = pretty(snap.input ?? {});
}

// The history is the last few exchanges of every round, oldest first. Each round asks its
// queries afresh (round 2's q-0 is another question than round 1's), so they are shown under
// a heading per round, numbered as the page's Round fact.
function renderHistory(page, items) {
  const list = Array.isArray(items) ? items : [];
  page.historyBox.hidden = list.length === 0;
  page.historySummary.textContent = `Conversation history (${list.length})`;
  fill(page.historyList, ...byRound(list).map(([round, exchanges]) => {
    return h('div', { class: 'history-round' },
      round === null ? null : h('h3', {}, `Round ${round}`),
      h('ol', { class: 'history' }, exchanges.map(exchangeItem)));
  }));
}

/** ``[[round, exchanges]]`` in order; exchanges without a round (an older server) share one
 * group with no heading. */
function byRound(list) {
  const groups = [];
  for (const x of list) {
    const round = typeof x.round === 'number' ? x.round : null;
    const last = groups[groups.length - 1];
    if (last && last[0] === round) last[1].push(x);
    else groups.push([round, [x]]);
  }
  return groups;
}

function exchangeItem(x) {
  return h('li', {},
    h('div', { class: 'query-head' }, h('h4', {}, x.query_id ?? 'query'),
      x.completed_at ? h('span', { class: 'muted small' }, 'answered ', timeEl(x.completed_at)) : null),
    h('div', { class: 'part-label' }, 'Prompt'), h('pre', {}, x.prompt ?? ''),
    h('div', { class: 'part-label' }, 'Answer'), h('pre', {}, x.response ?? ''));
}

function renderLogs(list, logs) {
  const items = Array.isArray(logs) ? logs : [];
  if (!items.length) {
    fill(list, h('li', { class: 'muted' }, 'No logs yet'));
    return;
  }
  fill(list, ...items.slice().reverse().map((e) => h('li', {},
    timeEl(e.ts), h('span', { class: 'level', dataset: { level: String(e.level || '').toLowerCase() } }, e.level || ''),
    h('span', {}, e.message ?? pretty(e)))));
}

// -- cancelling -------------------------------------------------------------------------------

function cancelDialog() {
  const form = h('form', { method: 'dialog' },
    h('h2', { id: 'cancel-h' }, 'Cancel this session?'),
    h('p', {}, 'The strategy stops where it is and its pending questions are dropped. This cannot be undone.'),
    h('div', { class: 'actions' },
      h('button', { type: 'submit', value: 'keep', autofocus: true }, 'Keep it'),
      h('button', { type: 'submit', value: 'yes', class: 'danger-solid' }, 'Yes, cancel it')));
  return h('dialog', { 'aria-labelledby': 'cancel-h' }, form);
}

/** Cancel session opens the dialog; "Yes, cancel it" sends the DELETE, anything else (Keep
 * it, Escape) puts the focus back on the button. */
function wireCancel(page, url, signal, refresh) {
  const { cancelBtn, dialog, pageAlert } = page;
  cancelBtn.addEventListener('click', () => {
    dialog.returnValue = '';
    dialog.showModal();
  });
  dialog.addEventListener('close', async () => {
    if (dialog.returnValue !== 'yes') {
      cancelBtn.focus();
      return;
    }
    dialog.returnValue = '';
    cancelBtn.disabled = true;
    try {
      await api('DELETE', url, { signal });
      pageAlert.textContent = '';
    } catch (err) {
      if (err instanceof AuthNeeded) { needToken(); return; }
      if (signal.aborted) return;
      pageAlert.textContent = err instanceof ApiError && err.status === 409
        ? 'The session had already finished; it cannot be cancelled.'
        : `Could not cancel the session: ${err.message}`;
    } finally {
      cancelBtn.disabled = false;
    }
    refresh();
  });
}

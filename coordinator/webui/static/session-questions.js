// A session's questions: one form per pending query, the "Waiting for …" line, and what a
// Send does (including the polite refusal when another tab answered first).

import { ApiError, AuthNeeded, api, needToken } from './api.js';
import { fill, h } from './dom.js';
import { fmtNumber } from './format.js';
import { main } from './page.js';
import { FINISHED } from './phases.js';

const MOVED_ON = new Set(['stale_round', 'already_responded', 'not_found', 'invalid_transition']);
const MOVED_ON_TEXT = 'This question was already answered or the session moved on (perhaps in '
  + 'another tab). The page now shows the current state.';

/**
 * The Questions card of the session at ``url``. ``refresh`` refetches the session (after a
 * Send, whatever its outcome). Returns ``{ el, update(snap, phase) }``.
 */
export function questionsPanel(url, signal, refresh) {
  const missing = h('p', { class: 'missing', role: 'status', 'data-testid': 'missing' });
  const formsBox = h('div', { class: 'queries' });
  const stateNote = h('div');
  const el = h('section', { class: 'card', 'aria-labelledby': 'questions-h' },
    h('h2', { id: 'questions-h' }, 'Questions'), missing, formsBox, stateNote);
  const panel = { el, formsBox, forms: new Map(), phase: null, url, signal, refresh };
  // `${round}/${query_id}` -> form state: { el, qid, round, textarea, send, alert, state }
  return {
    el,
    update(snap, phase) {
      panel.phase = phase;
      const pending = phase === 'paused' ? (snap.pending || []) : [];
      placeForms(panel, snap.round, pending);
      missing.textContent = missingText(pending.map((q) => q.query_id), snap.round_query_ids);
      el.hidden = FINISHED.has(phase) && panel.forms.size === 0;
      fill(stateNote, ...stateNoteFor(phase, pending));
    },
  };
}

function missingText(ids, roundIds) {
  const total = Array.isArray(roundIds) ? roundIds.length : null;
  if (!ids.length) return '';
  if (total && total > 1) return `Waiting for ${ids.length} of ${total} answers: ${ids.join(', ')}`;
  if (ids.length === 1) return `Waiting for 1 answer: ${ids[0]}`;
  return `Waiting for ${ids.length} answers: ${ids.join(', ')}`;
}

function stateNoteFor(phase, pending) {
  if (phase === 'running') {
    return [h('p', { class: 'note' }, 'A worker is running the next step; new questions or the result will show here.')];
  }
  if (phase === 'paused' && !pending.length) {
    return [h('p', { class: 'note' }, 'Every answer is in; the session continues in a moment.')];
  }
  return [];
}

// Pending queries: one form each, keyed by round and id. A form the person is using is
// never rebuilt under them; one whose query went away keeps its draft (a Send then says
// why it is refused) or its error until the round shows the same id again.
function placeForms(panel, round, pending) {
  const { forms, formsBox } = panel;
  const want = new Map(pending.map((q) => [`${round}/${q.query_id}`, q]));
  const pendingIds = new Set(pending.map((q) => q.query_id));
  for (const [key, f] of forms) {
    if (want.has(key)) continue;
    const draft = f.state === 'open' && f.textarea.value.trim() !== '';
    const keep = f.state === 'sending' || f.state === 'error' || draft;
    if (keep && !pendingIds.has(f.qid)) {
      if (f.state === 'error') closeForm(panel, f);
      continue;
    }
    if (f.state === 'error' && pendingIds.has(f.qid)) f.carry = f.alert.cloneNode(true);
    f.el.remove();
    forms.delete(key);
    if (f.carry) want.get(`${round}/${f.qid}`).carry = f.carry;
  }
  for (const [key, q] of want) {
    if (!forms.has(key)) forms.set(key, queryForm(panel, q, round));
  }
  const stale = [...forms.entries()].filter(([k]) => !want.has(k)).map(([, f]) => f.el);
  const desired = [...stale, ...[...want.keys()].map((k) => forms.get(k).el)];
  desired.forEach((el, i) => {
    if (formsBox.children[i] !== el) formsBox.insertBefore(el, formsBox.children[i] || null);
  });
}

function queryForm(panel, q, round) {
  const qid = q.query_id;
  const areaId = `answer-${round}-${qid}`.replace(/[^A-Za-z0-9_-]/g, '_');
  const hintId = `${areaId}-hint`;
  const textarea = h('textarea', { id: areaId, name: 'response', rows: '4', required: true,
    'aria-describedby': hintId });
  const send = h('button', { type: 'submit', class: 'primary' }, 'Send');
  const alert = h('div', { class: 'alert', role: 'alert', 'data-testid': 'error' });
  if (q.carry) fill(alert, ...q.carry.childNodes);
  const el = h('form', { class: 'query', 'aria-label': `Query ${qid}`, 'data-query-id': qid },
    h('div', { class: 'query-head' }, h('h3', {}, qid),
      q.max_tokens ? h('span', { class: 'muted small' }, `up to ${fmtNumber(q.max_tokens)} tokens`) : null),
    q.system ? [h('div', { class: 'part-label' }, 'System'), h('pre', { class: 'system' }, q.system)] : null,
    h('div', { class: 'part-label' }, 'Prompt'),
    h('pre', { class: 'prompt' }, q.prompt ?? '(the prompt is not shown)'),
    h('label', { for: areaId, class: 'part-label' }, `Answer ${qid}`),
    textarea,
    h('div', { class: 'actions' }, send,
      h('span', { id: hintId, class: 'muted small' }, 'Ctrl+Enter sends')),
    alert);
  const f = { el, qid, round, textarea, send, alert, state: 'open' };
  // Someone answering many questions keeps their hands on the keys: Ctrl+Enter (⌘+Enter)
  // sends from the answer box, with the same checks as the button (requestSubmit).
  textarea.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      el.requestSubmit(send);
    }
  });
  el.addEventListener('submit', (ev) => {
    ev.preventDefault();
    answer(panel, f);
  });
  return f;
}

// A form whose query went away after its Send failed: its text stays readable, its
// error stays shown, and a Dismiss button takes it off the page.
function closeForm(panel, f) {
  if (f.el.classList.contains('closed')) return;
  f.el.classList.add('closed');
  f.textarea.readOnly = true;
  f.send.hidden = true;
  const dismiss = h('button', { type: 'button' }, 'Dismiss');
  dismiss.addEventListener('click', () => {
    f.el.remove();
    panel.forms.delete(`${f.round}/${f.qid}`);
    if (!panel.formsBox.children.length && FINISHED.has(panel.phase)) panel.el.hidden = true;
    main.querySelector('h1')?.focus();
  });
  f.send.after(dismiss);
}

async function answer(panel, f) {
  if (f.state === 'sending') return;
  f.state = 'sending';
  f.textarea.readOnly = true;
  f.send.disabled = true;
  f.send.textContent = 'Sending…';
  fill(f.alert);
  try {
    await api('POST', `${panel.url}/responses`,
      { body: { query_id: f.qid, response: f.textarea.value, round: f.round } });
    f.state = 'sent';
    f.send.textContent = 'Sent';
    f.el.classList.add('sent');
  } catch (err) {
    if (err instanceof AuthNeeded) {
      needToken();
      return;
    }
    if (panel.signal.aborted) return;
    f.state = 'error';
    f.textarea.readOnly = false;
    f.send.disabled = false;
    f.send.textContent = 'Send';
    const movedOn = err instanceof ApiError && (MOVED_ON.has(err.type) || err.status === 409);
    fill(f.alert, 
      movedOn ? MOVED_ON_TEXT : `Could not send the answer: ${err.message}. Try again.`,
      err instanceof ApiError && movedOn ? h('small', {}, err.message) : null);
  }
  panel.refresh();
}

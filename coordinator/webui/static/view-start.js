// The start view (#/start): a form built from the strategies' parameters; a 201 opens the
// new session's page.

import { ApiError, AuthNeeded, api, needToken } from './api.js';
import { fill, h, pageHead } from './dom.js';
import { enc, plural, pretty } from './format.js';
import { main, setTitle } from './page.js';

const TEXTAREA_PARAMS = new Set(['task', 'text', 'prompt', 'question', 'context', 'initial_draft']);
let lastStrategy = '';

function paramKind(annotation) {
  const ann = String(annotation || '').replace(/\s+/g, '');
  const base = ann.replace(/^Optional\[(.*)\]$/, '$1').replace(/\|None$/, '').replace(/^None\|/, '');
  if (['bool', 'int', 'float', 'str'].includes(base)) return base;
  return 'json';
}

function paramField(p, i) {
  const id = `param-${i}`;
  const kind = paramKind(p.annotation);
  const hasDefault = !p.required && p.default !== null && p.default !== undefined;
  const hintText = [p.annotation && p.annotation !== 'str' ? p.annotation : null,
    hasDefault ? `default ${typeof p.default === 'string' ? JSON.stringify(p.default) : pretty(p.default)}` : null,
    kind === 'json' ? 'JSON (an object or a list) or plain text' : null].filter(Boolean).join(' · ');
  const hint = hintText ? h('span', { class: 'hint', id: `${id}-hint` }, hintText) : null;
  const common = { id, name: p.name, required: !!p.required, 'aria-describedby': hint ? `${id}-hint` : null };
  let control;
  if (kind === 'bool') {
    control = h('input', { type: 'checkbox', ...common, required: false });
    control.checked = p.default === true;
    return { kind, p, control,
      el: h('div', { class: 'field' }, h('div', { class: 'field check' }, control, h('label', { for: id }, p.name)), hint) };
  }
  if (kind === 'int' || kind === 'float') {
    control = h('input', { type: 'number', step: kind === 'int' ? '1' : 'any', inputmode: kind === 'int' ? 'numeric' : 'decimal', ...common });
  } else if (kind === 'str' && !TEXTAREA_PARAMS.has(p.name)) {
    control = h('input', { type: 'text', ...common });
  } else {
    control = h('textarea', { rows: kind === 'json' ? '3' : '4', class: kind === 'json' ? 'json' : null, ...common });
  }
  if (hasDefault) control.placeholder = typeof p.default === 'string' ? p.default : JSON.stringify(p.default);
  const labelRow = h('div', {}, h('label', { for: id }, p.name), p.required ? h('span', { class: 'req' }, 'required') : null);
  return { kind, p, control, el: h('div', { class: 'field' }, labelRow, control, hint) };
}

/** The strategy input from the fields: only those filled in (or changed, for checkboxes). */
function collectInput(fields) {
  const input = {};
  for (const { kind, p, control } of fields) {
    if (kind === 'bool') {
      if (control.checked !== (p.default === true)) input[p.name] = control.checked;
      continue;
    }
    const raw = control.value;
    if (raw.trim() === '') continue;
    if (kind === 'int' || kind === 'float') {
      const n = Number(raw);
      if (!Number.isFinite(n) || (kind === 'int' && !Number.isInteger(n))) {
        throw fieldError(control, `${p.name} must be ${kind === 'int' ? 'a whole number' : 'a number'}.`);
      }
      input[p.name] = n;
    } else if (kind === 'json' && /^\s*[[{]/.test(raw)) {
      try { input[p.name] = JSON.parse(raw); } catch (err) {
        throw fieldError(control, `${p.name} is not valid JSON: ${err.message}`);
      }
    } else {
      input[p.name] = raw;
    }
  }
  return input;
}

function fieldError(control, message) {
  const err = new Error(message);
  err.control = control;
  return err;
}

/** The POST /sessions body from the form; a field error (with its control) if one is wrong. */
function requestBody(strategy, fields, ttl, budget) {
  const body = { strategy, input: collectInput(fields) };
  const ttlValue = ttl.control.value.trim();
  if (ttlValue) {
    const n = Number(ttlValue);
    if (!(n > 0)) throw fieldError(ttl.control, 'TTL must be a positive number of seconds.');
    body.ttl = n;
  }
  const limits = {};
  for (const [key, f] of budget) {
    const v = f.control.value.trim();
    if (!v) continue;
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw fieldError(f.control, 'Budget limits must be positive whole numbers.');
    limits[key] = n;
  }
  if (Object.keys(limits).length) body.budget = limits;
  return body;
}

function numberField(id, label, hint) {
  const control = h('input', { type: 'number', id, min: '1', step: 'any', inputmode: 'numeric',
    'aria-describedby': hint ? `${id}-hint` : null });
  return { control, el: h('div', { class: 'field' }, h('label', { for: id }, label), control,
    hint ? h('span', { class: 'hint', id: `${id}-hint` }, hint) : null) };
}

export async function startView(signal, route) {
  setTitle('Start a session');
  const data = await api('GET', '/strategies', { signal });
  if (signal.aborted) return;
  const strategies = data.strategies || [];
  const select = h('select', { id: 'start-strategy', name: 'strategy', 'aria-describedby': 'strategy-desc' },
    strategies.map((s) => h('option', { value: s.name }, s.name)));
  const desc = h('p', { class: 'hint', id: 'strategy-desc' });
  const paramsBox = h('div');
  const ttl = numberField('start-ttl', 'TTL (seconds)', 'How long the session may wait for answers before it expires. Empty: the server’s default.');
  const budget = [
    ['max_llm_calls', numberField('budget-calls', 'Max LLM calls')],
    ['max_tokens', numberField('budget-tokens', 'Max tokens')],
    ['max_elapsed_ms', numberField('budget-elapsed', 'Max elapsed (ms)')],
  ];
  for (const [, f] of budget) f.control.step = '1';
  const alert = h('div', { class: 'alert', role: 'alert' });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Start');
  const form = h('form', { 'aria-label': 'Start a session', class: 'card start-form' },
    h('div', { class: 'field' }, h('label', { for: 'start-strategy' }, 'Strategy'), select, desc),
    paramsBox,
    h('fieldset', {}, h('legend', {}, 'Options'), ttl.el),
    h('fieldset', {}, h('legend', {}, 'Budget'),
      h('p', { class: 'hint' }, 'Optional limits; the session fails when it runs past one.'),
      h('div', { class: 'row3' }, budget.map(([, f]) => f.el))),
    h('div', { class: 'actions' }, submit),
    alert);

  fill(main, pageHead('Start a session'), form);

  if (!strategies.length) {
    select.append(h('option', { value: '' }, 'No strategies'));
    select.disabled = true;
    submit.disabled = true;
    fill(desc, h('span', { class: 'note warn', role: 'status' }, 'No live worker offers a strategy'));
    return;
  }

  let fields = [];
  const showStrategy = () => {
    const s = strategies.find((x) => x.name === select.value) || strategies[0];
    lastStrategy = s.name;
    desc.textContent = [s.description || 'No description.',
      typeof s.workers === 'number' ? `Offered by ${plural(s.workers, 'live worker', 'live workers')}.` : null]
      .filter(Boolean).join(' ');
    fields = (s.params || []).map(paramField);
    fill(paramsBox, ...(fields.length
      ? [h('fieldset', {}, h('legend', {}, 'Input'), fields.map((f) => f.el))]
      : [h('p', { class: 'muted' }, 'This strategy takes no input.')]));
  };
  const wanted = route.params.get('strategy') || lastStrategy;
  if (strategies.some((s) => s.name === wanted)) select.value = wanted;
  showStrategy();
  select.addEventListener('change', () => { alert.textContent = ''; showStrategy(); });

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    alert.textContent = '';
    let body;
    try {
      body = requestBody(select.value, fields, ttl, budget);
    } catch (err) {
      alert.textContent = err.message;
      err.control?.focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = 'Starting…';
    try {
      const first = await api('POST', '/sessions', { body, signal });
      if (signal.aborted) return;
      location.hash = `#/sessions/${enc(first.session_id)}`;
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof AuthNeeded) { needToken(); return; }
      alert.textContent = err instanceof ApiError
        ? `Could not start the session: ${err.message}${err.type ? ` (${err.type})` : ''}`
        : `Could not reach the server: ${err.message}`;
      submit.disabled = false;
      submit.textContent = 'Start';
    }
  });
}

// Numbers, durations, JSON and times as the console shows them.

import { h } from './dom.js';

export const enc = encodeURIComponent;
export const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
export const fmtNumber = (n) => (typeof n === 'number' ? n.toLocaleString() : '—');

export function fmtDuration(ms) {
  if (typeof ms !== 'number') return '—';
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function pretty(value) {
  if (typeof value === 'string') return value;
  try { return JSON.stringify(value, null, 2); } catch { return String(value); }
}

// -- times: relative text, absolute title, refreshed in place ---------------------------------

const relFormat = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto', style: 'narrow' });
const absFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

function toMs(ts) {
  const n = typeof ts === 'string' && /^\d+(\.\d+)?$/.test(ts) ? Number(ts) : ts;
  if (typeof n === 'number' && Number.isFinite(n)) return n < 1e11 ? n * 1000 : n;
  const parsed = Date.parse(ts);
  return Number.isNaN(parsed) ? null : parsed;
}

function relative(ms) {
  const diff = (ms - Date.now()) / 1000;
  const abs = Math.abs(diff);
  if (abs < 60) return relFormat.format(Math.round(diff), 'second');
  if (abs < 3600) return relFormat.format(Math.round(diff / 60), 'minute');
  if (abs < 86400) return relFormat.format(Math.round(diff / 3600), 'hour');
  return relFormat.format(Math.round(diff / 86400), 'day');
}

export function timeEl(ts) {
  const ms = toMs(ts);
  if (ms === null || ms === undefined) return h('span', { class: 'muted' }, '—');
  const date = new Date(ms);
  return h('time', { datetime: date.toISOString(), title: absFormat.format(date),
    dataset: { ts: String(ms) } }, relative(ms));
}

/** Keeps every relative time on the page current ("5 s ago" grows old in place). */
export function keepTimesFresh() {
  setInterval(() => {
    for (const el of document.querySelectorAll('time[data-ts]')) {
      el.textContent = relative(Number(el.dataset.ts));
    }
  }, 5000);
}

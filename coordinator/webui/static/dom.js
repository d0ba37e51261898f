// Building the page: elements from data (never markup), and the pieces every view shares.
//
// Every server value reaches the page through h(): strings become text nodes, so nothing the
// server says is ever parsed as HTML.

/** createElement with attributes and children; strings become text nodes. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace ``el``'s children; like append(), skips null/undefined/false (the DOM's own
 * replaceChildren would show them as the text "null"). */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function badge(phase, attrs = {}) {
  return h('span', { class: 'badge', dataset: { phase }, ...attrs }, phase);
}

export function pageHead(title, ...actions) {
  return h('div', { class: 'page-head' }, h('h1', { tabindex: '-1' }, title),
    actions.length ? h('div', { class: 'actions' }, actions) : null);
}

export function cell(label, content, attrs = {}) {
  return h('td', { 'data-label': label, ...attrs }, content);
}

export function table(caption, columns, { hideCaption = false, numeric = [] } = {}) {
  const tbody = h('tbody');
  const el = h('table', { class: 'stack-sm' },
    h('caption', { class: hideCaption ? 'sr' : null }, caption),
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: numeric.includes(c) ? 'num' : null }, c)))),
    tbody);
  return { el, tbody };
}

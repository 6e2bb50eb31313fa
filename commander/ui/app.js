// The dashboard's core: the token and the caller's roles, API calls, the live stream
// (SSE read with fetch, so the token travels in a header), the control socket, and a
// hash router over the pages in views.js.
import * as views from './views.js';

// Every uncaught error is kept (and shown): the browser tests read window.__fleetErrors.
window.__fleetErrors = [];
const keepError = (msg) => {
  window.__fleetErrors.push(String(msg));
  const b = document.getElementById('banner');
  if (b) { b.textContent = `Dashboard error: ${msg}`; b.hidden = false; }
};
window.addEventListener('error', e => keepError(e.message));
window.addEventListener('unhandledrejection', e => keepError(e.reason?.message ?? e.reason));
const consoleError = console.error.bind(console);
console.error = (...a) => { keepError(a.join(' ')); consoleError(...a); };

export const app = {
  token: sessionStorage.getItem('fleet.token') || '',
  me: null,
  page: null,
  handlers: new Map(),
};

export class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (app.token) h.Authorization = `Bearer ${app.token}`;
  return h;
}

/**
 * An API path (`/v1/fleet`) as a URL beside the page, so the dashboard also works where a
 * reverse proxy serves it under a prefix (`https://tools.example/fleet/`).
 */
function apiUrl(path) {
  return new URL(path.replace(/^\//, ''), document.baseURI);
}

/** GET (or `opts`) an API path as JSON; a 401 asks for a token. */
export async function api(path, opts = {}) {
  const r = await fetch(apiUrl(path), { ...opts, headers: headers(opts.headers) });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { error: { code: 'bad_answer', message: text.slice(0, 200) } }; }
  if (r.status === 401) { askToken('The commander needs a token for this.'); }
  if (!r.ok) throw new ApiError(r.status, body?.error?.code, body?.error?.message ?? r.statusText);
  return body;
}

export function may(role) {
  return !!app.me && app.me.roles.includes(role);
}

function askToken(why) {
  const d = document.getElementById('login');
  const e = document.getElementById('login-error');
  if (why) { e.textContent = why; e.hidden = false; }
  if (!d.open) d.showModal();
}

async function whoami() {
  try {
    app.me = await api('/v1/whoami');
  } catch (e) {
    app.me = null;
    if (e.status !== 401) throw e;
    return false;
  }
  const who = document.getElementById('who');
  who.textContent = app.me.local_mode ? 'local mode (no tokens)' : `${app.me.name} · ${app.me.roles.join(', ')}`;
  document.body.dataset.roles = app.me.roles.join(' ');
  return true;
}

// ---- live stream ----------------------------------------------------------------

let streamAbort = null;
let lastEventId = null;
// The kinds the page on screen listens to: the stream asks for these alone, so a page
// that shows the fleet does not receive every agent's updates.
let streamKinds = '';

/** Calls `fn(data)` for each `kind` event while the current page is mounted. */
export function on(kind, fn) {
  if (!app.handlers.has(kind)) app.handlers.set(kind, new Set());
  app.handlers.get(kind).add(fn);
}

function dispatch(kind, data) {
  for (const fn of app.handlers.get(kind) ?? []) {
    try { fn(data); } catch (e) { keepError(e.message); }
  }
}

async function stream() {
  if (streamAbort) streamAbort.abort();
  const ctl = new AbortController();
  streamAbort = ctl;
  const live = document.getElementById('live');
  for (let backoff = 500; !ctl.signal.aborted; backoff = Math.min(backoff * 2, 10000)) {
    try {
      const h = headers(lastEventId ? { 'Last-Event-ID': String(lastEventId) } : {});
      const r = await fetch(apiUrl(`/v1/stream?kinds=${streamKinds}`), { headers: h, signal: ctl.signal });
      if (r.status === 401 || r.status === 403) { live.classList.remove('on'); return; }
      if (!r.ok || !r.body) throw new Error(`stream: ${r.status}`);
      live.classList.add('on');
      backoff = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const frame = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let ev = 'message', data = '', id = null;
          for (const line of frame.split('\n')) {
            if (line.startsWith('event: ')) ev = line.slice(7);
            else if (line.startsWith('data: ')) data += line.slice(6);
            else if (line.startsWith('id: ')) id = Number(line.slice(4));
          }
          if (id != null) lastEventId = id;
          if (!data) continue;
          if (ev === 'resync') { route(); continue; }
          dispatch(ev, JSON.parse(data));
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    live.classList.remove('on');
    await new Promise(res => setTimeout(res, backoff));
  }
}

// ---- control socket -------------------------------------------------------------

let sock = null;
const pending = new Map();
let seq = 0;

function openSocket() {
  if (sock && sock.readyState <= 1) return sock;
  const url = apiUrl('/v1/control');
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  const protocols = ['fleet.control.v1'];
  if (app.token) protocols.push(`bearer.${app.token}`);
  sock = new WebSocket(url, protocols);
  sock.onmessage = m => {
    const ack = JSON.parse(m.data);
    const p = pending.get(ack.id);
    if (p) { pending.delete(ack.id); p(ack); }
  };
  sock.onclose = () => {
    for (const [, p] of pending) p({ ok: false, error: { code: 'closed', message: 'control socket closed' } });
    pending.clear();
  };
  return sock;
}

/** Sends one control command over the WebSocket; resolves with its ack. */
export function control(cmd) {
  const s = openSocket();
  const id = `ui-${Date.now()}-${++seq}`;
  return new Promise(resolve => {
    pending.set(id, resolve);
    const send = () => s.send(JSON.stringify({ ...cmd, id }));
    if (s.readyState === 1) send(); else s.addEventListener('open', send, { once: true });
    setTimeout(() => { if (pending.delete(id)) resolve({ ok: false, error: { code: 'timeout', message: 'no ack in 10 s' } }); }, 10000);
  });
}

// ---- router ---------------------------------------------------------------------

const PAGES = {
  overview: views.overview,
  workers: views.workers,
  worker: views.worker,
  pools: views.pools,
  decisions: views.decisions,
  decision: views.decision,
  task: views.task,
  tasks: views.tasks,
  traces: views.traces,
  trace: views.trace,
  costs: views.costs,
  alerts: views.alerts,
  policy: views.policy,
  audit: views.audit,
};

let mountSeq = 0;

export async function route() {
  const [name, ...rest] = (location.hash.replace(/^#\/?/, '') || 'overview').split('/');
  const page = PAGES[name] ?? views.overview;
  const arg = rest.map(decodeURIComponent).join('/');
  app.handlers = new Map();
  const main = document.getElementById('main');
  for (const a of document.querySelectorAll('.top nav a')) {
    a.classList.toggle('on', a.dataset.page === name || (a.dataset.page + 's') === name || a.dataset.page === name + 's');
    if (a.classList.contains('on')) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const mine = ++mountSeq;
  try {
    await page(main, arg, () => mine === mountSeq);
    if (mine === mountSeq) follow();
  } catch (e) {
    if (mine !== mountSeq) return;
    if (e.status === 401) return;
    main.innerHTML = '';
    const p = document.createElement('p');
    p.className = 'error';
    p.textContent = e.status === 403 ? `Your role may not see this: ${e.message}` : `Could not load this page: ${e.message}`;
    main.append(p);
  }
}

/** (Re)opens the stream when the page on screen listens to other kinds than before. */
function follow() {
  const kinds = [...app.handlers.keys()].sort().join(',') || 'policy';
  if (kinds === streamKinds && streamAbort) return;
  streamKinds = kinds;
  // A new set of kinds starts from now: the page fetched the state it shows.
  lastEventId = null;
  stream();
}

async function start() {
  const root = document.documentElement;
  const saved = localStorage.getItem('fleet.theme');
  if (saved) root.classList.add(saved);
  document.getElementById('theme').onclick = () => {
    const dark = root.classList.contains('dark') || (!root.classList.contains('light') && matchMedia('(prefers-color-scheme: dark)').matches);
    root.classList.remove('dark', 'light');
    root.classList.add(dark ? 'light' : 'dark');
    localStorage.setItem('fleet.theme', dark ? 'light' : 'dark');
  };
  document.getElementById('signout').onclick = () => askToken('');
  document.getElementById('login-form').addEventListener('submit', async () => {
    app.token = document.getElementById('login-token').value.trim();
    sessionStorage.setItem('fleet.token', app.token);
    if (sock) { sock.close(); sock = null; }
    if (await whoami()) { document.getElementById('login-error').hidden = true; streamAbort?.abort(); streamAbort = null; route(); }
    else askToken('That token was not accepted.');
  });
  document.getElementById('find').addEventListener('submit', e => {
    e.preventDefault();
    const id = document.getElementById('find-id').value.trim();
    if (id) location.hash = `#/task/${encodeURIComponent(id)}`;
  });
  window.addEventListener('hashchange', route);
  if (await whoami()) await route();
}

start().catch(e => keepError(e.message));

// The dashboard's pages. Each is `async (main, arg, alive)`: it fetches what it shows,
// renders, and subscribes to the live events it updates from; `alive()` turns false when
// the operator has moved to another page.
import { api, on, may, control, app } from './app.js';
import { esc, sparkline, lines, donut, gauge, treemap, fmtNum, usd, ago, dur } from './charts.js';

const STATES = ['ACTIVE', 'IDLE', 'WAITING', 'STUCK', 'ERROR', 'LOST'];
const q = (root, sel) => root.querySelector(sel);

function errorClass(rate) {
  if (rate == null) return 'muted';
  return rate > 0.05 ? 'bad' : rate > 0.01 ? 'warn' : 'ok';
}

function pct(x, d = 1) {
  return x == null ? '—' : `${(x * 100).toFixed(d)} %`;
}

function qs(obj) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(obj)) if (v !== '' && v != null) p.set(k, v);
  const s = p.toString();
  return s ? `?${s}` : '';
}

/** A click on a row of `tbody` (or Enter on it) opens `#/<page>/<its data-<key>>`. */
function rowsOpen(tbody, key, page) {
  const open = e => { const tr = e.target.closest(`tr[data-${key}]`); if (tr) location.hash = `#/${page}/${encodeURIComponent(tr.dataset[key])}`; };
  tbody.onclick = open;
  tbody.onkeydown = e => { if (e.key === 'Enter') open(e); };
}

function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}

async function act(cmd, out) {
  out.textContent = 'sending…';
  const ack = await control(cmd);
  out.textContent = ack.ok ? `done (${ack.audit_id})` : `refused: ${ack.error?.message ?? 'unknown error'}`;
  out.className = ack.ok ? 'ok' : 'error';
  return ack;
}

// ---- overview -------------------------------------------------------------------

export async function overview(main, _arg, alive) {
  const [fleet, pools, alerts, policy] = await Promise.all([
    api('/v1/fleet?series=5m'),
    api('/v1/pools'),
    api('/v1/alerts?state=all&limit=5'),
    api('/v1/policy').catch(() => null),
  ]);
  if (!alive()) return;
  main.innerHTML = `
    <h1>Fleet overview</h1>
    <div class="grid">
      <section class="card" aria-labelledby="h-states"><h2 id="h-states">Agents by state</h2><div class="states" id="states"></div></section>
      <section class="card" aria-labelledby="h-tok"><h2 id="h-tok">Tokens / s</h2><div class="big" id="tokens">—</div><div id="tokens-spark"></div><div class="muted">last 5 minutes</div></section>
      <section class="card" aria-labelledby="h-tpm"><h2 id="h-tpm">Tasks / min</h2><div class="big" id="tpm">—</div><div id="tpm-spark"></div><div class="muted">last 5 minutes</div></section>
      <section class="card" aria-labelledby="h-burn"><h2 id="h-burn">Burn rate</h2><div class="big" id="burn">—</div><div id="monthly" class="muted"></div><div id="burn-spark"></div><div class="muted" id="burn-note">24 hours</div></section>
      <section class="card" aria-labelledby="h-err"><h2 id="h-err">Error rate (5 min)</h2><div class="big" id="errors">—</div><div class="muted" id="ops"></div></section>
      <section class="card wide" aria-labelledby="h-q"><h2 id="h-q">Queue depth by pool</h2><div id="queues" style="display:flex;flex-wrap:wrap;gap:8px"></div></section>
      <section class="card wide" aria-labelledby="h-m"><h2 id="h-m">Models (LLM calls, last hour)</h2><div id="models"></div></section>
      <section class="card full" aria-labelledby="h-a"><h2 id="h-a"><a href="#/alerts">Recent alerts</a> <span id="firing" class="pill"></span></h2><div class="alerts-strip" id="strip"></div></section>
    </div>`;
  const budget = fleetBudget(policy);
  const toks = fleet.series ?? [];
  const tokSeries = toks.map(p => p.output_tokens / 10);
  const tpmSeries = toks.map(p => p.tasks * 6);
  let limits = {};
  const drawFleet = (f) => {
    const states = Object.fromEntries(STATES.map(s => [s, s === 'LOST' ? f.lost : (f.states?.[s] ?? 0)]));
    q(main, '#states').innerHTML = STATES.map(s => `<div class="state ${s.toLowerCase()}" data-state="${s}"><b>${states[s]}</b>${s.toLowerCase()}</div>`).join('');
    q(main, '#tokens').textContent = fmtNum(f.output_tokens_per_s + f.input_tokens_per_s);
    q(main, '#tokens').title = `${fmtNum(f.input_tokens_per_s)} in, ${fmtNum(f.output_tokens_per_s)} out`;
    q(main, '#tpm').textContent = fmtNum(f.tasks_per_min);
    q(main, '#burn').textContent = `${usd(f.burn_rate_usd_per_h)}/h`;
    q(main, '#monthly').textContent = `${usd(f.projected_monthly_usd)} / month projected`;
    const burnEl = q(main, '#burn');
    burnEl.className = 'big ' + (budget ? budgetClass(f.burn_rate_usd_per_h, budget) : '');
    const er = q(main, '#errors');
    er.textContent = pct(f.error_rate_5m, 2);
    er.className = 'big ' + errorClass(f.error_rate_5m);
    q(main, '#ops').textContent = `${fmtNum(f.ops_5m)} operations`;
    q(main, '#models').innerHTML = donut((f.models ?? []).slice(0, 8).map(m => ({ label: m.model, value: m.calls })), { label: 'model distribution' });
  };
  const drawPools = (ps) => {
    q(main, '#queues').innerHTML = ps.map(p => {
      const depth = p.queue?.depth ?? 0;
      const max = limits[p.name] ?? p.capacity;
      return `<div data-pool="${esc(p.name)}">${gauge(depth, max, { label: esc(p.name) })}</div>`;
    }).join('') || '<p class="muted">No pools yet.</p>';
  };
  const drawSparks = () => {
    q(main, '#tokens-spark').innerHTML = sparkline(tokSeries.slice(-30), { label: 'tokens per second, 5 minutes' });
    q(main, '#tpm-spark').innerHTML = sparkline(tpmSeries.slice(-30), { label: 'tasks per minute, 5 minutes', stroke: 'var(--output)' });
  };
  let recent = alerts.alerts ?? [];
  const drawAlerts = (firing) => {
    q(main, '#firing').textContent = `${firing ?? recent.filter(a => a.state === 'firing').length} firing`;
    // The strip holds the latest alerts whatever their state: one not firing says so, or a
    // pending (not yet due) or resolved one reads like a live one.
    const when = a => a.state === 'resolved' ? `resolved ${ago(a.ended_ms ?? a.started_ms)}`
      : a.state === 'pending' ? `pending ${ago(a.started_ms)}` : ago(a.firing_ms ?? a.started_ms);
    q(main, '#strip').innerHTML = recent.slice(0, 5).map(a => `<a href="#/alerts" class="alert-item ${esc(a.state)}" data-alert="${esc(a.id)}" data-state="${esc(a.state)}"><span class="pill ${esc(a.severity)}">${esc(a.severity)}</span> ${esc(a.rule)} <span class="muted">${esc(a.labels?.worker ?? a.labels?.pool ?? 'fleet')}</span> <span class="muted">${when(a)}</span></a>`).join('') || '<span class="muted">No alerts.</span>';
  };
  drawFleet(fleet);
  drawPools(pools.pools ?? []);
  drawSparks();
  drawAlerts();
  performance.mark('overview-ready');
  on('fleet_snapshot', ev => {
    limits = ev.max_queue_depth ?? {};
    drawFleet(ev.fleet);
    drawPools(ev.pools);
    tokSeries.push(ev.fleet.output_tokens_per_s);
    tpmSeries.push(ev.fleet.tasks_per_min);
    if (tokSeries.length > 300) { tokSeries.shift(); tpmSeries.shift(); }
    drawSparks();
    q(main, '#firing').textContent = `${ev.alerts_firing} firing`;
  });
  on('alert', a => {
    if (!a.rule) return;
    recent = [a, ...recent.filter(x => x.id !== a.id)].slice(0, 5);
    drawAlerts();
  });
  // The 24-hour burn line is 8,640 ten-second buckets: loaded after the first paint.
  api('/v1/fleet?series=24h').then(s => {
    if (!alive()) return;
    const pts = s.series ?? [];
    const hourly = [];
    for (let i = 0; i < pts.length; i += 60) hourly.push(pts.slice(i, i + 60).reduce((a, p) => a + p.cost_usd, 0) * 6);
    q(main, '#burn-spark').innerHTML = sparkline(hourly, { label: 'burn rate per hour over 24 hours', stroke: 'var(--warn)' });
    if (budget) q(main, '#burn-note').textContent = `24 hours · budget ${esc(budget.name)}: ${usd(budget.limit_usd)} per ${esc(budget.window)}`;
  }).catch(() => {});
}

/** The fleet-wide budget in force, if any (the burn rate is coloured against it). */
function fleetBudget(policy) {
  const b = (policy?.budgets ?? []).find(b => b.scope === 'fleet');
  if (!b) return null;
  const st = (policy.standing ?? []).find(s => s.budget === b.name);
  return { name: b.name, limit_usd: b.limit_usd, window: b.window, used: st?.used };
}

function budgetClass(burnPerH, b) {
  const hours = { hour: 1, day: 24, month: 720 }[b.window] ?? (parseFloat(b.window) || 1);
  const projected = burnPerH * hours;
  const frac = Math.max(b.used ?? 0, projected / b.limit_usd);
  return frac >= 1 ? 'bad' : frac >= 0.8 ? 'warn' : 'ok';
}

// ---- workers --------------------------------------------------------------------

export async function workers(main, _arg, alive) {
  main.innerHTML = `
    <h1>Workers</h1>
    <form class="filters" id="f" role="search">
      <label>Id contains <input name="q" size="14"></label>
      <label>Pool <input name="pool" size="10"></label>
      <label>Model <input name="model" size="14"></label>
      <label>State <select name="state"><option value="">any</option>${STATES.map(s => `<option>${s}</option>`).join('')}</select></label>
      <button type="submit">Filter</button>
    </form>
    <div class="card"><table id="t"><thead><tr>
      ${[['id', 'Worker'], ['state', 'State'], ['pool', 'Pool'], ['model', 'Model'], ['tasks', 'Tasks', 'n'], ['errors', 'Failed', 'n'], ['context', 'Context', 'n'], ['tokens_per_s', 'Tokens/s', 'n'], ['burn_rate', '$/h', 'n'], ['cost_usd', 'Cost', 'n']]
        .map(([k, l, c]) => `<th class="${c ?? ''}" aria-sort="none"><button type="button" data-sort="${k}">${l}</button></th>`).join('')}
    </tr></thead><tbody></tbody></table>
    <div class="pager"><button type="button" id="prev">← Previous</button><span id="page" class="muted"></span><button type="button" id="next">Next →</button></div></div>`;
  const state = { sort: 'id', order: 'asc', offset: 0, limit: 50, filters: {} };
  const rows = new Map();
  const tbody = q(main, 'tbody');
  const row = (w) => {
    const tr = document.createElement('tr');
    tr.className = 'clickable' + (w.lost ? ' lost-row' : '');
    tr.tabIndex = 0;
    tr.dataset.worker = w.id;
    fill(tr, w);
    const go = () => { location.hash = `#/worker/${encodeURIComponent(w.id)}`; };
    tr.onclick = go;
    tr.onkeydown = e => { if (e.key === 'Enter') go(); };
    return tr;
  };
  const fill = (tr, w) => {
    const st = w.lost ? 'LOST' : w.state;
    tr.innerHTML = `<td>${esc(w.id)}</td><td><span class="pill ${st}">${st}</span>${w.paused ? ' <span class="pill">paused</span>' : ''}${w.draining ? ' <span class="pill">draining</span>' : ''}</td><td>${esc(w.pool ?? '')}</td><td>${esc(w.model ?? '')}</td>
      <td class="n">${w.tasks_completed}</td><td class="n">${w.tasks_failed}</td><td class="n">${pct(w.context_utilisation, 0)}</td><td class="n">${fmtNum(w.output_tokens_per_s)}</td><td class="n">${usd(w.burn_rate_usd_per_h)}</td><td class="n">${usd(w.cost_usd)}</td>`;
  };
  const load = async () => {
    const page = await api('/v1/workers' + qs({ ...state.filters, sort: state.sort, order: state.order, offset: state.offset, limit: state.limit }));
    if (!alive()) return;
    rows.clear();
    tbody.replaceChildren(...page.workers.map(w => { const tr = row(w); rows.set(w.id, tr); return tr; }));
    q(main, '#page').textContent = page.total ? `${page.offset + 1}–${page.offset + page.workers.length} of ${page.total}` : 'no workers match';
    q(main, '#prev').disabled = state.offset === 0;
    q(main, '#next').disabled = page.next_offset == null;
    for (const th of main.querySelectorAll('th')) {
      const k = th.querySelector('button')?.dataset.sort;
      th.setAttribute('aria-sort', k === state.sort ? (state.order === 'asc' ? 'ascending' : 'descending') : 'none');
    }
  };
  q(main, '#f').onsubmit = e => { e.preventDefault(); state.filters = formValues(e.target); state.offset = 0; load(); };
  for (const b of main.querySelectorAll('th button')) {
    b.onclick = () => {
      state.order = state.sort === b.dataset.sort && state.order === 'asc' ? 'desc' : 'asc';
      state.sort = b.dataset.sort;
      state.offset = 0;
      load();
    };
  }
  q(main, '#prev').onclick = () => { state.offset = Math.max(0, state.offset - state.limit); load(); };
  q(main, '#next').onclick = () => { state.offset += state.limit; load(); };
  // Live: only the rows on screen change; the page is not fetched again.
  on('agent_update', w => { const tr = rows.get(w.id); if (tr) fill(tr, w); });
  await load();
}

// ---- one agent ------------------------------------------------------------------

export async function worker(main, id, alive) {
  const [d, alerts, interventions] = await Promise.all([
    api(`/v1/workers/${encodeURIComponent(id)}`),
    api(`/v1/alerts?state=all&worker=${encodeURIComponent(id)}&limit=20`),
    api(`/v1/interventions?worker=${encodeURIComponent(id)}&limit=20`),
  ]);
  if (!alive()) return;
  const w = d;
  const ctx = w.context_utilisation;
  const ctxColour = ctx == null ? 'var(--line)' : ctx >= 0.95 ? 'var(--bad)' : ctx >= 0.8 ? 'var(--warn)' : ctx >= 0.6 ? 'var(--info)' : 'var(--ok)';
  main.innerHTML = `
    <h1>Agent ${esc(w.id)}</h1>
    <div class="grid">
      <section class="card"><h2>Identity</h2><dl class="kv">
        <dt>id</dt><dd>${esc(w.id)}</dd><dt>agent</dt><dd>${esc(w.agent_name ?? '—')}</dd>
        <dt>version</dt><dd>${esc(w.version ?? '—')}</dd><dt>model</dt><dd>${esc(w.model ?? '—')}</dd>
        <dt>pool</dt><dd>${esc(w.pool ?? '—')}</dd><dt>uptime</dt><dd>${dur(w.uptime_s * 1000)}</dd>
        <dt>state</dt><dd id="state"><span class="pill ${w.lost ? 'LOST' : w.state}">${w.lost ? 'LOST' : w.state}</span> ${w.paused ? '<span class="pill">paused</span>' : ''}${w.draining ? '<span class="pill">draining</span>' : ''}</dd>
        <dt>task</dt><dd>${esc(w.current_task ?? '—')}</dd></dl></section>
      <section class="card"><h2>Context</h2>
        <div class="bar" role="meter" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${ctx == null ? 0 : Math.round(ctx * 100)}" aria-label="context utilisation"><span style="width:${ctx == null ? 0 : Math.min(100, ctx * 100)}%;background:${ctxColour}"></span></div>
        <p class="num">${pct(ctx)} of ${fmtNum(w.context_limit_tokens)} tokens</p>
        <h2>Spend</h2><p class="num">${usd(w.cost_usd)} total · ${usd(w.burn_rate_usd_per_h)}/h · ${usd(w.cost_per_task_usd)} per task</p></section>
      <section class="card" data-role-needs="operator" ${may('operator') ? '' : 'hidden'}><h2>Control</h2>
        <div class="actions"><button type="button" id="pause" class="danger">Pause</button><button type="button" id="drain">Drain</button><button type="button" id="resume" class="primary">Resume</button></div>
        <p id="ack" class="muted" aria-live="polite"></p></section>
      <section class="card full"><h2>Tokens over time (input vs output)</h2><div id="tokens"></div></section>
      <section class="card wide"><h2>Cost per task</h2><table id="tasks"><thead><tr>
        <th><button type="button" data-k="task_id">Task</button></th><th><button type="button" data-k="status">Status</button></th>
        <th class="n"><button type="button" data-k="duration_ms">Duration</button></th><th class="n"><button type="button" data-k="tokens">Tokens</button></th><th class="n"><button type="button" data-k="cost_usd">Cost</button></th></tr></thead><tbody></tbody></table></section>
      <section class="card wide"><h2>Tools</h2><table><thead><tr><th>Tool</th><th class="n">OK</th><th class="n">Failed</th><th class="n">Success</th><th class="n">Mean latency</th></tr></thead><tbody>
        ${Object.entries(d.tools ?? {}).map(([name, t]) => `<tr><td>${esc(name)}</td><td class="n">${t.calls - t.failures}</td><td class="n">${t.failures}</td><td class="n">${pct(t.success_rate, 0)}</td><td class="n">${dur(t.mean_ms)}</td></tr>`).join('') || '<tr><td colspan="5" class="muted">No tool calls.</td></tr>'}
      </tbody></table></section>
      <section class="card wide"><h2>State history</h2><table><tbody>
        ${(d.transitions ?? []).slice().reverse().map(t => `<tr><td class="muted">${ago(t.at_ms)}</td><td>${esc(t.from)} → <b>${esc(t.to)}</b></td><td>${esc(t.reason)}</td></tr>`).join('') || '<tr><td class="muted">No transitions.</td></tr>'}
      </tbody></table></section>
      <section class="card wide"><h2>Alerts and interventions</h2><table><tbody>
        ${(alerts.alerts ?? []).map(a => `<tr><td><span class="pill ${esc(a.severity)}">${esc(a.severity)}</span></td><td>${esc(a.rule)}</td><td>${esc(a.state)}</td><td class="muted">${ago(a.started_ms)}</td></tr>`).join('')}
        ${(interventions.interventions ?? []).map(i => `<tr><td><span class="pill">${esc(i.action)}</span></td><td>${esc(i.note)}</td><td>${esc(i.state)}</td><td class="muted">${ago(i.applied_ms)}</td></tr>`).join('') || ''}
      </tbody></table></section>
    </div>`;
  const series = d.series ?? [];
  q(main, '#tokens').innerHTML = lines([
    { name: 'input', values: series.map(p => p.input_tokens), colour: 'var(--input)' },
    { name: 'output', values: series.map(p => p.output_tokens), colour: 'var(--output)' },
  ], { label: 'tokens per 10 s' });
  const tasks = (d.recent_tasks ?? []).map(t => ({ ...t, tokens: t.input_tokens + t.output_tokens }));
  let sortKey = 'ended_ms', desc = true;
  const drawTasks = () => {
    tasks.sort((a, b) => (a[sortKey] > b[sortKey] ? 1 : a[sortKey] < b[sortKey] ? -1 : 0) * (desc ? -1 : 1));
    q(main, '#tasks tbody').innerHTML = tasks.map(t => `<tr><td><a href="#/decision/${encodeURIComponent(t.task_id)}">${esc(t.task_id)}</a></td><td><span class="pill ${esc(t.status)}">${esc(t.status)}</span></td><td class="n">${dur(t.duration_ms)}</td><td class="n">${fmtNum(t.tokens)}</td><td class="n">${usd(t.cost_usd)}</td></tr>`).join('') || '<tr><td colspan="5" class="muted">No finished tasks.</td></tr>';
  };
  for (const b of main.querySelectorAll('#tasks th button')) b.onclick = () => { desc = sortKey === b.dataset.k ? !desc : true; sortKey = b.dataset.k; drawTasks(); };
  drawTasks();
  const out = q(main, '#ack');
  for (const c of ['pause', 'drain', 'resume']) {
    q(main, `#${c}`).onclick = () => act({ command: c, worker: w.id }, out);
  }
  on('agent_update', u => {
    if (u.id !== w.id) return;
    q(main, '#state').innerHTML = `<span class="pill ${u.lost ? 'LOST' : u.state}">${u.lost ? 'LOST' : u.state}</span> ${u.paused ? '<span class="pill">paused</span>' : ''}${u.draining ? '<span class="pill">draining</span>' : ''}`;
  });
}

// ---- pools ----------------------------------------------------------------------

/** What operators have done to pool `name`, from `GET /v1/control/state`. */
function poolControls(name, st) {
  const marks = [];
  const modes = { pause: 'paused', drain: 'draining' };
  for (const i of st.operator_interventions ?? []) if (i.target?.pool === name && modes[i.action]) marks.push(modes[i.action]);
  if ((st.blocks ?? []).some(b => b.scope === 'pool' && b.value === name)) marks.push('blocked');
  for (const r of st.reroutes ?? []) if (r.from === name) marks.push(`rerouted to ${r.to}`);
  for (const w of st.weights ?? []) if (w.pool === name) marks.push(`weight ${w.weight}`);
  return marks.map(m => `<span class="pill">${esc(m)}</span>`).join(' ') || '<span class="muted">—</span>';
}

const poolRow = (p, st) => {
  const q95 = p.dispatch_latency_ms?.p95;
  const depth = p.queue?.depth;
  return `<tr data-pool="${esc(p.name)}"><td>${esc(p.name)}${p.configured ? '' : ' <span class="muted">(not configured)</span>'}</td><td class="n">${p.workers}</td><td class="n ${p.lost ? 'warn' : ''}">${p.lost}</td><td class="n">${p.active} (${pct(p.utilisation, 0)})</td><td class="n">${p.in_flight} / ${p.capacity}</td><td class="n">${depth == null ? '—' : fmtNum(depth)}</td><td class="n">${q95 == null ? '—' : dur(q95)}</td><td class="n">${fmtNum(p.tasks_per_min)}</td><td class="n ${p.failed_per_min ? 'bad' : ''}">${fmtNum(p.failed_per_min)}</td><td>${poolControls(p.name, st)}</td></tr>`;
};

/** The pool commands the Control form sends, by button. */
const POOL_COMMANDS = {
  pause: v => ({ command: 'pause', pool: v.pool }),
  drain: v => ({ command: 'drain', pool: v.pool }),
  resume: v => ({ command: 'resume', pool: v.pool }),
  block: v => ({ command: 'block_pool', pool: v.pool }),
  reroute: v => ({ command: 'reroute_pool', pool: v.pool, to: v.to }),
  weight: v => ({ command: 'weight_pool', pool: v.pool, weight: Number(v.weight) }),
  restore: v => ({ command: 'restore_pool', pool: v.pool }),
  purge: v => ({ command: 'purge_pool', pool: v.pool, reason: v.reason || 'purged from the dashboard' }),
};

/**
 * Every pool: its workers, load, queue and dispatch latency, live from `fleet_snapshot`,
 * and what operators have done to it; for operators, the pool commands (pause, drain,
 * resume, block, reroute, weight, restore, and purging its queue after a second click).
 */
export async function pools(main, _arg, alive) {
  const [first, state] = await Promise.all([api('/v1/pools'), api('/v1/control/state')]);
  if (!alive()) return;
  let list = first.pools ?? [], st = state;
  // Reroutes go to configured pools only; the other commands also reach a pool that is
  // not configured: one with workers (pause, drain), or whose queue still holds tasks
  // after it left the config (purge: docs/configuration.md, "Taking a pool out").
  const names = list.filter(p => p.configured).map(p => `<option>${esc(p.name)}</option>`).join('');
  const targets = names + list.filter(p => !p.configured)
    .map(p => `<option value="${esc(p.name)}">${esc(p.name)} (not configured)</option>`).join('');
  main.innerHTML = `
    <h1>Pools</h1>
    <div class="grid"><section class="card full"><table id="pools"><thead><tr><th>Pool</th><th class="n">Workers</th><th class="n">Lost</th><th class="n">Busy</th><th class="n">In flight / capacity</th><th class="n">Queued</th><th class="n">p95 dispatch</th><th class="n">Tasks/min</th><th class="n">Failed/min</th><th>Operators</th></tr></thead><tbody></tbody></table></section>
    <section class="card full" data-role-needs="operator" ${may('operator') ? '' : 'hidden'}><h2>Control</h2>
      <form class="filters" id="pf">
        <label>Pool <select name="pool">${targets}</select></label>
        <button type="button" data-c="pause" class="danger">Pause</button><button type="button" data-c="drain">Drain</button><button type="button" data-c="resume" class="primary">Resume</button>
        <button type="button" data-c="block" class="danger">Block</button><button type="button" data-c="restore">Restore</button>
        <label>to <select name="to">${names}</select></label><button type="button" data-c="reroute">Reroute</button>
        <label>Weight <input name="weight" size="4" value="1" inputmode="decimal"></label><button type="button" data-c="weight">Set weight</button>
        <label>Reason <input name="reason" size="20"></label><button type="button" data-c="purge" class="danger">Purge queue</button>
      </form>
      <p class="muted">Pause and drain reach every worker of the pool; block refuses dispatch to it; reroute sends its tasks to another pool; restore ends the block, reroute and weight. Purge cancels up to 1,000 tasks waiting in its queue (each producer gets <code>cancelled</code>); it asks for a second click.</p>
      <p id="pool-out" aria-live="polite"></p></section></div>`;
  const tbody = q(main, '#pools tbody');
  const draw = () => { tbody.innerHTML = list.map(p => poolRow(p, st)).join('') || '<tr><td colspan="10" class="muted">No pools.</td></tr>'; };
  const reload = async () => { st = await api('/v1/control/state'); if (alive()) draw(); };
  draw();
  const form = q(main, '#pf'), out = q(main, '#pool-out');
  let armed = null;
  form.onclick = async e => {
    const b = e.target.closest('button[data-c]');
    if (!b) return;
    const v = formValues(form), c = b.dataset.c;
    if (c === 'purge' && armed !== v.pool) {
      armed = v.pool;
      b.textContent = `Purge ${v.pool}'s queue: click again`;
      setTimeout(() => { if (armed === v.pool) { armed = null; b.textContent = 'Purge queue'; } }, 5000);
      return;
    }
    armed = null;
    q(form, 'button[data-c="purge"]').textContent = 'Purge queue';
    const ack = await act(POOL_COMMANDS[c](v), out);
    if (ack.ok && c === 'purge') {
      const r = ack.state ?? {};
      out.textContent = `cancelled ${r.cancelled ?? 0} queued task(s) of ${v.pool}${r.more ? '; more wait: purge again' : ''}${r.not_cancelled?.length ? `; ${r.not_cancelled.length} left (${r.not_cancelled[0].why})` : ''} (${ack.audit_id})`;
    }
    if (ack.ok) await reload();
  };
  on('fleet_snapshot', snap => { if (Array.isArray(snap.pools)) { list = snap.pools; draw(); } });
  on('intervention', reload);
}

// ---- decisions ------------------------------------------------------------------

const decisionRow = d => `<tr class="clickable" tabindex="0" data-task="${esc(d.task_id)}"><td class="muted">${ago(d.at_ms)}</td><td>${esc(d.task_id)}</td><td><span class="pill ${esc(d.outcome)}">${esc(d.outcome)}</span></td><td>${esc(d.pool ?? '—')}</td><td>${esc(d.model ?? '—')}</td><td>${esc(d.rule)}</td><td>${esc(d.reason)}</td></tr>`;

export async function decisions(main, _arg, alive) {
  main.innerHTML = `
    <h1>Routing decisions</h1>
    <form class="filters" id="f" role="search">
      <label>Pool <input name="pool" size="10"></label><label>Model <input name="model" size="14"></label>
      <label>Task type <input name="task_type" size="12"></label><label>Rule <input name="rule" size="12"></label>
      <label>Outcome <select name="outcome"><option value="">any</option><option>dispatched</option><option>rejected</option><option>deferred</option><option>intervened</option></select></label>
      <label>Reason contains <input name="reason" size="14"></label>
      <button type="submit">Filter</button>
      <label style="flex-direction:row;gap:4px;align-items:center"><input type="checkbox" id="tail" checked> live tail</label>
    </form>
    <div class="card"><table><thead><tr><th>When</th><th>Task</th><th>Outcome</th><th>Pool</th><th>Model</th><th>Rule</th><th>Why</th></tr></thead><tbody id="rows"></tbody></table>
    <div class="pager"><button type="button" id="more">Older →</button></div></div>`;
  let filters = {}, next = null;
  const tbody = q(main, '#rows');
  rowsOpen(tbody, 'task', 'decision');
  const load = async (more) => {
    const page = await api('/v1/decisions' + qs({ ...filters, limit: 50, cursor: more ? next : '' }));
    if (!alive()) return;
    next = page.next;
    const html = page.decisions.map(decisionRow).join('');
    if (more) tbody.insertAdjacentHTML('beforeend', html); else tbody.innerHTML = html || '<tr><td colspan="7" class="muted">No decisions match.</td></tr>';
    q(main, '#more').disabled = !next;
  };
  q(main, '#f').onsubmit = e => { e.preventDefault(); filters = formValues(e.target); load(false); };
  q(main, '#more').onclick = () => load(true);
  const matches = d => Object.entries(filters).every(([k, v]) => !v || (k === 'reason' ? (d.reason ?? '').toLowerCase().includes(v.toLowerCase()) : String(d[k] ?? '') === v));
  on('decision', d => {
    if (!q(main, '#tail').checked || !matches(d)) return;
    tbody.insertAdjacentHTML('afterbegin', decisionRow(d));
    while (tbody.rows.length > 500) tbody.deleteRow(-1);
  });
  await load(false);
}

export async function decision(main, taskId, alive) {
  const d = await api(`/v1/decisions/${encodeURIComponent(taskId)}`);
  if (!alive()) return;
  const c = d.classification ?? {};
  main.innerHTML = `
    <h1>Decision for ${esc(d.task_id)}</h1>
    <div class="grid">
      <section class="card wide"><h2>Outcome</h2><p><span class="pill ${esc(d.outcome)}">${esc(d.outcome)}</span> ${esc(d.pool ?? '')} ${esc(d.model ?? '')} · rule <b>${esc(d.rule)}</b></p><p>${esc(d.reason)}</p>
        <p class="muted">${esc(d.at)} · policy ${esc(d.policy_version ?? '—')} · rubric ${esc(d.rubric)} · est ${usd(d.est_cost_usd)}</p>
        <p>${d.kept_trace ? `<a href="#/trace/${esc(d.kept_trace.trace_id)}">Kept trace ${esc(d.kept_trace.trace_id)}</a>` : '<span class="muted">No kept trace.</span>'} · <a href="#/task/${encodeURIComponent(d.task_id)}">The task and its result</a> · <a href="#/decisions">All decisions</a></p></section>
      <section class="card wide"><h2>Classification</h2><dl class="kv"><dt>type / tier</dt><dd>${esc(c.task_type)} / ${esc(c.tier)}</dd><dt>source</dt><dd>${esc(c.source)} (confidence ${fmtNum(c.confidence)})</dd><dt>capabilities</dt><dd>${esc((c.capabilities ?? []).join(', '))}</dd><dt>why</dt><dd>${esc(c.reason)}</dd></dl></section>
      <section class="card full"><h2>Every candidate, and why it lost</h2><table id="candidates"><thead><tr><th>Pool</th><th>Model</th><th>Tier</th><th class="n">Est. cost</th><th class="n">Load</th><th class="n">Score</th><th>Verdict</th><th>Why</th></tr></thead><tbody>
      ${(d.candidates ?? []).map(x => `<tr class="candidate"><td>${esc(x.pool)}</td><td>${esc(x.model)}</td><td>${esc(x.tier)}</td><td class="n">${usd(x.est_cost_usd)}</td><td class="n">${fmtNum(x.load)}</td><td class="n">${x.score == null ? '—' : x.score.toFixed(6)}</td><td><span class="pill ${esc(x.code)}">${esc(x.code)}</span></td><td>${esc(x.reason)}</td></tr>`).join('') || '<tr><td colspan="8" class="muted">Nothing could be weighed.</td></tr>'}
      </tbody></table></section>
    </div>`;
}

// ---- tasks ----------------------------------------------------------------------

const finishedRow = t => {
  const o = t.outcome ?? {};
  const err = o.error ?? t.rejection;
  return `<tr class="clickable" tabindex="0" data-task="${esc(t.task_id)}"><td class="muted">${ago(t.finished_ms)}</td><td>${esc(t.task_id)}</td><td><span class="pill ${esc(t.state)}">${esc(t.state)}</span></td><td>${o.status ? `<span class="pill ${esc(o.status)}">${esc(o.status)}</span>` : '—'}</td><td>${esc(t.pool ?? '—')}</td><td>${esc(o.worker_id ?? '—')}</td><td class="n">${o.duration_ms == null ? '—' : dur(o.duration_ms)}</td><td>${err ? `<b>${esc(err.code)}</b> ${esc(err.message)}` : ''}</td></tr>`;
};

/**
 * The tasks that have ended, newest first (`GET /v1/tasks?state=finished`), with their
 * outcome: filtered by state, status, pool, worker, model and error code, older pages on
 * demand.
 * A page examines a bounded number of tasks, so a filter that matches few may need more.
 */
export async function tasks(main, _arg, alive) {
  main.innerHTML = `
    <h1>Finished tasks</h1>
    <form class="filters" id="f" role="search">
      <label>State <select name="state"><option>finished</option><option>completed</option><option>failed</option><option>rejected</option></select></label>
      <label>Status <select name="status"><option value="">any</option><option>ok</option><option>failed</option><option>cancelled</option><option>rejected</option></select></label>
      <label>Pool <input name="pool" size="10"></label><label>Worker <input name="worker" size="12"></label>
      <label>Model <input name="model" size="14"></label><label>Error code <input name="code" size="16"></label>
      <button type="submit">Filter</button>
    </form>
    <p class="muted" id="scan"></p>
    <div class="card"><table><thead><tr><th>Ended</th><th>Task</th><th>State</th><th>Status</th><th>Pool</th><th>Worker</th><th class="n">Duration</th><th>Error</th></tr></thead><tbody id="rows"></tbody></table>
    <div class="pager"><button type="button" id="more">Older →</button></div></div>`;
  let filters = { state: 'finished' }, next = null, shown = 0, scanned = 0;
  const tbody = q(main, '#rows');
  rowsOpen(tbody, 'task', 'task');
  const load = async (more) => {
    const page = await api('/v1/tasks' + qs({ ...filters, limit: 50, cursor: more ? next : '' }));
    if (!alive()) return;
    next = page.next;
    shown = (more ? shown : 0) + page.tasks.length;
    scanned = (more ? scanned : 0) + page.scanned;
    const html = page.tasks.map(finishedRow).join('');
    if (more) tbody.insertAdjacentHTML('beforeend', html); else tbody.innerHTML = html;
    if (!tbody.rows.length) tbody.innerHTML = '<tr><td colspan="8" class="muted">No finished tasks match.</td></tr>';
    const across = page.replicas > 1 ? ` across ${page.replicas} commander replicas` : '';
    q(main, '#scan').textContent = `${shown} shown of the ${scanned} most recent finished tasks examined${across}${next ? '; older ones: Older →' : ''}`;
    q(main, '#more').disabled = !next;
  };
  q(main, '#f').onsubmit = e => { e.preventDefault(); filters = formValues(e.target); load(false); };
  q(main, '#more').onclick = () => load(true);
  await load(false);
}

// ---- task -----------------------------------------------------------------------

/** The most of a result's output the page prints; the API has the whole of it. */
const OUTPUT_SHOWN = 20000;

/**
 * One task: where it is and why (its record), its history, and its result as its worker
 * published it (`/v1/tasks/{id}/result`). Read again every 2 s until the task finishes;
 * operators may cancel it while it runs or waits.
 */
export async function task(main, id, alive) {
  const path = `/v1/tasks/${encodeURIComponent(id)}`;
  const [rec, res] = await Promise.all([api(path), api(`${path}/result`).catch(e => ({ unavailable: e }))]);
  if (!alive()) return;
  const done = ['completed', 'failed', 'rejected'].includes(rec.state);
  const d = rec.deferred, b = rec.budget, o = rec.outcome;
  const kv = (pairs) => pairs.filter(([, v]) => v != null && v !== '').map(([k, v]) => `<dt>${esc(k)}</dt><dd>${v}</dd>`).join('');
  main.innerHTML = `
    <h1>Task ${esc(rec.id)} <span class="pill ${esc(rec.state)}" id="task-state">${esc(rec.state)}</span></h1>
    <div class="grid">
      <section class="card wide"><h2>Where it went, and why</h2><dl class="kv" id="task-where">${kv([
        ['pool / model', rec.pool ? `${esc(rec.pool)} / ${esc(rec.model ?? '—')}` : null],
        ['why', esc(rec.route_reason ?? rec.rejection?.message ?? '')],
        ['priority', rec.priority],
        ['attempt', rec.attempt],
        ['policy', esc(rec.policy_version ?? '')],
        ['waits', d && !done ? `${esc(d.reason)}${d.turn ? ` (throttle ${esc(d.turn.throttle)}, turn at ${esc(new Date(d.turn.at_ms).toISOString())})` : ''}` : null],
        ['budget', b ? `est ${usd(b.est_usd)}${b.charged_usd != null ? ` · charged ${usd(b.charged_usd)}` : ''}` : null],
      ])}</dl>
      <p>${rec.decision_id ? `<a href="#/decision/${encodeURIComponent(rec.id)}">Its routing decision</a>` : '<span class="muted">No decision.</span>'} · ${rec.kept_trace ? `<a href="#/trace/${esc(rec.kept_trace.trace_id)}">Kept trace</a>` : '<span class="muted">No kept trace.</span>'}</p>
      ${may('operator') && !done ? '<p><button type="button" class="danger" id="task-cancel">Cancel</button> <span id="task-out" aria-live="polite"></span></p>' : ''}</section>
      <section class="card wide"><h2>Result</h2><div id="task-result">${resultHtml(id, rec, res, o)}</div></section>
      <section class="card full"><h2>History</h2><table id="task-history"><thead><tr><th>State</th><th>At</th></tr></thead><tbody>
      ${(rec.history ?? []).map(h => `<tr><td><span class="pill ${esc(h.state)}">${esc(h.state)}</span></td><td class="muted">${esc(h.at)}</td></tr>`).join('') || '<tr><td colspan="2" class="muted">No change recorded yet.</td></tr>'}
      </tbody></table></section>
    </div>`;
  const cancel = q(main, '#task-cancel');
  if (cancel) cancel.onclick = async () => {
    const ack = await act({ command: 'cancel', task_id: rec.id, reason: 'cancelled from the dashboard' }, q(main, '#task-out'));
    if (ack.ok) setTimeout(() => { if (alive()) task(main, id, alive); }, 500);
  };
  if (!done) setTimeout(() => { if (alive()) task(main, id, alive); }, 2000);
}

function resultHtml(id, rec, res, outcome) {
  if (res.unavailable) {
    const e = res.unavailable;
    if (e.status === 410) return `<p class="muted">No longer kept (results stay 7 days); the record's outcome: <b>${esc(outcome?.status ?? rec.state)}</b>${outcome?.error ? ` · ${esc(outcome.error.code)}: ${esc(outcome.error.message)}` : ''}</p>`;
    return `<p class="error">Could not read the result: ${esc(e.message)}</p>`;
  }
  if (!res.status) return `<p class="muted">No result yet (${esc(res.state ?? rec.state)}).</p>`;
  const out = res.output == null ? '' : JSON.stringify(res.output, null, 2);
  const shown = out.length > OUTPUT_SHOWN ? `${out.slice(0, OUTPUT_SHOWN)}\n…` : out;
  const u = res.usage;
  return `<p><span class="pill ${esc(res.status)}">${esc(res.status)}</span> attempt ${esc(res.attempt)}${res.worker_id ? ` · worker <a href="#/worker/${encodeURIComponent(res.worker_id)}">${esc(res.worker_id)}</a>` : ''}${res.timings?.duration_ms != null ? ` · ${dur(res.timings.duration_ms)}` : ''}</p>
    ${res.error ? `<p class="error">${esc(res.error.code)}: ${esc(res.error.message)}</p>` : ''}
    ${u ? `<p class="muted">${esc(u.model ?? '')} · ${fmtNum(u.input_tokens)} in · ${fmtNum(u.output_tokens)} out${u.cost_usd != null ? ` · ${usd(u.cost_usd)}` : ''}</p>` : ''}
    ${out ? `<pre id="task-output">${esc(shown)}</pre>${out.length > OUTPUT_SHOWN ? `<p class="muted">The first ${fmtNum(OUTPUT_SHOWN)} characters; all of it: <code>GET /v1/tasks/${esc(id)}/result</code></p>` : ''}` : ''}`;
}

// ---- traces ---------------------------------------------------------------------

export async function traces(main, _arg, alive) {
  main.innerHTML = `
    <h1>Kept traces</h1>
    <form class="filters" id="f" role="search">
      <label>Worker <input name="worker" size="12"></label><label>Pool <input name="pool" size="10"></label>
      <label>Task type <input name="task_type" size="12"></label>
      <label>Kept because <select name="why"><option value="">any</option>${['error', 'task_failed', 'p99_cost', 'p99_duration', 'cost_multiple', 'slow', 'unmeasured', 'flagged', 'sentinel', 'healthy'].map(w => `<option>${w}</option>`).join('')}</select></label>
      <label>Status <select name="status"><option value="">any</option><option>ok</option><option>error</option></select></label>
      <label>Min cost $ <input name="min_cost_usd" size="6" inputmode="decimal"></label>
      <button type="submit">Filter</button></form>
    <div class="card"><table><thead><tr><th>Kept</th><th>Root</th><th>Why</th><th>Status</th><th class="n">Spans</th><th class="n">Duration</th><th class="n">Tokens</th><th class="n">Cost</th></tr></thead><tbody id="rows"></tbody></table>
    <div class="pager"><button type="button" id="more">Older →</button></div></div>`;
  let filters = {}, next = null;
  const tbody = q(main, '#rows');
  rowsOpen(tbody, 'trace', 'trace');
  const load = async (more) => {
    const page = await api('/v1/traces' + qs({ ...filters, limit: 50, cursor: more ? next : '' }));
    if (!alive()) return;
    next = page.next;
    const html = page.traces.map(t => `<tr class="clickable" tabindex="0" data-trace="${esc(t.trace_id)}"><td class="muted">${ago(t.kept_at_ms)}</td><td>${esc(t.root_name ?? '')}</td><td>${(t.why ?? []).map(w => `<span class="pill">${esc(w)}</span>`).join(' ')}</td><td><span class="pill ${esc(t.status)}">${esc(t.status)}</span></td><td class="n">${t.spans}</td><td class="n">${dur(t.duration_ms)}</td><td class="n">${fmtNum(t.input_tokens + t.output_tokens)}</td><td class="n">${usd(t.cost_usd)}</td></tr>`).join('');
    if (more) tbody.insertAdjacentHTML('beforeend', html); else tbody.innerHTML = html || '<tr><td colspan="8" class="muted">No kept traces match.</td></tr>';
    q(main, '#more').disabled = !next;
  };
  q(main, '#f').onsubmit = e => { e.preventDefault(); filters = formValues(e.target); load(false); };
  q(main, '#more').onclick = () => load(true);
  await load(false);
}

/** The waterfall: one row per span in depth-first order, bars placed by offset and
 * duration, so parallel branches show side by side in time; a subtree collapses to one
 * row with its aggregate duration, tokens and cost. */
export async function trace(main, id, alive) {
  const t = await api(`/v1/traces/${encodeURIComponent(id)}`);
  if (!alive()) return;
  const spans = t.span_tree ?? [];
  // The run's duration (the summary's) may be shorter than the spans' extent: the
  // commander's dispatch span comes before the run, so the scale is the longer of the two.
  const total = Math.max(1, t.duration_ms ?? 0, ...spans.map(s => s.offset_ms + s.duration_ms));
  const collapsed = new Set();
  main.innerHTML = `
    <h1>Trace ${esc(t.trace_id)}</h1>
    <p>${(t.why ?? []).map(w => `<span class="pill">${esc(w)}</span>`).join(' ')} · ${t.spans} spans · ${dur(t.duration_ms)} · ${fmtNum((t.input_tokens ?? 0) + (t.output_tokens ?? 0))} tokens · ${usd(t.cost_usd)}
      ${(t.tasks ?? []).map(x => ` · <a href="#/decision/${encodeURIComponent(x.task_id)}">task ${esc(x.task_id)}</a>`).join('')}</p>
    <div class="card wf" id="wf" role="tree" aria-label="span waterfall"></div>`;
  const byId = new Map(spans.map(s => [s.span_id, s]));
  const hiddenBy = s => { for (let p = byId.get(s.parent_span_id); p; p = byId.get(p.parent_span_id)) if (collapsed.has(p.span_id)) return true; return false; };
  const draw = () => {
    const rows = spans.filter(s => !hiddenBy(s)).map(s => {
      const kind = s.tokens && (s.tokens.input || s.tokens.output) ? 'llm' : s.tool ? 'tool' : '';
      const closed = collapsed.has(s.span_id);
      const width = closed ? s.subtree.duration_ms : s.duration_ms;
      const left = (s.offset_ms / total) * 100, w = Math.max(0.2, (width / total) * 100);
      const tok = kind === 'llm' ? `<span class="tok">${fmtNum(s.tokens.input)}→${fmtNum(s.tokens.output)} tok</span>` : '';
      const agg = closed ? `<span class="agg">[${s.subtree.spans} spans · ${dur(s.subtree.duration_ms)} · ${fmtNum(s.subtree.input_tokens + s.subtree.output_tokens)} tok · ${usd(s.subtree.cost_usd)}]</span>` : '';
      const toggle = s.children?.length ? `<button type="button" data-span="${esc(s.span_id)}" aria-expanded="${!closed}" aria-label="${closed ? 'expand' : 'collapse'} ${esc(s.name)}">${closed ? '▸' : '▾'}</button>` : '<span style="display:inline-block;width:1.2em"></span>';
      return `<div class="row" role="treeitem" aria-level="${s.depth + 1}"><div class="name" style="padding-left:${s.depth * 14}px" title="${esc(s.name)}">${toggle}${esc(s.name)}${tok}${agg}</div>
        <div class="lane"><span class="span ${kind} ${s.status === 'error' ? 'error' : ''}" style="left:${left.toFixed(3)}%;width:${w.toFixed(3)}%" title="${esc(s.name)}: ${dur(s.duration_ms)} at +${dur(s.offset_ms)}${s.model ? ' · ' + esc(s.model) : ''}${s.cost_usd ? ' · ' + usd(s.cost_usd) : ''}"></span></div></div>`;
    });
    q(main, '#wf').innerHTML = rows.join('') || '<p class="muted">No spans.</p>';
  };
  q(main, '#wf').onclick = e => {
    const b = e.target.closest('button[data-span]');
    if (!b) return;
    const s = b.dataset.span;
    if (collapsed.has(s)) collapsed.delete(s); else collapsed.add(s);
    draw();
    q(main, `button[data-span="${CSS.escape(s)}"]`)?.focus();
  };
  draw();
}

// ---- costs ----------------------------------------------------------------------

export async function costs(main, _arg, alive) {
  main.innerHTML = `
    <h1>Costs</h1>
    <form class="filters" id="f">
      <label>Group by <select name="by">${['team', 'feature', 'user_tier', 'prompt_variant', 'task_type', 'tenant', 'pool', 'model'].map(d => `<option${d === 'model' ? ' selected' : ''}>${d}</option>`).join('')}</select></label>
      <label>Window <select name="window"><option>15m</option><option selected>1h</option><option>6h</option><option>24h</option></select></label>
      <button type="submit">Show</button></form>
    <div class="card" id="map"></div>
    <div class="card"><table><thead><tr><th>Group</th><th class="n">Cost</th><th class="n">Calls</th><th class="n">Input tokens</th><th class="n">Output tokens</th></tr></thead><tbody id="rows"></tbody></table><p class="muted" id="total"></p></div>`;
  const load = async (v) => {
    const r = await api('/v1/costs' + qs(v));
    if (!alive()) return;
    const label = row => Object.values(row.group).map(x => x ?? '(none)').join(' · ') || 'total';
    q(main, '#map').innerHTML = treemap(r.rows.map(x => ({ label: label(x), value: x.cost_usd })), { label: `cost by ${v.by}` });
    q(main, '#rows').innerHTML = r.rows.map(x => `<tr><td>${esc(label(x))}</td><td class="n">${usd(x.cost_usd)}</td><td class="n">${x.calls}</td><td class="n">${fmtNum(x.input_tokens)}</td><td class="n">${fmtNum(x.output_tokens)}</td></tr>`).join('') || '<tr><td colspan="5" class="muted">Nothing spent in this window.</td></tr>';
    q(main, '#total').textContent = `total ${usd(r.total_usd)}${r.unknown_cost_calls ? ` · ${r.unknown_cost_calls} calls of unpriced models (a lower bound)` : ''}`;
  };
  q(main, '#f').onsubmit = e => { e.preventDefault(); load(formValues(e.target)); };
  await load({ by: 'model', window: '1h' });
}

// ---- alerts ---------------------------------------------------------------------

export async function alerts(main, _arg, alive) {
  const [open, history, silences, sinks] = await Promise.all([
    api('/v1/alerts'), api('/v1/alerts?state=all&limit=50'), api('/v1/silences'), api('/v1/alerts/sinks'),
  ]);
  if (!alive()) return;
  const alertRow = a => `<tr data-alert="${esc(a.id)}"><td><span class="pill ${esc(a.severity)}">${esc(a.severity)}</span></td><td>${esc(a.rule)}</td><td>${esc(a.state)}${a.silenced_by ? ' <span class="pill">silenced</span>' : ''}</td><td>${esc(Object.entries(a.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(' '))}</td><td>${esc(a.message)}</td><td class="muted">${ago(a.firing_ms ?? a.started_ms)}</td></tr>`;
  const now = Date.now();
  main.innerHTML = `
    <h1>Alerts</h1>
    <div class="grid">
      <section class="card full"><h2>Open now</h2><table><tbody id="open">${(open.alerts ?? []).map(alertRow).join('') || '<tr><td class="muted">Nothing open.</td></tr>'}</tbody></table></section>
      <section class="card full"><h2>Silences</h2><table><tbody>${(silences.silences ?? []).map(s => `<tr><td>${esc(JSON.stringify(s.matchers))}</td><td>${esc(s.author)}: ${esc(s.comment)}</td><td class="muted">${s.expired_ms || s.ends_ms < now ? 'ended' : 'until ' + new Date(s.ends_ms).toISOString().slice(0, 16)}</td><td>${!s.expired_ms && s.ends_ms > now && may('operator') ? `<button type="button" data-expire="${esc(s.id)}">Expire</button>` : ''}</td></tr>`).join('') || '<tr><td class="muted">No silences.</td></tr>'}</tbody></table>
        <form class="filters" id="silence" ${may('operator') ? '' : 'hidden'}><label>Rule <input name="rule" size="14"></label><label>Worker <input name="worker" size="12"></label><label>Pool <input name="pool" size="10"></label>
          <label>Minutes <input name="minutes" value="60" size="4" inputmode="numeric"></label><label>Why <input name="comment" size="20"></label><button type="submit">Silence</button><span id="sil-out" aria-live="polite"></span></form></section>
      <section class="card full"><h2>History</h2><table><tbody>${(history.alerts ?? []).map(alertRow).join('') || '<tr><td class="muted">No alerts yet.</td></tr>'}</tbody></table></section>
      <section class="card full"><h2>Sinks</h2><table><thead><tr><th>Sink</th><th>Kind</th><th class="n">Delivered</th><th class="n">Failed</th><th class="n">Dropped</th><th>Last error</th></tr></thead><tbody>${(sinks.sinks ?? []).map(s => `<tr><td>${esc(s.name)} ${s.enabled ? '' : '<span class="pill error">disabled</span>'}</td><td>${esc(s.kind)}</td><td class="n">${s.delivered}</td><td class="n ${s.failed ? 'bad' : ''}">${s.failed}</td><td class="n">${s.dropped}</td><td>${esc(s.last_error ?? '')}</td></tr>`).join('') || '<tr><td class="muted">No sinks configured.</td></tr>'}</tbody></table></section>
    </div>`;
  main.onclick = async e => {
    const b = e.target.closest('button[data-expire]');
    if (!b) return;
    await api(`/v1/silences/${encodeURIComponent(b.dataset.expire)}`, { method: 'DELETE', headers: { 'Fleet-Identity': app.me?.name ?? 'dashboard' } });
    alerts(main, '', alive);
  };
  q(main, '#silence').onsubmit = async e => {
    e.preventDefault();
    const v = formValues(e.target);
    const matchers = Object.fromEntries(['rule', 'worker', 'pool'].filter(k => v[k]).map(k => [k, v[k]]));
    const out = q(main, '#sil-out');
    try {
      await api('/v1/silences', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ matchers, duration_s: Math.round(Number(v.minutes) * 60), author: app.me?.name ?? 'dashboard', comment: v.comment }) });
      alerts(main, '', alive);
    } catch (err) { out.textContent = err.message; out.className = 'error'; }
  };
  on('alert', a => {
    if (!a.rule) return;
    const tb = q(main, '#open');
    tb.querySelector(`tr[data-alert="${CSS.escape(a.id)}"]`)?.remove();
    if (a.state !== 'resolved') tb.insertAdjacentHTML('afterbegin', alertRow(a));
  });
}

// ---- policy ---------------------------------------------------------------------

function diffHtml(diff) {
  if (!diff) return '';
  const text = Array.isArray(diff) ? diff.join('\n') : typeof diff === 'string' ? diff : JSON.stringify(diff, null, 2);
  return text.split('\n').map(l => `<span class="${l.startsWith('+') ? 'add' : l.startsWith('-') ? 'del' : ''}">${esc(l)}</span>`).join('\n');
}

export async function policy(main, _arg, alive) {
  const [p, history, state] = await Promise.all([api('/v1/policy'), api('/v1/policy/history?limit=20'), api('/v1/control/state')]);
  if (!alive()) return;
  main.innerHTML = `
    <h1>Policy ${esc(p.version)}</h1>
    <div class="grid">
      <section class="card wide"><h2>In force</h2><dl class="kv"><dt>version</dt><dd>${esc(p.version)} (revision ${p.revision})</dd><dt>from</dt><dd>${esc(p.source)} by ${esc(p.identity)} at ${esc(p.applied_at)}</dd><dt>sha256</dt><dd class="num">${esc((p.sha256 ?? '').slice(0, 16))}…</dd><dt>summary</dt><dd>${esc(p.summary)}</dd></dl></section>
      <section class="card wide"><h2>Emergency cost cap</h2><p id="cap">${state.cost_cap ? `${usd(state.cost_cap.limit_usd)} per ${esc(state.cost_cap.window)}, set by ${esc(state.cost_cap.set_by)}` : 'none'}</p>
        <form class="filters" id="capf" ${may('operator') ? '' : 'hidden'}><label>USD <input name="usd" size="6" inputmode="decimal" required></label><label>Window <input name="window" value="1h" size="5"></label><button type="submit" class="danger">Cap spend</button><button type="button" id="lift">Lift</button><span id="cap-out" aria-live="polite"></span></form></section>
      <section class="card full"><h2>Budgets and where they stand</h2><table><thead><tr><th>Budget</th><th>Value</th><th>Used</th><th class="n">Spent</th><th class="n">Limit</th><th>Action</th><th>Resets</th></tr></thead><tbody>
        ${(p.standing ?? []).map(s => `<tr><td>${esc(s.budget)}</td><td>${esc(s.value ?? '')}</td><td style="min-width:120px"><div class="bar"><span style="width:${Math.min(100, (s.used ?? 0) * 100)}%;background:${(s.used ?? 0) >= 1 ? 'var(--bad)' : (s.used ?? 0) >= 0.8 ? 'var(--warn)' : 'var(--ok)'}"></span></div></td><td class="n">${usd(s.spent_usd)}</td><td class="n">${usd(s.limit_usd)}</td><td>${esc(s.action)}</td><td class="muted">${esc(s.window_resets_at ?? '')}</td></tr>`).join('') || '<tr><td colspan="7" class="muted">No budgets.</td></tr>'}
      </tbody></table></section>
      <section class="card full"><h2>Waiting tasks</h2><div id="waiting"></div><span id="waiting-out" aria-live="polite"></span></section>
      <section class="card full"><h2>History</h2>${(history.records ?? []).map(r => `<details><summary>${esc(r.version ?? r.source)} · ${r.accepted ? 'accepted' : '<span class="bad">refused</span>'} · ${esc(r.identity)} · ${esc(r.at)}</summary>${r.errors?.length ? `<pre class="error">${esc(r.errors.join('\n'))}</pre>` : ''}<pre>${diffHtml(r.diff)}</pre></details>`).join('') || '<p class="muted">No changes yet.</p>'}</section>
    </div>`;
  const out = q(main, '#cap-out');
  q(main, '#capf').onsubmit = async e => {
    e.preventDefault();
    const v = formValues(e.target);
    const ack = await act({ command: 'cost_cap', usd: Number(v.usd), window: v.window }, out);
    if (ack.ok) policy(main, '', alive);
  };
  q(main, '#lift').onclick = async () => { const ack = await act({ command: 'lift_cost_cap' }, out); if (ack.ok) policy(main, '', alive); };
  const box = q(main, '#waiting');
  const mine = {};
  box.onclick = async e => {
    const b = e.target.closest('button[data-cancel]');
    if (!b) return;
    b.disabled = true;
    const ack = await act({ command: 'cancel', task_id: b.dataset.cancel, reason: 'cancelled from the dashboard' }, q(main, '#waiting-out'));
    if (ack.ok) b.closest('tr')?.remove(); else b.disabled = false;
  };
  const refresh = async () => {
    if (!alive() || !box.isConnected) return;
    await waiting(box);
    clearTimeout(mine.timer);
    mine.timer = setTimeout(refresh, 5000);
  };
  await refresh();
  on('policy', () => policy(main, '', alive));
}

/**
 * The tasks budgets deferred and throttles parked, the first page of each, with what
 * holds them and until when; operators may cancel one (its producer gets `cancelled`).
 * Read again every 5 s while the page is on screen: deferrals come and go without events.
 */
async function waiting(box) {
  const [d, p] = await Promise.all([api('/v1/tasks?state=deferred&limit=50'), api('/v1/tasks?state=parked&limit=50')]);
  const row = (t, held) => `<tr data-task="${esc(t.task_id)}"><td style="white-space:nowrap"><a href="#/task/${encodeURIComponent(t.task_id)}">${esc(t.task_id)}</a></td><td>${held}</td><td class="n">${t.priority}</td><td class="muted">${esc(t.until ?? 'until the limit rises')}</td><td class="muted">${esc(t.deadline ?? '')}</td><td>${esc(t.cancelled ?? t.reason)}</td><td>${may('operator') && !t.cancelled ? `<button type="button" class="danger" data-cancel="${esc(t.task_id)}">Cancel</button>` : ''}</td></tr>`;
  const rows = [...(d.tasks ?? []).map(t => row(t, 'budget')), ...(p.tasks ?? []).map(t => row(t, `throttle ${esc(t.turn?.throttle ?? '')}`))];
  const across = Math.max(d.replicas ?? 1, p.replicas ?? 1) > 1 ? ` across ${Math.max(d.replicas, p.replicas)} commander replicas` : '';
  box.innerHTML = `<p class="muted" id="waiting-sum">${d.total} deferred by budgets · ${p.total} parked by throttles${across}${d.total + p.total > rows.length ? ` (the first ${rows.length} shown; all of them: <code>GET /v1/tasks?state=deferred|parked</code>)` : ''}</p>
    <table><thead><tr><th>Task</th><th>Held by</th><th class="n">Priority</th><th>Until</th><th>Deadline</th><th>Why</th><th></th></tr></thead><tbody>${rows.join('') || '<tr><td colspan="7" class="muted">No task waits.</td></tr>'}</tbody></table>`;
}

// ---- audit ----------------------------------------------------------------------

export async function audit(main, _arg, alive) {
  const [a, state] = await Promise.all([api('/v1/control/audit?limit=200'), api('/v1/control/state')]);
  if (!alive()) return;
  main.innerHTML = `
    <h1>Control audit</h1>
    <div class="card"><h2>In force by operators</h2><table><tbody>${(state.operator_interventions ?? []).map(i => `<tr><td><span class="pill">${esc(i.action)}</span></td><td>${esc(JSON.stringify(i.target))}</td><td>${esc(i.note)}</td><td class="muted">${ago(i.applied_ms)}</td></tr>`).join('') || '<tr><td class="muted">Nothing.</td></tr>'}</tbody></table></div>
    <div class="card"><h2>Every command</h2><table id="audit"><thead><tr><th>When</th><th>Who</th><th>Via</th><th>Command</th><th>Result</th></tr></thead><tbody>
    ${(a.records ?? []).map(r => `<tr data-audit="${esc(r.id)}"><td class="muted">${ago(r.at_ms)}</td><td>${esc(r.who)}</td><td>${esc(r.via)}</td><td>${esc(r.request.command)} ${esc(r.request.worker ?? r.request.pool ?? r.request.task_id ?? '')}${r.request.reason ? ` <span class="muted">(${esc(r.request.reason)})</span>` : ''}</td><td>${r.ok ? '<span class="pill ok">ok</span>' : `<span class="pill error">${esc(r.result?.code ?? 'refused')}</span> ${esc(r.result?.message ?? '')}`}</td></tr>`).join('') || '<tr><td colspan="5" class="muted">No commands yet.</td></tr>'}
    </tbody></table></div>`;
  on('intervention', () => audit(main, '', alive));
}

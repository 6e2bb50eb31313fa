// Hand-written SVG charts: sparkline, line chart, donut, gauge, treemap. Every label
// goes through esc(): the data comes from agents and producers, so it is never markup.

export function esc(s) {
  return String(s ?? '').replace(/[&<>"']/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

const PALETTE = ['#2f6fde', '#c46bd6', '#1a9e77', '#d95f02', '#e7298a', '#66a61e', '#e6ab02', '#a6761d', '#7570b3', '#999999'];
export const colour = i => PALETTE[i % PALETTE.length];

/** A sparkline of `values` (newest last), `cls` colouring its stroke. */
export function sparkline(values, { width = 240, height = 40, stroke = 'var(--accent)', label = '' } = {}) {
  const v = values.filter(x => Number.isFinite(x));
  if (v.length < 2) return `<svg class="spark" viewBox="0 0 ${width} ${height}" role="img" aria-label="${esc(label)}: not enough data"></svg>`;
  const max = Math.max(...v) || 1, min = Math.min(0, ...v);
  const step = width / (v.length - 1);
  const pts = v.map((y, i) => `${(i * step).toFixed(1)},${(height - 2 - ((y - min) / (max - min || 1)) * (height - 4)).toFixed(1)}`);
  return `<svg class="spark" viewBox="0 0 ${width} ${height}" preserveAspectRatio="none" role="img" aria-label="${esc(label)}">
    <polyline points="${pts.join(' ')}" fill="none" stroke="${stroke}" stroke-width="1.5" vector-effect="non-scaling-stroke"/></svg>`;
}

/** Two or more series over the same x, with a legend. `series`: [{name, values, colour}]. */
export function lines(series, { width = 600, height = 160, label = '' } = {}) {
  const n = Math.max(0, ...series.map(s => s.values.length));
  if (n < 2) return `<p class="muted">No ${esc(label)} yet.</p>`;
  const max = Math.max(1, ...series.flatMap(s => s.values));
  const x = i => 30 + (i * (width - 40)) / (n - 1);
  const y = v => height - 20 - (v / max) * (height - 30);
  const paths = series.map(s => `<polyline fill="none" stroke="${s.colour}" stroke-width="1.5" points="${s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' ')}"/>`);
  const legend = series.map((s, i) => `<text x="${40 + i * 120}" y="${height - 4}" style="fill:${s.colour}">■ ${esc(s.name)}</text>`);
  return `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" style="max-width:100%" role="img" aria-label="${esc(label)}">
    <line class="axis" x1="30" y1="${height - 20}" x2="${width - 10}" y2="${height - 20}"/>
    <text x="0" y="14">${fmtNum(max)}</text><text x="0" y="${height - 20}">0</text>
    ${paths.join('')}${legend.join('')}</svg>`;
}

/** A donut of `parts` ([{label, value}]), largest first, with a legend. */
export function donut(parts, { size = 140, label = '' } = {}) {
  const total = parts.reduce((a, p) => a + p.value, 0);
  if (!total) return `<p class="muted">No ${esc(label)} yet.</p>`;
  const r = size / 2 - 8, c = size / 2, w = 18;
  let a0 = -Math.PI / 2;
  const arcs = parts.map((p, i) => {
    const frac = p.value / total;
    const a1 = a0 + frac * 2 * Math.PI;
    const large = a1 - a0 > Math.PI ? 1 : 0;
    const [x0, y0, x1, y1] = [c + r * Math.cos(a0), c + r * Math.sin(a0), c + r * Math.cos(a1 - 1e-6), c + r * Math.sin(a1 - 1e-6)];
    a0 = a1;
    return `<path d="M${x0.toFixed(2)},${y0.toFixed(2)} A${r},${r} 0 ${large} 1 ${x1.toFixed(2)},${y1.toFixed(2)}" stroke="${colour(i)}" stroke-width="${w}" fill="none"><title>${esc(p.label)}: ${(frac * 100).toFixed(1)} %</title></path>`;
  });
  const legend = parts.map((p, i) => `<li><span style="color:${colour(i)}">■</span> ${esc(p.label)} <span class="muted num">${(p.value / total * 100).toFixed(1)} %</span></li>`);
  return `<div style="display:flex;gap:12px;align-items:center"><svg width="${size}" height="${size}" viewBox="0 0 ${size} ${size}" role="img" aria-label="${esc(label)}">${arcs.join('')}</svg>
    <ul style="list-style:none;padding:0;margin:0">${legend.join('')}</ul></div>`;
}

/** A half-circle gauge of `value` against `max`, green → yellow → red. */
export function gauge(value, max, { label = '', size = 120 } = {}) {
  const frac = max > 0 ? Math.min(1, value / max) : 0;
  const r = size / 2 - 10, cx = size / 2, cy = size / 2;
  const end = Math.PI * (1 - frac);
  const x = cx + r * Math.cos(end), y = cy - r * Math.sin(end);
  const col = frac >= 0.9 ? 'var(--bad)' : frac >= 0.7 ? 'var(--warn)' : 'var(--ok)';
  return `<svg width="${size}" height="${size / 2 + 24}" viewBox="0 0 ${size} ${size / 2 + 24}" role="img" aria-label="${esc(label)}: ${value} of ${max}">
    <path d="M${cx - r},${cy} A${r},${r} 0 0 1 ${cx + r},${cy}" stroke="var(--line)" stroke-width="12" fill="none"/>
    ${frac > 0 ? `<path d="M${cx - r},${cy} A${r},${r} 0 0 1 ${x.toFixed(2)},${y.toFixed(2)}" stroke="${col}" stroke-width="12" fill="none"/>` : ''}
    <text x="${cx}" y="${cy - 4}" text-anchor="middle" style="font-size:16px;font-weight:700">${fmtNum(value)}</text>
    <text x="${cx}" y="${cy + 18}" text-anchor="middle" class="muted">${esc(label)} / ${max > 0 ? fmtNum(max) : '—'}</text></svg>`;
}

/** A squarified treemap of `items` ([{label, value}]). */
export function treemap(items, { width = 800, height = 360, label = '' } = {}) {
  const data = items.filter(i => i.value > 0).sort((a, b) => b.value - a.value);
  const total = data.reduce((a, i) => a + i.value, 0);
  if (!total) return `<p class="muted">Nothing spent in this window.</p>`;
  const rects = [];
  const scale = (width * height) / total;
  let box = { x: 0, y: 0, w: width, h: height };
  let row = [], rest = data.map((d, i) => ({ ...d, area: d.value * scale, i }));
  const worst = (r, side) => {
    const s = r.reduce((a, x) => a + x.area, 0);
    const mx = Math.max(...r.map(x => x.area)), mn = Math.min(...r.map(x => x.area));
    return Math.max((side * side * mx) / (s * s), (s * s) / (side * side * mn));
  };
  const layout = r => {
    const s = r.reduce((a, x) => a + x.area, 0);
    if (box.w >= box.h) {
      const w = s / box.h; let y = box.y;
      for (const x of r) { const h = x.area / w; rects.push({ ...x, x: box.x, y, w, h }); y += h; }
      box = { x: box.x + w, y: box.y, w: box.w - w, h: box.h };
    } else {
      const h = s / box.w; let x0 = box.x;
      for (const x of r) { const w = x.area / h; rects.push({ ...x, x: x0, y: box.y, w, h }); x0 += w; }
      box = { x: box.x, y: box.y + h, w: box.w, h: box.h - h };
    }
  };
  while (rest.length) {
    const side = Math.min(box.w, box.h);
    const next = rest[0];
    if (!row.length || worst([...row, next], side) <= worst(row, side)) { row.push(next); rest.shift(); }
    else { layout(row); row = []; }
  }
  if (row.length) layout(row);
  const cells = rects.map(r => `<g><rect x="${r.x.toFixed(1)}" y="${r.y.toFixed(1)}" width="${Math.max(0, r.w - 1).toFixed(1)}" height="${Math.max(0, r.h - 1).toFixed(1)}" fill="${colour(r.i)}" opacity="0.85"><title>${esc(r.label)}: $${r.value.toFixed(4)}</title></rect>
    ${r.w > 60 && r.h > 28 ? `<text x="${(r.x + 4).toFixed(1)}" y="${(r.y + 14).toFixed(1)}" style="fill:#fff">${esc([...r.label].slice(0, Math.floor(r.w / 7)).join(''))}</text><text x="${(r.x + 4).toFixed(1)}" y="${(r.y + 26).toFixed(1)}" style="fill:#fff">$${r.value.toFixed(4)}</text>` : ''}</g>`);
  return `<svg viewBox="0 0 ${width} ${height}" role="img" aria-label="${esc(label)}" style="width:100%">${cells.join('')}</svg>`;
}

export function fmtNum(x, digits = 1) {
  if (x == null || !Number.isFinite(x)) return '—';
  const a = Math.abs(x);
  if (a >= 1e9) return (x / 1e9).toFixed(digits) + 'G';
  if (a >= 1e6) return (x / 1e6).toFixed(digits) + 'M';
  if (a >= 1e4) return (x / 1e3).toFixed(digits) + 'k';
  if (Number.isInteger(x)) return String(x);
  return x.toFixed(a < 10 ? 2 : digits);
}

/**
 * USD at the precision the amount needs: whole dollars from $100, cents from $1, four
 * decimals below; an amount under $0.0001 (a cheap model's cost per task, a tiny cap)
 * keeps two significant digits instead of showing as $0.0000.
 */
export function usd(x) {
  if (x == null || !Number.isFinite(x)) return '—';
  const a = Math.abs(x);
  if (a > 0 && a < 0.0001) return '$' + String(Number(x.toPrecision(2)));
  return '$' + (a >= 100 ? x.toFixed(0) : a >= 1 ? x.toFixed(2) : x.toFixed(4));
}

export function ago(ms) {
  if (!ms) return '—';
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return new Date(ms).toISOString().slice(0, 16).replace('T', ' ');
}

export function dur(ms) {
  if (ms == null) return '—';
  if (ms < 1000) return `${ms.toFixed(0)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}

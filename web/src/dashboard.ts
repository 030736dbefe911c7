// The fleet dashboard: live tier shares, p50/p99 per priority class, 429s, drift verdicts with PSI, read every
// two seconds from the servers' Prometheus metrics (through the demo server's token-checked proxy) and from the
// demo server's own counters of the answers pages got; small canvas plots keep the history.
import { openSession } from "./session";
import type { Session } from "./session";

type Sample = { name: string; labels: Record<string, string>; value: number };

export function parseProm(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** The q-quantile of a Prometheus histogram from its cumulative buckets (linear inside a bucket). */
export function quantile(buckets: [number, number][], q: number): number | null {
  buckets.sort((a, b) => a[0] - b[0]);
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!total) return null;
  const rank = q * total;
  let prevLe = 0, prevCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (!isFinite(le)) return prevLe;
      return prevLe + (le - prevLe) * ((rank - prevCount) / Math.max(count - prevCount, 1e-9));
    }
    prevLe = le; prevCount = count;
  }
  return prevLe;
}

const $ = (id: string) => document.getElementById(id) as HTMLElement;
const history: Record<string, number[]> = {};

function plot(canvasId: string, series: Record<string, number[]>): void {
  const canvas = $(canvasId) as HTMLCanvasElement;
  const ctx = canvas.getContext("2d")!;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const colors = ["#2a7", "#37c", "#c53", "#a3c", "#888"];
  const top = Math.max(1e-9, ...Object.values(series).flat());
  Object.entries(series).forEach(([name, ys], k) => {
    ctx.strokeStyle = colors[k % colors.length];
    ctx.beginPath();
    ys.forEach((y, i) => {
      const x = (i / Math.max(1, ys.length - 1)) * (canvas.width - 10) + 5;
      const py = canvas.height - 5 - (y / top) * (canvas.height - 20);
      if (i) ctx.lineTo(x, py); else ctx.moveTo(x, py);
    });
    ctx.stroke();
    if (ys.length) { // the latest value as a dot: a single sample is visible too
      const y = ys[ys.length - 1];
      ctx.fillStyle = colors[k % colors.length];
      ctx.fillRect(canvas.width - 8, canvas.height - 7 - (y / top) * (canvas.height - 20), 4, 4);
    }
    ctx.fillStyle = colors[k % colors.length];
    ctx.fillText(name, 5 + 70 * k, 10);
  });
}

function push(key: string, value: number): number[] {
  const h = (history[key] ??= []);
  h.push(value);
  if (h.length > 60) h.shift();
  return h;
}

async function scrape(path: string, token: string): Promise<Sample[]> {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return parseProm(await r.text());
}

async function tick(session: Session): Promise<void> {
  const errors: string[] = [];
  const web = await scrape("/api/metrics", session.token).catch((e: Error) => { errors.push(e.message); return []; });
  const tiers: Record<string, Sample[]> = {};
  for (const t of session.tiers) {
    tiers[t] = await scrape(`/tier/${t}/metrics`, session.token).catch((e: Error) => { errors.push(e.message); return []; });
  }
  // tier shares: every answer a page got, by the tier that answered
  const answers: Record<string, number> = { mobile: 0, edge: 0, cloud: 0 };
  for (const s of web) if (s.name === "dimec_web_answers_total") answers[s.labels.tier] = (answers[s.labels.tier] ?? 0) + s.value;
  const total = Object.values(answers).reduce((a, b) => a + b, 0);
  const shares = $("shares");
  shares.textContent = total ? Object.entries(answers).map(([t, n]) => `${t} ${(100 * n / total).toFixed(1)}%`).join(" · ") +
    ` (${total} answers)` : "no answers yet";
  for (const [t, n] of Object.entries(answers)) shares.dataset[t] = total ? (n / total).toFixed(4) : "0";
  plot("shares-plot", Object.fromEntries(Object.entries(answers).map(([t, n]) => [t, push(`share-${t}`, total ? n / total : 0)])));
  // latency per priority class, and 429s, from each tier
  const rows: string[][] = [];
  const p99s: Record<string, number[]> = {};
  for (const [t, samples] of Object.entries(tiers)) {
    const byClass: Record<string, [number, number][]> = {};
    let shed = 0;
    for (const s of samples) {
      if (s.name === "dimec_source_latency_seconds_bucket") {
        (byClass[s.labels.class] ??= []).push([s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), s.value]);
      } else if (s.name === "dimec_requests_total" && s.labels.status === "429") shed += s.value;
    }
    for (const [cls, b] of Object.entries(byClass)) {
      const merged = new Map<number, number>();
      for (const [le, c] of b) merged.set(le, (merged.get(le) ?? 0) + c);
      const buckets = [...merged.entries()];
      const p50 = quantile(buckets, 0.5), p99 = quantile(buckets, 0.99);
      rows.push([t, cls, p50 === null ? "-" : (1e3 * p50).toFixed(1), p99 === null ? "-" : (1e3 * p99).toFixed(1), String(shed)]);
      p99s[`${t}/${cls}`] = push(`p99-${t}-${cls}`, p99 === null ? 0 : 1e3 * p99);
    }
    if (!Object.keys(byClass).length) rows.push([t, "-", "-", "-", String(shed)]);
  }
  table("latency", ["tier", "class", "p50 ms", "p99 ms", "429s"], rows);
  plot("latency-plot", p99s);
  // drift: the demo server compares the tiers' drift histograms with the export's reference (monitor.py)
  try {
    const r = await fetch("/api/drift", { headers: { Authorization: `Bearer ${session.token}` }, cache: "no-store" });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ?? `HTTP ${r.status}`);
    table("drift", ["tier", "distribution", "samples", "PSI", "noise floor", "verdict"],
      (body.rows as Record<string, unknown>[]).map((d) => [String(d.tier), String(d.distribution), String(d.samples),
        String(d.psi), String(d.noise_floor), String(d.verdict)]));
    $("loss-bound").textContent = body.loss_bound ?? "no live loss bound is served yet";
  } catch (e) {
    errors.push(`drift: ${(e as Error).message}`);
  }
  $("dash-error").textContent = errors.join("; ");
  $("updated").textContent = new Date().toLocaleTimeString();
  $("updated").dataset.ticks = String(Number($("updated").dataset.ticks ?? 0) + 1);
}

function table(id: string, head: string[], rows: string[][]): void {
  const el = $(id);
  const tr = (cells: string[], tag: string) => {
    const row = document.createElement("tr");
    for (const c of cells) { const cell = document.createElement(tag); cell.textContent = c; row.append(cell); }
    return row;
  };
  el.replaceChildren(tr(head, "th"), ...rows.map((r) => tr(r, "td")));
}

async function main(): Promise<void> {
  let session: Session;
  try {
    session = await openSession();
  } catch (e) {
    $("dash-error").textContent = (e as Error).message;
    return;
  }
  const loop = async () => {
    if (Date.now() / 1000 > session.expires_at - 5) session = await openSession().catch(() => session);
    await tick(session).catch((e: Error) => { $("dash-error").textContent = e.message; });
    setTimeout(loop, 2000);
  };
  void loop();
}

void main();

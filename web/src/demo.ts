// The demo page: load and verify the phone artifact, classify typed or pasted text in the browser's mobile tier,
// show which tier answered and why, the time per stage, the bytes sent up and the cost against cloud-only; a batch
// box runs a file of texts with a running summary. `window.dimec` exposes the client to tests and benchmarks.
import { ArtifactError, loadArtifact } from "./artifact";
import { InputError, TokenExpiredError, WebClient } from "./client";
import type { Answer } from "./client";
import { openSession, tierHealth } from "./session";
import type { Session } from "./session";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

interface DemoApi {
  ready: boolean; failed: string | null; client: WebClient | null; session: Session | null;
  classify(text: string, pair?: string | null): Promise<Answer>;
  renew(): Promise<void>;
  timings: Record<string, number>;
}

const api: DemoApi = {
  ready: false, failed: null, client: null, session: null, timings: {},
  classify: async (text: string, pair: string | null = null) => {
    if (!api.client) throw new Error("not loaded");
    return api.client.classify(text, pair);
  },
  renew: async () => { api.session = await openSession(); showError(null); setStatus("session renewed"); },
};
(window as unknown as { dimec: DemoApi }).dimec = api;

function setStatus(text: string): void { $("status").textContent = text; }

function showError(text: string | null): void {
  const box = $("error");
  box.textContent = text ?? "";
  box.hidden = text === null;
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
const fmt = (x: number | null, d = 3) => (x === null ? "-" : x.toFixed(d));

function render(answer: Answer): void {
  const why = answer.stages.map((s) => `${s.tier}@${s.exit}: confidence ${fmt(s.confidence)} ` +
    (s.threshold === null ? "(last stage: answers)" : `${s.stopped ? ">=" : "<"} threshold ${fmt(s.threshold)}`));
  if (answer.routed !== "mobile") why.push(`the policy sent the text straight to the ${answer.routed}`);
  else if (answer.tier !== "mobile") why.push(`the hidden state after layer m went up (${answer.bytes_up} bytes, fp16)`);
  if (answer.degraded) why.push("both remote tiers failed: degraded answer from the mobile exit");
  else if (answer.fallback) why.push("a tier failed: another one took its stages");
  const cut = answer.cost !== null && answer.cloud_only_cost ? 1 - answer.cost / answer.cloud_only_cost : null;
  const rows: [string, string][] = [
    ["answer", `${answer.label} (${answer.probs.map((p) => p.toFixed(3)).join(" / ")})`],
    ["answered by", `${answer.tier} (exit layer ${answer.exit_layer})${answer.degraded ? " - degraded" : ""}`],
    ["plan", answer.plan],
    ["why", why.join("; ")],
    ["time", `tokenize ${answer.ms.tokenize.toFixed(1)} ms, mobile stage ${answer.ms.mobile.toFixed(1)} ms, ` +
      `remote ${answer.ms.remote.toFixed(1)} ms, total ${answer.ms.total.toFixed(1)} ms`],
    ["bytes up", `${answer.bytes_up}`],
    ["cost", answer.cost === null ? "-" : `${answer.cost.toFixed(4)} vs cloud-only ${answer.cloud_only_cost!.toFixed(4)}` +
      (cut === null ? "" : ` (${cut >= 0 ? "-" : "+"}${pct(Math.abs(cut))})`)],
  ];
  if (answer.errors.length) rows.push(["errors", answer.errors.join("; ")]);
  const table = $("result");
  table.replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th"), td = document.createElement("td");
    th.textContent = k; td.textContent = v; td.dataset.key = k;
    tr.append(th, td);
    return tr;
  }));
  table.dataset.tier = answer.tier;
}

async function report(answer: Answer): Promise<void> {
  try {
    await fetch("/api/report", {
      method: "POST", headers: { "Content-Type": "application/json", Authorization: `Bearer ${api.session?.token}` },
      body: JSON.stringify({ tier: answer.tier, routed: answer.routed, degraded: answer.degraded }),
    });
  } catch { /* the dashboard's counts are best effort; the answer stands */ }
}

async function classifyOne(text: string, pair: string | null = null): Promise<Answer | null> {
  try {
    const answer = await api.classify(text, pair);
    showError(null);
    void report(answer);
    return answer;
  } catch (exc) {
    if (exc instanceof InputError) showError(`cannot classify: ${exc.message}`);
    else if (exc instanceof TokenExpiredError) showError(exc.message);
    else showError(`error: ${(exc as Error).message}`);
    return null;
  }
}

async function onClassify(): Promise<void> {
  const button = $<HTMLButtonElement>("classify");
  button.disabled = true;
  try {
    const pair = $<HTMLTextAreaElement>("pair").value;
    const answer = await classifyOne($<HTMLTextAreaElement>("text").value, pair.trim() ? pair : null);
    if (answer) render(answer);
  } finally {
    button.disabled = false;
  }
}

async function onBatch(): Promise<void> {
  const file = $<HTMLInputElement>("file").files?.[0];
  const raw = file ? await file.text() : $<HTMLTextAreaElement>("batch").value;
  const texts = raw.split(/\r?\n/).filter((t) => t.trim());
  const counts: Record<string, number> = { mobile: 0, edge: 0, cloud: 0 };
  let cost = 0, cloud = 0, done = 0, failed = 0, degraded = 0;
  const summary = $("summary");
  for (const line of texts) {
    const [text, pair] = line.split("\t"); // a tab separates a text pair
    const answer = await classifyOne(text, pair === undefined ? null : pair);
    if (!answer) { failed++; continue; }
    done++; counts[answer.tier]++; degraded += Number(answer.degraded);
    cost += answer.cost ?? 0; cloud += answer.cloud_only_cost ?? 0;
    summary.textContent = `${done}/${texts.length} answered` + (failed ? `, ${failed} refused` : "") +
      ` - shares: ${Object.entries(counts).map(([t, n]) => `${t} ${pct(n / done)}`).join(", ")}` +
      (degraded ? `, ${degraded} degraded` : "") + (cloud ? ` - cost cut vs cloud-only ${pct(1 - cost / cloud)}` : "");
  }
  summary.dataset.done = "true";
}

async function main(): Promise<void> {
  const params = new URLSearchParams(location.search);
  const threads = Math.max(1, Number(params.get("threads") ?? 1));
  try {
    setStatus("opening a session...");
    api.session = await openSession();
    setStatus("downloading the phone artifact and checking its sha256...");
    const t0 = performance.now();
    const artifact = await loadArtifact("/artifact/", api.session.manifest_sha256);
    setStatus("starting onnxruntime-web...");
    api.client = await WebClient.create(artifact, {
      tierBase: Object.fromEntries(api.session.tiers.map((t) => [t, `/tier/${t}`])),
      token: () => api.session!.token, threads: crossOriginIsolated ? threads : 1, simd: params.get("simd") !== "0",
      maxTextChars: api.session.max_text_chars,
    });
    api.timings = { download_ms: artifact.downloadMs, init_ms: api.client.initMs, total_ms: performance.now() - t0,
                    artifact_bytes: artifact.bytes, threads: crossOriginIsolated ? threads : 1,
                    isolated: Number(crossOriginIsolated) };
    const m = artifact.manifest;
    $("model").textContent = `${m.label_names.join("/")} classifier, ${m.exit_layers.join("/")} exit layers, ` +
      `${(artifact.bytes / 1e6).toFixed(1)} MB verified in ${artifact.downloadMs.toFixed(0)} ms, ` +
      `policy: ${api.client.policy.describe()}`;
    api.ready = true;
    setStatus("ready");
    const down = (await Promise.all(api.session.tiers.map((t) => tierHealth(t, api.session!.token)))).filter((x) => x);
    if (down.length) showError(`remote tiers unreachable (${down.join("; ")}): answers will come from the ` +
      "mobile exit (degraded) until they are back");
  } catch (exc) {
    api.failed = (exc as Error).message;
    setStatus("not loaded");
    showError(exc instanceof ArtifactError ? `refused to load the artifact: ${exc.message}` : `cannot start: ${api.failed}`);
  }
  $("classify").addEventListener("click", () => void onClassify());
  $("run-batch").addEventListener("click", () => void onBatch());
  $("renew").addEventListener("click", () => void api.renew().catch((e: Error) => showError(e.message)));
}

void main();

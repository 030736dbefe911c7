// The mobile tier in the browser: what src/dimec/serving/client.py's MobileClient does, for one text at a time.
// Route the text to a plan (routing embedding + pre-router), run the mobile stage in onnxruntime-web on the int8
// graph, answer here when the exit's confidence clears the stage's threshold, else ship the hidden state after
// layer m (fp16 safetensors) to the next tier's /v1/continue; a plan that starts on the edge or cloud sends the
// raw text to /v1/classify with the rest of the plan. Fallbacks as in Python: edge down -> the cloud runs the same
// stages, cloud down -> the edge answers at its exit n, both down -> the mobile exit answers, marked degraded.
// Not carried over from Python: the FleetPolicy (privacy flags, cloud budget, deadlines, the edge's advice).
import * as ort from "onnxruntime-web/wasm";
import type { Artifact } from "./artifact";
import { CLOUD, EDGE, MOBILE, Policy, TIERS, confidence, pathCost, planJson, planText, softmax } from "./policy";
import type { Plan, Stage } from "./policy";
import { TextTokenizer } from "./tokenize";
import { CONTENT_TYPE, encodeHidden } from "./wire";

export interface StageReport { tier: string; exit: string; confidence: number | null; threshold: number | null; stopped: boolean }

export interface Answer {
  id: string;
  label: string;
  label_id: number;
  probs: number[];
  tier: string; // the tier that answered
  routed: string; // the tier the plan starts on
  exit_layer: number;
  degraded: boolean;
  fallback: boolean;
  errors: string[];
  plan: string;
  plan_index: number;
  tokens: number;
  stages: StageReport[]; // what the mobile saw: its confidence against the threshold
  ms: { tokenize: number; mobile: number; remote: number; total: number };
  bytes_up: number; // request bodies sent (raw text or hidden state)
  cost: number | null; // the path's cost (router.json's cost model), and cloud-only's
  cloud_only_cost: number | null;
}

export class TokenExpiredError extends Error {}
export class InputError extends Error {}

class RemoteError extends Error {
  constructor(message: string, readonly busy = false) { super(message); }
}

interface RemoteAnswer {
  probs: number[][]; label_names: string[]; tiers?: string[]; exits?: number[]; exit_layers?: number[];
  exit_layer?: number; fallback?: boolean[]; errors?: string[];
}

export interface ClientOptions {
  tierBase: Record<string, string>; // "edge" -> "/tier/edge" (the demo server's proxy) or a tier URL
  token: () => string; // the current short-lived session token
  threads?: number;
  simd?: boolean; // false: ask onnxruntime-web for its non-SIMD path (1.31 ships SIMD builds only: a no-op)
  retries?: number;
  timeoutMs?: number;
  cooldownMs?: number;
  maxTextChars?: number;
}

/** One remote tier: bounded retries with backoff, a timeout, and a cooldown after a failure. */
class Remote {
  private downUntil = 0;
  constructor(readonly name: string, private base: string, private opts: ClientOptions) {}

  available(): boolean { return performance.now() >= this.downUntil; }

  async post(path: string, body: Uint8Array | string, contentType: string, id: string): Promise<RemoteAnswer> {
    if (!this.available()) throw new RemoteError(`${this.name} skipped: it failed less than ${this.opts.cooldownMs} ms ago`);
    let error = "no attempt";
    const retries = this.opts.retries ?? 2;
    for (let attempt = 0; attempt <= retries; attempt++) {
      if (attempt) await new Promise((r) => setTimeout(r, 50 * 2 ** (attempt - 1)));
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), this.opts.timeoutMs ?? 10000);
      let response: Response;
      try {
        response = await fetch(`${this.base}${path}`, {
          method: "POST", body: body as BodyInit, signal: abort.signal,
          headers: { "Content-Type": contentType, Authorization: `Bearer ${this.opts.token()}`, "X-Request-ID": id },
        });
      } catch (exc) {
        error = `${(exc as Error).name}: ${(exc as Error).message}`;
        continue;
      } finally {
        clearTimeout(timer);
      }
      let payload: Record<string, unknown> = {};
      try { payload = await response.json(); } catch { /* not JSON: judged by status below */ }
      if (response.status === 200) return payload as unknown as RemoteAnswer;
      error = `HTTP ${response.status}: ${String(payload.error ?? response.statusText)}`;
      if (response.status === 401) {
        throw new TokenExpiredError(payload.expired ? "the session token expired: renew the session (button " +
          "above) to go on" : `the demo server refused this page's token (${error})`);
      }
      if (response.status === 429) {
        const after = Number(response.headers.get("retry-after") ?? 1);
        this.downUntil = performance.now() + Math.min(60, after) * 1000;
        throw new RemoteError(`${this.name} is busy: ${error}`, true);
      }
      if ([409, 413, 415, 422].includes(response.status)) throw new RemoteError(`${this.name} refused the request: ${error}`);
      if (![500, 502, 503, 504].includes(response.status)) break;
    }
    this.downUntil = performance.now() + (this.opts.cooldownMs ?? 1000);
    throw new RemoteError(`${this.name} failed after ${retries + 1} attempt(s): ${error}`);
  }
}

/** The same stages run on `tier`: exits capped at what it holds, repeated exits merged, the last answering. */
export function substituteTier(stages: Plan, tier: number): Plan {
  const top = tier === CLOUD ? 2 : tier;
  const out: Stage[] = [];
  for (const s of stages) {
    const stage = { tier, exit: Math.min(s.exit, top), threshold: s.threshold };
    if (out.length && out[out.length - 1].exit === stage.exit) out[out.length - 1] = stage; else out.push(stage);
  }
  out[out.length - 1] = { ...out[out.length - 1], threshold: null };
  return out;
}

function attempts(stages: Plan): [number, Plan][] {
  const target = stages[0].tier;
  const other = target === EDGE ? CLOUD : EDGE;
  return [[target, stages], [other, substituteTier(stages, other)]];
}

/** Why a text cannot be classified, or null: the checks the tiers make (server.py), said before any work. */
export function textProblem(text: string, maxChars: number): string | null {
  if (!text.trim()) return "the text is empty";
  if (text.length > maxChars) return `the text has ${text.length} characters, over the limit of ${maxChars}`;
  if (!text.isWellFormed()) return "the text holds a lone surrogate (half of an emoji or other character " +
    "outside the basic plane): it is not valid Unicode; paste it again";
  return null;
}

export class WebClient {
  readonly policy: Policy;
  readonly tokenizer: TextTokenizer;
  readonly labels: string[];
  private remotes: Record<string, Remote>;
  private counter = 0;

  private constructor(readonly artifact: Artifact, readonly session: ort.InferenceSession, private opts: ClientOptions,
                      readonly initMs: number) {
    const m = artifact.manifest;
    this.policy = new Policy(artifact.router);
    this.tokenizer = new TextTokenizer(artifact.tokenizer, artifact.tokenizerConfig, m.max_length);
    this.labels = m.label_names;
    this.remotes = Object.fromEntries(Object.entries(opts.tierBase).map(([k, v]) => [k, new Remote(k, v, opts)]));
  }

  static async create(artifact: Artifact, opts: ClientOptions, wasmPaths = "/static/"): Promise<WebClient> {
    const start = performance.now();
    ort.env.wasm.wasmPaths = wasmPaths;
    ort.env.wasm.numThreads = opts.threads ?? 1;
    ort.env.wasm.simd = opts.simd ?? true;
    const session = await ort.InferenceSession.create(artifact.onnx, {
      executionProviders: ["wasm"], graphOptimizationLevel: "all",
    });
    return new WebClient(artifact, session, opts, performance.now() - start);
  }

  /** Layers 1..m of the int8 graph: routing embedding (H,), exit m's logits (C,), hidden state (T, H). */
  async runMobile(ids: number[], types: number[]): Promise<{ embedding: Float32Array; logits: Float32Array; hidden: Float32Array; size: number }> {
    const t = ids.length;
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, t]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(t).fill(1n), [1, t]),
    };
    if (this.session.inputNames.includes("token_type_ids")) {
      feeds.token_type_ids = new ort.Tensor("int64", BigInt64Array.from(types, BigInt), [1, t]);
    }
    const out = await this.session.run(feeds);
    const hidden = out.hidden;
    return { embedding: out.embedding.data as Float32Array, logits: out.logits.data as Float32Array,
             hidden: hidden.data as Float32Array, size: hidden.dims[2] };
  }

  /** Per text, the best of `repeats` runs of the mobile stage (ms), tokenisation excluded: the benchmark. */
  async timeMobile(texts: string[], repeats = 3): Promise<number[]> {
    const out: number[] = [];
    for (const text of texts) {
      const { ids, types } = this.tokenizer.encode(text);
      let best = Infinity;
      for (let r = 0; r < repeats; r++) {
        const start = performance.now();
        await this.runMobile(ids, types);
        best = Math.min(best, performance.now() - start);
      }
      out.push(best);
    }
    return out;
  }

  async classify(text: string, pair: string | null = null): Promise<Answer> {
    const problem = textProblem(text, this.opts.maxTextChars ?? 20000) ?? (pair === null ? null : textProblem(pair, this.opts.maxTextChars ?? 20000));
    if (problem) throw new InputError(problem);
    const id = `web-${Date.now().toString(36)}-${(this.counter++).toString(36)}`;
    const t0 = performance.now();
    const { ids, types } = this.tokenizer.encode(text, pair);
    const t1 = performance.now();
    const mobile = await this.runMobile(ids, types);
    const t2 = performance.now();
    const choice = this.policy.choose(mobile.embedding, ids.length);
    const plan = this.policy.plans[choice];
    const temps = this.artifact.temperatures;
    const mobileProbs = softmax(mobile.logits, temps[MOBILE]);
    const answer: Answer = {
      id, label: "", label_id: -1, probs: [], tier: "mobile", routed: TIERS[plan[0].tier], plan_index: choice,
      exit_layer: this.artifact.manifest.exit_layers[MOBILE], degraded: false, fallback: false, errors: [],
      plan: planText(plan), tokens: ids.length, stages: [], ms: { tokenize: t1 - t0, mobile: t2 - t1, remote: 0, total: 0 },
      bytes_up: 0, cost: null, cloud_only_cost: null,
    };
    let ran: Plan = [plan[0]];
    if (plan[0].tier === MOBILE) {
      const first = plan[0];
      const conf = confidence(mobileProbs, this.policy.confidence);
      const stop = first.threshold === null || conf >= first.threshold;
      answer.stages.push({ tier: "mobile", exit: "m", confidence: conf, threshold: first.threshold, stopped: stop });
      if (stop) {
        this.fill(answer, mobileProbs, "mobile", answer.exit_layer);
      } else {
        ran = await this.ship(answer, plan, mobile, mobileProbs);
      }
    } else {
      ran = await this.offload(answer, plan, text, pair, mobileProbs);
    }
    answer.ms.total = performance.now() - t0;
    answer.ms.remote = answer.bytes_up ? answer.ms.total - (t2 - t0) : 0; // the rest: the exchanges with the tiers
    const cost = this.artifact.router.cost_model;
    if (cost) {
      const layers = (cost.exit_layers as number[]) ?? this.artifact.manifest.exit_layers;
      answer.cost = pathCost(ran, cost, layers);
      answer.cloud_only_cost = pathCost([{ tier: CLOUD, exit: 2, threshold: null }], cost, layers);
    }
    return answer;
  }

  private fill(answer: Answer, probs: number[], tier: string, exitLayer: number): void {
    let best = 0;
    probs.forEach((p, i) => { if (p > probs[best]) best = i; });
    answer.probs = probs.map((p) => Math.round(p * 1e6) / 1e6);
    answer.label_id = best;
    answer.label = this.labels[best];
    answer.tier = tier;
    answer.exit_layer = exitLayer;
  }

  /** The hidden state after layer m to the next stage's tier (or its substitute); returns the stages run. */
  private async ship(answer: Answer, plan: Plan, mobile: { hidden: Float32Array; size: number }, mobileProbs: number[]): Promise<Plan> {
    const stages = plan.slice(1);
    const tokens = answer.tokens;
    for (const [tier, rest] of attempts(stages)) {
      const body = encodeHidden(mobile.hidden, tokens, mobile.size, answer.exit_layer, this.artifact.manifest.model_id,
        answer.id, rest, this.policy.confidence);
      const result = await this.exchange(answer, TIERS[tier], "/v1/continue", body, CONTENT_TYPE);
      if (result) {
        this.fillRemote(answer, result, TIERS[tier], tier !== stages[0].tier);
        return [plan[0], ...this.stagesRun(rest, result)];
      }
    }
    this.degrade(answer, mobileProbs);
    return [plan[0]];
  }

  /** Raw text to the plan's first tier (or its substitute) with the rest of the plan. */
  private async offload(answer: Answer, plan: Plan, text: string, pair: string | null, mobileProbs: number[]): Promise<Plan> {
    for (const [tier, rest] of attempts(plan)) {
      const ownExit = rest.length === 1 && rest[0].exit === tier && rest[0].threshold === null;
      const body: Record<string, unknown> = { texts: [text], ids: [answer.id] };
      if (pair !== null) body.text_pairs = [pair];
      if (!ownExit) { body.plan = planJson(rest); body.confidence = this.policy.confidence; }
      const result = await this.exchange(answer, TIERS[tier], "/v1/classify", JSON.stringify(body), "application/json");
      if (result) {
        this.fillRemote(answer, result, TIERS[tier], tier !== plan[0].tier);
        return this.stagesRun(rest, result);
      }
    }
    this.degrade(answer, mobileProbs);
    return [{ tier: MOBILE, exit: 0, threshold: null }];
  }

  private stagesRun(rest: Plan, result: RemoteAnswer): Plan {
    const tier = result.tiers ? TIERS.indexOf(result.tiers[0] as never) : rest[0].tier;
    const exit = result.exits ? result.exits[0] : rest[rest.length - 1].exit;
    const upto = rest.findIndex((s) => s.tier === tier && s.exit === exit);
    return upto >= 0 ? rest.slice(0, upto + 1) : rest;
  }

  private async exchange(answer: Answer, target: string, path: string, body: Uint8Array | string,
                         type: string): Promise<RemoteAnswer | null> {
    const remote = this.remotes[target];
    if (!remote) { answer.errors.push(`no ${target} tier configured`); return null; }
    answer.bytes_up += typeof body === "string" ? new TextEncoder().encode(body).length : body.length;
    try {
      const result = await remote.post(path, body, type, answer.id);
      if (JSON.stringify(result.label_names) !== JSON.stringify(this.labels) || result.probs?.length !== 1) {
        throw new RemoteError(`${target} serves another model (labels ${JSON.stringify(result.label_names)})`);
      }
      return result;
    } catch (exc) {
      if (exc instanceof TokenExpiredError) throw exc;
      answer.errors.push((exc as Error).message);
      return null;
    }
  }

  private fillRemote(answer: Answer, result: RemoteAnswer, target: string, substituted: boolean): void {
    const tier = result.tiers ? result.tiers[0] : target;
    const layer = result.exit_layers ? result.exit_layers[0] : (result.exit_layer ?? 0);
    this.fill(answer, result.probs[0], tier, layer);
    const forwarded = result.fallback ? result.fallback[0] : false;
    answer.fallback = substituted || forwarded;
    if (answer.fallback) answer.errors.push(...(result.errors ?? []));
  }

  private degrade(answer: Answer, mobileProbs: number[]): void {
    this.fill(answer, mobileProbs, "mobile", this.artifact.manifest.exit_layers[MOBILE]);
    answer.degraded = true;
    answer.fallback = true;
  }
}

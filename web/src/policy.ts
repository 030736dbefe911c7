// The calibrated policy of router.json, as dimec's PlanRouter serves it (src/dimec/routing/plan.py,
// prerouters.py): a list of plans, what the thresholds read, and a pre-router choosing a plan per text from the
// routing embedding and the token count. Every family `auto` can choose is one of these shapes: one plan (cascades,
// split computing, early exit, one tier), nearest pool mean (DIMEC-DC Fixed; moving means: Dynamic), or the
// learned pre-router (hybrids).
import type { RouterFile } from "./artifact";

export const TIERS = ["mobile", "edge", "cloud"] as const;
export type TierName = (typeof TIERS)[number];
export const MOBILE = 0, EDGE = 1, CLOUD = 2;

export interface Stage { tier: number; exit: number; threshold: number | null }
export type Plan = Stage[];

export function parsePlan(raw: [string, number, number | null][]): Plan {
  return raw.map(([tier, exit, threshold]) => {
    const t = TIERS.indexOf(tier as TierName);
    if (t < 0 || ![0, 1, 2].includes(exit)) throw new Error(`router.json: bad plan stage ${JSON.stringify([tier, exit])}`);
    return { tier: t, exit, threshold: threshold === null ? null : Number(threshold) };
  });
}

/** Python's f"{x:.4g}" for the numbers thresholds hold. */
function g4(x: number): string {
  return String(parseFloat(x.toPrecision(4)));
}

export function planText(plan: Plan): string {
  return plan.map((s) => `${TIERS[s.tier]}@${"mnl"[s.exit]}` + (s.threshold === null ? "" : `>=${g4(s.threshold)}`))
    .join(" -> ");
}

export function planJson(plan: Plan): { tier: string; exit: number; threshold: number | null }[] {
  return plan.map((s) => ({ tier: TIERS[s.tier], exit: s.exit, threshold: s.threshold }));
}

export function softmax(logits: ArrayLike<number>, temperature: number): number[] {
  const z = Array.from(logits, (x) => x / temperature);
  const top = Math.max(...z);
  const e = z.map((x) => Math.exp(x - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

export function confidence(probs: number[], kind: string): number {
  if (kind === "max_prob") return Math.max(...probs);
  if (kind === "entropy") return probs.reduce((a, p) => a + p * Math.log(Math.min(1, Math.max(p, 1e-12))), 0);
  throw new Error(`unknown confidence ${kind}`);
}

interface PreRouter { choose(embedding: Float32Array, length: number): number; describe(): string }

class CentroidPreRouter implements PreRouter {
  // centroids: (K, H) or null for an empty pool; online: each text moves its pool's mean (DIMEC-DC Algorithm 2)
  constructor(private centroids: (number[] | null)[], private counts: number[], private planOfPool: number[],
              private online: boolean) {}

  choose(e: Float32Array): number {
    // argmin_k ||c_k||^2 - 2 x.c_k: the squared distance minus ||x||^2, the same sums Python's numpy does
    let best = -1, bestD = Infinity;
    this.centroids.forEach((c, k) => {
      if (c === null) return;
      let cc = 0, xc = 0;
      for (let i = 0; i < c.length; i++) { cc += c[i] * c[i]; xc += e[i] * c[i]; }
      const d = cc - 2 * xc;
      if (d < bestD) { bestD = d; best = k; }
    });
    if (this.online) {
      const c = this.centroids[best]!, n = this.counts[best];
      for (let i = 0; i < c.length; i++) c[i] = (n * c[i] + e[i]) / (n + 1);
      this.counts[best] = n + 1;
    }
    return this.planOfPool[best];
  }

  describe(): string { return "nearest pool mean" + (this.online ? " (moving, Algorithm 2)" : "") + " picks the plan"; }
}

class LearnedPreRouter implements PreRouter {
  constructor(private mean: number[], private scale: number[], private coef: number[][],
              private intercept: number[], private tCloud: number, private tEdge: number) {}

  probabilities(e: Float32Array, length: number): number[] {
    const x = [...Array.from(e), Math.log(Math.max(length, 1))].map((v, i) => (v - this.mean[i]) / this.scale[i]);
    const z = this.coef.map((row, k) => row.reduce((a, w, i) => a + w * x[i], 0) + this.intercept[k]);
    const top = Math.max(...z);
    const p = z.map((v) => Math.exp(v - top));
    const sum = p.reduce((a, b) => a + b, 0);
    return p.map((v) => v / sum);
  }

  choose(e: Float32Array, length: number): number {
    const p = this.probabilities(e, length);
    return p[CLOUD] >= this.tCloud ? 2 : p[EDGE] + p[CLOUD] >= this.tEdge ? 1 : 0;
  }

  describe(): string { return "learned pre-router"; }
}

export class Policy {
  readonly plans: Plan[];
  readonly confidence: string;
  readonly needsEmbedding: boolean;
  private pre: PreRouter | null;

  constructor(router: RouterFile) {
    this.plans = router.state.plans.map(parsePlan);
    this.confidence = router.state.confidence;
    if (!["max_prob", "entropy"].includes(this.confidence)) throw new Error(`unknown confidence ${this.confidence}`);
    this.pre = makePreRouter(router.state.prerouter);
    this.needsEmbedding = this.pre !== null;
  }

  /** Index into `plans` for one text: from its routing embedding (H,) and its token count. */
  choose(embedding: Float32Array, length: number): number {
    return this.pre === null ? 0 : this.pre.choose(embedding, length);
  }

  describe(): string {
    const plans = this.plans.map(planText).join(" | ");
    return this.pre === null ? plans : `${this.pre.describe()}: ${plans}`;
  }
}

function makePreRouter(raw: Record<string, unknown> | null): PreRouter | null {
  if (raw === null || raw === undefined) return null;
  if (raw.kind === "centroid") {
    const centroids = (raw.centroids as (number[] | null)[]).map((c) => (c === null ? null : [...c]));
    return new CentroidPreRouter(centroids, [...(raw.counts as number[])], raw.plan_of_pool as number[],
      Boolean(raw.online));
  }
  if (raw.kind === "learned") {
    const inf = (t: unknown) => (t === null ? Infinity : Number(t));
    return new LearnedPreRouter(raw.mean as number[], raw.scale as number[], raw.coef as number[][],
      (raw.intercept as (number | null)[]).map((b) => (b === null ? -Infinity : b)), inf(raw.t_cloud), inf(raw.t_edge));
  }
  throw new Error(`unknown pre-router kind ${String(raw.kind)}`);
}

/** The cost of a path (router.json's cost_model; docs/cost-model.md): raw offload to the first tier, the layers
 *  run on each tier at its rate, and each hop of a hidden state. `stages`: the stages run, the last answering. */
export function pathCost(stages: Plan, cost: Record<string, number | number[]>, exitLayers: number[]): number {
  const raw = [0, cost.o_e as number, cost.o_c as number];
  const numLayers = exitLayers[exitLayers.length - 1];
  const rate = [cost.lambda_m as number, cost.lambda_e as number, (cost.cloud_fee as number) / numLayers];
  let total = raw[stages[0].tier], done = 0, tier = stages[0].tier;
  for (const s of stages) {
    if (s.tier !== tier) {
      total += (cost.hidden_state_factor as number) * Math.max(0, raw[s.tier] - raw[tier]);
      tier = s.tier;
    }
    total += (exitLayers[s.exit] - done) * rate[s.tier];
    done = exitLayers[s.exit];
  }
  return total;
}

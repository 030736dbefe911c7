// The continuation body of src/dimec/serving/wire.py, written in the browser: one safetensors file holding the
// hidden state after layer m as float16 (B, T, H) and its attention mask as uint8 (B, T), with the metadata the
// receiving tier checks (wire version, model identity, layer, request ids, the rest of the plan, confidence).
import type { Plan } from "./policy";
import { planJson } from "./policy";

export const CONTENT_TYPE = "application/vnd.dimec.hidden+safetensors";
export const WIRE_VERSION = "1";

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 -> IEEE half bits, rounding to nearest even (numpy's astype(float16)). */
export function toHalf(value: number): number {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf / nan
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> inf
  if (e <= 0) { // subnormal half (or zero)
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1), mid = 1 << (shift - 1);
    if (rest > mid || (rest === mid && (half & 1))) half++;
    return sign | half;
  }
  let half = sign | (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1))) half++; // may carry into the exponent: still right
  return half;
}

/** hidden: (T, H) float32 over the text's real tokens. */
export function encodeHidden(hidden: Float32Array, tokens: number, size: number, layer: number, modelId: string,
                             id: string, plan: Plan | null, confidence: string): Uint8Array {
  const hiddenBytes = tokens * size * 2;
  const metadata: Record<string, string> = {
    dimec: WIRE_VERSION, model: modelId, layer: String(layer), ids: JSON.stringify([id]), confidence,
  };
  if (plan !== null) metadata.plan = JSON.stringify(planJson(plan));
  const header = {
    hidden: { dtype: "F16", shape: [1, tokens, size], data_offsets: [0, hiddenBytes] },
    attention_mask: { dtype: "U8", shape: [1, tokens], data_offsets: [hiddenBytes, hiddenBytes + tokens] },
    __metadata__: metadata,
  };
  let headerBytes = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(headerBytes.length / 8) * 8; // the safetensors writers align the data to 8 bytes
  const out = new Uint8Array(8 + padded + hiddenBytes + tokens);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(padded), true);
  out.fill(0x20, 8, 8 + padded);
  out.set(headerBytes, 8);
  headerBytes = new Uint8Array(0);
  const base = 8 + padded;
  for (let i = 0; i < tokens * size; i++) view.setUint16(base + 2 * i, toHalf(hidden[i]), true);
  out.fill(1, base + hiddenBytes);
  return out;
}

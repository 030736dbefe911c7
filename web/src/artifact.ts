// The phone artifact exactly as `dimec export` writes it (src/dimec/serving/package.py): manifest.json lists every
// file with its size and sha256; each file the browser needs is fetched and checked against it, and a manifest
// whose own sha256 differs from the one the demo server pinned at start is refused too. A mismatch never loads.

export interface FileEntry { bytes: number; sha256: string }

export interface Manifest {
  format_version: number;
  tier: string;
  model_id: string;
  exit_layers: number[];
  exit_layer: number;
  label_names: string[];
  max_length: number;
  files: Record<string, FileEntry>;
  [key: string]: unknown;
}

export interface Artifact {
  manifest: Manifest;
  onnx: Uint8Array; // model.int8.onnx
  tokenizer: object; // model/tokenizer.json
  tokenizerConfig: object; // model/tokenizer_config.json
  temperatures: number[]; // (3,) per exit, from model/dimec_model.json (1.0 each when absent)
  router: RouterFile; // router.json
  bytes: number; // what was downloaded
  downloadMs: number;
}

export interface RouterFile {
  format_version: number;
  router: string;
  state: { plans: [string, number, number | null][][]; confidence: string; prerouter: Record<string, unknown> | null };
  cost_model?: Record<string, number | number[]>;
}

export class ArtifactError extends Error {}

export const NEEDED = ["model.int8.onnx", "model/tokenizer.json", "model/tokenizer_config.json",
  "model/dimec_model.json", "router.json"];

export async function sha256Hex(data: ArrayBuffer | Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", data as BufferSource);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function fetchBytes(url: string): Promise<Uint8Array> {
  let response: Response;
  try {
    response = await fetch(url, { cache: "no-store" });
  } catch (exc) {
    throw new ArtifactError(`cannot download ${url}: ${(exc as Error).message}`);
  }
  if (!response.ok) throw new ArtifactError(`cannot download ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

/** Download and verify the mobile package under `base` (e.g. "/artifact/"). `manifestSha256`: the manifest's
 *  sha256 as the server pinned it when it started (null: not pinned). */
export async function loadArtifact(base: string, manifestSha256: string | null): Promise<Artifact> {
  const start = performance.now();
  const rawManifest = await fetchBytes(`${base}manifest.json`);
  if (manifestSha256 && (await sha256Hex(rawManifest)) !== manifestSha256) {
    throw new ArtifactError("manifest.json does not match the sha256 the server pinned: the artifact was " +
      "modified; refusing to load it (export it again with `dimec export RUN_DIR`)");
  }
  let manifest: Manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(rawManifest)) as Manifest;
  } catch {
    throw new ArtifactError("manifest.json is not valid JSON");
  }
  if (manifest.tier !== "mobile" || !manifest.files || (manifest.format_version ?? 1) < 2) {
    throw new ArtifactError(`not a mobile package of format 2 (tier ${manifest.tier}, format ${manifest.format_version})`);
  }
  const files: Record<string, Uint8Array> = {};
  let bytes = rawManifest.length;
  await Promise.all(NEEDED.map(async (name) => {
    const entry = manifest.files[name];
    if (!entry) throw new ArtifactError(`the package lacks ${name} (export it again with \`dimec export RUN_DIR\`)`);
    const data = await fetchBytes(`${base}${name}`);
    if (data.length !== entry.bytes || (await sha256Hex(data)) !== entry.sha256) {
      throw new ArtifactError(`${name} does not match its sha256 in manifest.json: the artifact was tampered ` +
        "with or half-copied; refusing to load it");
    }
    files[name] = data;
    bytes += data.length;
  }));
  const json = (name: string) => JSON.parse(new TextDecoder().decode(files[name]));
  const modelConfig = json("model/dimec_model.json") as { temperatures?: number[] };
  const temperatures = modelConfig.temperatures ?? [1, 1, 1];
  if (temperatures.length !== 3 || !temperatures.every((t) => t > 0)) {
    throw new ArtifactError(`invalid temperatures ${JSON.stringify(temperatures)} in dimec_model.json`);
  }
  const router = json("router.json") as RouterFile;
  if (router.format_version !== 2 || !router.state?.plans?.length) {
    throw new ArtifactError("router.json is from another dimec version or holds no plans (run `dimec calibrate`)");
  }
  return {
    manifest, onnx: files["model.int8.onnx"], tokenizer: json("model/tokenizer.json"),
    tokenizerConfig: json("model/tokenizer_config.json"), temperatures, router, bytes,
    downloadMs: performance.now() - start,
  };
}

// Bundle the two pages with esbuild into dist/, beside the static files and onnxruntime-web's wasm runtime.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readdirSync } from "node:fs";

mkdirSync("dist", { recursive: true });
await build({
  entryPoints: { demo: "src/demo.ts", dashboard: "src/dashboard.ts" },
  bundle: true, format: "esm", target: "es2022", minify: true, sourcemap: false, outdir: "dist",
  logLevel: "warning",
});
for (const f of readdirSync("static")) copyFileSync(`static/${f}`, `dist/${f}`);
const ort = "node_modules/onnxruntime-web/dist/";
for (const f of ["ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"]) copyFileSync(ort + f, `dist/${f}`);
console.log("built web/dist");

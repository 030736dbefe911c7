"""GPU figures (issue 19), one prepared script of at most about 5 minutes on one GPU:

1. training samples/s of the real training step (`trainer.train_epoch`: autocast, backward, clipping, AdamW,
   schedule) for the default model (MiniLM-L6, fresh exit heads) and a 12-layer BERT-base-sized encoder
   (hidden 768, 12 heads, random initialisation: throughput does not depend on the weights), fp32 against bf16,
   on synthetic token sequences of 16..128 tokens (length-bucketed batches of 32), with peak GPU memory;
2. the cloud tier (the default model, every layer) served with dynamic batching on the GPU (`dimec serve`'s
   app, bf16, in-process uvicorn on loopback): throughput and p50/p99 at 1, 32 and 256 concurrent closed-loop
   clients sending single texts, with peak GPU memory.

Results go to benchmarks/results/gpu.json naming the machine and the GPU. Without a CUDA device it says so
and exits (status 0, nothing written); `--device cpu --quick` smoke-tests the script on a CPU (nothing written
unless --out is given).

    python benchmarks/bench_gpu.py [--quick] [--device cuda|cuda:N|cpu] [--seconds 10] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
COMMAND = "python benchmarks/bench_gpu.py"
TITLE = "GPU (issue 19): training fp32 vs bf16, the cloud tier batched on a GPU"
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
CLIENTS = (1, 32, 256)


def synthetic(n: int, vocab: int, seed: int = 0):
    """n sequences of 16..128 token ids ([CLS] ... [SEP] of the BERT vocabulary), binary labels."""
    import numpy as np

    from dimec.training.batching import Encoded

    rng = np.random.default_rng(seed)
    ids = [[101, *rng.integers(1000, vocab, int(k) - 2).tolist(), 102] for k in rng.integers(16, 129, n)]
    return Encoded(ids, None, rng.integers(0, 2, n))


def default_encoder_dir() -> str:
    from dimec.modeling.multi_exit import resolve_model_path

    return resolve_model_path("default")


def bert_base_dir(root: Path) -> str:
    """A random 12-layer BERT-base-sized encoder with the default model's (BERT uncased) tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = root / "bert-base-random"
    tokenizer = AutoTokenizer.from_pretrained(default_encoder_dir())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **BERT_BASE)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def bench_training(encoder: str, device, precision: str, samples: int) -> dict:
    import torch

    from dimec.config import TrainConfig
    from dimec.devices import grad_scaler
    from dimec.modeling.multi_exit import MultiExitConfig
    from dimec.training.loss import exit_weights
    from dimec.training.trainer import make_optimizer, new_model, train_epoch

    model = new_model(MultiExitConfig(name_or_path=encoder, label_names=["neg", "pos"]), seed=0).to(device)
    cfg = TrainConfig(batch_size=32, epochs=1, progress=False)
    enc = synthetic(samples, model.tokenizer.vocab_size)
    warm = synthetic(4 * cfg.batch_size, model.tokenizer.vocab_size, seed=1)
    optimizer, scheduler = make_optimizer(model, cfg, 10_000)
    weights = exit_weights(cfg, model.config.exit_layers).to(device)
    scaler = grad_scaler(device, precision)
    train_epoch(model, warm, optimizer, scheduler, weights, cfg, 1, None, precision, scaler)  # kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = train_epoch(model, enc, optimizer, scheduler, weights, cfg, 2, None, precision, scaler)
    out = {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
           "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def cloud_package(root: Path, device) -> Path:
    """The cloud tier package of the default model with fresh exit heads (throughput only: no training)."""
    from dimec.modeling.multi_exit import MultiExitConfig
    from dimec.runtime.package import FORMAT_VERSION, MODEL_SUBDIR, model_id, write_manifest
    from dimec.training.trainer import new_model

    model = new_model(MultiExitConfig(name_or_path=default_encoder_dir(), label_names=["neg", "pos"]), seed=0)
    directory = root / "cloud"
    model.save_pretrained(directory / MODEL_SUBDIR)
    cfg = model.config
    write_manifest(directory, {"format_version": FORMAT_VERSION, "tier": "cloud", "tier_index": 2,
                               "model_id": model_id(directory / MODEL_SUBDIR), "exit_layers": list(cfg.exit_layers),
                               "exit_layer": cfg.exit_layers[2], "label_names": list(cfg.label_names),
                               "max_length": cfg.max_length, "task": "synthetic"})
    return directory


def bench_serving(package: Path, device, precision: str, seconds: float, batch_max: int, texts: list[str]) -> dict:
    import torch
    from bench_batching import load

    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.local import ThreadServer
    from dimec.serving.servers.batcher import BatchingConfig
    from dimec.serving.servers.server import Limits, create_app

    token = secrets.token_urlsafe(16)
    model = TierModel(package, device=str(device), precision=precision)
    app = create_app(None, "cloud", token, Limits(), model=model,
                     batching=BatchingConfig(max_batch=batch_max, max_wait_ms=2.0, max_queue=4096))
    server = ThreadServer(app).start()
    out: dict = {"precision": model.precision, "batch_max": batch_max}
    try:
        load(server.url, token, texts, 8, min(2.0, seconds))  # warm-up
        for c in CLIENTS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            batcher = app.state.fleet.batcher.batcher
            before = (batcher.batches, batcher.texts)
            result = load(server.url, token, texts, c, seconds)
            batches, done = batcher.batches - before[0], batcher.texts - before[1]
            result["mean_batch"] = done / max(1, batches)
            if device.type == "cuda":
                result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            out[str(c)] = result
            print(f"  {c:>3} clients: {result['throughput']:8.1f} req/s  p50 {result['p50_ms']:6.1f} ms  p99 "
                  f"{result['p99_ms']:6.1f} ms  mean batch {result['mean_batch']:.1f}", flush=True)
    finally:
        app.state.fleet.close()
        server.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke run with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples, short loads; writes only "
                                                             "with --out")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per serving load")
    parser.add_argument("--out", help="results file (default benchmarks/results/gpu.json)")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): nothing measured, nothing written. Run it on a machine with a "
              "GPU, or smoke-test it with `--device cpu --quick`.", file=sys.stderr)
        return 0
    from dimec.devices import describe, resolve_device
    from dimec.errors import DimecError

    try:
        device = resolve_device(args.device, "--device")
    except DimecError as exc:
        print(f"bench_gpu: {exc.message}", file=sys.stderr)
        return 2
    quick = args.quick or device.type == "cpu"
    samples = {"default": 64 if quick else 8192, "bert-base": 32 if quick else 2048}
    seconds = 1.0 if quick else args.seconds
    out = Path(args.out) if args.out else (None if quick else RESULTS)
    precisions = ["no", "bf16"] if device.type == "cuda" and torch.cuda.is_bf16_supported() else ["no"]
    started = time.perf_counter()

    root = Path(tempfile.mkdtemp(prefix="dimec-bench-gpu-"))
    encoders = {"default": default_encoder_dir(), "bert-base": bert_base_dir(root)}
    training: dict = {}
    for name, encoder in encoders.items():
        for precision in precisions:
            result = bench_training(encoder, device, precision, samples[name])
            training[f"{name}/{precision}"] = result
            print(f"training {name:<9} {precision:<4}: {result['samples_per_s']:8.1f} samples/s"
                  + (f", peak {result['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in result else ""), flush=True)
    texts = [f"the movie was {w} and the plot {v}" for w in ("good", "dull", "great", "weak", "fine")
             for v in ("moved slowly", "surprised me", "made no sense at all", "was quite lovely")]
    serving = bench_serving(cloud_package(root, device), device, "auto", seconds, 256, texts)
    data = {"device": describe(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "training": training, "serving": serving, "quick": quick,
            "settings": {"samples": samples, "seconds": seconds, "clients": list(CLIENTS), "batch_size": 32,
                         "bert_base": BERT_BASE}, "wall_seconds": time.perf_counter() - started}
    data = json.loads(json.dumps(data, default=float))
    print("\n" + render(data))
    if out is not None:
        from datetime import date

        from report import machine, render_all

        from dimec.atomic import write_json

        write_json(out, {"title": TITLE, "command": COMMAND, "script": "bench_gpu.py",
                         "measured": {"date": date.today().isoformat(), "machine": f"{machine()}, {data['device']}"},
                         "data": data})
        if out == RESULTS:
            render_all()
        print(f"wrote {out}")
    return 0


def render(data: dict) -> str:
    from report import markdown_table

    train_rows = []
    for key, r in data["training"].items():
        model, precision = key.split("/")
        train_rows.append([model, "fp32" if precision == "no" else precision, f"{r['samples_per_s']:.1f}",
                           f"{r['parameters'] / 1e6:.1f} M", f"{r.get('peak_memory_gib', float('nan')):.2f}"])
    serve_rows = [[c, f"{r['throughput']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.1f}",
                   f"{r.get('peak_memory_gib', float('nan')):.2f}", r["errors"]]
                  for c, r in data["serving"].items() if c.isdigit()]
    s = data["settings"]
    return "\n\n".join([
        f"Device: {data['device']} (torch {data['torch']}, CUDA {data['cuda']}). Training: `trainer.train_epoch` on "
        f"synthetic sequences of 16..128 tokens, batches of {s['batch_size']}, after a warm-up epoch; peak memory "
        "in GiB.",
        markdown_table(["model", "precision", "samples/s", "parameters", "peak GiB"], train_rows),
        f"Cloud tier (default model, every layer, {data['serving']['precision']}), dynamic batching up to "
        f"{data['serving']['batch_max']} texts, closed-loop single-text clients over loopback, {s['seconds']:g} s "
        "per load:",
        markdown_table(["clients", "req/s", "p50 ms", "p99 ms", "mean batch", "peak GiB", "errors"], serve_rows),
    ])


if __name__ == "__main__":
    sys.exit(main())

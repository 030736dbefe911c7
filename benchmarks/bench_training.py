"""Fine-tuning throughput with length-bucketed dynamic padding against fixed-length padding, side by side
on SST-2 (issue 3). Same model, same samples, same number of steps; the two settings alternate in rounds
so machine noise hits both alike.

    python benchmarks/bench_training.py [--glue-dir ../shared/glue] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save  # noqa: E402

from dimec.config import DataConfig  # noqa: E402
from dimec.data import load_task  # noqa: E402
from dimec.modeling import hf_adapter  # noqa: E402
from dimec.modeling.multi_exit import MultiExitConfig, MultiExitModel  # noqa: E402
from dimec.training.batching import collate, encode, train_batches  # noqa: E402
from dimec.training.loss import joint_loss  # noqa: E402

COMMAND = "python benchmarks/bench_training.py"


def throughput(model, optimizer, enc, batches, pad_id: int, pad_to: int | None) -> tuple[float, float]:
    """(samples per second, mean padded width) over the given batches."""
    weights = torch.ones(3)
    widths, samples = [], 0
    t0 = time.perf_counter()
    for index in batches:
        batch = collate(enc, index, pad_id, pad_to)
        widths.append(batch["input_ids"].shape[1])
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})  # 3 x (B, C)
        joint_loss(logits, batch["labels"], weights).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(index)
    return samples / (time.perf_counter() - t0), float(np.mean(widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--glue-dir", default="../shared/glue")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="training steps per setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    data = load_task(DataConfig(task="sst2", glue_dir=args.glue_dir, max_samples=20000))
    config = MultiExitConfig(label_names=data.label_names, max_length=args.max_length)
    model = MultiExitModel.from_encoder(config).train()
    hf_adapter.freeze_word_embeddings(model.encoder)  # as in the default job
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    enc = encode(model.tokenizer, data.train, args.max_length)
    pad_id = model.tokenizer.pad_token_id
    results: dict[str, list[float]] = {"bucketed": [], "fixed": []}
    widths: dict[str, list[float]] = {"bucketed": [], "fixed": []}
    for r in range(args.rounds):
        # the same random draw of samples for both settings in a round; only the batching differs
        bucketed = train_batches(enc.lengths, args.batch_size, seed=r, bucketing=True)[: args.steps]
        fixed = [np.sort(b) for b in train_batches(enc.lengths, args.batch_size, seed=r, bucketing=False)]
        fixed = fixed[: args.steps]
        for name, batches, pad_to in (("bucketed", bucketed, None), ("fixed", fixed, args.max_length)):
            sps, width = throughput(model, optimizer, enc, batches, pad_id, pad_to)
            results[name].append(sps)
            widths[name].append(width)
            print(f"round {r + 1}: {name:<9} {sps:7.1f} samples/s, mean padded length {width:.1f}", flush=True)

    data = {"rounds": args.rounds, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
            "samples_per_second": results, "mean_padded_length": widths}
    print(render(data))
    print(f"wrote {save('training', 'Training throughput: length bucketing (issue 3)', COMMAND, 'bench_training.py', data)}")


def render(data: dict) -> str:
    sps, widths = data["samples_per_second"], data["mean_padded_length"]
    b, f = statistics.median(sps["bucketed"]), statistics.median(sps["fixed"])
    return f"""
all-MiniLM-L6-v2 (exits 2/3/6), SST-2 from `../shared/glue` (pooled train split), batch {data['batch_size']},
max length {data['max_length']}, word embeddings frozen as in the default job.
{data['rounds']} rounds x {data['steps']} steps per setting, alternating; medians over rounds.

| batching | samples/s (median) | mean padded length |
|---|---|---|
| length-bucketed dynamic padding | {b:.1f} | {statistics.mean(widths['bucketed']):.1f} |
| fixed-length padding to {data['max_length']} | {f:.1f} | {statistics.mean(widths['fixed']):.1f} |
| speed-up | {b / f:.2f}x | |
"""


if __name__ == "__main__":
    main()

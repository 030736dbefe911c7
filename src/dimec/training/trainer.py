"""Joint fine-tuning of the three exits (L_m + L_e + L_c), recording training dynamics every epoch.

Resumable: after every finished epoch the model, optimiser and scheduler states are written to
`run_dir/checkpoint/` (safetensors + JSON, no pickle); a restarted run continues from there.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dimec.config import TrainConfig
from dimec.modeling.multi_exit import MultiExitModel
from dimec.outputs import ExitOutputs
from dimec.rundir import RunDir
from dimec.training.batching import Encoded, collate, eval_batches, train_batches
from dimec.training.cartography import write_epoch_dynamics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def predict_exit_outputs(model: MultiExitModel, enc: Encoded, batch_size: int = 128,
                         progress: bool = False) -> ExitOutputs:
    """Every exit's logits and the routing embedding for each sample, computed once, in input order."""
    model.eval()
    pad_id = model.tokenizer.pad_token_id or 0
    n, c = len(enc), model.config.num_labels
    all_logits = np.zeros((n, 3, c), dtype=np.float32)  # (N, 3, C)
    emb = None
    batches = list(eval_batches(enc.lengths, batch_size))
    for index in tqdm(batches, desc="predict", disable=not progress, leave=False):
        inputs = _model_inputs(collate(enc, index, pad_id))
        logits = model(**inputs)  # 3 x (B, C)
        all_logits[index] = torch.stack(logits, 1).numpy()
        e = model.embed(**inputs).numpy()  # (B, H)
        if emb is None:
            emb = np.zeros((n, e.shape[1]), dtype=np.float32)
        emb[index] = e
    return ExitOutputs(all_logits, enc.labels.copy(), emb, lengths=enc.lengths)


def joint_loss(model: MultiExitModel, batch: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The paper's objective L_m + L_e + L_c (with optional per-exit weights)."""
    logits = model(**_model_inputs(batch))  # 3 x (B, C)
    losses = torch.stack([torch.nn.functional.cross_entropy(lg, batch["labels"]) for lg in logits])
    return (weights * losses).sum()


def exit_accuracies(outputs: ExitOutputs) -> list[float]:
    return outputs.correct.mean(0).tolist()


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    seconds: float
    samples_per_second: float


def train(model: MultiExitModel, train_enc: Encoded, val_enc: Encoded, cfg: TrainConfig, run_dir: Path) -> TrainResult:
    """Fine-tune, record validation dynamics per epoch, keep the best epoch in run_dir/model."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    pad_id = model.tokenizer.pad_token_id or 0
    steps_per_epoch = -(-len(train_enc) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and LayerNorm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    warmup = int(cfg.warmup_ratio * total_steps)

    def linear_schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule)
    weights = torch.tensor(cfg.exit_loss_weights, dtype=torch.float32)
    state = {"epoch": 0, "best_epoch": 0, "best_score": -1.0, "seconds": 0.0, "samples": 0}
    start_epoch = _resume(run_dir, model, optimizer, scheduler, state) + 1

    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        batches = train_batches(train_enc.lengths, cfg.batch_size, cfg.seed + epoch, cfg.length_bucketing,
                                cfg.bucket_size_multiplier)
        bar = tqdm(total=len(train_enc), desc=f"epoch {epoch}/{cfg.epochs}", unit="sample", disable=not cfg.progress)
        for index in batches:
            batch = collate(train_enc, index, pad_id)
            loss = joint_loss(model, batch, weights)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(len(index))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        seconds = time.perf_counter() - t0
        state["seconds"] += seconds
        state["samples"] += len(train_enc)

        val = predict_exit_outputs(model, val_enc, cfg.eval_batch_size)
        true_prob = val.probs[np.arange(len(val)), :, val.labels]  # (N, 3) probability of the true label
        write_epoch_dynamics(RunDir(run_dir).dynamics(epoch), epoch, true_prob, val.correct)
        accs = exit_accuracies(val)
        score = accs[2] if cfg.select_metric == "cloud_accuracy" else float(np.mean(accs))
        improved = score > state["best_score"]
        if improved:
            state["best_epoch"], state["best_score"] = epoch, score
            model.save_pretrained(RunDir(run_dir).model)
        record = {"epoch": epoch, "val_exit_accuracy": accs, "score": score, "kept": improved,
                  "train_seconds": round(seconds, 2), "samples_per_second": round(len(train_enc) / seconds, 2)}
        with RunDir(run_dir).train_log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.progress:
            print(f"epoch {epoch}: val acc mobile/edge/cloud = {accs[0]:.4f}/{accs[1]:.4f}/{accs[2]:.4f}"
                  f"{'  (kept)' if improved else ''}", flush=True)
        state["epoch"] = epoch
        _save_checkpoint(run_dir, model, optimizer, scheduler, state)

    return TrainResult(
        best_epoch=state["best_epoch"], best_score=state["best_score"], epochs_run=state["epoch"],
        seconds=state["seconds"], samples_per_second=state["samples"] / max(state["seconds"], 1e-9),
    )


# ---- checkpoints: safetensors for tensors, JSON for the rest --------------------------------------------
def _save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict) -> None:
    ckpt = RunDir(run_dir).checkpoint
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors, steps = {}, {}
    for pid, s in opt_state["state"].items():
        for name, value in s.items():
            if name == "step":
                steps[str(pid)] = float(value)
            else:
                tensors[f"{pid}.{name}"] = value.contiguous()
    tensors["torch_rng_state"] = torch.get_rng_state()
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    meta = {"state": state, "steps": steps, "param_groups": opt_state["param_groups"],
            "scheduler": {"last_epoch": scheduler.last_epoch}}
    tmp = ckpt / "state.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(ckpt / "state.json")  # state.json is written last: it marks the checkpoint complete


def _resume(run_dir: Path, model, optimizer, scheduler, state: dict) -> int:
    """Load the last finished epoch's checkpoint if any; returns that epoch (0 when starting fresh)."""
    ckpt = RunDir(run_dir).checkpoint
    if not (ckpt / "state.json").is_file():
        return 0
    meta = json.loads((ckpt / "state.json").read_text())
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng_state"))
    opt_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state["state"].setdefault(int(pid), {})[name] = value
    for pid, step in meta["steps"].items():
        opt_state["state"].setdefault(int(pid), {})["step"] = torch.tensor(step)
    optimizer.load_state_dict(opt_state)
    scheduler.last_epoch = meta["scheduler"]["last_epoch"]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    state.update(meta["state"])
    print(f"resuming after epoch {state['epoch']} from {ckpt}", flush=True)
    return int(state["epoch"])

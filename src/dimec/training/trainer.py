"""Joint fine-tuning of the three exits, recording training dynamics every epoch, then calibrating the kept
model's exits.

`train` reads top to bottom: set-up (frozen embeddings, optimiser, loss weights), resume from the last
committed epoch, then per epoch: train, measure on validation (and the training split's dynamics sample),
choose whether to keep it, commit the checkpoint, publish what derives from it (model/, train_log.jsonl);
finally fit one temperature per exit on validation for the kept model. Crash safety: `checkpoint.py`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dimec.atomic import write_text
from dimec.config import TrainConfig
from dimec.devices import autocast, grad_scaler, resolve_device, resolve_training_precision
from dimec.modeling import hf_adapter
from dimec.modeling.multi_exit import MultiExitConfig, MultiExitModel
from dimec.outputs import ExitOutputs
from dimec.rundir import SPARE, RunDir
from dimec.training.batching import Encoded, collate, eval_batches, train_batches
from dimec.training.cartography import prune_dynamics, write_epoch_dynamics
from dimec.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from dimec.training.loss import exit_weights, joint_loss
from dimec.training.temperature import calibration_report, fit_temperatures


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_model(config: MultiExitConfig, seed: int) -> MultiExitModel:
    """The one place a run is seeded: the exit heads' initialisation, then (the same torch stream, carried
    through checkpoints) dropout. Batch order has its own seeded generator per epoch (`train_batches`)."""
    seed_everything(seed)
    return MultiExitModel.from_encoder(config)


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The encoder's inputs, on `device` (on the CPU `.to` hands back the same tensors: nothing changes)."""
    return {k: v if device is None else v.to(device) for k, v in batch.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_exit_outputs(model: MultiExitModel, enc: Encoded, batch_size: int = 128,
                         progress: bool = False, precision: str = "no") -> ExitOutputs:
    """Every exit's logits and the routing embedding for each sample, computed once, in input order, on the
    model's device (`precision`: its autocast, devices.py); the confidences are read at the model's fitted
    temperatures (T = 1 before they are fitted). The outputs are float32 numpy arrays whatever the device."""
    model.eval()
    device = model_device(model)
    pad_id = model.tokenizer.pad_token_id or 0
    n, c = len(enc), model.config.num_labels
    all_logits = np.zeros((n, 3, c), dtype=np.float32)  # (N, 3, C)
    emb = None
    for index in tqdm(list(eval_batches(enc.lengths, batch_size)), desc="predict", disable=not progress, leave=False):
        inputs = _model_inputs(collate(enc, index, pad_id), device)
        with autocast(device, precision):
            logits = model(**inputs)  # 3 x (B, C)
            e = model.embed(**inputs).float().cpu().numpy()  # (B, H)
        all_logits[index] = torch.stack(logits, 1).float().cpu().numpy()
        if emb is None:
            emb = np.zeros((n, e.shape[1]), dtype=np.float32)
        emb[index] = e
    temperatures = model.config.temperatures if model.config.temperatures is not None else np.ones(3)
    return ExitOutputs(all_logits, enc.labels.copy(), emb, lengths=enc.lengths, temperatures=temperatures)


def exit_accuracies(outputs: ExitOutputs) -> list[float]:
    return outputs.correct.mean(0).tolist()


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    seconds: float
    samples_per_second: float
    calibration: dict = field(default_factory=dict)  # temperatures, ECE and NLL per exit on validation


def train(model: MultiExitModel, train_enc: Encoded, val_enc: Encoded, cfg: TrainConfig, run_dir: Path,
          dynamics_rows: np.ndarray | None = None) -> TrainResult:
    """Fine-tune, record dynamics per epoch (validation; and the training rows `dynamics_rows`, indices into
    train_enc, when given), keep the best epoch in run_dir/model and calibrate its exits."""
    run = RunDir(run_dir)
    device = resolve_device(cfg.device, "train.device")  # a missing GPU is one error before any work
    precision = resolve_training_precision(cfg.mixed_precision, device)
    refuse_multi_process()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.freeze_word_embeddings:
        hf_adapter.freeze_word_embeddings(model.encoder)
    model.to(device)  # in place, before the optimiser holds the parameters; a no-op on the CPU
    steps_per_epoch = -(-len(train_enc) // cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    weights = exit_weights(cfg, model.config.exit_layers).to(device)
    scaler = grad_scaler(device, precision)

    state = load_checkpoint(run.checkpoint, model, optimizer, scheduler) or TrainState()
    if state.epoch:
        print(f"resuming after epoch {state.epoch} from {run.checkpoint}", flush=True)
    publish(run, model, state)  # what derives from the checkpoint matches it, whatever a crash left

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        recorder = None
        if dynamics_rows is not None and cfg.train_dynamics_pass == "training":
            recorder = TrainingPassDynamics(dynamics_rows, len(train_enc))
        seconds = train_epoch(model, train_enc, optimizer, scheduler, weights, cfg, epoch, recorder, precision, scaler)
        accs = record_epoch(model, train_enc, val_enc, dynamics_rows, recorder, cfg, run, epoch, precision)
        kept = update_state(state, epoch, accs, seconds, len(train_enc), cfg.select_metric)
        save_checkpoint(run.checkpoint, model, optimizer, scheduler, state)  # the commit point
        publish(run, model, state)
        if cfg.progress:
            print(f"epoch {epoch}: val acc mobile/edge/cloud = {accs[0]:.4f}/{accs[1]:.4f}/{accs[2]:.4f}"
                  f"{'  (kept)' if kept else ''}", flush=True)

    calibration = calibrate_kept_model(run, val_enc, cfg, device, precision)
    return TrainResult(
        best_epoch=state.best_epoch, best_score=state.best_score, epochs_run=state.epoch, seconds=state.seconds,
        samples_per_second=state.samples / max(state.seconds, 1e-9), calibration=calibration,
    )


# ---- the parts of `train`, in the order it calls them ----------------------------------------------------
def refuse_multi_process() -> None:
    """`torchrun`/`accelerate launch` with several processes would train N copies that overwrite one run
    directory: refused until the trainer shards batches and writes from rank 0 (docs/devices.md)."""
    import os

    from dimec.errors import ConfigError

    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise ConfigError(f"launched as {world} processes (WORLD_SIZE={world}): multi-GPU training is not "
                          "supported yet", "run one process per job: `dimec train` with train.device=cuda:N")


def make_optimizer(model: MultiExitModel, cfg: TrainConfig, total_steps: int):
    """AdamW (no weight decay on biases and LayerNorm weights) with linear warm-up and linear decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    warmup = int(cfg.warmup_ratio * total_steps)

    def linear_schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule)


class TrainingPassDynamics:
    """Training-split dynamics read off the epoch's own forward passes (as Swayamdipta et al. record them:
    dropout on, the parameters as they were when the row's batch ran), for the rows `rows` of the split:
    no extra forward pass."""

    def __init__(self, rows: np.ndarray, n: int) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.position = np.full(n, -1, dtype=np.int64)  # row of the split -> row of the record, -1: not sampled
        self.position[self.rows] = np.arange(len(self.rows))
        self.true_label_probs = np.zeros((len(self.rows), 3))  # (R, 3)
        self.correct = np.zeros((len(self.rows), 3), dtype=bool)  # (R, 3)

    @torch.no_grad()
    def record(self, index: np.ndarray, logits: list[torch.Tensor], labels: torch.Tensor) -> None:
        pos = self.position[index]  # (B,)
        keep = pos >= 0
        if not keep.any():
            return
        z = torch.stack(logits, 1).cpu()[torch.from_numpy(keep)].float()  # (b, 3, C)
        y = labels.cpu()[torch.from_numpy(keep)]  # (b,)
        probs = z.softmax(-1)[torch.arange(len(y)), :, y]  # (b, 3) probability of the true label
        self.true_label_probs[pos[keep]] = probs.numpy()
        self.correct[pos[keep]] = (z.argmax(-1) == y[:, None]).numpy()


def train_epoch(model: MultiExitModel, enc: Encoded, optimizer, scheduler, weights: torch.Tensor,
                cfg: TrainConfig, epoch: int, recorder: TrainingPassDynamics | None = None, precision: str = "no",
                scaler: torch.amp.GradScaler | None = None) -> float:
    """One pass over the training split in seeded, length-bucketed batches, on the model's device with
    `precision`'s autocast (fp16: `scaler` scales the loss); returns its seconds."""
    model.train()
    device = model_device(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pad_id = model.tokenizer.pad_token_id or 0
    t0 = time.perf_counter()
    batches = train_batches(enc.lengths, cfg.batch_size, cfg.seed + epoch, cfg.length_bucketing,
                            cfg.bucket_size_multiplier)
    bar = tqdm(total=len(enc), desc=f"epoch {epoch}/{cfg.epochs}", unit="sample", disable=not cfg.progress)
    for index in batches:
        batch = collate(enc, index, pad_id)
        labels = batch["labels"].to(device)
        with autocast(device, precision):
            logits = model(**_model_inputs(batch, device))  # 3 x (B, C)
        logits = [z.float() for z in logits]  # the loss in fp32 (a no-op without autocast)
        loss = joint_loss(logits, labels, weights, cfg.distill_weight, cfg.distill_temperature,
                          cfg.distill_teacher)
        if recorder is not None:
            recorder.record(index, logits, labels)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
        else:  # fp16: scaled loss, gradients unscaled before clipping; a step with inf/NaN gradients is skipped
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(len(index))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - t0


def record_epoch(model: MultiExitModel, train_enc: Encoded, val_enc: Encoded, dynamics_rows: np.ndarray | None,
                 recorder: TrainingPassDynamics | None, cfg: TrainConfig, run: RunDir, epoch: int,
                 precision: str = "no") -> list[float]:
    """Write this epoch's dynamics: validation (an evaluation pass after the epoch, as DIMEC-DC records them)
    and the sampled training rows (read off the training pass, or an evaluation pass of their own); returns
    the validation accuracy of each exit. The files may run ahead of the checkpoint until it commits: a
    resume deletes them."""
    val = predict_exit_outputs(model, val_enc, cfg.eval_batch_size, precision=precision)
    write_epoch_dynamics(run.dynamics(epoch), epoch, _true_label_probs(val), val.correct)
    if recorder is not None:
        write_epoch_dynamics(run.dynamics(epoch, split="train"), epoch, recorder.true_label_probs, recorder.correct,
                             index=recorder.rows)
    elif dynamics_rows is not None:
        sample = predict_exit_outputs(model, train_enc.subset(dynamics_rows), cfg.eval_batch_size,
                                      precision=precision)
        write_epoch_dynamics(run.dynamics(epoch, split="train"), epoch, _true_label_probs(sample), sample.correct,
                             index=dynamics_rows)
    return exit_accuracies(val)


def _true_label_probs(outputs: ExitOutputs) -> np.ndarray:
    """(N, 3) each exit's raw (T = 1) probability of the true label."""
    return outputs.probs[np.arange(len(outputs)), :, outputs.labels]


def update_state(state: TrainState, epoch: int, accs: list[float], seconds: float, samples: int,
                 select_metric: str) -> bool:
    """Score the epoch, keep it if it beats the best so far, append its log row; returns whether kept."""
    score = accs[2] if select_metric == "cloud_accuracy" else float(np.mean(accs))
    kept = score > state.best_score
    if kept:
        state.best_epoch, state.best_score = epoch, score
    state.epoch, state.seconds, state.samples = epoch, state.seconds + seconds, state.samples + samples
    state.log.append({"epoch": epoch, "val_exit_accuracy": accs, "score": score, "kept": kept,
                      "train_seconds": round(seconds, 2), "samples_per_second": round(samples / seconds, 2)})
    return kept


def publish(run: RunDir, model: MultiExitModel, state: TrainState) -> None:
    """Bring what derives from the committed state in line with it: model/ holds the best epoch (written
    when the committed epoch is the best; earlier bests were published when they committed), the log has
    one row per committed epoch, and no dynamics file is left from an epoch that never committed."""
    if state.epoch and state.best_epoch == state.epoch:
        model.save_pretrained(run.model)
    write_text(run.train_log, "".join(json.dumps(row) + "\n" for row in state.log))
    prune_dynamics(run.root, state.epoch)


def calibrate_kept_model(run: RunDir, val_enc: Encoded, cfg: TrainConfig, device: torch.device | None = None,
                         precision: str = "no") -> dict:
    """Fit one temperature per exit on validation (NLL) for the kept model, save them in its
    dimec_model.json, cache its validation outputs (calibrate reads them) and drop caches of older models."""
    model = MultiExitModel.from_pretrained(run.model).to(device or "cpu")
    model.config.temperatures = None
    raw = predict_exit_outputs(model, val_enc, cfg.eval_batch_size, precision=precision)  # T = 1
    temperatures = fit_temperatures(raw)
    model.config.temperatures = tuple(float(t) for t in temperatures)
    model.save_config(run.model)
    for split in ("validation", "test", "train", SPARE):
        run.outputs(split).unlink(missing_ok=True)  # computed by an older model, if any (not oof: fold models')
    raw.with_temperatures(temperatures).save(run.outputs("validation"))
    return calibration_report(raw, temperatures) | {"split": "validation"}

"""The training objective of the three exits, in one function, and the checks of the training settings.

    L = sum_k w_k * [ (1 - a_k) * CE(z_k, y) + a_k * tau^2 * KL( softmax(t_k / tau) || softmax(z_k / tau) ) ]

- z_k: exit k's logits (k = mobile, edge, cloud); y: the labels.
- t_k: exit k's teacher, detached (a teacher learns from the labels only): the last exit's logits
  (`train.distill_teacher: last`), or the next deeper exit's (`next`).
- a_k = `train.distill_weight` for every exit but the last, 0 for the last (it has no teacher).
- tau = `train.distill_temperature`; the tau^2 factor keeps the KL term's gradients on the scale of the
  cross-entropy's (Hinton et al., 2015).
- w_k = `train.exit_loss_weights[k]`, times exit_layer_k / l with `train.exit_loss_weighting: depth`
  (deeper exits weigh more, as in SDN/DeeBERT-style multi-exit training).

With distill_weight = 0 and uniform weights (the defaults of TrainConfig) this is the paper's L_m + L_e + L_c.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dimec.config import TrainConfig
from dimec.errors import ConfigError

WEIGHTINGS = ("uniform", "depth")
TEACHERS = ("last", "next")
SELECT_METRICS = ("mean_exit_accuracy", "cloud_accuracy")
DYNAMICS_PASSES = ("training", "evaluation")


def train_setting_problems(cfg: TrainConfig) -> list[str]:
    """One message per bad loss, selection or dynamics setting (empty when all are fine). The training-split
    sample size is checked against the split by `cartography.dynamics_sample`."""
    problems = []
    if not (math.isfinite(cfg.distill_weight) and 0.0 <= cfg.distill_weight <= 1.0):
        problems.append(f"train.distill_weight must be in [0, 1] (0: no self-distillation), got {cfg.distill_weight}")
    if not (math.isfinite(cfg.distill_temperature) and cfg.distill_temperature > 0):
        problems.append(f"train.distill_temperature must be > 0, got {cfg.distill_temperature}")
    if cfg.distill_teacher not in TEACHERS:
        problems.append(f"train.distill_teacher must be one of {', '.join(TEACHERS)}, got {cfg.distill_teacher!r}")
    if cfg.exit_loss_weighting not in WEIGHTINGS:
        problems.append(f"train.exit_loss_weighting must be one of {', '.join(WEIGHTINGS)}, "
                        f"got {cfg.exit_loss_weighting!r}")
    w = cfg.exit_loss_weights
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        problems.append(f"train.exit_loss_weights must be three non-negative weights, not all 0, got {list(w)}")
    if cfg.select_metric not in SELECT_METRICS:
        problems.append(f"train.select_metric must be one of {', '.join(SELECT_METRICS)}, got {cfg.select_metric!r}")
    if cfg.train_dynamics_pass not in DYNAMICS_PASSES:
        problems.append(f"train.train_dynamics_pass must be one of {', '.join(DYNAMICS_PASSES)}, "
                        f"got {cfg.train_dynamics_pass!r}")
    return problems


def exit_weights(cfg: TrainConfig, exit_layers: tuple[int, int, int]) -> torch.Tensor:
    """(3,) w_k: the configured weights, scaled by depth (exit layer / l) when asked."""
    weights = torch.tensor(cfg.exit_loss_weights, dtype=torch.float32)
    if cfg.exit_loss_weighting == "depth":
        weights = weights * torch.tensor(exit_layers, dtype=torch.float32) / exit_layers[-1]
    elif cfg.exit_loss_weighting != "uniform":
        raise ConfigError(f"unknown train.exit_loss_weighting {cfg.exit_loss_weighting!r}",
                          f"use one of {', '.join(WEIGHTINGS)}")
    return weights


def joint_loss(logits: list[torch.Tensor], labels: torch.Tensor, weights: torch.Tensor,
               distill_weight: float = 0.0, temperature: float = 2.0, teacher: str = "last") -> torch.Tensor:
    """logits: one (B, C) tensor per exit, shallowest first; labels (B,); weights (3,). The formula above."""
    losses = []
    for k, z in enumerate(logits):
        ce = F.cross_entropy(z, labels)
        if distill_weight == 0.0 or k == len(logits) - 1:
            losses.append(ce)
            continue
        t = (logits[-1] if teacher == "last" else logits[k + 1]).detach()  # (B, C)
        kl = F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                      reduction="batchmean")
        losses.append((1.0 - distill_weight) * ce + distill_weight * temperature**2 * kl)
    return (weights[: len(losses)] * torch.stack(losses)).sum()

"""The training objective of the three exits, in one function (its settings are checked in dimec.config).

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

import torch
import torch.nn.functional as F

from dimec.config import WEIGHTINGS, TrainConfig
from dimec.errors import ConfigError


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

"""The optimizer and its schedule: AdamW with weight decay on matrices only, linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from .options import TrainOptions


def lr_at(step: int, cfg: TrainOptions) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    progress = (step - cfg.warmup) / max(cfg.steps - 1 - cfg.warmup, 1)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


def make_optimizer(model: nn.Module, cfg: TrainOptions) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and expert stacks (>= 2-D), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]  # buffers (router bias) are not parameters
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

"""The optimizer and its schedule: AdamW with weight decay on matrices only (and the routers at their own
learning rate), linear warmup then cosine decay, as a LambdaLR that a resumed run sets to its step
(`schedule_at`: computed, never read from a file)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moekit.moe.accounting.sources import classify


@dataclass
class Schedule:
    """Linear warmup from lr/(warmup+1) to `lr`, then cosine decay to lr * min_lr_ratio at the last step."""

    lr: float
    warmup: int
    steps: int
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(self.steps - 1 - self.warmup, 1)
        min_lr = self.lr * self.min_lr_ratio
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (self.lr - min_lr)

    def describe(self) -> str:
        end = self.lr * self.min_lr_ratio
        return (f"lr {self.lr:.3g}: linear warmup over {self.warmup} steps, cosine to {end:.3g} at step "
                f"{self.steps}")


def is_router(name: str) -> bool:
    return classify(name) == "router"


def is_expert(name: str) -> bool:
    """Routed and shared experts' weights, and the routers: what `--train experts` trains."""
    return classify(name) in ("router", "routed_experts", "shared_experts")


def make_optimizer(model: nn.Module, schedule: Schedule, weight_decay: float, betas: tuple[float, float],
                   router_lr_mult: float = 1.0, trainable: str = "all"):
    """AdamW (decay on >= 2-D weights, none on norms and biases; routers at `router_lr_mult` x lr) and its
    LambdaLR. `trainable` "experts" freezes everything but the experts and routers."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if trainable == "experts" and not is_expert(name):
            p.requires_grad_(False)
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, is_router(name)), []).append(p)
    params = [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
               "lr": schedule.lr * (router_lr_mult if router else 1.0)}
              for (decay, router), ps in sorted(groups.items())]
    # fused: one kernel over all parameters (80M parameters on a 2-core CPU: 84 ms a step against 259 ms for the
    # default foreach implementation; BENCHMARKS.md, `moekit bench train --adamw`)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, betas=betas, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_at(step) / schedule.lr)
    return optimizer, scheduler


def schedule_at(scheduler, step: int) -> None:
    """Set the LambdaLR of `make_optimizer` where it stands after `step` optimizer steps, as resuming at `step`
    needs: computed from the schedule, never read from a file (which could set any learning rate)."""
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.last_epoch, scheduler._step_count, scheduler._last_lr = step, step + 1, lrs


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every parameter group's settings (lr, betas, weight decay, ...), to put back with `set_hyperparameters`
    after loading a saved optimizer state: the state brings the moments, the options bring the settings."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def set_hyperparameters(optimizer: torch.optim.Optimizer, saved: list[dict]) -> None:
    for group, settings in zip(optimizer.param_groups, saved):
        group.update(settings)

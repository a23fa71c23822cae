"""The optimiser and its learning-rate schedule (docs/METHOD.md §7).

The paper's: Ranger (RAdam + Lookahead) with a cosine learning rate stepped every iteration. A fit with a
reconstruction-only phase (the fast recipe) runs two cosines on one step counter, each with its own peak.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from nern.config import FitConfig, OptimConfig
from nern.errors import NernError


def make_optimizer(cfg: FitConfig, params: Any) -> torch.optim.Optimizer:
    """`params`: parameters or param groups (a group's own lr / weight_decay win over optim's)."""
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    try:
        from pytorch_ranger import Ranger
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise NernError("pytorch-ranger is not installed; run `pip install pytorch-ranger` or set optim.name=adam") from exc
    warnings.filterwarnings("ignore", message=".*addcmul_.*", category=UserWarning)
    return Ranger(params, lr=o.lr, alpha=0.5, k=6, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def make_scheduler(cfg: FitConfig, optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Two phases on one step counter, each annealing to `min_lr` with a cosine stepped every iteration: the
    reconstruction-only steps (peak optim.rec_only_lr), then the `total` distillation iterations (optional
    linear warm-up, peak optim.lr). A fitted-to-the-weights predictor needs a far gentler distillation step
    than a random one, hence the two peaks."""
    rec = cfg.rec_only_iterations
    rec_peak = (cfg.optim.rec_only_lr or cfg.optim.lr) / cfg.optim.lr
    warm = cfg.optim.warmup_iterations
    floor = cfg.optim.min_lr / cfg.optim.lr

    def cosine(progress: float, peak: float) -> float:
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        if step < rec:
            return cosine(step / rec, rec_peak)
        step -= rec
        if step < warm:
            return (step + 1) / warm
        return cosine((step - warm) / max(1, total - warm), 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(trainable: list[nn.Parameter], steps: set[nn.Parameter], optim: OptimConfig) -> list[dict[str, Any]]:
    """`trainable` for the optimiser: the quantiser steps (nern.qat) in a group of their own, at
    optim.step_lr_scale x the lr and without weight decay; the rest first, so group 0's lr is the logged one.
    In order: the optimiser's state of a resumed fit is matched by position."""
    if not steps:
        return [{"params": trainable}]
    return [{"params": [p for p in trainable if p not in steps]},
            {"params": [p for p in trainable if p in steps], "lr": optim.lr * optim.step_lr_scale, "weight_decay": 0.0}]


def optimizer_and_schedule(cfg: FitConfig, groups: list[dict[str, Any]], distillation_total: int,
                           iteration: int = 0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A fresh optimiser over `groups` and its schedule, continued to `iteration`."""
    optimizer = make_optimizer(cfg, groups)
    scheduler = make_scheduler(cfg, optimizer, distillation_total)
    for _ in range(iteration):
        scheduler.step()
    return optimizer, scheduler


def total_iterations(cfg: FitConfig, batches_per_epoch: int) -> int:
    """The distillation iterations (`rec_only_iterations` come on top)."""
    if cfg.iterations is not None:
        return cfg.iterations
    return max(1, math.ceil(cfg.epochs * batches_per_epoch))

"""Measuring networks the same way in every stage: top-1 on one split (`split_top1`), what a fit reports while
and after fitting (`Scorer`), and the Pareto front of size against accuracy (`pareto_front`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nern import data as data_mod
from nern.config import FitConfig
from nern.evaluate import top_k_accuracy
from nern.reconstruct import run_reconstructed


def split_top1(forward: Callable[[torch.Tensor], torch.Tensor], imageset: Any, batch_size: int,
               device: str | torch.device) -> float:
    """Top-1 in percent of `forward` (images -> logits) on one split, in its fixed order."""
    batches = data_mod.eval_batches(imageset, batch_size)
    return top_k_accuracy(forward, batches, (1,), device)["top1"]


class Scorer:
    """The accuracies a fit reports: validation while fitting (the test set costs twice as much and must not steer
    anything), validation and test at the end; the test set every time when there is no validation split."""

    def __init__(self, cfg: FitConfig, setup: Any, device: torch.device):
        self.cfg, self.s, self.device = cfg, setup, device

    def top1(self, weights: list[torch.Tensor] | None, split: str) -> float:
        """The original (weights None) or the network with these reconstructed weights, on one split."""
        model, rep = self.s.model, self.s.rep
        forward = model if weights is None else (lambda x: run_reconstructed(model, rep, weights, x))
        return split_top1(forward, getattr(self.s.splits, split), self.cfg.data.eval_batch_size, self.device)

    def measure(self, weights: list[torch.Tensor] | None, final: bool) -> dict[str, float]:
        splits = ["test"] if self.s.splits.val is None else ["val", "test"] if final else ["val"]
        return {f"{split}_top1": self.top1(weights, split) for split in splits}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (bytes, top-1) points that no other point beats in both, smallest first. Ties keep the first
    listed; a missing (NaN) value sorts last, as pandas sorts it."""
    def key(i: int) -> tuple[Any, ...]:
        size, top1 = points[i]
        return (size != size, 0 if size != size else size, top1 != top1, 0 if top1 != top1 else -top1)

    front, best = [], float("-inf")
    for i in sorted(range(len(points)), key=key):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front

"""Measuring networks the same way in every stage: top-1 on one split (`split_top1`), agreement with the original on
one split (`split_fidelity`), what a fit reports while and after fitting (`Scorer`), and the Pareto front of size
against accuracy (`pareto_front`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nern import data as data_mod
from nern.config import FitConfig
from nern.evaluate import Predictions, agreement, predictions, top_k_accuracy
from nern.reconstruct import run_reconstructed


def split_top1(forward: Callable[[torch.Tensor], torch.Tensor], imageset: Any, batch_size: int,
               device: str | torch.device) -> float:
    """Top-1 in percent of `forward` (images -> logits) on one split, in its fixed order."""
    batches = data_mod.eval_batches(imageset, batch_size)
    return top_k_accuracy(forward, batches, (1,), device)["top1"]


def split_predictions(forward: Callable[[torch.Tensor], torch.Tensor], imageset: Any, batch_size: int,
                      device: str | torch.device) -> Predictions:
    return predictions(forward, data_mod.eval_batches(imageset, batch_size), device)


def split_fidelity(original: Predictions, forward: Callable[[torch.Tensor], torch.Tensor], imageset: Any,
                   batch_size: int, device: str | torch.device) -> dict[str, float]:
    """`top1`, `agreement` and `kl_to_original` of `forward` on one split, against the original's predictions there."""
    found = split_predictions(forward, imageset, batch_size, device)
    return {"top1": found.top1(), **agreement(original, found)}


class Scorer:
    """What a fit reports: validation while fitting (the test set costs twice as much and must not steer anything),
    validation and test at the end; the test set every time when there is no validation split. A reconstruction is
    measured by its top-1 and by its agreement with the original on the same images (`<split>_agreement`,
    `<split>_kl_to_original`): the original's predictions are computed once per split and kept."""

    def __init__(self, cfg: FitConfig, setup: Any, device: torch.device):
        self.cfg, self.s, self.device = cfg, setup, device
        self.original: dict[str, Predictions] = {}

    def forward(self, weights: list[torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor]:
        model, rep = self.s.model, self.s.rep
        return model if weights is None else (lambda x: run_reconstructed(model, rep, weights, x))

    def original_predictions(self, split: str) -> Predictions:
        if split not in self.original:
            self.original[split] = split_predictions(self.s.model, getattr(self.s.splits, split),
                                                     self.cfg.data.eval_batch_size, self.device)
        return self.original[split]

    def top1(self, weights: list[torch.Tensor] | None, split: str) -> float:
        """The original (weights None) or the network with these reconstructed weights, on one split."""
        if weights is None:
            return self.original_predictions(split).top1()
        return split_top1(self.forward(weights), getattr(self.s.splits, split), self.cfg.data.eval_batch_size,
                          self.device)

    def fidelity(self, weights: list[torch.Tensor], split: str) -> dict[str, float]:
        found = split_fidelity(self.original_predictions(split), self.forward(weights), getattr(self.s.splits, split),
                               self.cfg.data.eval_batch_size, self.device)
        return {f"{split}_{key}": value for key, value in found.items()}

    def measure(self, weights: list[torch.Tensor] | None, final: bool) -> dict[str, float]:
        splits = ["test"] if self.s.splits.val is None else ["val", "test"] if final else ["val"]
        if weights is None:
            return {f"{split}_top1": self.top1(None, split) for split in splits}
        return {key: value for split in splits for key, value in self.fidelity(weights, split).items()}


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

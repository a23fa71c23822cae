"""Accuracies, per-layer reconstruction errors and sizes in bytes (docs/METHOD.md §8).

Size accounting follows the paper (predictor parameters x 4 bytes against represented conv weights x 4
bytes) and shows what the paper leaves out separately: the stored permutations and per-layer scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from nern.layers import ConvLayer

FP32_BYTES = 4


@torch.no_grad()
def top_k_accuracy(forward: Callable[[torch.Tensor], torch.Tensor],
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ks: tuple[int, ...] = (1,),
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-k accuracy in percent, e.g. {'top1': 81.03}; `forward` maps images to logits."""
    correct = {k: 0 for k in ks}
    total = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = forward(x)
        top = logits.topk(max(ks), dim=1).indices
        hits = top == y[:, None]
        for k in ks:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        total += y.numel()
    if total == 0:
        raise ValueError("no evaluation data")
    return {f"top{k}": 100.0 * correct[k] / total for k in ks}


@dataclass(frozen=True)
class Predictions:
    """One network's logits on one split, in the split's fixed order, with its labels: what agreement with another
    network on the same images is computed from, without running either network again."""

    logits: torch.Tensor  # [N, classes], float32 on the CPU
    labels: torch.Tensor  # [N]

    def classes(self) -> torch.Tensor:
        """The predicted class of each image, as top-k accuracy picks it (`topk`, so ties break the same way)."""
        return self.logits.topk(1, dim=1).indices[:, 0]

    def top1(self) -> float:
        return 100.0 * int((self.classes() == self.labels).sum()) / self.labels.numel()


@torch.no_grad()
def predictions(forward: Callable[[torch.Tensor], torch.Tensor],
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu") -> Predictions:
    logits, labels = [], []
    for x, y in batches:
        logits.append(forward(x.to(device)).float().cpu())
        labels.append(y.cpu())
    if not logits:
        raise ValueError("no evaluation data")
    return Predictions(torch.cat(logits), torch.cat(labels))


def agreement(original: Predictions, other: Predictions) -> dict[str, float]:
    """How faithfully `other` reproduces `original` on the same images: `agreement`, the percentage of images on
    which both predict the same class, and `kl_to_original`, the mean KL(p_original || p_other) in nats. Delta
    top-1 alone cannot tell a reconstruction from a fine-tuned network; these can."""
    if original.logits.shape != other.logits.shape or not torch.equal(original.labels, other.labels):
        raise ValueError("agreement needs both networks' predictions on the same images, in the same order")
    same = original.classes() == other.classes()
    log_p = torch.log_softmax(original.logits.double(), dim=1)
    log_q = torch.log_softmax(other.logits.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0.0)
    return {"agreement": 100.0 * float(same.double().mean()), "kl_to_original": float(kl.mean())}


@torch.no_grad()
def layer_errors(predicted: list[torch.Tensor], original: list[torch.Tensor],
                 layers: list[ConvLayer]) -> list[dict[str, float | str]]:
    """Per layer: RMSE, and relative error ||W - W_hat|| / ||W|| (the paper's importance signal, per layer)."""
    rows = []
    for layer, p, o in zip(layers, predicted, original):
        diff = (p - o).float()
        rows.append({
            "layer": layer.name,
            "kernels": layer.num_kernels,
            "rmse": float(diff.pow(2).mean().sqrt()),
            "relative_error": float(diff.norm() / o.float().norm().clamp_min(1e-12)),
        })
    return rows


def size_report(predictor_params: int, layers: list[ConvLayer], permutation_bytes: int,
                scale_count: int = 0) -> dict[str, float | int]:
    represented = sum(layer.num_weights for layer in layers)
    predictor_bytes = predictor_params * FP32_BYTES
    represented_bytes = represented * FP32_BYTES
    scale_bytes = scale_count * FP32_BYTES
    total = predictor_bytes + permutation_bytes + scale_bytes
    return {
        "predictor_params": predictor_params,
        "represented_params": represented,
        "represented_kernels": sum(layer.num_kernels for layer in layers),
        "represented_layers": len(layers),
        "predictor_bytes": predictor_bytes,
        "represented_bytes": represented_bytes,
        "permutation_bytes": permutation_bytes,
        "scale_bytes": scale_bytes,
        "size_ratio": predictor_bytes / represented_bytes,
        "total_bytes": total,
        "total_ratio": total / represented_bytes,
    }

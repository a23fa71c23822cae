"""Pruning masks: which entries of a set of tensors to drop, by score, globally or per tensor.

Shared by the meta-compression experiment (magnitude pruning of the predictor and of the original network)
and the importance study (pruning the original network by NeRN's reconstruction error). A mask is True where
an entry is KEPT.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nern.errors import NernError
from nern.predictor import Predictor

SCOPES = ("global", "layer")


def lowest_score_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks that drop exactly round(sparsity * n) entries of lowest score, over all tensors or per tensor.

    Ties are broken by position (stable sort), so a mask is a pure function of the scores.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise NernError(f"sparsity {sparsity} is outside [0, 1]; pass fractions such as 0.5,0.7,0.9")
    if scope not in SCOPES:
        raise NernError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if scope == "layer":
        return {name: _drop_lowest(s.reshape(-1), sparsity).reshape(s.shape) for name, s in scores.items()}
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    keep = _drop_lowest(flat, sparsity)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return masks


def _drop_lowest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    drop = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if drop:
        order = torch.sort(scores.float(), stable=True).indices
        keep[order[:drop]] = False
    return keep


def magnitude_masks(tensors: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    return lowest_score_masks({k: v.detach().abs() for k, v in tensors.items()}, sparsity, scope)


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, total)


def prunable_predictor_weights(predictor: nn.Module) -> dict[str, torch.Tensor]:
    """The Linear weight matrices (biases are few and carry the offsets: they are not pruned)."""
    return {name: p for name, p in predictor.named_parameters() if p.dim() == 2}


def prunable_network_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every conv kernel and FC matrix of the original network (the classic magnitude-pruning baseline)."""
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    mask_parameters(dict(module.named_parameters()), masks)


@torch.no_grad()
def mask_parameters(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Zero the dropped entries of each named tensor (the names may be a parametrised module's, see compress)."""
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def pruned_predictor(predictor: Predictor, sparsity: float, scope: str) -> tuple[Predictor, dict[str, torch.Tensor]]:
    """A magnitude-pruned copy of `predictor` and its keep-masks (empty at sparsity 0)."""
    pruned = copy.deepcopy(predictor).cpu().eval()
    if sparsity == 0:
        return pruned, {}
    masks = magnitude_masks(prunable_predictor_weights(pruned), sparsity, scope)
    apply_masks(pruned, masks)
    return pruned, masks

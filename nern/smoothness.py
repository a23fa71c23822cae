"""The smoothness regulariser for training the ORIGINAL network (docs/METHOD.md §6).

loss = CE - factor * (sum of cosine similarities between flattened kernels adjacent along the input-channel
axis and along the output-channel axis, over represented k>1 layers) + factor * (mean squared difference
of neighbours for 1x1 layers, where a cosine of scalars is only a sign). Factor 0 is plain training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _neighbour_cosines(w: torch.Tensor) -> torch.Tensor:
    flat = w.flatten(2)  # [Cout, Cin, k*k]
    along_in = F.cosine_similarity(flat[:, 1:], flat[:, :-1], dim=2, eps=1e-8).sum()
    along_out = F.cosine_similarity(flat[1:], flat[:-1], dim=2, eps=1e-8).sum()
    return along_in + along_out


def _neighbour_sq_diff(w: torch.Tensor) -> torch.Tensor:
    flat = w.flatten(1)  # [Cout, Cin]
    return ((flat[:, 1:] - flat[:, :-1]) ** 2).sum() + ((flat[1:] - flat[:-1]) ** 2).sum()


def smoothness_penalty(weights: list[torch.Tensor]) -> torch.Tensor:
    """Value to ADD to the task loss, already signed: lower means smoother."""
    total = weights[0].new_zeros(())
    for w in weights:
        total = total + (_neighbour_sq_diff(w) if w.shape[-1] == 1 else -_neighbour_cosines(w))
    return total

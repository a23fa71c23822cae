"""Positional embedding of kernel coordinates (docs/METHOD.md §2).

For each of the three RAW INTEGER indices p = (layer, filter, channel) and levels k = 0..L-1:
sin(pi * b^k * p), cos(pi * b^k * p), laid out index-major with sin/cos interleaved per level. With
integer p, b = 0.76 keeps every frequency <= pi (smooth); b = 1.25 aliases 39 of 40 levels (non-smooth).
Normalising p would change the method, so we never do.
"""

from __future__ import annotations

import math

import torch

SMOOTH_BASE = 0.76
NON_SMOOTH_BASE = 1.25


def positional_embedding(coords: torch.Tensor, levels: int = 40, base: float = SMOOTH_BASE) -> torch.Tensor:
    """[N, 3] integer coordinates -> [N, 6L] float32 embedding, computed once in float64 for accuracy."""
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be [N, 3], got {tuple(coords.shape)}")
    freqs = math.pi * torch.tensor(base, dtype=torch.float64) ** torch.arange(levels, dtype=torch.float64)
    angles = coords.to(torch.float64)[:, :, None] * freqs  # [N, 3, L]
    emb = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)  # [N, 3, L, 2]
    return emb.reshape(coords.shape[0], 6 * levels).to(torch.float32)

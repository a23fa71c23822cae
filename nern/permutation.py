"""Coordinate permutations of the represented layers: none, infilter, crossfilter (docs/METHOD.md §6).

A permutation re-assigns COORDINATES, not weights. For a layer with weight [Cout, Cin, k, k], kernel
`i = f * Cin + c` is fed the embedding of grid slot `position[i]`, whose coordinate is
`(position[i] // Cin, position[i] % Cin)`; its prediction is written back to (f, c). The network function
is therefore unchanged by construction, and decoding needs the stored `position` of every layer.

Chains put similar kernels on neighbouring slots, so that a smooth predictor has less to learn.
Similarity is the cosine of the flattened kernels; a zero kernel has cosine 0 with everything.

- crossfilter: one chain over all Cout*Cin kernels of a layer; `position[chain[t]] = t`.
- infilter: a greedy chain over each filter's Cin kernels gives pi_f; a greedy chain over the filters, with
  filter similarity sum_c cos(W[f, pi_f(c)], W[g, pi_g(c)]), ranks the filters; kernel (f, c) gets slot
  (rank of f) * Cin + (rank of c within pi_f). These chains are short (Cin or Cout long), so infilter always
  uses the paper's exact greedy.

The crossfilter chain itself (the paper's greedy, and faster or better solvers) is found by nern/chain.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nern.artifacts import load_tensors, save_tensors
from nern.chain import METHODS, batched_greedy_orders, chain_quality, check_method, find_chain, greedy_order, unit_rows
from nern.config import PERMUTATIONS, PermutationMode
from nern.errors import NernError

Mode = PermutationMode
MODES: tuple[str, ...] = PERMUTATIONS  # defined once, in nern.config

def _kernels(weight: Tensor) -> Tensor:
    """A conv weight [Cout, Cin, ...] as its Cout*Cin flattened kernels, row-major over (filter, channel)."""
    if weight.dim() < 2:
        raise NernError(f"expected a conv weight [Cout, Cin, k, k], got shape {tuple(weight.shape)}; "
                        "pass the represented layers' weights")
    return weight.detach().reshape(weight.shape[0] * weight.shape[1], -1)

def chain_of_positions(position: Tensor) -> Tensor:
    """The chain a position vector encodes: `chain[t]` is the kernel placed on slot t."""
    return torch.argsort(position.long())

def chain_quality_of_positions(weights: Sequence[Tensor], positions: Sequence[Tensor]) -> float:
    """Mean cosine of kernels on consecutive slots, pooled over all layers (pairs never cross layers)."""
    total, pairs = 0.0, 0
    for weight, position in zip(weights, positions, strict=True):
        n = position.numel()
        if n >= 2:
            total += chain_quality(_kernels(weight), chain_of_positions(position)) * (n - 1)
            pairs += n - 1
    return total / pairs if pairs else 1.0

# ------------------------------------------------------------------------------------ layer permutations


def identity_permutation(cout: int, cin: int) -> Tensor:
    return torch.arange(cout * cin, dtype=torch.long)

def crossfilter_chain(weight: Tensor, method: str = "auto", seed: int = 0) -> Tensor:
    """The chain over all Cout*Cin kernels of a layer by the chosen method (nern/chain.py)."""
    check_method(method)
    return find_chain(_kernels(weight), method, seed)

def crossfilter_permutation(weight: Tensor, method: str = "auto", seed: int = 0) -> Tensor:
    """position[chain[t]] = t: the t-th kernel of the chain takes grid slot t."""
    chain = crossfilter_chain(weight, method, seed)
    position = torch.empty_like(chain)
    position[chain] = torch.arange(chain.numel())
    return position

def infilter_permutation(weight: Tensor) -> Tensor:
    """Channels ranked by a greedy chain inside each filter, filters by a greedy chain over those ranks."""
    cout, cin = weight.shape[0], weight.shape[1]
    unit = unit_rows(_kernels(weight)).reshape(cout, cin, -1)
    channel_order = batched_greedy_orders(unit)  # [Cout, Cin]: channel at rank r of filter f
    ranked = unit.gather(1, channel_order.unsqueeze(2).expand_as(unit)).reshape(cout, -1)
    filter_order = greedy_order(ranked)  # dot of ranked rows = sum_r cos(W[f, pi_f(r)], W[g, pi_g(r)])
    channel_rank = torch.empty_like(channel_order)
    channel_rank.scatter_(1, channel_order, torch.arange(cin).expand(cout, cin).contiguous())
    filter_rank = torch.empty(cout, dtype=torch.long)
    filter_rank[filter_order] = torch.arange(cout)
    return (filter_rank.unsqueeze(1) * cin + channel_rank).reshape(-1)

def layer_permutation(weight: Tensor, mode: Mode, method: str = "auto") -> Tensor:
    """The position vector of one layer for a permutation mode."""
    check_method(method)
    if mode == "none":
        return identity_permutation(weight.shape[0], weight.shape[1])
    if mode == "infilter":
        return infilter_permutation(weight)
    if mode == "crossfilter":
        return crossfilter_permutation(weight, method)
    raise NernError(f"unknown permutation mode '{mode}'; choose one of {', '.join(MODES)}")

def compute_permutations(weights: Sequence[Tensor], mode: Mode, method: str = "auto",
                         progress: bool = True) -> list[Tensor]:
    """One position vector per represented layer, in discovery order."""
    from tqdm import tqdm

    if mode not in MODES:
        raise NernError(f"unknown permutation mode '{mode}'; choose one of {', '.join(MODES)}")
    check_method(method)
    bar = tqdm(weights, desc=f"permute ({mode})", unit="layer", disable=not progress)
    return [layer_permutation(w, mode, method) for w in bar]

# -------------------------------------------------------------------------------------------- storage


def _storage_dtype(size: int) -> torch.dtype:
    """int16 holds positions 0..32767; larger layers need int32."""
    return torch.int16 if size <= 1 << 15 else torch.int32

def permutation_bytes(perms: Sequence[Tensor]) -> int:
    """Bytes the positions take on disk (what decoding needs besides the predictor)."""
    return sum(p.numel() * torch.empty(0, dtype=_storage_dtype(p.numel())).element_size() for p in perms)

def is_bijection(position: Tensor, size: int) -> bool:
    """Whether `position` holds every slot 0..size-1 exactly once."""
    if position.dim() != 1 or position.numel() != size:
        return False
    if size == 0:
        return True
    pos = position.long()
    if int(pos.min()) < 0 or int(pos.max()) >= size:
        return False
    return bool((torch.bincount(pos, minlength=size) == 1).all())

def save_permutations(path: str | Path, perms: Sequence[Tensor], metadata: dict[str, Any]) -> None:
    """Write positions as `layer.{i}` (int16 when it fits, else int32) with `mode` and `shapes` metadata."""
    shapes = metadata.get("shapes")
    if "mode" not in metadata or shapes is None or len(shapes) != len(perms):
        raise ValueError("metadata needs 'mode' and one [Cout, Cin] in 'shapes' per permutation")
    for i, (p, (cout, cin)) in enumerate(zip(perms, shapes, strict=True)):
        if not is_bijection(p, cout * cin):
            raise ValueError(f"permutation {i} is not a bijection of range({cout}*{cin})")
    meta = {**metadata, "num_layers": len(perms), "shapes": [[int(a), int(b)] for a, b in shapes]}
    tensors = {f"layer.{i}": p.to(_storage_dtype(p.numel())) for i, p in enumerate(perms)}
    save_tensors(path, tensors, meta)

def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "no layer" if shape is None else "x".join(str(v) for v in shape)

def load_permutations(path: str | Path, expected_shapes: Sequence[tuple[int, int]] | None = None
                      ) -> tuple[list[Tensor], dict[str, Any]]:
    """Read and check a permutation file; a file that does not fit the model is a user error."""
    tensors, meta = load_tensors(path)
    shapes = [tuple(s) for s in meta.get("shapes", [])]
    count = meta.get("num_layers", len(shapes))
    names = meta.get("layers") or [f"layer {i}" for i in range(count)]
    fix = "recompute it with `nern permute` for this model"
    if len(shapes) != count or any(f"layer.{i}" not in tensors for i in range(count)):
        raise NernError(f"{path} is not a complete permutation file; {fix}")
    if expected_shapes is not None:
        expected = [tuple(int(v) for v in s) for s in expected_shapes]
        for i in range(max(len(expected), count)):
            got = shapes[i] if i < count else None
            want = expected[i] if i < len(expected) else None
            if got != want:
                name = names[i] if i < len(names) else f"layer {i}"
                raise NernError(f"{path} does not match the model at {name} (file {_shape_text(got)}, "
                                f"model {_shape_text(want)}); {fix}")
    perms = []
    for i, (cout, cin) in enumerate(shapes):
        position = tensors[f"layer.{i}"].long()
        if not is_bijection(position, cout * cin):
            raise NernError(f"{path}: the permutation of {names[i]} is not a bijection of its "
                            f"{cout}x{cin} kernels; {fix}")
        perms.append(position)
    return perms, meta

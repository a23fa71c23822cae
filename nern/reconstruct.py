"""From predicted kernels to the reconstructed network.

coordinates (with permutation) -> embedding table (once) -> predictor -> [N, k*k] kernels -> per-layer
weights, centre-cropped for k < 3 -> the ORIGINAL module run with these weights substituted through
`torch.func.functional_call`. No wrapper class per architecture: the module itself is the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from nern.embedding import positional_embedding
from nern.feature_maps import FeatureMapRecorder, map_graph
from nern.layers import ConvLayer


@dataclass
class Representation:
    """What the predictor represents: the layers, their coordinate permutations and per-layer scales."""

    layers: list[ConvLayer]
    positions: list[torch.Tensor]
    kernel_size: int = 3
    scales: torch.Tensor | None = None  # one scalar per layer (fast recipe), else None
    # verbatim tensors (by parameter name) that replace the original's in the reconstructed network: those a fit
    # with tune_verbatim trained (BatchNorm affine, FC, ...); empty: the original's own, as in the paper
    tuned: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for layer in self.layers:
            self.offsets.append(self.offsets[-1] + layer.num_kernels)

    @property
    def num_kernels(self) -> int:
        return self.offsets[-1]

    def coordinates(self) -> torch.Tensor:
        """[N, 3] raw integer (layer, filter, channel) fed to kernel i, after the layer's permutation."""
        rows = []
        for index, (layer, position) in enumerate(zip(self.layers, self.positions)):
            cin = layer.shape[1]
            slot = position.to(torch.long)
            rows.append(torch.stack([torch.full_like(slot, index), slot // cin, slot % cin], dim=1))
        return torch.cat(rows)

    def embeddings(self, levels: int, base: float) -> torch.Tensor:
        return positional_embedding(self.coordinates(), levels, base)

    def kernel_scales(self) -> torch.Tensor | None:
        """Per-kernel multiplier [N, 1] expanding the per-layer scales, or None."""
        if self.scales is None:
            return None
        counts = torch.tensor([layer.num_kernels for layer in self.layers])
        return torch.repeat_interleave(self.scales, counts).unsqueeze(1)


def identity_positions(layers: list[ConvLayer]) -> list[torch.Tensor]:
    return [torch.arange(layer.num_kernels) for layer in layers]


def _crop(kernels: torch.Tensor, full: int, k: int) -> torch.Tensor:
    if k == full:
        return kernels
    start = (full - k) // 2
    return kernels[:, :, start : start + k, start : start + k]


def kernels_to_weights(kernels: torch.Tensor, rep: Representation) -> list[torch.Tensor]:
    """[N, k*k] predicted kernels (original order) -> list of conv weights, centre-cropped per layer."""
    full = rep.kernel_size
    weights = []
    for layer, start, stop in zip(rep.layers, rep.offsets[:-1], rep.offsets[1:]):
        cout, cin, k, _ = layer.shape
        block = kernels[start:stop].reshape(cout, cin, full, full)
        weights.append(_crop(block, full, k))
    return weights


def weights_to_kernels(weights: list[torch.Tensor], kernel_size: int = 3) -> torch.Tensor:
    """Original conv weights -> [N, k*k] targets, smaller kernels zero-padded into the centre."""
    rows = []
    for w in weights:
        cout, cin, k, _ = w.shape
        if k == kernel_size:
            rows.append(w.reshape(cout * cin, kernel_size * kernel_size))
            continue
        padded = w.new_zeros(cout, cin, kernel_size, kernel_size)
        start = (kernel_size - k) // 2
        padded[:, :, start : start + k, start : start + k] = w
        rows.append(padded.reshape(cout * cin, -1))
    return torch.cat(rows)


def predict_kernels(predictor: nn.Module, embeddings: torch.Tensor, sampled: torch.Tensor | None,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Predict ALL kernels; only rows in `sampled` carry gradient (None: every row does).

    One no-grad pass over all rows plus a grad pass over the sampled rows: the backward then costs
    O(B) instead of O(N). Rows sampled twice (sampling with replacement) receive their gradient twice.
    """
    if sampled is None:
        kernels = predictor(embeddings)
    else:
        with torch.no_grad():
            everything = predictor(embeddings)
        kernels = everything.index_put((sampled,), predictor(embeddings[sampled]))
    return kernels if scales is None else kernels * scales


def weight_overrides(rep: Representation, weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the reconstructed network holds instead of the original's: the predicted conv weights and any tuned
    verbatim tensors."""
    tuned = {name: t.to(weights[0].device) for name, t in rep.tuned.items()} if weights else rep.tuned
    return {**tuned, **{layer.param: w for layer, w in zip(rep.layers, weights)}}


class TunedTensors(nn.Module):
    """Trainable copies of the floating-point parameters NeRN stores verbatim (BatchNorm affine, FC, unrepresented
    convs), for a fit that distils them together with the predictor (tune_verbatim). Buffers (BatchNorm
    statistics) are not trained: in eval mode they are constants of the affine map the gammas and betas adjust."""

    def __init__(self, model: nn.Module, rep: Representation):
        super().__init__()
        represented = {layer.param for layer in rep.layers}
        named = [(n, p) for n, p in model.named_parameters() if n not in represented and p.is_floating_point()]
        self.names = [n for n, _ in named]
        self.values = nn.ParameterList([nn.Parameter(p.detach().clone()) for _, p in named])

    def overrides(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values))


def run_reconstructed(model: nn.Module, rep: Representation, weights: list[torch.Tensor],
                      x: torch.Tensor) -> torch.Tensor:
    """The original module with its represented conv weights replaced; everything else verbatim."""
    return functional_call(model, weight_overrides(rep, weights), (x,), strict=False)


class NetworkPair:
    """The original network (teacher) and its reconstruction (student), each returning (logits, feature maps).

    fused=True asks for one torch.fx graph of the module that returns its maps as well, so torch.compile can
    fuse the whole forward with normalisation, activation and the losses; without it, or when the module cannot
    be traced, forward hooks on the module record the maps (`close()` removes them: the module is the user's).
    """

    def __init__(self, model: nn.Module, rep: Representation, fused: bool = False):
        self.model, self.rep = model, rep
        self.graph = map_graph(model) if fused else None
        self.recorder = FeatureMapRecorder(model) if self.graph is None else None
        self.teacher = self._hooked_teacher if self.graph is None else torch.compile(self.graph)

    @property
    def fused(self) -> bool:
        return self.graph is not None

    def _hooked_teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with self.recorder.record() as maps:
            return self.model(x), list(maps)

    def student(self, weights: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.graph is not None:
            logits, maps = run_reconstructed(self.graph, self.rep, weights, x)
            return logits, list(maps)
        with self.recorder.record() as maps:
            return run_reconstructed(self.model, self.rep, weights, x), list(maps)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None


def reconstructed_model(model: nn.Module, rep: Representation, weights: list[torch.Tensor]) -> nn.Module:
    """A standalone copy of `model` holding the reconstructed weights (for evaluation, pruning, export)."""
    import copy

    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, w in weight_overrides(rep, weights).items():
            params[name].copy_(w)
    return clone.eval()

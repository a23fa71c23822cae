"""What a fit is built from (docs/METHOD.md §1-3): everything derived, not learned.

`prepare`: the represented layers of the original network, their coordinate permutations, the reconstruction
targets and the kernel coordinates' positional embeddings (computed once), and the data splits. The parts a fit
trains are built here too, so nern/method.py shows what they are, not how they are made: the predictor (with the
quantisers of predictor.quantise_bits) and the verbatim tensors a tune_verbatim fit trains.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nern import data as data_mod
from nern.config import FitConfig
from nern.errors import NernError
from nern.layers import ConvLayer, conv_weights, find_conv_layers
from nern.predictor import Predictor
from nern.qat import attach_quantisers
from nern.reconstruct import Representation, TunedTensors, identity_positions, weights_to_kernels


@dataclass
class FitSetup:
    """Everything a fit needs that is derived, not learned."""

    model: nn.Module
    rep: Representation
    originals: list[torch.Tensor]
    targets: torch.Tensor
    embeddings: torch.Tensor
    splits: Any
    permutation_mode: str
    permutation_bytes: int


def prepare(cfg: FitConfig, model: nn.Module | None = None, permutation: str | list[torch.Tensor] | None = None,
            splits: Any = None) -> FitSetup:
    """The represented layers, their targets and the kernel coordinates' embeddings (docs/METHOD.md §1-2)."""
    from nern import models

    if model is None:
        torch.manual_seed(cfg.seed)  # a config without a checkpoint gets the same random original every time
        model = models.load_model(cfg.model)
    model = model.to(cfg.device).eval()
    model.requires_grad_(False)
    layers = find_conv_layers(model, cfg.represent)
    originals = conv_weights(model, layers)
    positions, mode, perm_bytes = coordinate_positions(layers, permutation)
    scales = layer_scales(originals).cpu() if cfg.predictor.normalize_targets else None
    rep = Representation(layers, [p.cpu() for p in positions], kernel_size=3, scales=scales)
    targets = weights_to_kernels(originals, rep.kernel_size)
    embeddings = rep.embeddings(cfg.embedding.levels, cfg.embedding.base).to(cfg.device)
    if splits is None:
        splits = data_mod.build_splits(cfg.data)
    data_mod.check_compatible(splits.test.info, _in_channels(model))
    return FitSetup(model, rep, originals, targets, embeddings, splits, mode, perm_bytes)


def layer_scales(originals: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer standard deviation of the original weights: the predictor then sees unit-scale targets."""
    return torch.stack([w.float().std().clamp_min(1e-8) for w in originals])


def coordinate_positions(layers: list[ConvLayer], permutation: str | Path | list[torch.Tensor] | None
                         ) -> tuple[list[torch.Tensor], str, int]:
    """(each layer's coordinate permutation, its mode, the bytes it costs to store)."""
    if permutation is None:
        return identity_positions(layers), "none", 0
    from nern import permutation as perm_mod

    if isinstance(permutation, (str, Path)):
        shapes = [(layer.shape[0], layer.shape[1]) for layer in layers]
        positions, meta = perm_mod.load_permutations(permutation, expected_shapes=shapes)
        mode = meta.get("mode", "unknown")
        # symmetry: the network itself was permuted (nern.symmetry); its identity coordinates cost nothing
        return positions, mode, 0 if mode in ("none", "symmetry") else perm_mod.permutation_bytes(positions)
    positions = list(permutation)
    return positions, "custom", perm_mod.permutation_bytes(positions)


def _in_channels(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


# -- the parts a fit trains --------------------------------------------------------------------------------


def build_predictor(cfg: FitConfig, setup: FitSetup, device: torch.device) -> tuple[Predictor, nn.Module]:
    """(the predictor, the module a step calls: the same one, or its torch.compile graph with compile=true).
    With predictor.quantise_bits every step, the reconstruction phase included, sees the rounding."""
    predictor = Predictor(setup.embeddings.shape[1], cfg.predictor.hidden, cfg.predictor.depth,
                          setup.rep.kernel_size, cfg.predictor.init).to(device)
    if cfg.predictor.quantise_bits:
        attach_quantisers(predictor, cfg.predictor.quantise_bits)
    if cfg.compile:
        check_compile_toolchain(device)
    return predictor, torch.compile(predictor) if cfg.compile else predictor


def attach_tuned(cfg: FitConfig, setup: FitSetup) -> TunedTensors | None:
    """tune_verbatim: trainable copies of the student's verbatim tensors (BatchNorm affine, FC), which the
    reconstructed network then sees through setup.rep.tuned; None (the original's own, as in the paper) otherwise."""
    if not cfg.tune_verbatim:
        return None
    tuned = TunedTensors(setup.model, setup.rep)
    setup.rep.tuned = tuned.overrides()
    return tuned


def check_compile_toolchain(device: torch.device) -> None:
    """torch.compile on CPU generates C++: fail at the start with the fix, not deep inside the first step."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise NernError("compile=true on the CPU needs a C++ compiler (g++); install one (e.g. apt-get install "
                        "g++) or set compile=false")

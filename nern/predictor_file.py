"""The predictor file `nern fit` writes (predictor.safetensors), and reading it back.

One self-contained file: the predictor's weights, every layer's coordinate permutation and the per-layer scales,
with the fit's config and the represented layers as metadata: enough to rebuild the network's conv weights with
no other input than the original network's verbatim tensors (`decode_weights`). A quantised predictor
(predictor.quantise_bits) carries its learnt steps (`fitted_steps`); a fit with tune_verbatim its trained verbatim
tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nern.artifacts import load_tensors, save_tensors
from nern.config import FitConfig, load_config, to_dict
from nern.errors import NernError
from nern.layers import find_conv_layers
from nern.predictor import Predictor
from nern.qat import plain_state
from nern.reconstruct import Representation, kernels_to_weights, predict_kernels

# Settings that do not change the numbers a run produces: a resumed run may change them.
NON_RESULT_KEYS = ("progress", "eval_every", "checkpoint_every", "threads", "device", "compile")
PREDICTOR_FILE = "predictor.safetensors"
KIND = "nern-predictor"


def save_predictor(path: Path, predictor: Predictor, rep: Representation, cfg: FitConfig,
                   extra: dict[str, Any]) -> None:
    """One self-contained file: predictor weights, permutations and scales, plus how to decode them. A
    quantised predictor (predictor.quantise_bits) is stored as its quantised weights under the plain names, with
    its learnt steps beside them (`steps.<weight name>`, read by `fitted_steps`); verbatim tensors the fit
    trained (tune_verbatim) as `tuned.<parameter name>`."""
    state, steps = plain_state(predictor)
    tensors = {f"predictor.{k}": v for k, v in state.items()}
    tensors.update({f"steps.{k}": v for k, v in steps.items()})
    tensors.update({f"tuned.{k}": v.detach().float().cpu().clone() for k, v in rep.tuned.items()})
    for i, pos in enumerate(rep.positions):
        tensors[f"permutation.{i}"] = pos.to(torch.int32)
    if rep.scales is not None:
        tensors["scales"] = rep.scales.float()
    meta = {
        "kind": KIND,
        "config": to_dict(cfg),
        "layers": [{"name": layer.name, "shape": list(layer.shape)} for layer in rep.layers],
        "kernel_size": rep.kernel_size,
        **extra,
    }
    save_tensors(path, tensors, meta)


def portable_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A predictor file's fit config without where and how the fit ran (device, threads, compile, progress):
    a predictor fitted on a cluster GPU is read back on a laptop with that machine's settings."""
    return {k: copy.deepcopy(v) for k, v in stored.items() if k not in NON_RESULT_KEYS}


def load_predictor(path: str | Path, model: nn.Module) -> tuple[Predictor, Representation, FitConfig]:
    """Rebuild predictor and representation from a predictor file; refuses a file made for another model."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != KIND:
        raise NernError(f"{path} is not a NeRN predictor file; pass the predictor.safetensors written by `nern fit`")
    cfg = load_config(FitConfig, base=portable_config(meta["config"]))
    layers = find_conv_layers(model, cfg.represent)
    stored = [(d["name"], tuple(d["shape"])) for d in meta["layers"]]
    actual = [(layer.name, layer.shape) for layer in layers]
    if stored != actual:
        diff = next(((s, a) for s, a in zip(stored, actual) if s != a), (len(stored), len(actual)))
        raise NernError(
            f"predictor {path} was fitted to another model (first difference: {diff[0]} vs {diff[1]}); "
            "pass the model it was fitted to"
        )
    positions = [tensors[f"permutation.{i}"].long() for i in range(len(layers))]
    tuned = {k.removeprefix("tuned."): v for k, v in tensors.items() if k.startswith("tuned.")}
    rep = Representation(layers, positions, meta["kernel_size"], tensors.get("scales"), tuned)
    state = {k.removeprefix("predictor."): v for k, v in tensors.items() if k.startswith("predictor.")}
    predictor = Predictor(6 * cfg.embedding.levels, cfg.predictor.hidden, cfg.predictor.depth, rep.kernel_size)
    predictor.load_state_dict(state)
    return predictor.eval(), rep, cfg


def fitted_steps(path: str | Path) -> dict[str, torch.Tensor]:
    """The learnt quantiser steps of a predictor fitted with predictor.quantise_bits ({} for a float fit), by
    weight name in the plain predictor's state dict: the codec stores exactly the integers the fit trained."""
    tensors, _ = load_tensors(path)
    return {k.removeprefix("steps."): v for k, v in tensors.items() if k.startswith("steps.")}


@torch.no_grad()
def decode_weights(predictor: Predictor, rep: Representation, cfg: FitConfig) -> list[torch.Tensor]:
    """The reconstructed conv weights a predictor file stands for."""
    embeddings = rep.embeddings(cfg.embedding.levels, cfg.embedding.base)
    kernels = predict_kernels(predictor, embeddings, None, rep.kernel_scales())
    return kernels_to_weights(kernels, rep)

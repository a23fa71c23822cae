"""What goes into a NeRN file or an original-network file, and the network rebuilt from one.

A NeRN file (`encode_nern`) holds the predictor (pruned and/or quantised, at learnt steps if any), the
permutations (the identity costs nothing), the per-layer scales and every tensor NeRN does not represent
(`verbatim_state`: BatchNorm, FC, unrepresented convs), optionally with each BatchNorm folded into its affine map
(`fold_batchnorm`). An original-network file (`encode_network`) holds the whole state dict. `read_network`
rebuilds either into a freshly built skeleton from the file alone (plus an NNCodec bitstream where one carries
the predictor), so nothing of the original can leak into a measurement. The bytes are `nern.codec`'s business.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nern.codec import Encoded, read_container
from nern.config import EmbeddingConfig, FitConfig, ModelConfig
from nern.errors import NernError
from nern.layers import ConvLayer
from nern.models import build_model, check_stored_config
from nern.nnc import NNC_SUFFIX, read_nnc
from nern.predictor import Predictor
from nern.predictor_file import decode_weights
from nern.reconstruct import Representation



def _model_meta(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "nern_config", None)
    if cfg is None:
        return None
    stored = dataclasses.asdict(cfg)
    stored["checkpoint"] = None  # the file must not need the original checkpoint
    return stored


def _position_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 1 << 15 else torch.int32


def tensor_precision(t: torch.Tensor, precision: str, vectors: str) -> str:
    """Integer files store 1-D tensors (biases, BatchNorm) at `vectors`: fp32, fp16, or int8 with one scale per
    tensor (standard PTQ keeps them float; a 48-KB file spends ~4 KB on them at fp16)."""
    return vectors if precision.startswith("int") and t.dim() < 2 and t.is_floating_point() else precision


def encode_nern(predictor: Predictor, masks: dict[str, torch.Tensor], precision: str, rep: Representation,
                embedding: EmbeddingConfig, model: nn.Module, *, steps: dict[str, torch.Tensor] | None = None,
                verbatim_precision: str | None = None, vectors: str = "fp32",
                parts: tuple[str, ...] = ("predictor", "verbatim"), fold: bool = False) -> Encoded:
    """Predictor (pruned and/or quantised, at its learnt `steps` if any), permutations, per-layer scales and
    every tensor NeRN does not represent (at `verbatim_precision`, default `precision`). `parts` leaves the
    predictor and/or verbatim tensors out when another codec (NNCodec) carries them; `fold` stores each BatchNorm as
    its affine map only (`fold_batchnorm`)."""
    linears = [m for m in predictor if isinstance(m, nn.Linear)]
    enc = Encoded.empty("nern", {
        "model": _model_meta(model),
        "embedding": {"levels": embedding.levels, "base": embedding.base},
        "predictor": {"in_dim": linears[0].in_features, "hidden": linears[0].out_features, "depth": len(linears),
                      "kernel_size": rep.kernel_size},
        "layers": [{"name": layer.name, "shape": list(layer.shape)} for layer in rep.layers],
        "identity_permutations": [],
    })
    steps = steps or {}
    if "predictor" in parts:
        for name, t in predictor.state_dict().items():
            enc.add(f"predictor.{name}", t, tensor_precision(t, precision, vectors), "predictor", masks.get(name),
                    steps.get(name))
    for i, (layer, pos) in enumerate(zip(rep.layers, rep.positions)):
        if torch.equal(pos.long(), torch.arange(layer.num_kernels)):
            enc.meta["identity_permutations"].append(i)  # the identity costs nothing to store
        else:
            enc.add(f"permutation.{i}", pos.to(_position_dtype(layer.num_kernels)), "fp32", "permutation")
    if rep.scales is not None:
        enc.add("scales", rep.scales.float(), "fp32", "scales")
    if "verbatim" in parts:
        state, enc.meta["folded_batchnorm"] = fold_batchnorm(verbatim_state(model, rep), model, fold)
        for name, t in state.items():
            enc.add(f"verbatim.{name}", t, tensor_precision(t, verbatim_precision or precision, vectors), "verbatim")
    return enc


def verbatim_state(model: nn.Module, rep: Representation) -> dict[str, torch.Tensor]:
    """Every tensor of the network that NeRN does not represent (BatchNorm, FC, unrepresented convs): the fit's
    tuned values where it trained them (tune_verbatim), the original's elsewhere."""
    represented = {layer.param for layer in rep.layers}
    return {name: rep.tuned[name].detach().to(t) if name in rep.tuned else t
            for name, t in model.state_dict().items() if name not in represented}


def encode_network(model: nn.Module, masks: dict[str, torch.Tensor], precision: str, vectors: str = "fp32",
                   fold: bool = False, *, steps: dict[str, torch.Tensor] | None = None,
                   precisions: dict[str, str] | None = None) -> Encoded:
    """The original network's whole state dict (the baselines), pruned entries masked out; a quantisation-aware
    baseline's weights at their learnt `steps` (the trained integers exactly), `precisions` overriding
    `precision` by tensor name (its unquantised matrices at int8, like a NeRN file's verbatim ones)."""
    enc = Encoded.empty("network", {"model": _model_meta(model)})
    state, enc.meta["folded_batchnorm"] = fold_batchnorm(model.state_dict(), model, fold)
    steps, precisions = steps or {}, precisions or {}
    for name, t in state.items():
        part = "weights" if t.is_floating_point() and t.dim() >= 2 else "other"
        enc.add(f"state.{name}", t, tensor_precision(t, precisions.get(name, precision), vectors), part,
                masks.get(name), steps.get(name))
    return enc


def batchnorm_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats}


def fold_batchnorm(state: dict[str, torch.Tensor], model: nn.Module, fold: bool = True
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Each BatchNorm of `model` in `state` as its eval-mode affine map: weight <- gamma / sqrt(var + eps),
    bias <- beta - mean * weight, statistics dropped (half its tensors, the same function up to float rounding).
    Returns the state and the folded modules' names, which `unit_statistics` restores on reading."""
    if not fold:
        return state, []
    out, folded = dict(state), []
    for name, bn in batchnorm_modules(model).items():
        keys = [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        if not all(k in out for k in keys):
            continue
        gamma, beta, mean, var = (out[k].float() for k in keys)
        scale = gamma / torch.sqrt(var + bn.eps)
        out[keys[0]], out[keys[1]] = scale, beta - mean * scale
        for key in (*keys[2:], f"{name}.num_batches_tracked"):
            out.pop(key, None)
        folded.append(name)
    return out, folded


def unit_statistics(network: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The statistics of folded BatchNorms: mean 0 and variance 1 - eps, so that the stored affine map is exact."""
    stats = {}
    for name in names:
        bn = network.get_submodule(name)
        stats[f"{name}.running_mean"] = torch.zeros_like(bn.running_mean)
        stats[f"{name}.running_var"] = torch.full_like(bn.running_var, 1.0 - bn.eps)
        if bn.num_batches_tracked is not None:
            stats[f"{name}.num_batches_tracked"] = torch.zeros_like(bn.num_batches_tracked)
    return stats


def _skeleton(meta: dict[str, Any], skeleton: nn.Module | None, path: Path) -> nn.Module:
    """A freshly built network to load the file into (its initial values are all overwritten)."""
    if skeleton is not None:
        return skeleton
    if meta.get("model") is None:
        raise NernError(f"{path} records no model config (a user-built network); pass the network as `skeleton`")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return build_model(ModelConfig(**{k: v for k, v in meta["model"].items() if k in names}))


def _load_strict(network: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    expected = set(network.state_dict())
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise NernError(f"{path} does not fit this network (missing {missing}, unexpected {extra}); "
                        "pass the architecture the file was written for")
    network.load_state_dict(state, strict=True)
    return network.eval()


def decode_predictor(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Predictor:
    p = meta["predictor"]
    predictor = Predictor(p["in_dim"], p["hidden"], p["depth"], p["kernel_size"])
    state = {k.removeprefix("predictor."): v for k, v in tensors.items() if k.startswith("predictor.")}
    predictor.load_state_dict(state)
    return predictor.eval()


def decode_representation(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Representation:
    layers = [ConvLayer(d["name"], tuple(d["shape"])) for d in meta["layers"]]
    identity = set(meta["identity_permutations"])
    positions = [torch.arange(layer.num_kernels) if i in identity else tensors[f"permutation.{i}"].long()
                 for i, layer in enumerate(layers)]
    return Representation(layers, positions, meta["predictor"]["kernel_size"], tensors.get("scales"))


def read_network(path: str | Path, skeleton: nn.Module | None = None, nnc_path: str | Path | None = None) -> nn.Module:
    """Rebuild a network from a NeRN or original-network file (plus, for a NeRN whose predictor and verbatim
    tensors went through NNCodec, that bitstream); uses nothing but the files (and the architecture)."""
    path = Path(path)
    tensors, meta = read_container(path)
    return _network_from(tensors, meta, path, skeleton, nnc_path)


def _network_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path, skeleton: nn.Module | None,
                  nnc_path: str | Path | None) -> nn.Module:
    """`read_network` on a container already read (a caller that checked its metadata first reads it once)."""
    if nnc_path is not None:
        tensors.update(read_nnc(nnc_path))
    network = _skeleton(meta, skeleton, path)
    folded = unit_statistics(network, meta.get("folded_batchnorm", []))
    if meta["kind"] == "network":
        state = {k.removeprefix("state."): v for k, v in tensors.items()}
        return _load_strict(network, {**state, **folded}, path)
    if not any(name.startswith("predictor.") for name in tensors):
        raise NernError(f"{path} holds no predictor: it went through NNCodec, whose bitstream (the {NNC_SUFFIX} "
                        "file of the same name that `nern compress` wrote) must lie beside it")
    predictor = decode_predictor(tensors, meta)
    rep = decode_representation(tensors, meta)
    state = {**{k.removeprefix("verbatim."): v for k, v in tensors.items() if k.startswith("verbatim.")}, **folded}
    embedding = EmbeddingConfig(levels=meta["embedding"]["levels"], base=meta["embedding"]["base"])
    with torch.no_grad():
        weights = decode_weights(predictor, rep, FitConfig(embedding=embedding))
    for layer, w in zip(rep.layers, weights):
        state[layer.param] = w
    return _load_strict(network, _with_integer_buffers(network, state), path)


def read_codec_file(path: str | Path, model_cfg: ModelConfig) -> nn.Module:
    """The network a file of `nern compress` holds, for a user to take away: a `.nernz` (a NeRN or an original
    network; a NeRN whose predictor went through NNCodec reads the `.nnc` of the same stem beside it, as the stage
    wrote them) or an original's `.nnc`, which records no architecture, so `model_cfg` builds every skeleton."""
    path = Path(path)
    skeleton = build_model(model_cfg)
    if path.suffix == NNC_SUFFIX:
        return read_nnc_network(path, skeleton)
    tensors, meta = read_container(path)
    if isinstance(meta.get("model"), dict):
        check_stored_config(dataclasses.replace(model_cfg, checkpoint=str(path)), meta["model"])
    companion = path.with_suffix(NNC_SUFFIX)
    return _network_from(tensors, meta, path, skeleton, companion if companion.is_file() else None)


def read_nnc_network(path: str | Path, skeleton: nn.Module) -> nn.Module:
    """The original network from an NNCodec bitstream of its float tensors (integer buffers start at zero)."""
    return _load_strict(skeleton, _with_integer_buffers(skeleton, read_nnc(path)), Path(path))


def _with_integer_buffers(network: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Integer buffers NNCodec does not code (BatchNorm's step count: unused in eval) as zeros of their shape."""
    missing = {k: torch.zeros_like(v) for k, v in network.state_dict().items()
               if k not in state and not v.is_floating_point()}
    return {**state, **missing}


def fresh_skeleton(model: nn.Module) -> nn.Module:
    """A network of the model's architecture to load a file into: built anew from its config when it has one,
    else a copy whose every tensor the file overwrites (integer buffers zeroed)."""
    meta = _model_meta(model)
    return _skeleton({"model": meta}, None if meta else copy.deepcopy(model).cpu(), Path("(model)"))

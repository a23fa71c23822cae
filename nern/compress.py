"""Meta-compression of a fitted NeRN (METHOD.md 9), measured in bytes on disk against codecs on the original.

The paper prunes the predictor and reports parameter counts. A parameter count hides what a file needs besides
the predictor (permutations, per-layer scales, BatchNorm, the FC layer, unrepresented convs) and what a
general-purpose compressor would do to the original network anyway. So every variant here is a real file:

    container = MAGIC + codec id + lossless(safetensors(encoded tensors, JSON metadata))

- a pruned tensor is a bitmask (`packbits`) plus its kept values only;
- `fp16` stores values as float16; `intN` stores symmetric per-output-channel integers (N bits, bit-packed
  below 8) plus one float32 scale per channel; 1-D tensors (biases, BatchNorm) stay float32 under `intN`;
- the same tensor codecs write the baselines (the ORIGINAL network at fp32/fp16/intN, magnitude-pruned at the
  same sparsities), so both sides pay for the same things under the same lossless compressor (zstd or lzma).

Every accuracy in the table is measured on a network rebuilt from the file READ BACK from disk, starting from
a freshly initialised skeleton, so nothing of the original network can leak into a NeRN row.

The predictor is pruned by weight magnitude (Linear weights, not biases), globally or per layer, then
optionally fine-tuned with the fit's own losses (`nern.fit.Fitter`) with the mask held fixed (gradients of
pruned weights are zeroed and the mask is re-applied after every step), on task images or on noise
(data-free), and finally quantised.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import lzma
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from tqdm import tqdm

from nern.artifacts import atomic_path, write_json
from nern.config import EmbeddingConfig, FitConfig, ModelConfig, flatten, load_config, to_dict
from nern.errors import NernError
from nern.layers import ConvLayer, conv_weights
from nern.losses import reconstruction_loss
from nern.predictor import Predictor
from nern.reconstruct import Representation, kernels_to_weights, predict_kernels

FORMAT = "nern-compressed/1"
MAGIC = b"NERNZ\x01"
COMPRESSORS = {"zstd": 1, "lzma": 2}
ZSTD_LEVEL = 19
PRECISIONS = ("fp32", "fp16", "int8", "int6", "int4")
SCOPES = ("global", "layer")
FINETUNES = ("none", "data", "data-free")
FILE_SUFFIX = ".nernz"


# ---------------------------------------------------------------------------------------------------------
# The lossless compressor on top


def lossless_compress(data: bytes, compressor: str) -> bytes:
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    if compressor == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    raise NernError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")


def lossless_decompress(data: bytes, compressor: str) -> bytes:
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data)
    return lzma.decompress(data)


# ---------------------------------------------------------------------------------------------------------
# Tensor codecs: bit packing, per-channel quantisation, sparsity masks


def bits_of(precision: str) -> int:
    """8 for int8, 4 for int4, ...; 0 for the float precisions."""
    if precision not in PRECISIONS:
        raise NernError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return int(precision[3:]) if precision.startswith("int") else 0


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers < 2**bits -> a dense little-endian bitstream of `bits` bits each (uint8)."""
    v = values.to(torch.uint8).reshape(-1).numpy()
    if bits == 8:
        return torch.from_numpy(v.copy())
    planes = np.unpackbits(v[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `count` unsigned values as uint8."""
    p = packed.reshape(-1).numpy()
    if bits == 8:
        return torch.from_numpy(p[:count].copy())
    planes = np.unpackbits(p, bitorder="little")[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, :bits] = planes
    return torch.from_numpy(np.packbits(full, axis=1, bitorder="little").reshape(count))


def channel_scales(w: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric per-output-channel step: max |w| of the channel's kept weights over the largest level."""
    levels = 2 ** (bits - 1) - 1
    rows = w.detach().float().reshape(w.shape[0], -1).abs()
    if mask is not None:
        rows = rows * mask.reshape(w.shape[0], -1)
    scale = rows.amax(dim=1) / levels
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantise(w: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Integers in [-(2**(b-1)-1), 2**(b-1)-1] (int16 to hold any b <= 8), one scale per output channel."""
    levels = 2 ** (bits - 1) - 1
    per_row = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round(w.detach().float() / per_row).clamp(-levels, levels).to(torch.int16)


def dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.reshape(-1, *([1] * (q.dim() - 1)))


def fake_quantise(w: torch.Tensor, precision: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What a tensor becomes after encoding and decoding in memory (the expected read-back, for tests)."""
    tensors, spec = encode_tensor("t", w, precision, mask)
    return decode_tensor("t", spec, tensors)


def _quantisable(t: torch.Tensor, precision: str) -> bool:
    """Integer codecs apply to weight matrices and kernels; biases and BatchNorm stay float32 (standard PTQ)."""
    return bits_of(precision) > 0 and t.is_floating_point() and t.dim() >= 2


def encode_tensor(name: str, t: torch.Tensor, precision: str,
                  mask: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One tensor -> stored arrays (`name.values`, optional `.mask`, `.scale`) and the spec to decode them."""
    t = t.detach().cpu()
    spec: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "codec": "raw",
                            "masked": mask is not None}
    out: dict[str, torch.Tensor] = {}
    keep = mask.detach().cpu().reshape(-1).bool() if mask is not None else None
    if keep is not None:
        out[f"{name}.mask"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
    if not t.is_floating_point():
        flat = t.reshape(-1)
        out[f"{name}.values"] = (flat[keep] if keep is not None else flat).clone()
        return out, spec
    if _quantisable(t, precision):
        bits = bits_of(precision)
        scale = channel_scales(t, bits, mask)
        levels = 2 ** (bits - 1) - 1
        unsigned = (quantise(t, bits, scale).reshape(-1) + levels).to(torch.uint8)
        out[f"{name}.values"] = pack_bits(unsigned[keep] if keep is not None else unsigned, bits)
        out[f"{name}.scale"] = scale.float()
        spec.update(codec=precision, bits=bits)
        return out, spec
    dtype = torch.float16 if precision == "fp16" else torch.float32
    flat = t.reshape(-1).to(dtype)
    out[f"{name}.values"] = (flat[keep] if keep is not None else flat).clone()
    spec["codec"] = "fp16" if dtype == torch.float16 else "fp32"
    return out, spec


def decode_tensor(name: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of `encode_tensor`: the dense tensor, pruned entries zero."""
    shape = tuple(spec["shape"])
    numel = math.prod(shape)
    dtype = getattr(torch, spec["dtype"])
    keep = None
    if spec["masked"]:
        keep = torch.from_numpy(np.unpackbits(tensors[f"{name}.mask"].numpy(), bitorder="little")[:numel].astype(bool))
    count = int(keep.sum()) if keep is not None else numel
    if spec["codec"].startswith("int"):
        bits = spec["bits"]
        levels = 2 ** (bits - 1) - 1
        values = unpack_bits(tensors[f"{name}.values"], bits, count).to(torch.int16) - levels
        scale = tensors[f"{name}.scale"]
        rows = torch.arange(numel) // (numel // shape[0])
        rows = rows[keep] if keep is not None else rows
        values = values.float() * scale[rows]
    else:
        values = tensors[f"{name}.values"]
    dense = torch.zeros(numel, dtype=dtype)
    if keep is not None:
        dense[keep] = values.to(dtype)
    else:
        dense = values.to(dtype).clone()
    return dense.reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Pruning masks


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


@torch.no_grad()
def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
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


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning a pruned predictor with the fit's losses


def finetune_config(cfg: FitConfig, iterations: int, lr: float, data_free: bool) -> FitConfig:
    """The fit's config for a short fine-tune: same losses (distillation on from step 0), cosine from `lr`."""
    return dataclasses.replace(
        cfg, iterations=iterations, epochs=None, data_free=data_free, eval_every=0, checkpoint_every=0,
        rec_only_iterations=0, compile=False, progress=False, select_best_on_val=False,
        loss=dataclasses.replace(cfg.loss, warmup=0),
        optim=dataclasses.replace(cfg.optim, lr=lr, warmup_iterations=0, min_lr=min(cfg.optim.min_lr, lr)),
    )


def finetune_pruned(predictor: Predictor, masks: dict[str, torch.Tensor], cfg: FitConfig, model: nn.Module,
                    rep: Representation, splits: Any, iterations: int, lr: float, data_free: bool,
                    out_dir: Path, progress: bool = False) -> Predictor:
    """Fine-tune with `nern.fit.Fitter`, keeping pruned weights at exactly zero; returns a fresh predictor."""
    from nern.fit import Fitter, prepare

    ft_cfg = finetune_config(cfg, iterations, lr, data_free)
    setup = prepare(ft_cfg, model=model, permutation=rep.positions, splits=splits)
    setup.rep.scales = rep.scales  # the file's scales, not a recomputation
    fitter = Fitter(ft_cfg, setup, out_dir)
    fitter.predictor.load_state_dict(predictor.state_dict())
    params = dict(fitter.predictor.named_parameters())
    device_masks = {name: m.to(fitter.device, params[name].dtype) for name, m in masks.items()}
    hooks = [params[name].register_hook(lambda g, m=m: g * m) for name, m in device_masks.items()]
    apply_masks(fitter.predictor, device_masks)
    mode = "data-free" if data_free else "data"
    for _ in tqdm(range(iterations), desc=f"fine-tune ({mode})", disable=not progress, leave=False):
        fitter.step()
        apply_masks(fitter.predictor, device_masks)  # the optimiser's weight decay / lookahead must not revive them
    for hook in hooks:
        hook.remove()
    tuned = copy.deepcopy(predictor).cpu()
    tuned.load_state_dict({k: v.detach().cpu() for k, v in fitter.predictor.state_dict().items()})
    return tuned.eval()


# ---------------------------------------------------------------------------------------------------------
# The container


@dataclass
class Encoded:
    """Stored arrays, their decoding specs, the part each tensor belongs to, and file-level metadata."""

    tensors: dict[str, torch.Tensor]
    specs: dict[str, dict[str, Any]]
    parts: dict[str, str]
    meta: dict[str, Any]

    def add(self, name: str, t: torch.Tensor, precision: str, part: str, mask: torch.Tensor | None = None) -> None:
        stored, spec = encode_tensor(name, t, precision, mask)
        self.tensors.update(stored)
        self.specs[name] = {**spec, "part": part}
        for key in stored:
            self.parts[key] = part


def _new_encoded(kind: str, meta: dict[str, Any]) -> Encoded:
    return Encoded({}, {}, {}, {"format": FORMAT, "kind": kind, **meta})


def _payload(enc: Encoded) -> bytes:
    meta = {**enc.meta, "tensors": enc.specs}
    return safetensors_save(enc.tensors, metadata={"nern": json.dumps(meta, sort_keys=True, separators=(",", ":"))})


def write_container(path: str | Path, enc: Encoded, compressor: str = "zstd") -> dict[str, int]:
    """Write the file; returns its size on disk and, per part, the raw and separately compressed bytes."""
    if compressor not in COMPRESSORS:
        raise NernError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")
    blob = MAGIC + bytes([COMPRESSORS[compressor]]) + lossless_compress(_payload(enc), compressor)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return {"bytes": Path(path).stat().st_size, "raw_bytes": len(_payload(enc)), **part_sizes(enc, compressor)}


def part_sizes(enc: Encoded, compressor: str) -> dict[str, int]:
    """Each part's arrays concatenated and compressed alone (they share no context, so the sum exceeds the file)."""
    groups: dict[str, list[bytes]] = {}
    for key, t in enc.tensors.items():
        groups.setdefault(enc.parts[key], []).append(t.contiguous().view(torch.uint8).numpy().tobytes()
                                                      if t.numel() else b"")
    sizes = {}
    for part, chunks in sorted(groups.items()):
        raw = b"".join(chunks)
        sizes[f"{part}_raw_bytes"] = len(raw)
        sizes[f"{part}_bytes"] = len(lossless_compress(raw, compressor))
    header = json.dumps({**enc.meta, "tensors": enc.specs}, sort_keys=True, separators=(",", ":")).encode()
    sizes["header_bytes"] = len(lossless_compress(header, compressor))
    return sizes


def read_container(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(decoded dense tensors by name, metadata) of a file written by `write_container`."""
    path = Path(path)
    if not path.is_file():
        raise NernError(f"compressed file not found: {path}; run `nern compress` to write it")
    blob = path.read_bytes()
    if not blob.startswith(MAGIC) or len(blob) <= len(MAGIC):
        raise NernError(f"{path} is not a NeRN compressed file ({FILE_SUFFIX}); pass a file written by `nern compress`")
    names = {v: k for k, v in COMPRESSORS.items()}
    compressor = names.get(blob[len(MAGIC)])
    if compressor is None:
        raise NernError(f"{path} uses an unknown lossless codec id {blob[len(MAGIC)]}; rewrite it with `nern compress`")
    try:
        payload = lossless_decompress(blob[len(MAGIC) + 1:], compressor)
        stored = safetensors_load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        meta = json.loads(json.loads(payload[8:8 + header_len])["__metadata__"]["nern"])
    except Exception as exc:  # zstd, lzma, safetensors and json each raise their own types on damage
        raise NernError(f"{path} is damaged or truncated ({type(exc).__name__}: {exc}); rerun `nern compress`") from exc
    if meta.get("format") != FORMAT:
        raise NernError(f"{path} has format {meta.get('format')!r}, not {FORMAT}; rewrite it with this version")
    decoded = {name: decode_tensor(name, spec, stored) for name, spec in meta["tensors"].items()}
    return decoded, meta


# ---------------------------------------------------------------------------------------------------------
# NeRN files and original-network files


def _model_meta(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "nern_config", None)
    if cfg is None:
        return None
    stored = dataclasses.asdict(cfg)
    stored["checkpoint"] = None  # the file must not need the original checkpoint
    return stored


def _position_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 1 << 15 else torch.int32


def encode_nern(predictor: Predictor, masks: dict[str, torch.Tensor], precision: str, rep: Representation,
                embedding: EmbeddingConfig, model: nn.Module) -> Encoded:
    """Predictor (pruned and/or quantised), permutations, per-layer scales and every tensor NeRN does not represent."""
    linears = [m for m in predictor if isinstance(m, nn.Linear)]
    enc = _new_encoded("nern", {
        "model": _model_meta(model),
        "embedding": {"levels": embedding.levels, "base": embedding.base},
        "predictor": {"in_dim": linears[0].in_features, "hidden": linears[0].out_features, "depth": len(linears),
                      "kernel_size": rep.kernel_size},
        "layers": [{"name": layer.name, "shape": list(layer.shape)} for layer in rep.layers],
        "identity_permutations": [],
    })
    for name, t in predictor.state_dict().items():
        enc.add(f"predictor.{name}", t, precision, "predictor", masks.get(name))
    for i, (layer, pos) in enumerate(zip(rep.layers, rep.positions)):
        if torch.equal(pos.long(), torch.arange(layer.num_kernels)):
            enc.meta["identity_permutations"].append(i)  # the identity costs nothing to store
        else:
            enc.add(f"permutation.{i}", pos.to(_position_dtype(layer.num_kernels)), "fp32", "permutation")
    if rep.scales is not None:
        enc.add("scales", rep.scales.float(), "fp32", "scales")
    represented = {layer.param for layer in rep.layers}
    for name, t in model.state_dict().items():
        if name not in represented:
            enc.add(f"verbatim.{name}", t, precision, "verbatim")
    return enc


def encode_network(model: nn.Module, masks: dict[str, torch.Tensor], precision: str) -> Encoded:
    """The original network's whole state dict (the baselines), pruned entries masked out."""
    enc = _new_encoded("network", {"model": _model_meta(model)})
    for name, t in model.state_dict().items():
        part = "weights" if t.is_floating_point() and t.dim() >= 2 else "other"
        enc.add(f"state.{name}", t, precision, part, masks.get(name))
    return enc


def _skeleton(meta: dict[str, Any], skeleton: nn.Module | None, path: Path) -> nn.Module:
    """A freshly built network to load the file into (its initial values are all overwritten)."""
    from nern.models import build_model

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


@torch.no_grad()
def nern_weights(predictor: Predictor, rep: Representation, embedding: dict[str, Any]) -> list[torch.Tensor]:
    """The conv weights a (decoded) predictor stands for."""
    embeddings = rep.embeddings(embedding["levels"], embedding["base"])
    return kernels_to_weights(predict_kernels(predictor, embeddings, None, rep.kernel_scales()), rep)


def read_network(path: str | Path, skeleton: nn.Module | None = None) -> nn.Module:
    """Rebuild a network from a NeRN or original-network file; uses nothing but the file (and the architecture)."""
    path = Path(path)
    tensors, meta = read_container(path)
    network = _skeleton(meta, skeleton, path)
    if meta["kind"] == "network":
        state = {k.removeprefix("state."): v for k, v in tensors.items()}
        return _load_strict(network, state, path)
    predictor = decode_predictor(tensors, meta)
    rep = decode_representation(tensors, meta)
    state = {k.removeprefix("verbatim."): v for k, v in tensors.items() if k.startswith("verbatim.")}
    for layer, w in zip(rep.layers, nern_weights(predictor, rep, meta["embedding"])):
        state[layer.param] = w
    return _load_strict(network, state, path)


# ---------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class CompressOptions:
    sparsities: list[float]
    scopes: list[str]
    finetunes: list[str]
    precisions: list[str]
    finetune_iterations: int | None = None  # None: 5% of the fit's iterations, within [10, 2000]
    finetune_lr: float | None = None  # None: a fifth of the fit's peak learning rate
    compressor: str = "zstd"
    keep_files: bool = True


def check_options(opts: CompressOptions) -> None:
    for s in opts.sparsities:
        if not 0.0 <= s < 1.0:
            raise NernError(f"sparsity {s} is outside [0, 1); pass fractions such as --sparsities 0,0.5,0.7,0.9")
    for name, values, allowed in (("scope", opts.scopes, SCOPES), ("fine-tune", opts.finetunes, FINETUNES),
                                  ("precision", opts.precisions, PRECISIONS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise NernError(f"{name} {bad[0] if bad else '(none)'!r} is not allowed; choose from {', '.join(allowed)}")
    if opts.compressor not in COMPRESSORS:
        raise NernError(f"unknown compressor {opts.compressor!r}; choose one of {', '.join(COMPRESSORS)}")


def default_finetune_iterations(cfg: FitConfig, splits: Any) -> int:
    fit_iterations = cfg.iterations
    if fit_iterations is None:
        fit_iterations = math.ceil((cfg.epochs or 1) * max(1, len(splits.train) // cfg.data.batch_size))
    return int(min(2000, max(10, round(0.05 * fit_iterations))))


def _accuracy(network: nn.Module, splits: Any, cfg: FitConfig) -> float:
    from nern import data as data_mod
    from nern.evaluate import top_k_accuracy

    network = network.to(cfg.device).eval()
    batches = data_mod.eval_batches(splits.test, cfg.data.eval_batch_size)
    return top_k_accuracy(network, batches, (1,), cfg.device)["top1"]


def _label(row: dict[str, Any]) -> str:
    scope = f"-{row['scope']}" if row["sparsity"] else ""
    ft = f"-ft-{row['finetune']}" if row["finetune"] != "none" else ""
    return f"{row['representation']}-s{row['sparsity']:g}{scope}{ft}-{row['precision']}"


def _measure(enc: Encoded, row: dict[str, Any], files: Path, opts: CompressOptions, splits: Any, cfg: FitConfig,
             originals: list[torch.Tensor], layers: list[ConvLayer]) -> dict[str, Any]:
    """Write the file, read it back into a fresh network, measure accuracy there."""
    path = files / f"{_label(row)}{FILE_SUFFIX}"
    sizes = write_container(path, enc, opts.compressor)
    network = read_network(path)
    rebuilt = conv_weights(network, layers)
    row = {**row, "file": path.name, **sizes, "top1": _accuracy(network, splits, cfg),
           "rec_rmse": float(reconstruction_loss([w.float() for w in rebuilt], [o.float() for o in originals]))}
    if not opts.keep_files:
        path.unlink()
    return row


def nern_variants(opts: CompressOptions) -> list[tuple[float, str, str]]:
    """(sparsity, scope, fine-tune) of every predictor to write; sparsity 0 needs neither scope nor fine-tune."""
    variants = []
    for s in sorted(set(opts.sparsities)):
        if s == 0:
            variants.append((0.0, "-", "none"))
            continue
        variants += [(s, scope, ft) for scope in opts.scopes for ft in opts.finetunes]
    return variants


def baseline_variants(opts: CompressOptions) -> list[tuple[float, str]]:
    variants = []
    for s in sorted(set(opts.sparsities)):
        variants += [(0.0, "-")] if s == 0 else [(s, scope) for scope in opts.scopes]
    return variants


def run_compress(model: nn.Module, predictor: Predictor, rep: Representation, cfg: FitConfig, splits: Any,
                 out: str | Path, opts: CompressOptions) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every NeRN variant and baseline as a file, measured from the file read back; writes the table and figure."""
    check_options(opts)
    out = Path(out)
    files = out / "files"
    start = time.perf_counter()
    originals = conv_weights(model, rep.layers)
    iterations = opts.finetune_iterations or default_finetune_iterations(cfg, splits)
    lr = opts.finetune_lr or cfg.optim.lr / 5
    original_top1 = _accuracy(model, splits, cfg)
    rows = []
    jobs = len(nern_variants(opts)) + len(baseline_variants(opts))
    bar = tqdm(total=jobs * len(opts.precisions), desc="compress", disable=not cfg.progress, dynamic_ncols=True)
    for sparsity, scope, ft in nern_variants(opts):
        pruned, masks = pruned_predictor(predictor, sparsity, scope if sparsity else "global")
        if ft != "none":
            pruned = finetune_pruned(pruned, masks, cfg, model, rep, splits, iterations, lr, ft == "data-free",
                                     out, cfg.progress)
        for precision in opts.precisions:
            base = {"representation": "nern", "sparsity": sparsity, "scope": scope, "finetune": ft,
                    "precision": precision, "achieved_sparsity": mask_sparsity(masks) if masks else 0.0,
                    "finetune_iterations": iterations if ft != "none" else 0}
            enc = encode_nern(pruned, masks, precision, rep, cfg.embedding, model)
            rows.append(_measure(enc, base, files, opts, splits, cfg, originals, rep.layers))
            bar.update(1)
    cpu_model = copy.deepcopy(model).cpu()
    for sparsity, scope in baseline_variants(opts):
        weights = prunable_network_weights(cpu_model)
        masks = magnitude_masks(weights, sparsity, scope) if sparsity else {}
        for precision in opts.precisions:
            base = {"representation": "original", "sparsity": sparsity, "scope": scope, "finetune": "none",
                    "precision": precision, "achieved_sparsity": mask_sparsity(masks) if masks else 0.0,
                    "finetune_iterations": 0}
            pruned = copy.deepcopy(cpu_model)
            apply_masks(pruned, masks)
            rows.append(_measure(encode_network(pruned, masks, precision), base, files, opts, splits, cfg,
                                 originals, rep.layers))
            bar.update(1)
    bar.close()
    fp32 = next(r["bytes"] for r in rows if r["representation"] == "original" and r["sparsity"] == 0
                and r["precision"] == "fp32") if 0.0 in opts.sparsities and "fp32" in opts.precisions else None
    for row in rows:
        row["label"] = _label(row)
        row["ratio_vs_original_fp32"] = row["bytes"] / fp32 if fp32 else None
        row["delta_top1"] = row["top1"] - original_top1
    metrics = summary_metrics(rows, original_top1, opts, iterations, lr, time.perf_counter() - start)
    write_outputs(out, rows, metrics, cfg)
    return rows, metrics


def summary_metrics(rows: list[dict[str, Any]], original_top1: float, opts: CompressOptions, iterations: int,
                    lr: float, seconds: float) -> dict[str, Any]:
    """Scalars for metrics.json and MLflow: each unpruned file's bytes and accuracy, per representation."""
    metrics: dict[str, Any] = {"original_top1": original_top1, "compressor": opts.compressor,
                               "finetune_iterations": iterations, "finetune_lr": lr, "variants": len(rows),
                               "wall_seconds": seconds}
    for row in rows:
        if row["sparsity"] == 0:
            key = f"{row['representation']}_{row['precision']}"
            metrics[f"{key}_bytes"] = row["bytes"]
            metrics[f"{key}_top1"] = row["top1"]
    metrics["frontier"] = {rep: pareto_front([r for r in rows if r["representation"] == rep])
                           for rep in ("nern", "original")}
    return metrics


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats in both bytes and accuracy, smallest first."""
    front, best = [], -math.inf
    for row in sorted(rows, key=lambda r: (r["bytes"], -r["top1"])):
        if row["top1"] > best:
            front.append({"label": row["label"], "bytes": row["bytes"], "top1": row["top1"]})
            best = row["top1"]
    return front


# ---------------------------------------------------------------------------------------------------------
# Table and figure

TABLE_COLUMNS = {"representation": "representation", "sparsity": "sparsity", "scope": "scope",
                 "finetune": "fine-tune", "precision": "precision", "bytes": "bytes on disk",
                 "ratio_vs_original_fp32": "ratio vs original fp32", "top1": "top-1", "delta_top1": "Δ top-1",
                 "predictor_bytes": "predictor bytes", "verbatim_bytes": "verbatim bytes",
                 "permutation_bytes": "permutation bytes", "weights_bytes": "weights bytes"}
CSV_FILE, MD_FILE, FIGURE_FILE = "compression.csv", "compression.md", "accuracy_vs_bytes.png"
METRICS_FILE = "metrics.json"


def write_outputs(out: Path, rows: list[dict[str, Any]], metrics: dict[str, Any], cfg: FitConfig) -> None:
    import pandas as pd

    from nern.tables import to_markdown

    df = pd.DataFrame(rows)
    front = ["label", "representation", "sparsity", "scope", "finetune", "precision", "bytes", "top1"]
    df = df[front + [c for c in df.columns if c not in front]]
    with atomic_path(out / CSV_FILE) as tmp:
        df.to_csv(tmp, index=False)
    shown = df[[c for c in TABLE_COLUMNS if c in df.columns]].rename(columns=TABLE_COLUMNS)
    caption = (f"**Meta-compression: bytes on disk ({metrics['compressor']} on top of every file) and test top-1 "
               f"measured on the network rebuilt from the file read back. Original network: "
               f"{metrics['original_top1']:.2f}%. Fine-tunes: {metrics['finetune_iterations']} iterations.**\n\n")
    with atomic_path(out / MD_FILE) as tmp:
        tmp.write_text(caption + to_markdown(shown))
    plot_accuracy_vs_bytes(rows, metrics["original_top1"], out / FIGURE_FILE, metrics["compressor"])
    write_json(out / METRICS_FILE, metrics)  # last: its presence means the stage finished


FAMILY_STYLE = {("nern", "none"): ("tab:blue", "NeRN"), ("nern", "data"): ("tab:green", "NeRN + fine-tune"),
                ("nern", "data-free"): ("tab:olive", "NeRN + data-free fine-tune"),
                ("original", "none"): ("tab:red", "original network")}
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "int6": "D", "int4": "v"}


def plot_accuracy_vs_bytes(rows: list[dict[str, Any]], original_top1: float, path: Path, compressor: str) -> None:
    """All variants as points (colour: family, marker: precision), each family's Pareto front as a line."""
    from nern.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (rep, ft), (colour, name) in FAMILY_STYLE.items():
        family = [r for r in rows if r["representation"] == rep and r["finetune"] == ft]
        if not family:
            continue
        for precision, marker in PRECISION_MARKERS.items():
            pts = [r for r in family if r["precision"] == precision]
            if pts:
                ax.scatter([r["bytes"] for r in pts], [r["top1"] for r in pts], c=colour, marker=marker, s=28,
                           alpha=0.75, edgecolors="none")
        front = pareto_front(family)
        ax.plot([r["bytes"] for r in front], [r["top1"] for r in front], color=colour, label=name, lw=1.2)
    for precision, marker in PRECISION_MARKERS.items():
        if any(r["precision"] == precision for r in rows):
            ax.scatter([], [], c="grey", marker=marker, label=precision)
    ax.axhline(original_top1, color="black", ls=":", lw=1, label=f"original {original_top1:.2f}%")
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes on disk (whole file, {compressor})")
    ax.set_ylabel("test top-1 (%) of the network read back")
    ax.set_title("Accuracy vs bytes on disk: NeRN variants and codecs on the original")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# CLI


def stage_config(args: argparse.Namespace) -> FitConfig:
    """The fit's own config (data, embedding, losses) from the predictor file, then --model, --config, --set."""
    from nern.artifacts import read_metadata
    from nern.cli import _model_base

    stored = read_metadata(args.predictor).get("config")
    if not isinstance(stored, dict):
        raise NernError(f"{args.predictor} holds no fit config; pass the predictor.safetensors written by `nern fit`")
    base = copy.deepcopy(stored)
    base["model"] = {**base.get("model", {}), **_model_base(args.model).get("model", {})}
    return load_config(FitConfig, args.config, args.set, base=base)


def load_inputs(args: argparse.Namespace) -> tuple[FitConfig, nn.Module, Predictor, Representation, Any]:
    """Config, original network, predictor, representation and data splits: what both application stages need."""
    from nern import data as data_mod
    from nern import models
    from nern.fit import load_predictor

    cfg = stage_config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = models.load_model(cfg.model)
    predictor, rep, fitted = load_predictor(args.predictor, model)
    # how to decode is the file's business: --set may change data or device, never the representation
    cfg = dataclasses.replace(cfg, embedding=fitted.embedding, predictor=fitted.predictor, represent=fitted.represent)
    splits = data_mod.build_splits(cfg.data, seed=cfg.seed)
    data_mod.check_compatible(splits.test.info, cfg.model.in_channels)
    return cfg, model, predictor, rep, splits


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NernError(f"{what} {text!r} must be comma-separated numbers, e.g. 0,0.5,0.7,0.9") from None


def parse_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def cmd_compress(args: argparse.Namespace) -> None:
    from nern.cli import _log_outputs, _tracker

    opts = CompressOptions(parse_floats(args.sparsities, "--sparsities"), parse_names(args.scopes),
                           parse_names(args.finetune), parse_names(args.precisions), args.finetune_iterations,
                           args.finetune_lr, args.compressor, args.keep_files == "all")
    check_options(opts)
    cfg, model, predictor, rep, splits = load_inputs(args)
    out = Path(args.out)
    with _tracker(args, "compress") as tracker:
        options = {f"compress.{k}": v for k, v in dataclasses.asdict(opts).items()}
        tracker.log_params({**flatten(to_dict(cfg)), **options, "predictor_file": args.predictor})
        rows, metrics = run_compress(model, predictor, rep, cfg, splits, out, opts)
        _log_outputs(tracker, out, {k: v for k, v in metrics.items() if k != "frontier"},
                     [CSV_FILE, MD_FILE, FIGURE_FILE, METRICS_FILE])
    nern_best = metrics.get("nern_int8_bytes"), metrics.get("nern_int8_top1")
    print(f"[compress] {len(rows)} files measured; original {metrics['original_top1']:.2f}%"
          + (f", NeRN int8 {nern_best[0]:,} B at {nern_best[1]:.2f}%" if nern_best[0] else "") + f" -> {out}")


def register_cli(subparsers: Any, name: str) -> None:
    from nern.cli import _common

    p = subparsers.add_parser(name, help="prune/quantise a fitted NeRN into real files; accuracy vs bytes on disk")
    _common(p, f"output directory ({CSV_FILE}, {MD_FILE}, {FIGURE_FILE}, {METRICS_FILE}, files/)")
    p.add_argument("--model", required=True, help="the original network's checkpoint the predictor was fitted to")
    p.add_argument("--predictor", required=True, help="predictor.safetensors from `nern fit`")
    p.add_argument("--sparsities", default="0,0.5,0.7,0.9", help="pruning fractions of the predictor's (and, for "
                   "the baseline, the original's) weights, comma-separated")
    p.add_argument("--scopes", default="global", help="magnitude-pruning scopes: global and/or layer (per-layer)")
    p.add_argument("--finetune", default="none,data,data-free",
                   help="after pruning: none, data (task images) and/or data-free (noise) fine-tunes")
    p.add_argument("--finetune-iterations", type=int, help="fine-tune length (default: 5%% of the fit's, 10..2000)")
    p.add_argument("--finetune-lr", type=float, help="fine-tune peak learning rate (default: the fit's / 5)")
    p.add_argument("--precisions", default="fp32,fp16,int8,int4", help=f"from {', '.join(PRECISIONS)}")
    p.add_argument("--compressor", default="zstd", choices=list(COMPRESSORS), help="lossless codec on every file")
    p.add_argument("--keep-files", default="all", choices=["all", "none"],
                   help="keep the measured files under OUT/files (none: delete each after measuring)")
    p.set_defaults(func=cmd_compress)

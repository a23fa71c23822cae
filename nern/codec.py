"""Lossless, tensor and container codecs: how a set of tensors becomes the bytes of one file, and back.

    container = MAGIC + codec id + lossless(safetensors(encoded tensors, JSON metadata))

- a pruned tensor is a bitmask (`packbits`) plus its kept values only;
- `fp16` stores values as float16; `intN` stores symmetric per-output-channel integers plus one float32 scale
  per channel (the scale given, e.g. a step learnt by `nern.qat`, or max |w| over the largest level), stored as
  float16 where that is lossless; a 1-D tensor (biases, BatchNorm) asked for `intN` gets one scale for the whole
  tensor (which 1-D tensors are asked so is the file writer's policy, `nern.network_files.tensor_precision`);
- N = 1, 2, 4 bits are bit-packed into whole bytes; other widths below 8 are stored one value per byte:
  packing 3 or 6 bits across byte boundaries hides the symbols from the entropy coder (zstd's Huffman stage:
  3-bit Gaussian levels, 26.9 KB one per byte vs 32.0 KB packed, entropy bound 25.9 KB);
- the lossless compressor on top is zstd or lzma.

Nothing here knows what the tensors mean: `nern.compress` decides what goes into a file.
"""

from __future__ import annotations

import json
import lzma
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from nern.artifacts import atomic_path
from nern.errors import NernError

FORMAT = "nern-compressed/2"  # /2: 3-, 5-, 6-bit values one per byte (/1 bit-packed them)
MAGIC = b"NERNZ\x01"
COMPRESSORS = {"zstd": 1, "lzma": 2}
ZSTD_LEVEL = 19
PRECISIONS = ("fp32", "fp16", "int8", "int7", "int6", "int5", "int4", "int3", "int2")
PACKED_BITS = (1, 2, 4)  # widths that tile a byte exactly
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
    """Unsigned integers < 2**bits -> a dense little-endian bitstream of `bits` bits each (uint8); widths that
    do not tile a byte stay one value per byte (see the module docstring)."""
    v = values.to(torch.uint8).reshape(-1).numpy()
    if bits not in PACKED_BITS:
        return torch.from_numpy(v.copy())
    planes = np.unpackbits(v[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `count` unsigned values as uint8."""
    p = packed.reshape(-1).numpy()
    if bits not in PACKED_BITS:
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


def compact_scale(scale: torch.Tensor) -> torch.Tensor:
    """The steps as float16 when that is lossless (a quantisation-aware fit rounds its steps so), else float32."""
    scale = scale.float()
    half = scale.half()
    return half if torch.equal(half.float(), scale) else scale


def fake_quantise(w: torch.Tensor, precision: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What a tensor becomes after encoding and decoding in memory (the expected read-back, for tests)."""
    tensors, spec = encode_tensor("t", w, precision, mask)
    return decode_tensor("t", spec, tensors)


def quantisable(t: torch.Tensor, precision: str) -> bool:
    """Integer codecs apply to float tensors of any rank: per output channel from 2-D up, per tensor in 1-D."""
    return bits_of(precision) > 0 and t.is_floating_point() and t.dim() >= 1 and t.numel() > 0


def _channel_rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as [channels, rest]: a 1-D tensor is one channel (one scale for all of it)."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def encode_tensor(name: str, t: torch.Tensor, precision: str, mask: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One tensor -> stored arrays (`name.values`, optional `.mask`, `.scale`) and the spec to decode them.

    `scale` (one step per output channel) replaces the max-|w| step of `intN`: a quantisation-aware fit's
    learnt steps, so the stored integers are exactly the ones it trained with."""
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
    if quantisable(t, precision):
        bits = bits_of(precision)
        rows = _channel_rows(t)
        row_mask = _channel_rows(mask.detach().cpu()) if mask is not None else None
        scale = channel_scales(rows, bits, row_mask) if scale is None else scale.detach().float().reshape(-1).cpu()
        levels = 2 ** (bits - 1) - 1
        unsigned = (quantise(rows, bits, scale).reshape(-1) + levels).to(torch.uint8)
        out[f"{name}.values"] = pack_bits(unsigned[keep] if keep is not None else unsigned, bits)
        out[f"{name}.scale"] = compact_scale(scale)
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
        scale = tensors[f"{name}.scale"].float()
        rows = torch.arange(numel) // (numel // scale.numel())  # one scale per channel, or one for a 1-D tensor
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
# The container


@dataclass
class Encoded:
    """Stored arrays, their decoding specs, the part each tensor belongs to, and file-level metadata."""

    tensors: dict[str, torch.Tensor]
    specs: dict[str, dict[str, Any]]
    parts: dict[str, str]
    meta: dict[str, Any]

    @classmethod
    def empty(cls, kind: str, meta: dict[str, Any]) -> Encoded:
        """A file of `kind` ("nern", "network") with no tensors yet."""
        return cls({}, {}, {}, {"format": FORMAT, "kind": kind, **meta})

    def add(self, name: str, t: torch.Tensor, precision: str, part: str, mask: torch.Tensor | None = None,
            scale: torch.Tensor | None = None) -> None:
        stored, spec = encode_tensor(name, t, precision, mask, scale)
        self.tensors.update(stored)
        self.specs[name] = {**spec, "part": part}
        for key in stored:
            self.parts[key] = part


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

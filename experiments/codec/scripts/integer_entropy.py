"""How many bytes an entropy coder could save on a quantised fit's predictor: per weight matrix, the empirical
(zeroth-order) entropy of the stored integers against what the codec's packing plus zstd makes of them.

A fit through learnt-step quantisers (predictor.quantise_bits) stores integers times steps. If their histogram
were peaked, an arithmetic coder would beat zstd by a wide margin and the file's bytes would not be
params x bits / 8. This prints the bound so that choice is measured, not guessed.

    python experiments/codec/scripts/integer_entropy.py results/.../predictor.safetensors [more.safetensors ...]
Prints a table per file and ONE JSON line per file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nern import codec
from nern.artifacts import load_tensors
from nern.predictor_file import fitted_steps


def entropy_bits(values: np.ndarray) -> float:
    """Zeroth-order entropy of the symbols, in bits per symbol."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def integers(path: Path) -> tuple[dict[str, np.ndarray], int]:
    """The stored integers of every quantised weight matrix, and the fit's bit width."""
    tensors, meta = load_tensors(path)
    bits = (meta.get("config") or {}).get("predictor", {}).get("quantise_bits")
    steps = fitted_steps(path)
    if not steps or not bits:
        raise SystemExit(f"{path}: not a quantised fit (no learnt steps); fit with predictor.quantise_bits")
    out = {}
    for name, step in steps.items():
        out[name] = codec.quantise(tensors[f"predictor.{name}"], int(bits), step.float()).numpy()
    return out, int(bits)


def report(path: Path) -> dict:
    ints, bits = integers(path)
    levels = 2 ** (bits - 1) - 1
    rows = []
    for name, q in ints.items():
        rows.append({"tensor": name, "count": int(q.size), "entropy_bits": round(entropy_bits(q), 4),
                     "clipped_fraction": round(float((np.abs(q) == levels).mean()), 4)})
    flat = np.concatenate([q.reshape(-1) for q in ints.values()])
    unsigned = torch.from_numpy((flat + levels).astype(np.uint8))
    packed = codec.lossless_compress(codec.pack_bits(unsigned, bits).numpy().tobytes(), "zstd")
    bound = sum(r["entropy_bits"] * r["count"] for r in rows) / 8
    return {"file": str(path), "bits": bits, "weights": int(flat.size), "tensors": rows,
            "entropy_bound_bytes": round(bound), "codec_zstd_bytes": len(packed),
            "saving_bound": round(1 - bound / len(packed), 4),
            "bits_per_weight_codec": round(8 * len(packed) / flat.size, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    for path in parser.parse_args().files:
        r = report(path)
        print(f"{path}  (int{r['bits']}, {r['weights']} weights)")
        for row in r["tensors"]:
            print(f"  {row['tensor']:<12} {row['count']:>7}  H = {row['entropy_bits']:.3f} bits  "
                  f"at +-max: {100 * row['clipped_fraction']:.1f}%")
        print(f"  entropy bound {r['entropy_bound_bytes']} B, codec (packing + zstd) {r['codec_zstd_bytes']} B: "
              f"an ideal zeroth-order coder saves at most {100 * r['saving_bound']:.1f}%")
        print(json.dumps(r))


if __name__ == "__main__":
    main()

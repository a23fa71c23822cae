"""Benchmark of the zero-byte symmetry permutation against the coordinate permutations (docs/METHOD.md §6, §12).

For the public CIFAR-10 ResNet20 and ResNet56 (option A, every 3x3 conv represented), chain quality (mean
cosine of kernels on consecutive grid slots, the figure `nern permute` reports; higher is better) of:
- none: the original grid, nothing stored;
- symmetry (features input / both): the original network permuted along its weight-space symmetries,
  identity coordinates, nothing stored;
- infilter, crossfilter: coordinate permutations, stored (their int16 bytes are printed; the zstd figure of
  issue #15 is smaller).
`filter_quality` is the same measure along the other grid axis (kernels (f, c) and (f+1, c) as neighbours),
which row-major chains ignore but a smooth predictor also sees. Each time is one run on this machine.
The last line printed is one JSON object with every figure.

    .venv/bin/python -m bench.symmetry [--archs resnet20]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from bench.harness import CHECKPOINTS, emit, machine, public_weights
from nern.config import ModelConfig
from nern.layers import conv_weights, find_conv_layers
from nern.models import load_model
from nern.permutation import chain_quality_of_positions, compute_permutations, permutation_bytes
from nern.symmetry import symmetry_permute


def _column_major(weights: list[torch.Tensor], positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same grid slots re-numbered column-major, so consecutive slots are filter neighbours."""
    out = []
    for weight, position in zip(weights, positions):
        cout, cin = weight.shape[:2]
        out.append((position % cin) * cout + position // cin)
    return out


def _qualities(model: torch.nn.Module, positions: list[torch.Tensor] | None = None) -> dict[str, float]:
    layers = find_conv_layers(model)
    weights = conv_weights(model, layers)
    if positions is None:
        positions = [torch.arange(layer.num_kernels) for layer in layers]
    return {"chain_quality": round(chain_quality_of_positions(weights, positions), 4),
            "filter_quality": round(chain_quality_of_positions(weights, _column_major(weights, positions)), 4)}


def bench_model(arch: str) -> dict[str, Any]:
    model = load_model(ModelConfig(arch=arch, shortcut="A", checkpoint=str(public_weights(arch))))
    result: dict[str, Any] = {"none": {**_qualities(model), "bytes": 0}}
    for features in ("input", "both"):
        permuted, report = symmetry_permute(model, features=features)
        result[f"symmetry_{features}"] = {**_qualities(permuted), "bytes": 0, "seconds": round(report["seconds"], 2),
                                          "free_groups": report["free_groups"], "groups": report["groups"]}
    weights = conv_weights(model, find_conv_layers(model))
    for mode in ("infilter", "crossfilter"):
        start = time.perf_counter()
        perms = compute_permutations(weights, mode, progress=False)
        seconds = time.perf_counter() - start
        result[mode] = {**_qualities(model, perms), "bytes": permutation_bytes(perms), "seconds": round(seconds, 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(CHECKPOINTS), help="comma-separated, from resnet20, resnet56")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    print("machine:", json.dumps(info))
    results: dict[str, Any] = {}
    for arch in args.archs.split(","):
        if not public_weights(arch).is_file():
            print(f"{arch}: {public_weights(arch)} is absent, skipped")
            continue
        results[arch] = bench_model(arch)
        print(f"{arch}:")
        for method, figures in results[arch].items():
            print(f"  {method:16s} chain {figures['chain_quality']:.4f}  filter {figures['filter_quality']:.4f}  "
                  f"stored {figures['bytes']:>7d} B  {figures.get('seconds', 0.0):6.2f} s")
    emit("symmetry", machine=info, results=results)


if __name__ == "__main__":
    main()

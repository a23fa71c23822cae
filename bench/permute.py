"""Benchmark of the coordinate permutations: wall time and chain quality, fast chain against the paper's greedy.

Parts (each timed in this one run, on this machine):
- ResNet56: every 3x3 conv of the public CIFAR-10 checkpoint (skipped, and said so, if the file is absent):
  infilter, crossfilter with the fast chain, crossfilter with the paper's greedy (the baseline), and auto.
- one Cout x Cin x 3 x 3 layer (512 x 512 by default) of Gaussian weights with a fixed seed: fast chain,
  infilter, and the exact greedy with a time limit; a greedy run cut short is extrapolated and labelled so.
- the 16 block-conv shapes of torchvision's ResNet18 (Gaussian weights): total time of crossfilter auto.
Torchvision's pretrained ResNet18 weights are used only if already on disk (nothing is downloaded).

Chain quality = mean cosine similarity of the kernels on consecutive grid slots (higher is better).
The last line printed is one JSON object with every figure.

    .venv/bin/python bench/permute.py            # full run (the 512x512 greedy baseline takes minutes)
    .venv/bin/python bench/permute.py --quick    # smoke run: small layer, short limits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nern import permutation as P  # noqa: E402

RESNET56 = Path("/work/shared/data/pretrained/resnet56-4bfd9763.th")
RESNET18_BLOCK_SHAPES = ([(64, 64)] * 4 + [(128, 64), (128, 128), (128, 128), (128, 128)]
                         + [(256, 128), (256, 256), (256, 256), (256, 256)]
                         + [(512, 256), (512, 512), (512, 512), (512, 512)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 128x128 layer, no ResNet18 sweep")
    p.add_argument("--side", type=int, default=None, help="Cout = Cin of the large Gaussian layer (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gaussian weights")
    p.add_argument("--baseline-limit-seconds", type=float, default=None,
                   help="time limit of the exact greedy on the large layer (default 900; 60 with --quick)")
    p.add_argument("--resnet56", type=Path, default=RESNET56, help="CIFAR ResNet56 checkpoint (.th)")
    p.add_argument("--skip-resnet18", action="store_true", help="skip the ResNet18 block-shape sweep")
    args = p.parse_args(argv)
    args.side = args.side or (128 if args.quick else 512)
    if args.baseline_limit_seconds is None:
        args.baseline_limit_seconds = 60.0 if args.quick else 900.0
    args.skip_resnet18 = args.skip_resnet18 or args.quick
    return args


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu (the permutation code runs on the CPU only)",
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def position_of(chain: torch.Tensor) -> torch.Tensor:
    position = torch.empty_like(chain)
    position[chain] = torch.arange(chain.numel())
    return position


def resnet56_weights(path: Path) -> list[tuple[str, torch.Tensor]] | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return [(k.removeprefix("module."), v) for k, v in state.items() if v.dim() == 4 and tuple(v.shape[-2:]) == (3, 3)]


def bench_resnet56(path: Path) -> dict[str, Any]:
    named = resnet56_weights(path)
    if named is None:
        print(f"[resnet56] {path} not found: part skipped")
        return {"skipped": f"{path} not found"}
    weights = [w for _, w in named]
    kernels = sum(w.shape[0] * w.shape[1] for w in weights)
    print(f"[resnet56] {len(weights)} represented 3x3 convs, {kernels} kernels")
    out: dict[str, Any] = {"layers": len(weights), "kernels": kernels}
    identity = [P.identity_permutation(w.shape[0], w.shape[1]) for w in weights]
    out["identity_quality"] = P.chain_quality_of_positions(weights, identity)
    runs = {
        "infilter": lambda w: P.infilter_permutation(w),
        "crossfilter_fast": lambda w: position_of(P.fast_chain(w.reshape(w.shape[0] * w.shape[1], -1))),
        "crossfilter_greedy": lambda w: P.crossfilter_permutation(w, method="greedy"),
        "crossfilter_auto": lambda w: P.crossfilter_permutation(w, method="auto"),
    }
    per_layer: dict[str, list[float]] = {}
    for name, fn in runs.items():
        perms, seconds = timed(lambda: [fn(w) for w in weights])
        assert all(P.is_bijection(p, w.shape[0] * w.shape[1]) for p, w in zip(perms, weights))
        per_layer[name] = [P.chain_quality_of_positions([w], [p]) for w, p in zip(weights, perms)]
        out[name] = {"seconds": round(seconds, 3), "quality": P.chain_quality_of_positions(weights, perms)}
        print(f"[resnet56] {name:<20} {seconds:8.2f} s   quality {out[name]['quality']:.5f}")
    not_worse = sum(f >= g for f, g in zip(per_layer["crossfilter_fast"], per_layer["crossfilter_greedy"]))
    out["fast_not_worse_than_greedy_layers"] = f"{not_worse}/{len(weights)}"
    out["worst_layer_fast_minus_greedy"] = min(
        f - g for f, g in zip(per_layer["crossfilter_fast"], per_layer["crossfilter_greedy"]))
    print(f"[resnet56] fast >= greedy on {not_worse}/{len(weights)} layers")
    return out


def greedy_with_limit(kernels: torch.Tensor, limit: float) -> dict[str, Any]:
    """The exact greedy, stopped at `limit` seconds and then extrapolated by the work left (labelled)."""
    n = kernels.shape[0]
    chain, seconds = timed(P.greedy_chain, kernels, time_limit_s=limit)
    done = chain.numel()
    if done == n:
        return {"seconds": round(seconds, 3), "quality": P.chain_quality(kernels, chain), "extrapolated": False}
    # each step's matvec runs over the still-unvisited kernels: time ~ sum over steps of (n - t)
    work_done = done * n - done * (done - 1) / 2
    work_all = n * (n + 1) / 2
    return {
        "seconds": round(seconds * work_all / work_done, 1),
        "extrapolated": True,
        "basis": f"stopped after {seconds:.0f} s at step {done} of {n}; time per step taken proportional to "
                 "the kernels still unvisited",
        "quality": None,
        "quality_of_partial_chain": P.chain_quality(kernels, chain),
    }


def bench_large_layer(side: int, seed: int, limit: float) -> dict[str, Any]:
    weight = torch.randn(side, side, 3, 3, generator=torch.Generator().manual_seed(seed))
    kernels = weight.reshape(side * side, 9)
    out: dict[str, Any] = {"shape": [side, side, 3, 3], "weights": f"Gaussian, torch seed {seed}",
                           "identity_quality": P.chain_quality(kernels, torch.arange(side * side))}
    print(f"[layer {side}x{side}] {side * side} kernels; torchvision ResNet18 weights: "
          f"{'found' if torchvision_weights() else 'not available offline (nothing is downloaded)'}")
    chain, seconds = timed(P.fast_chain, kernels)
    again, _ = timed(P.fast_chain, kernels)
    out["fast"] = {"seconds": round(seconds, 3), "quality": P.chain_quality(kernels, chain),
                   "deterministic": bool(torch.equal(chain, again))}
    print(f"[layer {side}x{side}] fast      {seconds:8.2f} s   quality {out['fast']['quality']:.5f}")
    position, seconds = timed(P.infilter_permutation, weight)
    out["infilter"] = {"seconds": round(seconds, 3),
                       "quality": P.chain_quality(kernels, P.chain_of_positions(position))}
    print(f"[layer {side}x{side}] infilter  {seconds:8.2f} s   quality {out['infilter']['quality']:.5f}")
    print(f"[layer {side}x{side}] greedy (limit {limit:.0f} s) ...", flush=True)
    out["greedy"] = greedy_with_limit(kernels, limit)
    g = out["greedy"]
    label = "extrapolated" if g["extrapolated"] else "measured"
    print(f"[layer {side}x{side}] greedy    {g['seconds']:8.1f} s ({label})   quality {g['quality']}")
    if g["quality"] is not None:
        out["fast_minus_greedy_quality"] = out["fast"]["quality"] - g["quality"]
        out["speedup"] = round(g["seconds"] / out["fast"]["seconds"], 1)
    return out


def torchvision_weights() -> Path | None:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(hub.glob("resnet18-*.pth")) if hub.is_dir() else []
    return found[0] if found else None


def bench_resnet18_shapes(seed: int) -> dict[str, Any]:
    path = torchvision_weights()
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = [v for k, v in state.items() if k.startswith("layer") and "conv" in k and v.dim() == 4]
        source = f"torchvision weights {path.name}"
    else:
        gen = torch.Generator().manual_seed(seed)
        weights = [torch.randn(co, ci, 3, 3, generator=gen) for co, ci in RESNET18_BLOCK_SHAPES]
        source = "Gaussian weights of the 16 block-conv shapes (torchvision weights not available offline)"
    print(f"[resnet18] {source}")
    perms, seconds = timed(P.compute_permutations, weights, "crossfilter", "auto", progress=False)
    quality = P.chain_quality_of_positions(weights, perms)
    print(f"[resnet18] crossfilter auto over {len(weights)} layers: {seconds:.1f} s, quality {quality:.5f}")
    return {"weights": source, "layers": len(weights), "crossfilter_auto_seconds": round(seconds, 1),
            "quality": quality, "bytes": P.permutation_bytes(perms)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    config = {"quick": args.quick, "side": args.side, "seed": args.seed,
              "baseline_limit_seconds": args.baseline_limit_seconds, "resnet56": str(args.resnet56),
              "resnet18_sweep": not args.skip_resnet18,
              "fast": {"neighbours": P.NEIGHBOURS, "cell_size": P.CELL_SIZE, "probes": P.PROBES,
                       "two_opt_rounds": P.TWO_OPT_ROUNDS, "or_opt_rounds": P.OR_OPT_ROUNDS,
                       "auto_exact_max": P.AUTO_EXACT_MAX}}
    print("config:", json.dumps(config))
    print("machine:", json.dumps(info))
    result: dict[str, Any] = {"bench": "permute", "config": config, "machine": info}
    result["resnet56"] = bench_resnet56(args.resnet56)
    result["large_layer"] = bench_large_layer(args.side, args.seed, args.baseline_limit_seconds)
    if not args.skip_resnet18:
        result["resnet18_shapes"] = bench_resnet18_shapes(args.seed)
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()

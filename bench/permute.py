"""Benchmark of the coordinate permutations: wall time and chain quality of each chain method, with LKH as
the ceiling, and (with --before REV) the same figures for nern/permutation.py as it was at git revision REV.

Parts (each timed in this one run, on this machine, one thread):
- ResNet20 and ResNet56: every 3x3 conv of the public CIFAR-10 checkpoints (a missing file is skipped, and
  said so): infilter, crossfilter fast / greedy (the paper's) / auto, and fast at REV; how many layers' fast
  chains are identical to REV's. Ceiling: LKH (elkai) on one layer of every distinct shape (the last one).
- one Cout x Cin x 3 x 3 layer (512 x 512 by default) of Gaussian weights with a fixed seed: fast (now and
  at REV, alternated, the faster of two runs each), infilter, and the exact greedy with a time limit; a
  greedy run cut short is extrapolated and labelled so. LKH cannot take this layer (elkai needs the full
  N^2 distance matrix), so its ceiling is measured on a 64 x 64 layer from the same generator instead.
- the 16 block-conv shapes of torchvision's ResNet18 (Gaussian weights): total time of crossfilter auto.

Chain quality = mean cosine similarity of the kernels on consecutive grid slots (higher is better).
The last line printed is one JSON object with every figure.

    .venv/bin/python -m bench.permute --before 4d5c60b     # before/after (4d5c60b: the hand-written k-means)
    .venv/bin/python -m bench.permute --quick              # smoke run: small layer, short limits
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.harness import CHECKPOINTS, ROOT, emit, machine, public_weights
from nern import chain as C
from nern import permutation as P

NETWORKS = {arch: public_weights(arch) for arch in CHECKPOINTS}
RESNET18_BLOCK_SHAPES = ([(64, 64)] * 4 + [(128, 64), (128, 128), (128, 128), (128, 128)]
                         + [(256, 128), (256, 256), (256, 256), (256, 256)]
                         + [(512, 256), (512, 512), (512, 512), (512, 512)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 128x128 layer, ResNet20 only, no ResNet18")
    p.add_argument("--side", type=int, default=None, help="Cout = Cin of the large Gaussian layer (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gaussian weights")
    p.add_argument("--baseline-limit-seconds", type=float, default=None,
                   help="time limit of the exact greedy on the large layer (default 900; 60 with --quick)")
    p.add_argument("--lkh-seconds", type=float, default=None,
                   help="LKH search time per layer (default 10; 2 with --quick); its preprocessing comes on top")
    p.add_argument("--before", metavar="REV", help="also run the fast chain of nern/permutation.py at git REV")
    p.add_argument("--skip-resnet18", action="store_true", help="skip the ResNet18 block-shape sweep")
    args = p.parse_args(argv)
    args.side = args.side or (128 if args.quick else 512)
    if args.baseline_limit_seconds is None:
        args.baseline_limit_seconds = 60.0 if args.quick else 900.0
    if args.lkh_seconds is None:
        args.lkh_seconds = 2.0 if args.quick else 10.0
    args.skip_resnet18 = args.skip_resnet18 or args.quick
    return args


def permutation_module_at(rev: str) -> ModuleType:
    """nern/permutation.py as it was at git revision `rev`, imported under another name (same process,
    so before and after share the machine's load)."""
    source = subprocess.run(["git", "show", f"{rev}:nern/permutation.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"permutation_at_{rev}", None))
    exec(compile(source, f"{rev}:nern/permutation.py", "exec"), module.__dict__)
    return module


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def position_of(chain: torch.Tensor) -> torch.Tensor:
    position = torch.empty_like(chain)
    position[chain] = torch.arange(chain.numel())
    return position


def flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0] * w.shape[1], -1)


def conv3x3_weights(path: Path) -> list[torch.Tensor] | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return [v for v in state.values() if v.dim() == 4 and tuple(v.shape[-2:]) == (3, 3)]


def network_runs(before: ModuleType | None) -> dict[str, Any]:
    runs = {
        "infilter": P.infilter_permutation,
        "crossfilter_fast": lambda w: position_of(C.fast_chain(flat(w))),
        "crossfilter_greedy": lambda w: P.crossfilter_permutation(w, method="greedy"),
        "crossfilter_auto": lambda w: P.crossfilter_permutation(w, method="auto"),
    }
    if before is not None:
        runs["crossfilter_fast_before"] = lambda w: position_of(before.fast_chain(flat(w)))
    return runs


def bench_network(name: str, path: Path, before: ModuleType | None, lkh_seconds: float) -> dict[str, Any]:
    weights = conv3x3_weights(path)
    if weights is None:
        print(f"[{name}] {path} not found: part skipped")
        return {"skipped": f"{path} not found"}
    print(f"[{name}] {len(weights)} represented 3x3 convs, {sum(flat(w).shape[0] for w in weights)} kernels")
    out: dict[str, Any] = {"layers": len(weights), "kernels": sum(flat(w).shape[0] for w in weights)}
    out["identity_quality"] = P.chain_quality_of_positions(
        weights, [P.identity_permutation(w.shape[0], w.shape[1]) for w in weights])
    perms: dict[str, list[torch.Tensor]] = {}
    for run, fn in network_runs(before).items():
        perms[run], seconds = timed(lambda: [fn(w) for w in weights])
        assert all(P.is_bijection(p, flat(w).shape[0]) for p, w in zip(perms[run], weights))
        out[run] = {"seconds": round(seconds, 3), "quality": P.chain_quality_of_positions(weights, perms[run])}
        print(f"[{name}] {run:<24} {seconds:8.2f} s   quality {out[run]['quality']:.5f}")
    per_layer = {run: [P.chain_quality_of_positions([w], [p]) for w, p in zip(weights, ps)]
                 for run, ps in perms.items()}
    fast, greedy = per_layer["crossfilter_fast"], per_layer["crossfilter_greedy"]
    out["fast_not_worse_than_greedy_layers"] = f"{sum(f >= g for f, g in zip(fast, greedy))}/{len(weights)}"
    out["worst_layer_fast_minus_greedy"] = min(f - g for f, g in zip(fast, greedy))
    if before is not None:
        same = sum(torch.equal(a, b) for a, b in zip(perms["crossfilter_fast"], perms["crossfilter_fast_before"]))
        out["fast_identical_to_before_layers"] = f"{same}/{len(weights)}"
        print(f"[{name}] fast chains identical to --before on {same}/{len(weights)} layers")
    out["lkh_ceiling"] = lkh_ceiling(name, weights, per_layer, lkh_seconds)
    return out


def lkh_ceiling(name: str, weights: list[torch.Tensor], per_layer: dict[str, list[float]],
                seconds: float) -> dict[str, Any]:
    """LKH on the last layer of every distinct shape, and every method's pooled quality on those layers."""
    last = {tuple(w.shape[:2]): i for i, w in enumerate(weights)}
    picked = sorted(last.values())
    rows, lkh_quality, total = [], [], 0.0
    for i in picked:
        kernels = flat(weights[i])
        chain, took = timed(C.lkh_chain, kernels, seconds)
        assert sorted(chain.tolist()) == list(range(kernels.shape[0]))
        total += took
        lkh_quality.append(C.chain_quality(kernels, chain))
        rows.append({"layer": i, "kernels": kernels.shape[0], "seconds": round(took, 2),
                     "lkh": lkh_quality[-1], **{run: q[i] for run, q in per_layer.items()}})
        print(f"[{name}] lkh layer {i:2d} ({kernels.shape[0]:5d} kernels) {took:7.1f} s   quality "
              f"{lkh_quality[-1]:.5f}   fast {per_layer['crossfilter_fast'][i]:.5f}   "
              f"greedy {per_layer['crossfilter_greedy'][i]:.5f}")
    pairs = [flat(weights[i]).shape[0] - 1 for i in picked]

    def pooled(values: list[float]) -> float:
        return sum(v * m for v, m in zip(values, pairs)) / sum(pairs)

    summary = {"lkh": pooled(lkh_quality), **{run: pooled([q[i] for i in picked]) for run, q in per_layer.items()}}
    print(f"[{name}] on those layers: " + ", ".join(f"{k} {v:.5f}" for k, v in summary.items()))
    return {"search_seconds_per_layer": seconds, "seconds": round(total, 1), "layers": rows, "pooled": summary}


def greedy_with_limit(kernels: torch.Tensor, limit: float) -> dict[str, Any]:
    """The exact greedy, stopped at `limit` seconds and then extrapolated by the work left (labelled)."""
    n = kernels.shape[0]
    chain, seconds = timed(C.greedy_chain, kernels, time_limit_s=limit)
    done = chain.numel()
    if done == n:
        return {"seconds": round(seconds, 3), "quality": C.chain_quality(kernels, chain), "extrapolated": False}
    # each step's matvec runs over the still-unvisited kernels: time ~ sum over steps of (n - t)
    work_done = done * n - done * (done - 1) / 2
    work_all = n * (n + 1) / 2
    return {
        "seconds": round(seconds * work_all / work_done, 1),
        "extrapolated": True,
        "basis": f"stopped after {seconds:.0f} s at step {done} of {n}; time per step taken proportional to "
                 "the kernels still unvisited",
        "quality": None,
        "quality_of_partial_chain": C.chain_quality(kernels, chain),
    }


def bench_large_layer(side: int, seed: int, limit: float, before: ModuleType | None) -> dict[str, Any]:
    weight = torch.randn(side, side, 3, 3, generator=torch.Generator().manual_seed(seed))
    kernels = flat(weight)
    out: dict[str, Any] = {"shape": [side, side, 3, 3], "weights": f"Gaussian, torch seed {seed}",
                           "identity_quality": C.chain_quality(kernels, torch.arange(side * side))}
    tag = f"[layer {side}x{side}]"
    print(f"{tag} {side * side} kernels")
    chains = {"fast": C.fast_chain} if before is None else {"fast_before": before.fast_chain, "fast": C.fast_chain}
    found: dict[str, list[tuple[torch.Tensor, float]]] = {run: [] for run in chains}
    for _ in range(2):  # alternated, the faster of two: the machine's load drifts within minutes
        for run, fn in chains.items():
            found[run].append(timed(fn, kernels))
    for run, ((chain, first), (again, second)) in found.items():
        assert sorted(chain.tolist()) == list(range(side * side))
        out[run] = {"seconds": round(min(first, second), 3), "both_seconds": [round(first, 2), round(second, 2)],
                    "quality": C.chain_quality(kernels, chain), "deterministic": bool(torch.equal(chain, again))}
        print(f"{tag} {run:<12} {out[run]['seconds']:8.2f} s (runs {first:.1f}, {second:.1f})   "
              f"quality {out[run]['quality']:.5f}")
    if before is not None:
        out["fast_speedup_over_before"] = round(out["fast_before"]["seconds"] / out["fast"]["seconds"], 2)
        out["fast_minus_before_quality"] = out["fast"]["quality"] - out["fast_before"]["quality"]
    position, seconds = timed(P.infilter_permutation, weight)
    out["infilter"] = {"seconds": round(seconds, 3),
                       "quality": C.chain_quality(kernels, P.chain_of_positions(position))}
    print(f"{tag} infilter     {seconds:8.2f} s   quality {out['infilter']['quality']:.5f}")
    print(f"{tag} greedy (limit {limit:.0f} s) ...", flush=True)
    out["greedy"] = g = greedy_with_limit(kernels, limit)
    print(f"{tag} greedy       {g['seconds']:8.1f} s ({'extrapolated' if g['extrapolated'] else 'measured'})"
          f"   quality {g['quality']}")
    if g["quality"] is not None:
        out["fast_minus_greedy_quality"] = out["fast"]["quality"] - g["quality"]
        out["speedup"] = round(g["seconds"] / out["fast"]["seconds"], 1)
    out["lkh"] = {"skipped": f"{side * side} kernels: elkai takes the full distance matrix, at most "
                             f"{C.LKH_MAX} kernels; see gaussian_64x64 for the Gaussian ceiling"}
    return out


def bench_gaussian_ceiling(seed: int, lkh_seconds: float, before: ModuleType | None) -> dict[str, Any]:
    """Fast, greedy and LKH on a 64x64 Gaussian layer: how far below the ceiling the chains are."""
    kernels = flat(torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(seed)))
    runs = {"fast": C.fast_chain, "greedy": C.greedy_chain, "lkh": lambda k: C.lkh_chain(k, lkh_seconds)}
    if before is not None:
        runs["fast_before"] = before.fast_chain
    out: dict[str, Any] = {"shape": [64, 64, 3, 3], "weights": f"Gaussian, torch seed {seed}"}
    for run, fn in runs.items():
        chain, seconds = timed(fn, kernels)
        out[run] = {"seconds": round(seconds, 3), "quality": C.chain_quality(kernels, chain)}
        print(f"[gaussian 64x64] {run:<12} {seconds:8.2f} s   quality {out[run]['quality']:.5f}")
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
    torch.set_num_threads(1)
    before = permutation_module_at(args.before) if args.before else None
    info = {**machine(), "device": "cpu (the permutation code runs on the CPU only)"}
    config = {"quick": args.quick, "side": args.side, "seed": args.seed, "before": args.before,
              "baseline_limit_seconds": args.baseline_limit_seconds, "lkh_seconds": args.lkh_seconds,
              "networks": {k: str(v) for k, v in NETWORKS.items()}, "resnet18_sweep": not args.skip_resnet18,
              "fast": {"neighbours": C.NEIGHBOURS, "cell_size": C.CELL_SIZE, "probes": C.PROBES,
                       "exact_neighbours_max": C.EXACT_NEIGHBOURS_MAX, "two_opt_rounds": C.TWO_OPT_ROUNDS,
                       "or_opt_rounds": C.OR_OPT_ROUNDS, "auto_exact_max": C.AUTO_EXACT_MAX}}
    print("config:", json.dumps(config))
    print("machine:", json.dumps(info))
    result: dict[str, Any] = {"config": config, "machine": info}
    for name, path in NETWORKS.items():
        if not (args.quick and name != "resnet20"):
            result[name] = bench_network(name, path, before, args.lkh_seconds)
    result["large_layer"] = bench_large_layer(args.side, args.seed, args.baseline_limit_seconds, before)
    result["gaussian_64x64"] = bench_gaussian_ceiling(args.seed, args.lkh_seconds, before)
    if not args.skip_resnet18:
        result["resnet18_shapes"] = bench_resnet18_shapes(args.seed)
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    emit("permute", **dict(sorted(result.items())))


if __name__ == "__main__":
    main()

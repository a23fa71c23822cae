"""Fit throughput benchmark: seconds per NeRN iteration and achieved FLOP/s against a dense matmul.

For the paper's ResNet20 setting (h=180, batch 256, random_weighted_batch 4096) and ResNet56 (h=320), it
times `Fitter.step()` (predict all kernels, sampled-gradient pass, teacher + reconstructed network,
losses, Ranger step) on synthetic images (timing does not depend on pixel values), counts the FLOPs of one
iteration with `torch.utils.flop_counter.FlopCounterMode` (predictor and network, forward and backward),
and divides the achieved FLOP/s by a dense fp32 matmul's FLOP/s measured in the same process.
Prints its configuration, the machine, and finally ONE JSON line.

    python -m bench.fit [--device cuda] [--iterations 10] [--archs resnet20,resnet56] [--set key=value ...]
    python -m bench.fit --archs resnet20 --set compile=true --compare-eager --iterations 10   # fused vs eager
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.harness import build, emit, fit_config, machine, matmul_flops, public_weights, sync

SETTINGS = {"resnet20": 180, "resnet56": 320}


def synthetic_splits(n: int = 2048):
    import torch

    from nern.data import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo, ImageSet, Splits

    info = DatasetInfo(3, 10, IMAGENET_MEAN, IMAGENET_STD, 32)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    part = ImageSet(images[:512], labels[:512], info)
    return Splits(ImageSet(images, labels, info), part, part)


def bench_arch(arch: str, hidden: int, args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from nern.fit import Fitter
    from nern.models import build_model, load_weights

    cfg = fit_config("paper", [f"model.arch={arch}", f"predictor.hidden={hidden}", "iterations=100000", "epochs=null",
                               f"device={args.device}", "progress=false", *args.set])
    model = build_model(cfg.model)
    if public_weights(arch).is_file():  # the public weights (option A shortcuts); else the init
        load_weights(model, str(public_weights(arch)))
    setup = build(cfg, model=model, splits=synthetic_splits())
    out = Path(tempfile.mkdtemp(prefix="nern-bench-fit-"))
    # FLOPs are counted on an eager step (the counter cannot see inside compiled graphs); the math is the same.
    eager = Fitter(replace(cfg, compile=False), setup, out)
    eager.step()
    with FlopCounterMode(display=False) as counter:
        eager.step()
    flops = counter.get_total_flops()
    compare = args.compare_eager and cfg.compile
    if not compare:
        eager.close()
    fitter = Fitter(cfg, setup, out)
    start = time.perf_counter()
    for _ in range(args.warmup):
        fitter.step()
    warmup_seconds = time.perf_counter() - start
    # --compare-eager: alternate rounds of the two, so a machine whose speed drifts affects both alike
    fitters = {"configured": fitter, **({"eager": eager} if compare else {})}
    spent = {name: 0.0 for name in fitters}
    rounds = args.rounds if compare else 1
    per_round = max(1, args.iterations // rounds)
    for _ in range(rounds):
        for name, f in fitters.items():
            sync(args.device)
            start = time.perf_counter()
            for _ in range(per_round):
                f.step()
            sync(args.device)
            spent[name] += time.perf_counter() - start
    seconds = spent["configured"] / (rounds * per_round)
    row = {"arch": arch, "hidden": hidden, "kernels": setup.rep.num_kernels,
           "seconds_per_iteration": seconds, "iterations_per_second": 1 / seconds,
           "flops_per_iteration": flops, "achieved_flops": flops / seconds,
           "warmup_seconds": warmup_seconds, "compile": cfg.compile, "sampling": cfg.sampling.method,
           "sampled": cfg.sampling.batch, "batch": cfg.data.batch_size}
    if compare:
        row["eager_seconds_per_iteration"] = spent["eager"] / (rounds * per_round)
        row["eager_achieved_flops"] = flops / row["eager_seconds_per_iteration"]
        row["speedup_over_eager"] = row["eager_seconds_per_iteration"] / seconds
    shutil.rmtree(out, ignore_errors=True)  # the fitters' run directory: nothing in it is a figure
    return row


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--archs", default="resnet20,resnet56")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compare-eager", action="store_true",
                   help="with --set compile=true: also time the eager iteration, in alternating rounds")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds for --compare-eager")
    p.add_argument("--set", action="append", default=[], help="FitConfig override, e.g. compile=true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mach = machine(args.device)
    print(json.dumps({"config": vars(args), "machine": mach}))
    peak = matmul_flops(args.device)
    rows = []
    for arch in args.archs.split(","):
        row = bench_arch(arch, SETTINGS[arch], args)
        row["fraction_of_matmul"] = row["achieved_flops"] / peak
        rows.append(row)
        if "eager_seconds_per_iteration" in row:
            row["eager_fraction_of_matmul"] = row["eager_achieved_flops"] / peak
            print(f"{arch} h={row['hidden']} eager (same rounds): {row['eager_seconds_per_iteration']:.3f} s/it = "
                  f"{100 * row['eager_fraction_of_matmul']:.1f}% of matmul; compiled is "
                  f"{row['speedup_over_eager']:.2f}x faster", flush=True)
        print(f"{arch} h={row['hidden']}: {row['seconds_per_iteration']:.3f} s/it, "
              f"{row['flops_per_iteration'] / 1e9:.1f} GFLOP/it, {row['achieved_flops'] / 1e9:.1f} GFLOP/s "
              f"= {100 * row['fraction_of_matmul']:.1f}% of matmul ({peak / 1e9:.1f} GFLOP/s)", flush=True)
    emit("fit", machine=mach, matmul_flops=peak, results=rows)


if __name__ == "__main__":
    main()

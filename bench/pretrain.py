"""Training an original network on the CPU: images/s of `nern pretrain`'s step (nern.pretrain.Pretraining) and
its FLOP/s against the same process's dense matmul, with memory-format, compile and bf16-autocast variants timed in
alternating rounds in one process, so each speed-up is a ratio from one run (issue #36). A bf16 variant's fraction
is of the bf16 matmul (fast only on a CPU with AVX512-BF16 or AMX: `nern.config.bf16_native`).

The step (SGD on cross-entropy, the data stream's crop + flip) is unchanged since 2aaff84 (`git diff 2aaff84 --
nern/pretrain.py` touches only loading and evaluation), so the `contiguous` variant IS the baseline commit's step.
Public ResNet20 fine-tuned on CIFAR-10 (JPEG) at batch 256, lr 0.01, as config/cifar10-cpu.yaml does. Prints the
configuration and the machine first, a table, and ONE JSON line.

    python -m bench.pretrain --threads 2 --steps 5 --rounds 3 --warmup 2  # ~3 min
    python -m bench.pretrain --threads 1 --steps 2 --rounds 1 --warmup 1 --variants contiguous  # a smoke test
Skips (exit 0, says why) when the public weights or the data are absent.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import CIFAR10_JPEG, emit, machine, matmul_flops, public_weights, skip
from nern.config import bf16_native

VARIANTS = ("contiguous", "channels_last", "compile", "channels_last+compile", "bf16", "channels_last+bf16")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet56"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compilation)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    return p.parse_args(argv)


def task(args: argparse.Namespace, variant: str) -> Any:
    """A Pretraining of the public weights, its model and inputs in the variant's memory format, compiled or not."""
    from nern import data as data_mod
    from nern.config import PretrainConfig, load_config
    from nern.pretrain import Pretraining, starting_model

    cfg = load_config(PretrainConfig, None, [
        f"model.arch={args.arch}", "model.shortcut=A", f"model.checkpoint={public_weights(args.arch)}",
        "data.name=imagefolder", f"data.root={CIFAR10_JPEG}", "data.val_size=5000",
        f"data.batch_size={args.batch_size}", "lr=0.01", "milestones=[]", "progress=false",
        f"autocast_bf16={'bf16' in variant}"])
    model = starting_model(cfg)
    splits = data_mod.build_splits(cfg.data)
    channels_last = variant.startswith("channels_last")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = Pretraining(cfg, model, splits)
    if channels_last:
        stream_next = run.stream.next
        run.stream.next = lambda: (lambda x, y: (x.contiguous(memory_format=torch.channels_last), y))(*stream_next())
    if variant.endswith("compile"):
        run.model = torch.compile(model)
    return run


def step_flops(run: Any) -> float:
    """FLOPs of one training step (forward and backward; the SGD update is negligible)."""
    with FlopCounterMode(display=False) as counter:
        run.step()
    return float(counter.get_total_flops())


def data_seconds(run: Any, steps: int) -> float:
    """The data stream alone (sampling, crop, flip, normalisation) per step."""
    start = time.perf_counter()
    for _ in range(steps):
        run.stream.next()
    return (time.perf_counter() - start) / steps


def time_rounds(runs: dict[str, Any], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of each variant, rounds interleaved so that a noisy neighbour hits all variants alike."""
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not public_weights(args.arch).exists() or not CIFAR10_JPEG.exists():
        return skip("pretrain", f"needs {public_weights(args.arch)} and {CIFAR10_JPEG}")
    torch.set_num_threads(args.threads)
    print({"config": vars(args), "machine": machine()}, flush=True)
    runs = {variant: task(args, variant) for variant in args.variants}
    flops = step_flops(runs[args.variants[0]])
    per_data = data_seconds(runs[args.variants[0]], max(3, args.steps))
    matmul = matmul_flops("cpu")
    matmul_bf16 = matmul_flops("cpu", dtype=torch.bfloat16) if any("bf16" in v for v in args.variants) else None
    times = time_rounds(runs, args)
    base = statistics.median(times[args.variants[0]])
    rows = []
    print(f"step: {flops / 1e9:.1f} GFLOP (fwd+bwd, batch {args.batch_size}); data stream {per_data * 1e3:.0f} ms/step;"
          f" matmul {matmul / 1e9:.0f} GFLOP/s" + (f", bf16 {matmul_bf16 / 1e9:.0f}" if matmul_bf16 else "")
          + f"; bf16 native: {bf16_native('cpu')}")
    print(f"{'variant':<24} {'s/step':>8} {'img/s':>7} {'GFLOP/s':>8} {'of matmul':>9} {'vs ' + args.variants[0]:>16}")
    for name, seconds in times.items():
        med = statistics.median(seconds)
        row = {"variant": name, "seconds_per_step": med, "images_per_second": args.batch_size / med,
               "gflops": flops / med / 1e9, "speedup": base / med,
               "fraction_of_matmul": flops / med / (matmul_bf16 if "bf16" in name else matmul),
               "rounds": seconds}
        rows.append(row)
        print(f"{name:<24} {med:>8.3f} {row['images_per_second']:>7.0f} {row['gflops']:>8.1f} "
              f"{row['fraction_of_matmul']:>9.1%} {row['speedup']:>15.2f}x")
    emit("pretrain", step_gflop=flops / 1e9, data_seconds_per_step=per_data, matmul_gflops=matmul / 1e9,
         matmul_bf16_gflops=matmul_bf16 / 1e9 if matmul_bf16 else None, bf16_native=bf16_native("cpu"),
         rows=rows, machine=machine())


if __name__ == "__main__":
    main()

"""The paper recipe's learning curve against the reference implementation's (issue #35's anchor).

The anchor was measured on this kind of 2-core CPU with the reference code at its May-2023 HEAD, only its data
loader pointed at ../shared/data/cifar10-jpeg: public ResNet20 (option A), crossfilter, h=180, batch 256,
random_weighted_batch B=4096, KD = FMD = 1e-4, Ranger lr 5e-3 with cosine annealing over 2,000 iterations, one
seed. Test top-1 of the last iterate at 0 / 500 / 1,000 / 1,500 / 2,000 iterations: ANCHOR below.

Here: config/recipes/paper.yaml with `iterations` = --iterations (so the cosine spans them, as the anchor's
did), on the public ResNet20, each seed its own process on --threads threads, --parallel at a time. Every
--every iterations a seed appends one JSON line (validation and test top-1 of the last iterate, L_rec as the
fit defines it, the mean of the steps' rec term since the previous point, seconds) to OUT/seed<N>.jsonl, so a
crash keeps what was measured and a rerun skips finished seeds. Then: per-iteration mean +- sd over the seeds
against the anchor, the gap in sd, a figure (OUT/paper_curve.png), and ONE JSON line.

    python -m bench.paper_curve --seeds 0 1 2 --out docs/results/paper-curve      # ~1 h per seed, 2 at a time
    python -m bench.paper_curve --seeds 0 --iterations 4 --every 2 --hidden 16 --val-size 500 --eval-limit 200 \
        --out /tmp/pc                                                               # a smoke test
    python -m bench.paper_curve --seeds 0 1 2 --parallel 3 --ablate fmd-aliased --compare docs/results/paper-curve \
        --out /tmp/pc-aliased                       # an ablation, drawn beside the recorded curve
    python -m bench.paper_curve --summarise-only --seeds 0 1 2 --out docs/results/paper-curve   # table + figure again

Ablations (--ablate, each a behaviour of the reference code that the paper does not define, docs/METHOD.md §13):
`fmd-aliased` makes every residual block add its shortcut into its second BatchNorm's output in place, as the
reference's block does, so the recorded map of bn2 becomes the sum: each block distils (bn1, sum, sum) instead
of (bn1, bn2, sum). It needs the hook recorder, so it runs with compile=false.
Skips (exit 0, says why) when the public weights or the data are absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (CIFAR10_JPEG, Network, emit, evaluate, fit_config, machine, permutation_file,
                           public_weights, skip, start_fit)

# iteration -> test top-1 (%) of the reference implementation's last iterate (issue #35, one seed)
ANCHOR = {0: 10.00, 500: 9.99, 1000: 16.54, 1500: 35.04, 2000: 49.24}


def alias_fmd_maps() -> None:
    """Ablation fmd-aliased: the residual sum written into bn2's output tensor, as the reference's block does; the
    hook recorder has recorded that tensor, so it holds the sum when the loss reads it (bn1, sum, sum)."""
    from nern import models

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu2(out)

    models.BasicBlock.forward = forward


ABLATIONS = {"fmd-aliased": (alias_fmd_maps, ["compile=false"])}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--hidden", type=int, default=180)
    p.add_argument("--permutation", default="crossfilter")
    p.add_argument("--method", default="greedy", help="the chain search of `nern permute` (greedy: the paper's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra fit overrides, key=value (an ablation)")
    p.add_argument("--ablate", action="append", default=[], choices=sorted(ABLATIONS),
                   help="a reference-code behaviour to reproduce (see above)")
    p.add_argument("--compare", type=Path, action="append", default=[],
                   help="another run's OUT folder, drawn beside this one in the figure")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--summarise-only", action="store_true",
                   help="run nothing: the table and figure of what OUT holds (seeds stopped early included)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--permutation-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def curve_file(args: argparse.Namespace, seed: int) -> Path:
    return args.out / f"seed{seed}.jsonl"


def read_curve(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_seed(args: argparse.Namespace, seed: int) -> None:
    """One seed's curve, a JSON line per point; the first line also holds the original's accuracies."""
    network = Network("resnet20", args.hidden, str(public_weights("resnet20")), str(CIFAR10_JPEG), args.val_size,
                      args.eval_limit, "cpu", args.threads, seed)
    for name in args.ablate:
        ABLATIONS[name][0]()
    forced = [item for name in args.ablate for item in ABLATIONS[name][1]]  # last: they win over --set
    cfg = fit_config("paper", network.overrides() + [f"iterations={args.iterations}", "epochs=null"] + args.set
                     + forced)
    path = curve_file(args, seed)
    path.write_text("")
    fitter, original = start_fit(cfg, args.permutation_file, args.out / f"seed{seed}")
    recs: list[float] = []
    start = time.perf_counter()
    while True:
        point = {"seed": seed, **evaluate(fitter), "rec_mean": statistics.fmean(recs) if recs else None,
                 "seconds": round(time.perf_counter() - start, 1)}
        if fitter.iteration == 0:
            point["original"] = original
        with path.open("a") as f:
            f.write(json.dumps(point) + "\n")
        print(json.dumps(point), flush=True)
        if fitter.iteration >= args.iterations:
            return
        recs = []
        target = min(args.iterations, fitter.iteration + args.every)
        while fitter.iteration < target:
            recs.append(fitter.step()["rec"])


def child_command(args: argparse.Namespace, seed: int) -> list[str]:
    return [sys.executable, "-m", "bench.paper_curve", *sys.argv[1:], "--child", str(seed),
            "--permutation-file", args.permutation_file]


def finished(args: argparse.Namespace, seed: int) -> bool:
    points = read_curve(curve_file(args, seed))
    return bool(points) and points[-1]["iteration"] >= args.iterations


def run_all(args: argparse.Namespace) -> None:
    """Each unfinished seed in its own process, --parallel at a time; a child's log is OUT/seed<N>.log."""
    queue = [s for s in args.seeds if not finished(args, s)]
    running: list[tuple[int, subprocess.Popen]] = []
    while queue or running:
        while queue and len(running) < args.parallel:
            seed = queue.pop(0)
            log = (args.out / f"seed{seed}.log").open("w")
            running.append((seed, subprocess.Popen(child_command(args, seed), stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for seed, proc in list(running):
            if proc.poll() is not None:
                running.remove((seed, proc))
                print(f"seed {seed}: exit {proc.returncode}", flush=True)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(args: argparse.Namespace) -> list[dict]:
    """Per iteration: validation and test mean +- sd over the seeds that reached it, the anchor, the gap in sd."""
    curves = {s: {p["iteration"]: p for p in read_curve(curve_file(args, s))} for s in args.seeds}
    rows = []
    for it in sorted({i for c in curves.values() for i in c}):
        points = [c[it] for c in curves.values() if it in c]
        test_m, test_sd = mean_sd([p["test_top1"] for p in points])
        val_m, val_sd = mean_sd([p["val_top1"] for p in points])
        anchor = ANCHOR.get(it)
        gap = None if anchor is None else test_m - anchor
        rows.append({"iteration": it, "seeds": len(points), "val_mean": val_m, "val_sd": val_sd,
                     "test_mean": test_m, "test_sd": test_sd, "test_per_seed": [p["test_top1"] for p in points],
                     "rec_rmse_mean": statistics.fmean(p["rec_rmse"] for p in points), "anchor_test": anchor,
                     "gap": gap, "gap_in_sd": (gap / test_sd) if gap is not None and test_sd > 0 else None})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'iteration':>9} {'seeds':>5} {'val % mean±sd':>15} {'test % mean±sd':>15} {'anchor':>7} {'gap':>7} "
          f"{'gap/sd':>7} {'L_rec':>8}")
    for r in rows:
        anchor = "-" if r["anchor_test"] is None else f"{r['anchor_test']:.2f}"
        gap = "-" if r["gap"] is None else f"{r['gap']:+.2f}"
        in_sd = "-" if r["gap_in_sd"] is None else f"{r['gap_in_sd']:+.1f}"
        print(f"{r['iteration']:>9} {r['seeds']:>5} {r['val_mean']:>8.2f}±{r['val_sd']:<6.2f} "
              f"{r['test_mean']:>8.2f}±{r['test_sd']:<6.2f} {anchor:>7} {gap:>7} {in_sd:>7} {r['rec_rmse_mean']:>8.4f}")


def compared_rows(folder: Path) -> list[dict]:
    """Per-iteration mean +- sd of test top-1 over the seed*.jsonl files of another run."""
    curves = [read_curve(f) for f in sorted(folder.glob("seed*.jsonl"))]
    its = sorted({p["iteration"] for c in curves for p in c})
    rows = []
    for it in its:
        values = [p["test_top1"] for c in curves for p in c if p["iteration"] == it]
        rows.append({"iteration": it, "test_mean": mean_sd(values)[0], "test_sd": mean_sd(values)[1],
                     "seeds": len(values)})
    return rows


def plot(rows: list[dict], seeds_points: dict[int, list[dict]], path: Path, label: str = "ours",
         compare: list[Path] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, points in seeds_points.items():
        ax.plot([p["iteration"] for p in points], [p["test_top1"] for p in points], color="tab:blue", alpha=0.3,
                lw=1, label=f"{label}, each seed" if seed == min(seeds_points) else None)
    ax.errorbar([r["iteration"] for r in rows], [r["test_mean"] for r in rows], yerr=[r["test_sd"] for r in rows],
                color="tab:blue", marker="o", capsize=3, label=f"{label}, mean ± sd (test)")
    for folder, colour in zip(compare, ("tab:orange", "tab:green", "tab:red")):
        other = compared_rows(folder)
        ax.errorbar([r["iteration"] for r in other], [r["test_mean"] for r in other],
                    yerr=[r["test_sd"] for r in other], color=colour, marker="^", capsize=3,
                    label=f"{folder.name}, mean ± sd (test)")
    ax.plot(list(ANCHOR), list(ANCHOR.values()), color="black", marker="s", ls="--",
            label="reference implementation (one seed)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("test top-1 of the last iterate (%)")
    ax.set_title("Paper recipe, ResNet20 h=180 crossfilter, CIFAR-10 (JPEG)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not public_weights("resnet20").exists() or not CIFAR10_JPEG.exists():
        return skip("paper_curve", f"needs {public_weights('resnet20')} and {CIFAR10_JPEG}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        return run_seed(args, args.child)
    print(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "machine": machine()}), flush=True)
    if not args.summarise_only:
        weights = public_weights("resnet20")
        args.permutation_file, seconds = permutation_file(args.permutation, "resnet20", weights, args.out,
                                                          args.method)
        print(f"permutation {args.permutation} ({args.method}): {seconds:.0f} s", flush=True)
        run_all(args)
    rows = summarise(args)
    print_table(rows)
    label = "ours" + "".join(f" + {name}" for name in args.ablate)
    plot(rows, {s: read_curve(curve_file(args, s)) for s in args.seeds}, args.out / "paper_curve.png", label,
         args.compare)
    emit("paper_curve", rows=rows, anchor=ANCHOR, machine=machine())


if __name__ == "__main__":
    main()

"""A fit job's wall time, this checkout against a baseline commit's code, side by side on one machine (issue #36).

Each fit is `nern fit` run as a pipeline fit job runs it (a fresh process: imports, data, the original measured,
the fit, its evaluations, the files written), once with this checkout's code and once with `--baseline-commit`'s
(a git worktree of that commit beside the repository, sharing this venv), alternating which goes first per seed,
one at a time, so the machine's drift hits both alike. Both fit the same network file with the same permutation
file (`nern permute` of this checkout, computed once). Reported per seed and as mean +- sd: process seconds,
`wall_seconds` of metrics.json, top-1, and agreement with the original where the code reports it (the baseline
may predate it), and the ratio baseline / current. Extra settings for the current side only (`--set`, e.g.
`autocast_bf16=auto`) are the levers being measured; `--both-set` goes to both sides.

    python -m bench.fit_wall --baseline-commit 2aaff84 --model results/.../original/reg0/model.safetensors \
        --seeds 0 1 2 --threads 2 --set autocast_bf16=auto --out /tmp/fit_wall
    python -m bench.fit_wall --baseline-commit HEAD --hidden 16 --seeds 0 --threads 1 --both-set iterations=2 \
        --both-set rec_only_iterations=4 --both-set data.val_size=500 --both-set data.eval_limit=200 --out /tmp/fw
Skips (exit 0, says why) when the public weights or the data are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import CIFAR10_JPEG, ROOT, emit, machine, permutation_file, public_weights, skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-commit", required=True, help="git revision whose `nern fit` is the baseline")
    p.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet56"])
    p.add_argument("--model", default=None, help="network file to fit (default: the public weights of --arch)")
    p.add_argument("--hidden", type=int, default=180)
    p.add_argument("--permutation", default="crossfilter", choices=["none", "infilter", "crossfilter"])
    p.add_argument("--recipe", default="fast", help="config/recipes/<recipe>.yaml (the baseline's own copy: "
                   "config/recipes/ or, before it existed, config/presets/)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="key=value for the current side only (the lever)")
    p.add_argument("--both-set", action="append", default=[], help="key=value for both sides")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def baseline_tree(commit: str, out: Path) -> Path:
    """A worktree of `commit` (created once, reused by a rerun), so its `nern` is imported instead of ours."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    tree = out / f"baseline-{sha[:10]}"
    if not (tree / "nern").is_dir():
        git("worktree", "add", "--detach", "--force", str(tree), sha)
    return tree


def recipe_file(tree: Path, recipe: str) -> Path:
    for folder in ("config/recipes", "config/presets"):
        if (tree / folder / f"{recipe}.yaml").is_file():
            return tree / folder / f"{recipe}.yaml"
    raise SystemExit(f"{tree} has no fit recipe {recipe!r} in config/recipes or config/presets")


def fit_command(tree: Path, args: argparse.Namespace, model: Path, perm: str, seed: int, extra: list[str],
                out: Path) -> list[str]:
    sets = ["data.name=imagefolder", f"data.root={CIFAR10_JPEG}", "data.val_size=5000", f"model.arch={args.arch}",
            "model.shortcut=A", f"predictor.hidden={args.hidden}", f"seed={seed}", f"threads={args.threads}",
            "device=cpu", "progress=false", *args.both_set, *extra]
    command = [sys.executable, "-m", "nern", "fit", "--config", str(recipe_file(tree, args.recipe)),
               "--model", str(model), "--out", str(out), "--mlflow-uri", "none"]
    command += ["--permutation", perm] if perm else []
    for item in sets:
        command += ["--set", item]
    return command


def run_fit(tree: Path, command: list[str], out: Path) -> dict[str, Any]:
    """One fit in its own process, from `tree` (its `nern` first on the path); its seconds and metrics."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (out / "fit.log").open("w") as log:
        subprocess.run(command, cwd=tree, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {"process_seconds": seconds, **{k: metrics.get(k) for k in (
        "wall_seconds", "train_seconds", "eval_seconds", "original_top1", "reconstructed_top1", "agreement",
        "kl_to_original", "bf16")}}


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    model = Path(args.model) if args.model else public_weights(args.arch)
    if not model.exists() or not CIFAR10_JPEG.exists():
        return skip("fit_wall", f"needs {model} and {CIFAR10_JPEG}")
    args.out.mkdir(parents=True, exist_ok=True)
    print({"config": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
           "current": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "nern"))},
          flush=True)
    trees = {"baseline": baseline_tree(args.baseline_commit, args.out), "current": ROOT}
    perm, perm_seconds = permutation_file(args.permutation, args.arch, model.resolve(), args.out)
    runs: list[dict[str, Any]] = []
    for index, seed in enumerate(args.seeds):
        order = ["baseline", "current"] if index % 2 == 0 else ["current", "baseline"]
        for side in order:
            out = args.out / f"{side}-seed{seed}"
            extra = args.set if side == "current" else []
            result = run_fit(trees[side], fit_command(trees[side], args, model.resolve(), perm, seed, extra, out), out)
            runs.append({"side": side, "seed": seed, **result})
            print(json.dumps(runs[-1]), flush=True)
    sides = {side: [r for r in runs if r["side"] == side] for side in ("baseline", "current")}
    print(f"\n{'side':<9} {'process s':>16} {'wall_seconds':>16} {'top-1':>14} {'agreement':>14}")
    for side, rows in sides.items():
        print(f"{side:<9} {mean_sd([r['process_seconds'] for r in rows]):>16} "
              f"{mean_sd([r['wall_seconds'] for r in rows]):>16} {mean_sd([r['reconstructed_top1'] for r in rows]):>14} "
              f"{mean_sd([r['agreement'] for r in rows]):>14}")
    ratios = [b["process_seconds"] / c["process_seconds"] for b, c in zip(sides["baseline"], sides["current"])]
    print(f"speed-up (baseline / current process seconds, per seed): {', '.join(f'{r:.2f}x' for r in ratios)}")
    emit("fit_wall", permutation_seconds=perm_seconds, runs=runs, speedups=ratios, machine=machine())


if __name__ == "__main__":
    main()

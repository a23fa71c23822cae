"""Screen fast-recipe schedules on VALIDATION: one reconstruction-only phase, then several distillation variants
branched from it, each scored on the validation split (never the test set) with its wall seconds.

A fast fit is two phases: `rec_only_iterations` steps that fit the kernels (no images), then `iterations`
distillation steps. The first phase is the same for every variant that shares its length and learning rate, so
it is trained once per length (--rec) and saved; each variant (--variant NAME:key=value,key=value) restarts
from it exactly as a fit would (fresh optimiser moments, the distillation cosine) and is evaluated on
validation at the end of its schedule (and every --eval-every steps, for the curve). Seconds are measured on
the threads given (one process; run two processes for two cores) and reported per phase, so a budget can be
summed: rec-only seconds + distillation seconds + evaluations.

    python -m bench.screen_fast --rec 600,2400@8192 --hidden 180 --threads 1 \
        --variant d150:iterations=150 --variant d150b128:iterations=150,data.batch_size=128
Prints a table and ONE JSON line. Skips (exit 0, says why) when the data or the weights are absent.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.harness import CIFAR10_JPEG, Network, build, emit, fit_config, machine, public_weights, skip


def parse_rec(text: str) -> tuple[int, int | None]:
    """"600" (600 steps on every kernel) or "2400@8192" (2,400 steps of 8,192 kernels each: rec_only_batch)."""
    steps, _, batch = text.partition("@")
    return int(steps), int(batch) if batch else None


def rec_name(rec: tuple[int, int | None]) -> str:
    return f"{rec[0]}" + (f"@{rec[1]}" if rec[1] else "")


def base_overrides(args: argparse.Namespace, rec: tuple[int, int | None]) -> list[str]:
    network = Network(args.arch, args.hidden, args.weights, args.data_root, args.val_size, args.eval_limit,
                      threads=args.threads, seed=args.seed)
    return network.overrides() + ["epochs=null", f"rec_only_iterations={rec[0]}",
                                  f"rec_only_batch={rec[1] if rec[1] else 'null'}", *args.set]


def make_fitter(args: argparse.Namespace, rec: tuple[int, int | None], variant: list[str], setup):
    from nern.fit import Fitter

    return Fitter(fit_config(args.recipe, base_overrides(args, rec) + variant), setup, Path(args.out) / "run")


def val_top1(fitter) -> tuple[float, float]:
    """Validation top-1 of the current predictor and the seconds the evaluation took."""
    from nern.measure import split_top1
    from nern.reconstruct import run_reconstructed

    start = time.perf_counter()
    weights = fitter.reconstructed_weights()
    forward = lambda x: run_reconstructed(fitter.s.model, fitter.s.rep, weights, x)  # noqa: E731
    return (split_top1(forward, fitter.s.splits.val, fitter.cfg.data.eval_batch_size, fitter.device),
            time.perf_counter() - start)


def rec_phase(args: argparse.Namespace, rec: tuple[int, int | None], setup) -> tuple[dict, dict]:
    """The reconstruction-only phase `rec`: the predictor's state after it and its figures (saved under --out
    and reused by a later screen with the same settings)."""
    import copy

    import torch

    tag = "_".join([Path(args.permutation).stem or "none", *args.set]).replace("=", "-").replace("/", "-")
    saved = Path(args.out) / f"rec_{args.arch}_h{args.hidden}_s{args.seed}_{rec_name(rec)}_{tag}.pt"
    if saved.exists():
        stored = torch.load(saved)
        print(f"rec-only {rec_name(rec)}: reused {saved}", flush=True)
        return stored["state"], stored["phase"]
    fitter = make_fitter(args, rec, ["iterations=1"], setup)
    start = time.perf_counter()
    while fitter.iteration < rec[0]:
        fitter.step()
    seconds = time.perf_counter() - start
    val, eval_seconds = val_top1(fitter)
    state = copy.deepcopy(fitter.predictor.state_dict())
    fitter.close()
    print(f"rec-only {rec_name(rec)}: {seconds:.0f} s ({seconds / max(rec[0], 1):.3f} s/step), val {val:.2f}",
          flush=True)
    phase = {"rec": rec_name(rec), "seconds": seconds, "val_top1": val, "eval_seconds": eval_seconds,
             "set": args.set}
    torch.save({"state": state, "phase": phase}, saved)
    return state, phase


def distil_variant(args: argparse.Namespace, rec: tuple[int, int | None], state: dict, name: str, overrides: list[str],
                   setup) -> dict:
    """One distillation variant restarted from the rec-only state, as a fit restarts at its phase boundary."""
    fitter = make_fitter(args, rec, overrides, setup)
    fitter.predictor.load_state_dict(state)
    import warnings

    with warnings.catch_warnings():  # stepping the schedule without an optimiser step is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(rec[0]):  # the schedule's position at the phase boundary
            fitter.scheduler.step()
    fitter.iteration = rec[0]
    curve, seconds, eval_seconds = [], 0.0, 0.0
    while fitter.iteration < fitter.total:
        start = time.perf_counter()
        fitter.step()
        seconds += time.perf_counter() - start
        done = fitter.iteration - rec[0]
        if done == fitter.distillation_total or (args.eval_every and done % args.eval_every == 0):
            val, spent = val_top1(fitter)
            eval_seconds += spent
            curve.append({"distill_iterations": done, "seconds": seconds, "val_top1": val})
    fitter.close()
    final = curve[-1]
    print(f"rec {rec_name(rec)} + {name}: val {final['val_top1']:.2f} after {final['distill_iterations']} it, "
          f"{seconds:.0f} s ({seconds / max(1, fitter.distillation_total):.3f} s/it)", flush=True)
    return {"rec": rec_name(rec), "variant": name, "overrides": overrides, "seconds": seconds,
            "eval_seconds": eval_seconds, "val_top1": final["val_top1"], "curve": curve}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, [item for item in rest.split(",") if item]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--weights", default=None, help="default: the public weights of --arch")
    p.add_argument("--data-root", default=str(CIFAR10_JPEG))
    p.add_argument("--permutation", default="", help="permutation file (nern permute); empty: none")
    p.add_argument("--recipe", default="fast", help="a fit recipe of config/recipes/")
    p.add_argument("--rec", type=lambda s: [parse_rec(x) for x in s.split(",")], default=[(600, None)],
                   help="reconstruction-only phases: STEPS or STEPS@KERNELS_PER_STEP, comma-separated")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value (distillation)")
    p.add_argument("--hidden", type=int, default=180)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on this many validation images (0: all)")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N distillation steps")
    p.add_argument("--set", action="append", default=[], help="override for every fit (both phases)")
    p.add_argument("--rec-only", action="store_true", help="only the reconstruction phases (their val top-1)")
    p.add_argument("--out", default="benchmarks/screen_fast")
    args = p.parse_args()
    args.weights = args.weights or str(public_weights(args.arch))
    if not Path(args.weights).exists() or not (Path(args.data_root) / "test").exists():
        skip("screen_fast", f"{args.weights} or {args.data_root} absent")
        return
    print(json.dumps({"config": vars(args), "machine": machine()}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    setup = build(fit_config(args.recipe, base_overrides(args, (0, None))), args.permutation)
    variants = [parse_variant(v) for v in args.variant] or [("recipe", [])]
    phases, rows = [], []
    for rec in args.rec:
        state, phase = rec_phase(args, rec, setup)
        phases.append(phase)
        rows += [distil_variant(args, rec, state, name, overrides, setup) for name, overrides in variants
                 if not args.rec_only]
    print(f"{'rec':>10} {'variant':<16} {'val':>6} {'distil s':>9} {'rec s':>6} {'rec val':>7}")
    for row in rows:
        phase = next(ph for ph in phases if ph["rec"] == row["rec"])
        print(f"{row['rec']:>10} {row['variant']:<16} {row['val_top1']:6.2f} {row['seconds']:9.0f} "
              f"{phase['seconds']:6.0f} {phase['val_top1']:7.2f}")
    emit("screen_fast", machine=machine(), phases=phases, variants=rows)


if __name__ == "__main__":
    main()

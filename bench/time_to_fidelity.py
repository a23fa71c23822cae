"""Time to fidelity: wall minutes until the fast recipe's reconstructed network is within 1.0 pt of the original
on VALIDATION, the test top-1 at that point, and the paper recipe's accuracy after the same wall time.

This is what sizes a CPU pipeline preset's budgets (config/cifar10-cpu.yaml). Public ResNet20 (h=140, 180) and
ResNet56 (h=280, 320) on CIFAR-10 (JPEG), 3 seeds each. Every fit is its own process on --threads threads,
run one at a time so they do not share cores, and its clock starts when the process starts: importing torch,
loading the data, measuring the original, compiling and evaluating are all inside the minutes (the pipeline's
fit job pays them too). The fast fit is evaluated after its reconstruction-only phase and then every
--eval-every distillation iterations, and stops at the first evaluation within --tolerance of the original on
validation (the decision never looks at the test set), at the end of its schedule, or at --max-minutes. The
paper recipe then runs its own schedule for the same wall minutes (the fast fit's, reached or not) and is
evaluated once. The permutation is computed once per network beforehand, as the pipeline does, and reported
separately. Prints its configuration and the machine first, a table, and finally ONE JSON line.

    python -m bench.time_to_fidelity --threads 2                          # the real thing (hours on 2 cores)
    python -m bench.time_to_fidelity --networks resnet20 --hidden 16 --seeds 0 --iterations 10 \
        --fast-set rec_only_iterations=20 --eval-every 5 --val-size 500 --eval-limit 200 --set compile=false
Skips (exit 0, says why) when the data or the weights are absent.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # a child's clock: the process's start, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.harness import (CHECKPOINTS, CIFAR10_JPEG, PRETRAINED, ROOT, Network, emit, evaluate,  # noqa: E402
                           fit_config, machine, permutation_file, skip, start_fit,
                           train_to)
from nern.config import PERMUTATIONS  # noqa: E402

# network -> default predictor widths (its public weights: bench.harness.CHECKPOINTS)
NETWORKS: dict[str, list[int]] = {"resnet20": [140, 180], "resnet56": [280, 320]}


def minutes() -> float:
    return (time.perf_counter() - START) / 60


def job_fit(job: dict, recipe: str, overrides: list[str], out: Path):
    """The fitter and the original's accuracy, as a pipeline fit job starts (data, permutation, measure)."""
    network = Network(job["network"], job["hidden"], job["weights"], job["data_root"], job["val_size"],
                      job["eval_limit"], job["device"], job["threads"], job["seed"])
    cfg = fit_config(recipe, network.overrides() + ["compile=true"] + job["set"] + overrides)
    return start_fit(cfg, job["permutation"], out)


def until(limit_minutes: float):
    """A deadline: `limit_minutes` of wall time since the process started."""
    return lambda: minutes() >= limit_minutes


def fast_child(job: dict, out: Path) -> dict:
    """Evaluate at the end of the rec-only phase, then every eval_every distillation iterations; stop at the
    first evaluation within tolerance of the original on validation."""
    fitter, original = job_fit(job, "fast", [f"iterations={job['iterations']}", "epochs=null", *job["fast_set"]], out)
    target = original["val_top1"] - job["tolerance"]
    rec_only = fitter.cfg.rec_only_iterations
    stops = sorted({rec_only, *range(rec_only + job["eval_every"], fitter.total, job["eval_every"]), fitter.total})
    result = {"original": original, "target_val_top1": target, "rec_only_iterations": rec_only, "evals": [],
              "reached": False}
    train_seconds = eval_seconds = 0.0
    for stop in [s for s in stops if s > 0]:
        train_seconds += train_to(fitter, stop, deadline=until(job["max_minutes"]))
        tick = time.perf_counter()
        point = {**fitter.evaluate(), "minutes": minutes(), "distill_iterations": max(0, fitter.iteration - rec_only)}
        eval_seconds += time.perf_counter() - tick
        result["evals"].append(point)
        print(f"[fast {job['network']} h={job['hidden']} seed={job['seed']}] it {fitter.iteration}: val "
              f"{point['val_top1']:.2f} (target {target:.2f}) at {point['minutes']:.1f} min", flush=True)
        if point["val_top1"] >= target or minutes() >= job["max_minutes"] or fitter.iteration >= fitter.total:
            result["reached"] = point["val_top1"] >= target
            break
    # the decision above saw validation only; the test set is measured once, after it, and its time counts
    # (the minutes are those to the final metrics, as a pipeline fit's are)
    final = result["evals"][-1]
    final.setdefault("test_top1", fitter.test_top1())
    result.update(final=final, minutes=minutes(), decision_minutes=final["minutes"], train_seconds=train_seconds,
                  eval_seconds=eval_seconds)
    fitter.close()
    return result


def paper_child(job: dict, out: Path) -> dict:
    """The paper recipe's own schedule, stopped after the fast fit's wall minutes and evaluated once."""
    fitter, original = job_fit(job, "paper", job["paper_set"], out)
    train_seconds = train_to(fitter, fitter.total, deadline=until(job["budget_minutes"]))
    spent = minutes()
    point = evaluate(fitter)  # stopped by the clock before the end of its schedule: test measured here
    fitter.close()
    return {"original": original, "minutes": spent, "train_seconds": train_seconds, "iterations": fitter.iteration,
            "schedule": fitter.total, "val_top1": point["val_top1"], "test_top1": point["test_top1"]}


def child(args: argparse.Namespace) -> None:
    from nern.errors import NernError

    job = json.loads(args.job)
    out = Path(args.result)
    try:
        result = (fast_child if job["recipe"] == "fast" else paper_child)(job, out.parent / f"{out.stem}_run")
    except NernError as exc:  # a diverged fit is a result too
        result = {"error": str(exc), "minutes": minutes()}
    out.write_text(json.dumps({"recipe": job["recipe"], **result}))  # the job itself is in the printed config


def run_child(job: dict, out_dir: Path) -> dict:
    name = f"{job['recipe']}_{job['network']}_h{job['hidden']}_s{job['seed']}"
    result = out_dir / f"{name}.json"
    subprocess.run([sys.executable, "-m", "bench.time_to_fidelity", "--child", "--job", json.dumps(job), "--result",
                    str(result.resolve())], check=True, cwd=ROOT)
    return json.loads(result.read_text())


def summary(results: list[dict]) -> list[dict]:
    """Per network and h, over seeds: minutes to fidelity and test top-1 then (reached runs only)."""
    rows = []
    for key in dict.fromkeys((r["network"], r["hidden"]) for r in results):
        runs = [r for r in results if (r["network"], r["hidden"]) == key]
        finished = [r["fast"] for r in runs if "final" in r["fast"]]
        reached = [f for f in finished if f["reached"]]
        paper = [r["paper"]["test_top1"] for r in runs if "test_top1" in r.get("paper", {})]
        rows.append({"network": key[0], "hidden": key[1], "seeds": len(runs), "reached": len(reached),
                     "minutes_mean": statistics.mean(f["minutes"] for f in reached) if reached else None,
                     "minutes_max": max(f["minutes"] for f in reached) if reached else None,
                     "test_top1_mean": statistics.mean(f["final"]["test_top1"] for f in reached) if reached else None,
                     "paper_test_top1_mean": statistics.mean(paper) if paper else None,
                     # the target is stated on the test set: every run, reached on validation or not
                     "minutes_max_all": max(f["minutes"] for f in finished) if finished else None,
                     "test_gap_max": max(f["original"]["test_top1"] - f["final"]["test_top1"] for f in finished)
                     if finished else None})
    return rows


def print_table(results: list[dict]) -> None:
    print(f"{'network':<10}{'h':>5}{'seed':>5}  {'orig val/test':>13}  {'reached':>7}  {'min':>6}  "
          f"{'dist. it':>8}  {'fast val/test':>13}  {'paper val/test after the same minutes':>37}")
    for r in results:
        fast, paper = r["fast"], r.get("paper", {})
        if "error" in fast:
            print(f"{r['network']:<10}{r['hidden']:>5}{r['seed']:>5}  FAILED: {fast['error']}")
            continue
        orig, final = fast["original"], fast["final"]
        paper_cell = (f"{paper['val_top1']:6.2f}/{paper['test_top1']:6.2f} ({paper['iterations']} it)"
                      if "test_top1" in paper else paper.get("error", "-"))
        print(f"{r['network']:<10}{r['hidden']:>5}{r['seed']:>5}  {orig['val_top1']:6.2f}/{orig['test_top1']:6.2f}  "
              f"{'yes' if fast['reached'] else 'no':>7}  {fast['minutes']:6.1f}  {final['distill_iterations']:>8}  "
              f"{final['val_top1']:6.2f}/{final['test_top1']:6.2f}  {paper_cell:>37}")


def parent(args: argparse.Namespace) -> None:
    data = Path(args.data_root)
    weights = {n: Path(args.weights_dir) / CHECKPOINTS[n] for n in args.networks}
    missing = [str(p) for p in [*weights.values(), data / "test"] if not p.exists()]
    if missing:
        skip("time_to_fidelity", f"{', '.join(missing)} absent")
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"config": vars(args), "machine": machine(args.device)}), flush=True)
    results, permute_seconds = [], {}
    for network in args.networks:
        permutation, permute_seconds[network] = permutation_file(args.permutation, network, weights[network],
                                                                   out_dir)
        for hidden in args.hidden or NETWORKS[network]:
            for seed in args.seeds:
                job = {"network": network, "weights": str(weights[network]), "hidden": hidden, "seed": seed,
                       "permutation": permutation, "data_root": str(data), "val_size": args.val_size,
                       "eval_limit": args.eval_limit, "device": args.device, "threads": args.threads,
                       "set": args.set, "tolerance": args.tolerance}
                fast = run_child({**job, "recipe": "fast", "iterations": args.iterations, "fast_set": args.fast_set,
                                  "eval_every": args.eval_every, "max_minutes": args.max_minutes}, out_dir)
                row = {"network": network, "hidden": hidden, "seed": seed, "fast": fast}
                if not args.no_paper and seed in (args.paper_seeds or args.seeds) and "error" not in fast:
                    row["paper"] = run_child({**job, "recipe": "paper", "paper_set": args.paper_set,
                                              "budget_minutes": fast["minutes"]}, out_dir)
                results.append(row)
    print_table(results)
    print(f"(minutes: wall, from the fit process's start; permutations computed beforehand: "
          + ", ".join(f"{n} {s:.0f} s" for n, s in permute_seconds.items()) + ")")
    emit("time_to_fidelity", machine=machine(args.device), tolerance=args.tolerance, permute_seconds=permute_seconds,
         summary=summary(results), results=results)


def comma_list(kind: type):
    return lambda text: [kind(item) for item in text.split(",") if item]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", type=comma_list(str), default=list(NETWORKS), help="from resnet20, resnet56")
    p.add_argument("--hidden", type=comma_list(int), default=None,
                   help="predictor widths for every network (default: resnet20 140,180; resnet56 280,320)")
    p.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=300, help="the fast fit's distillation schedule")
    p.add_argument("--eval-every", type=int, default=50, help="distillation iterations between evaluations")
    p.add_argument("--max-minutes", type=float, default=60.0, help="give up on a fast fit after this wall time")
    p.add_argument("--tolerance", type=float, default=1.0, help="points below the original's validation top-1")
    p.add_argument("--permutation", default="crossfilter", choices=PERMUTATIONS)
    p.add_argument("--val-size", type=int, default=5000, help="validation images carved from the train set")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on this many val/test images (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[],
                   help="override for both recipes' fits, e.g. compile=false (compile=true by default)")
    p.add_argument("--fast-set", action="append", default=[], help="override for the fast fits only")
    p.add_argument("--paper-set", action="append", default=[], help="override for the paper fits only")
    p.add_argument("--no-paper", action="store_true", help="skip the paper recipe's fits")
    p.add_argument("--paper-seeds", type=comma_list(int), default=None,
                   help="run the paper recipe beside these seeds only (default: every seed)")
    p.add_argument("--data-root", default=str(CIFAR10_JPEG))
    p.add_argument("--weights-dir", default=str(PRETRAINED))
    p.add_argument("--out", default="benchmarks/time_to_fidelity")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()

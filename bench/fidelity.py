"""Fidelity benchmark: reconstructed top-1 after 300/600/1000/2000 iterations, paper preset vs fast preset.

Each candidate (a preset plus overrides, at a predictor size) is one fit in its own process; several run at
once (`--parallel`), which keeps a GPU busy. Accuracy is measured on the validation split carved from the
train set AND on the test set at every checkpoint iteration; choosing between candidates must use `val`.
Prints the configuration, the machine, a table, and finally ONE JSON line with every figure.

    python bench/fidelity.py --model ../shared/data/pretrained/resnet20-12fca82f.th \
        --data-root ../shared/data/cifar10-jpeg --permutation perm.safetensors --device cpu
Skips (exit 0, says why) when the data or the model is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
PRESETS = ROOT / "config" / "presets"

# name -> (preset file, overrides). The fast preset's ablation drops one of its changes at a time.
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "paper": ("paper.yaml", []),
    "fast": ("fast.yaml", []),
}


def machine() -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cores": os.cpu_count(), "torch": torch.__version__, "device": device}


def child(args: argparse.Namespace) -> None:
    """Run one candidate and write its checkpoints' accuracies to --result as they come."""
    import torch

    from nern.config import FitConfig, load_config
    from nern.errors import NernError
    from nern.fit import Fitter, prepare

    torch.set_num_threads(args.threads)
    preset, overrides = json.loads(args.spec)
    base = [f"model.checkpoint={args.model}", "data.name=imagefolder", f"data.root={args.data_root}",
            f"data.val_size={args.val_size}", f"device={args.device}", "progress=false", "eval_every=0",
            "checkpoint_every=0", f"iterations={max(args.checkpoints)}", f"predictor.hidden={args.hidden}",
            "epochs=null"]
    if args.eval_limit:
        base.append(f"data.eval_limit={args.eval_limit}")
    cfg = load_config(FitConfig, PRESETS / preset, base + overrides + args.set)
    setup = prepare(cfg, permutation=args.permutation or None)
    fitter = Fitter(cfg, setup, Path(args.result).parent / (Path(args.result).stem + "_run"))
    original = fitter.original_acc = fitter.evaluate_original()
    out = {"name": args.name, "hidden": args.hidden, "preset": preset, "overrides": overrides,
           "original": original, "points": []}
    out["trace"] = []  # mean training losses (and gradient norm) per window of --trace-every iterations
    window: list[dict[str, float]] = []
    start = time.perf_counter()
    train_seconds = 0.0
    rec_only = cfg.rec_only_iterations  # checkpoints count distillation iterations; this phase comes first
    for target in ([0] if rec_only else []) + sorted(args.checkpoints):
        tick = time.perf_counter()
        while fitter.iteration < rec_only + target:
            try:
                losses = fitter.step()
            except NernError as exc:  # a diverged candidate is a result too: keep its trace, say where it died
                out["error"] = str(exc)
                Path(args.result).write_text(json.dumps(out))
                print(f"[{args.name} h={args.hidden}] FAILED: {exc}", flush=True)
                return
            window.append(losses)
            if len(window) == args.trace_every:
                out["trace"].append({"iteration": fitter.iteration,
                                     **{k: sum(w[k] for w in window) / len(window) for k in losses}})
                window = []
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - tick
        point = fitter.evaluate()
        point.setdefault("test_top1", fitter.test_top1())  # a fit evaluates the test set only at its end
        point["iteration"] = target  # distillation iterations; train_seconds includes the rec-only phase
        point["train_seconds"] = train_seconds
        point["loss"] = losses
        if target == 0:
            out["rec_only"] = {"steps": rec_only, **point}
        else:
            out["points"].append(point)
        out["wall_seconds"] = time.perf_counter() - start
        Path(args.result).write_text(json.dumps(out))
        where = f"after {rec_only} rec-only steps" if target == 0 else f"it {target}"
        print(f"[{args.name} h={args.hidden}] {where}: val {point.get('val_top1', float('nan')):.2f} "
              f"test {point['test_top1']:.2f} rec {point['rec_rmse']:.5f} ({train_seconds:.0f}s)", flush=True)
    fitter.finish(point, resumed=False)  # predictor.safetensors + metrics.json beside the result, for reuse


def parent(args: argparse.Namespace) -> None:
    model = Path(args.model)
    data = Path(args.data_root)
    if not model.is_file() or not (data / "test").is_dir():
        print(f"SKIP: model {model} or data {data} absent")
        print(json.dumps({"bench": "fidelity", "skipped": True}))
        return
    names = args.candidates.split(",")
    extra = {}
    for item in args.candidate:
        name, _, rest = item.partition("=")
        preset, _, overrides = rest.partition(":")
        extra[name] = (preset, [o for o in overrides.split(";") if o])
    specs = {**CANDIDATES, **extra}
    jobs = [(n, h) for n in names for h in args.hidden]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"config": vars(args), "machine": machine()}))
    procs = []
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, str, int]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, hidden = pending.pop(0)
            result = out_dir / f"{name}_h{hidden}.json"
            cmd = [sys.executable, __file__, "--child", "--name", name, "--hidden", str(hidden),
                   "--spec", json.dumps(specs[name]), "--result", str(result), "--model", args.model,
                   "--data-root", args.data_root, "--permutation", args.permutation or "",
                   "--device", args.device, "--threads", str(args.threads), "--val-size", str(args.val_size),
                   "--eval-limit", str(args.eval_limit or 0),
                   "--checkpoints", ",".join(map(str, args.checkpoints)), "--trace-every", str(args.trace_every),
                   *[arg for item in args.set for arg in ("--set", item)]]
            running.append((subprocess.Popen(cmd), name, hidden))
            procs.append(result)
        time.sleep(1)
        running = [(p, n, h) for p, n, h in running if p.poll() is None]
    results = [json.loads(p.read_text()) for p in procs if p.is_file()]
    print(f"{'candidate':<28}{'h':>5}  {'rec-only':>13}  " + "  ".join(f"{c:>13}" for c in args.checkpoints))
    for r in results:
        first = r.get("rec_only")
        cells = [f"{first.get('val_top1', 0):6.2f}/{first['test_top1']:6.2f}" if first else "-"]
        cells += [f"{p.get('val_top1', 0):6.2f}/{p['test_top1']:6.2f}" for p in r["points"]]
        if "error" in r:
            cells.append(r["error"].split(";")[0])
        print(f"{r['name']:<28}{r['hidden']:>5}  " + "  ".join(f"{c:>13}" for c in cells))
    print("(cells: val/test top-1 % after that many distillation iterations, the rec-only column before the first; "
          "original test top-1 "
          + ", ".join(sorted({f"{r['original']['test_top1']:.2f}" for r in results})) + ")")
    print(json.dumps({"bench": "fidelity", "machine": machine(), "checkpoints": args.checkpoints,
                      "results": results}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "pretrained" / "resnet20-12fca82f.th"))
    p.add_argument("--data-root", default=str(SHARED / "cifar10-jpeg"))
    p.add_argument("--permutation", default="", help="permutation file (nern permute); empty: none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--candidates", default="paper,fast", help="comma-separated names")
    p.add_argument("--candidate", action="append", default=[],
                   help="extra candidate NAME=PRESET.yaml:key=v;key=v (repeatable)")
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[180, 140])
    p.add_argument("--checkpoints", type=lambda s: [int(x) for x in s.split(",")], default=[300, 600, 1000, 2000])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=0)
    p.add_argument("--out", default="benchmarks/fidelity")
    p.add_argument("--trace-every", type=int, default=50,
                   help="average the training losses over windows of this many iterations (JSON 'trace')")
    p.add_argument("--set", action="append", default=[],
                   help="override applied to every candidate, e.g. compile=true (does not change the method)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.hidden = args.hidden[0]
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()

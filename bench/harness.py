"""The benchmarks' shared harness: where the public weights and data are, the machine, a dense-matmul rate, and
build -> fit -> evaluate of a named network with a fit recipe, the way a pipeline fit job does it.

Imported as `bench.harness` by benchmarks run as modules from the repository root (`python -m bench.fit`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nern.config import FitConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # public weights and data beside the repository (skipped when absent)
PRETRAINED = SHARED / "pretrained"
CIFAR10_JPEG = SHARED / "cifar10-jpeg"
RECIPES = ROOT / "config" / "recipes"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def public_weights(arch: str) -> Path:
    """The public CIFAR-10 weights of `arch` (option-A shortcuts)."""
    return PRETRAINED / CHECKPOINTS[arch]


def machine(device: str = "cpu") -> dict[str, Any]:
    """What a figure was measured on: printed first by every benchmark and inside its JSON line."""
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    return {"cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": name,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def skip(bench: str, reason: str) -> None:
    """A benchmark without its weights or data says so and exits cleanly (its JSON line marks it skipped)."""
    print(f"SKIP: {reason}")
    emit(bench, skipped=True)


def emit(bench: str, **figures: Any) -> None:
    """The one JSON line a benchmark ends with."""
    print(json.dumps({"bench": bench, **figures}), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops(device: str, size: int = 2048, repeats: int = 10, rounds: int = 5,
                 dtype: torch.dtype = torch.float32) -> float:
    """A dense matmul's FLOP/s (fp32 unless `dtype`), the BEST of several rounds: the machine's limit, so a fraction
    of it errs low."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


@dataclass(frozen=True)
class Network:
    """A named network as the benchmarks fit it: public weights, CIFAR-10 (JPEG) with a validation split carved
    from the train set, one predictor width; `overrides()` are the fit settings every benchmark shares."""

    arch: str
    hidden: int
    weights: str
    data_root: str
    val_size: int = 5000
    eval_limit: int = 0  # evaluate on this many validation/test images (0: all)
    device: str = "cpu"
    threads: int = 1
    seed: int = 0

    def overrides(self) -> list[str]:
        sets = [f"model.arch={self.arch}", "model.shortcut=A", f"model.checkpoint={self.weights}",
                "data.name=imagefolder", f"data.root={self.data_root}", f"data.val_size={self.val_size}",
                f"device={self.device}", f"threads={self.threads}", "progress=false", "eval_every=0",
                "checkpoint_every=0", f"predictor.hidden={self.hidden}", f"seed={self.seed}"]
        return sets + ([f"data.eval_limit={self.eval_limit}"] if self.eval_limit else [])


def fit_config(recipe: str, overrides: list[str]) -> FitConfig:
    """A fit recipe of config/recipes/ (by name: fast, paper) with overrides, later ones winning."""
    return load_config(FitConfig, RECIPES / f"{recipe}.yaml", overrides)


def build(cfg: FitConfig, permutation: str | None = None, **prepare_kwargs: Any):
    """The fit's inputs as a fit job prepares them (network, data, coordinates), on cfg.threads threads (None:
    torch's default)."""
    from nern.fit import prepare

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return prepare(cfg, permutation=permutation or None, **prepare_kwargs)


def start_fit(cfg: FitConfig, permutation: str | None, out: Path, setup: Any = None):
    """build -> a Fitter, and the original's accuracies (measured first, as a fit job does)."""
    from nern.fit import Fitter

    fitter = Fitter(cfg, setup if setup is not None else build(cfg, permutation), out)
    fitter.original_acc = fitter.evaluate_original()
    return fitter, fitter.original_acc


def train_to(fitter: Any, iteration: int, deadline: Any = None) -> float:
    """Steps until `iteration`, or until `deadline()` is true (checked after every step); their seconds."""
    start = time.perf_counter()
    while fitter.iteration < iteration and not (deadline and deadline()):
        fitter.step()
    return time.perf_counter() - start


def evaluate(fitter: Any) -> dict[str, float]:
    """The current iterate's accuracies, validation and test (a fit measures test only at its end; a benchmark
    that stops early measures it here)."""
    point = fitter.evaluate()
    point.setdefault("test_top1", fitter.test_top1())
    return point


def permutation_file(permutation: str, arch: str, weights: Path, out_dir: Path,
                     method: str = "auto") -> tuple[str, float]:
    """The pipeline's permutation of a network (`nern permute`, once per network, shared by its fits) and its
    seconds; "" for none."""
    if permutation == "none":
        return "", 0.0
    out = out_dir / f"{arch}_{permutation}_{method}.safetensors"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nern", "permute", "--model", str(weights), "--set", f"model.arch={arch}",
                    "--mode", permutation, "--method", method, "--quiet", "--mlflow-uri", "none", "--out", str(out)],
                   check=True, cwd=ROOT)
    return str(out), time.perf_counter() - start

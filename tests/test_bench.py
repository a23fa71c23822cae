"""bench/: the shared harness gives every benchmark the same fit settings, and each benchmark runs as a module
(`python -m bench.<name>`) against the installed nern, with no path tricks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem not in ("__init__", "harness"))


def load_harness():
    spec = importlib.util.spec_from_file_location("bench_harness", REPO / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def test_a_named_network_and_a_recipe_make_the_fit_config_a_benchmark_runs() -> None:
    harness = load_harness()
    network = harness.Network("resnet20", 16, "w.th", "data", eval_limit=200, threads=1, seed=3)
    cfg = harness.fit_config("fast", network.overrides() + ["iterations=5"])
    assert (cfg.predictor.hidden, cfg.seed, cfg.data.eval_limit, cfg.model.checkpoint) == (16, 3, 200, "w.th")
    assert cfg.iterations == 5 and cfg.rec_only_iterations == 4800  # the override, and the recipe's own value
    assert harness.fit_config("paper", network.overrides()).sampling.method == "random_weighted_batch"
    assert "data.eval_limit=200" in network.overrides()
    assert not any(item.startswith("data.eval_limit") for item in harness.Network("resnet20", 16, "w", "d").overrides())


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_runs_as_a_module_on_the_installed_package(script: str) -> None:
    assert "sys.path" not in (REPO / "bench" / f"{script}.py").read_text()
    done = subprocess.run([sys.executable, "-m", f"bench.{script}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_fmd_aliased_ablation_records_each_blocks_sum_where_bn2_was() -> None:
    """bench.paper_curve --ablate fmd-aliased reproduces the reference's (bn1, sum, sum) per block; without it the
    maps are (bn1, bn2, sum) and bn2 differs from the sum."""
    probe = """
import torch
from nern.feature_maps import FeatureMapRecorder
from nern.models import CIFAR_RESNETS, CifarResNet
from bench.paper_curve import alias_fmd_maps

def block_maps():
    torch.manual_seed(0)
    model = CifarResNet(CIFAR_RESNETS["resnet20"]).eval()
    with FeatureMapRecorder(model) as rec, torch.no_grad(), rec.record() as maps:
        model(torch.randn(2, 3, 32, 32))
        return [(maps[2 + 3 * b], maps[3 + 3 * b]) for b in range(9)]

before = block_maps()
alias_fmd_maps()
after = block_maps()
assert not any(torch.equal(bn2, total) for bn2, total in before)
assert all(torch.equal(bn2, total) for bn2, total in after)
assert all(torch.equal(b[1], a[1]) for b, a in zip(before, after))  # the sums themselves unchanged
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

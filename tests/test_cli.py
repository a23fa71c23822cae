"""The CLI end to end, and the bad-input battery: one line naming the problem, exit 2, no partial output."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nern.cli import build_parser, main
from nern.config import ModelConfig
from nern.models import build_model, save_model

from helpers import PRETRAINED_RESNET20, fashion_mnist_root, grey_model  # noqa: F401 (fixtures)
from helpers import fmnist_args as data_args

ROOT = Path(__file__).resolve().parents[1]


def fit_args(root, model, out, *extra) -> list[str]:
    return ["fit", "--model", str(model), "--out", str(out), "--mlflow-uri", "none", *data_args(root),
            "--set", "predictor.hidden=16", "--set", "embedding.levels=4", "--set", "iterations=3",
            "--set", "eval_every=0", "--set", "progress=false", "--set", "sampling.batch=64", *extra]


@pytest.fixture(scope="module")
def fitted(grey_model, fashion_mnist_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit")
    assert main(fit_args(fashion_mnist_root, grey_model, out)) == 0
    return out


def run_bad(args: list[str], capsys, out: Path | None = None) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) >= 1 and err[-1].startswith(f"nern {args[0]}: error: "), err
    assert not any("Traceback" in line for line in err)
    if out is not None:
        assert not (out / "metrics.json").exists() and not (out / "predictor.safetensors").exists()
    return err[-1]


def test_fit_and_evaluate_from_the_cli(fitted, grey_model, fashion_mnist_root, tmp_path, capsys):
    metrics = json.loads((fitted / "metrics.json").read_text())
    for key in ("original_top1", "reconstructed_top1", "predictor_params", "represented_params", "size_ratio",
                "iterations", "wall_seconds", "seconds_per_iteration"):
        assert key in metrics
    assert (fitted / "curves.png").is_file()
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(grey_model), "--predictor", str(fitted / "predictor.safetensors"),
                 "--out", str(out), "--mlflow-uri", "none", *data_args(fashion_mnist_root)]) == 0
    again = json.loads(out.read_text())
    # the network rebuilt from the file read back gives the fit's own final accuracy
    assert again["reconstructed_top1"] == pytest.approx(metrics["reconstructed_top1"])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_INPUTS = [
    # (name, how to build the args, text the error must contain)
    ("missing model file", lambda c: fit_args(c.root, c.tmp / "nope.safetensors", c.out), "not found"),
    ("corrupt checkpoint", lambda c: fit_args(c.root, _write(c.tmp / "bad.safetensors", b"garbage" * 10), c.out),
     "safetensors"),
    ("truncated checkpoint", lambda c: fit_args(c.root, _write(c.tmp / "cut.safetensors",
                                                               c.model.read_bytes()[: c.model.stat().st_size // 2]),
                                                c.out), "truncated"),
    ("checkpoint of another architecture", lambda c: fit_args(c.root, c.model, c.out, "--set", "model.arch=resnet20"),
     "resnet"),
    ("unknown config key", lambda c: fit_args(c.root, c.model, c.out, "--set", "predictor.hiden=3"), "predictor.hiden"),
    ("wrong type", lambda c: fit_args(c.root, c.model, c.out, "--set", "predictor.hidden=abc"), "predictor.hidden"),
    ("negative hidden size", lambda c: fit_args(c.root, c.model, c.out, "--set", "predictor.hidden=-4"),
     "predictor.hidden"),
    ("out-of-range probability", lambda c: fit_args(c.root, c.model, c.out, "--set", "sampling.uniform_prob=1.5"),
     "uniform_prob"),
    ("unknown sampling method", lambda c: fit_args(c.root, c.model, c.out, "--set", "sampling.method=bogus"),
     "random_weighted_batch"),
    ("bad override syntax", lambda c: fit_args(c.root, c.model, c.out, "--set", "predictor.hidden"), "key.sub=value"),
    ("missing config file", lambda c: fit_args(c.root, c.model, c.out, "--config", str(c.tmp / "none.yaml")),
     "config file not found"),
    ("invalid YAML", lambda c: fit_args(c.root, c.model, c.out, "--config",
                                        str(_write(c.tmp / "bad.yaml", b"a: [1, 2\n"))), "YAML"),
    ("missing dataset", lambda c: fit_args(c.tmp / "no-data", c.rgb_model, c.out, "--set", "data.name=cifar10"),
     "cifar10"),
    ("empty ImageFolder", lambda c: fit_args(c.root, c.model, c.out, "--set", "data.name=imagefolder",
                                             "--set", f"data.root={c.empty_folder}"), "image"),
    ("grey data into an RGB model", lambda c: fit_args(c.root, c.rgb_model, c.out), "channel"),
    ("NaN in weights", lambda c: fit_args(c.root, c.nan_model, c.out), "nan"),
    ("inf in weights", lambda c: fit_args(c.root, c.inf_model, c.out), "inf"),
    ("NaN loss during fitting", lambda c: fit_args(c.root, c.model, c.out, "--set", "optim.name=adam",
                                                   "--set", "optim.lr=1e30", "--set", "iterations=20"), "nan"),
    ("unwritable output directory", lambda c: fit_args(c.root, c.model, c.file_as_dir / "out"), "cannot write"),
    ("permutation of another model", lambda c: fit_args(c.root, c.model, c.out, "--permutation", str(c.wrong_perm)),
     "permute"),
    ("missing permutation file", lambda c: fit_args(c.root, c.model, c.out, "--permutation", str(c.tmp / "p.st")),
     "not found"),
    ("predictor from another model", lambda c: ["evaluate", "--model", str(c.other_model), "--predictor",
                                                str(c.fitted / "predictor.safetensors"), "--out", str(c.out / "e.json"),
                                                "--mlflow-uri", "none", *data_args(c.root)], "another model"),
    ("a model file passed as predictor", lambda c: ["evaluate", "--model", str(c.model), "--predictor", str(c.model),
                                                    "--out", str(c.out / "e.json"), "--mlflow-uri", "none",
                                                    *data_args(c.root)], "not a NeRN predictor"),
]


class Case:
    """Files the bad-input battery needs, built once."""

    def __init__(self, tmp: Path, root: Path, model: Path, fitted: Path):
        self.tmp, self.root, self.model, self.fitted = tmp, root, model, fitted
        self.out = tmp / "out"
        self.empty_folder = tmp / "empty"
        (self.empty_folder / "train").mkdir(parents=True)
        (self.empty_folder / "test").mkdir()
        self.file_as_dir = _write(tmp / "a-file", b"x")
        self.rgb_model = self._model("rgb", ModelConfig(arch="resnet8", in_channels=3))
        self.other_model = self._model("other", ModelConfig(arch="resnet14", in_channels=1))
        self.nan_model = self._model("nan", ModelConfig(arch="resnet8", in_channels=1), float("nan"))
        self.inf_model = self._model("inf", ModelConfig(arch="resnet8", in_channels=1), float("inf"))
        from nern.permutation import save_permutations

        self.wrong_perm = tmp / "wrong.safetensors"
        save_permutations(self.wrong_perm, [torch.arange(12)], {"mode": "crossfilter", "shapes": [[3, 4]]})

    def _model(self, name: str, cfg: ModelConfig, poison: float | None = None) -> Path:
        model = build_model(cfg)
        if poison is not None:
            with torch.no_grad():
                model.conv1.weight[0, 0, 0, 0] = poison
        path = self.tmp / f"{name}.safetensors"
        save_model(model, path, {"model": {**cfg.__dict__}})
        return path


@pytest.fixture(scope="module")
def case(tmp_path_factory, fashion_mnist_root, grey_model, fitted) -> Case:
    return Case(tmp_path_factory.mktemp("bad"), fashion_mnist_root, grey_model, fitted)


@pytest.mark.parametrize("name,build,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, build, needle, case, capsys):
    case.out = case.tmp / ("out-" + "".join(ch if ch.isalnum() else "-" for ch in name))
    line = run_bad(build(case), capsys, case.out)
    assert needle.lower() in line.lower(), line


def test_disk_full_leaves_no_partial_output(case, monkeypatch, capsys, tmp_path):
    import nern.artifacts

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("predictor.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(nern.artifacts.os, "replace", full)
    out = tmp_path / "full"
    line = run_bad(fit_args(case.root, case.model, out), capsys, out)
    assert "no space left" in line.lower()
    assert not [p for p in out.glob("*.tmp")] and not list(out.glob(".*.tmp"))


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nern", "fit", "--model", str(tmp_path / "missing.safetensors"),
                           "--out", str(tmp_path / "o"), "--mlflow-uri", "none"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("nern fit: error: model file not found")


@pytest.mark.skipif(not PRETRAINED_RESNET20.is_file(), reason="../shared/data/pretrained absent")
def test_permute_cli_on_public_resnet20(tmp_path, capsys):
    out = tmp_path / "perm.safetensors"
    assert main(["permute", "--model", str(PRETRAINED_RESNET20), "--mode", "infilter", "--out", str(out),
                 "--quiet", "--mlflow-uri", "none"]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert len(summary["layers"]) == 19 and 0 < summary["chain_quality"] <= 1


def test_every_stage_is_a_sub_command():
    parser = build_parser()
    stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(stages) == {"pretrain", "import", "permute", "fit", "evaluate", "tables", "compress", "importance",
                           "track"}


def test_a_broken_stage_import_is_an_error_not_a_missing_sub_command(monkeypatch):
    import nern

    monkeypatch.setitem(sys.modules, "nern.importance", None)  # `import nern.importance` now raises ImportError
    monkeypatch.delattr(nern, "importance")
    monkeypatch.delitem(sys.modules, "nern.cli")
    with pytest.raises(ImportError):
        importlib.import_module("nern.cli")


def test_a_rerun_job_stays_one_mlflow_run_and_the_uri_comes_from_the_environment(grey_model, fashion_mnist_root,
                                                                                tmp_path, monkeypatch):
    """$MLFLOW_TRACKING_URI reaches the CLI; rerunning a finished job (as after a kill between FINISHED and
    exit) reopens its run; a changed result-affecting setting is a new run, a changed thread count is not."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.delenv("NERN_MLFLOW_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = [a for a in fit_args(fashion_mnist_root, grey_model, tmp_path / "out") if a not in ("--mlflow-uri", "none")]
    for extra in ([], ["--set", "threads=1"], ["--set", "predictor.hidden=12"]):
        assert main(args + extra) == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("nern").experiment_id])
    assert sorted(r.data.params["predictor.hidden"] for r in runs) == ["12", "16"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_permute_symmetry_writes_an_equivalent_network_that_costs_no_bytes(tmp_path, grey_model, capsys):
    """--mode symmetry permutes the network itself: same function, identity coordinates, 0 bytes to store."""
    from nern.config import FitConfig
    from nern.fit_setup import coordinate_positions
    from nern.layers import find_conv_layers
    from nern.models import load_model, model_overrides

    out, permuted = tmp_path / "perm.safetensors", tmp_path / "permuted.safetensors"
    assert main(["permute", "--model", str(grey_model), "--mode", "symmetry", "--out", str(out), "--quiet"]) == 2
    assert "--model-out" in capsys.readouterr().err and not out.exists()
    assert main(["permute", "--model", str(grey_model), "--mode", "symmetry", "--out", str(out),
                 "--model-out", str(permuted), "--quiet"]) == 0
    original = load_model(ModelConfig(**model_overrides(str(grey_model))["model"])).eval()
    rebuilt = load_model(ModelConfig(**model_overrides(str(permuted))["model"])).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x), rtol=1e-5, atol=1e-5)
    moved = [name for name, w in rebuilt.state_dict().items() if not torch.equal(w, original.state_dict()[name])]
    assert moved, "the symmetry permutation left every tensor in place"
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["mode"] == "symmetry" and summary["symmetry"]["permutation_bytes"] == 0
    layers = find_conv_layers(rebuilt, FitConfig().represent)
    positions, mode, cost = coordinate_positions(layers, out)
    assert (mode, cost) == ("symmetry", 0)
    assert all(torch.equal(p, torch.arange(len(p))) for p in positions)


def test_a_predictor_fitted_on_a_gpu_is_read_with_this_machines_settings(fitted, grey_model, tmp_path):
    """compress/importance take the fit's own config from the file, but not where it ran: a predictor fitted with
    device=cuda on a cluster must be read back on a CPU-only laptop (it failed with 'no NVIDIA driver')."""
    import argparse

    from nern.artifacts import load_tensors, save_tensors
    from nern.runs import fitted_config

    tensors, meta = load_tensors(fitted / "predictor.safetensors")
    meta["config"].update(device="cuda:3", threads=64, compile=True, progress=True)
    moved = tmp_path / "predictor.safetensors"
    save_tensors(moved, tensors, meta)
    args = argparse.Namespace(predictor=str(moved), model=str(grey_model), config=None, set=[])
    cfg = fitted_config(args)
    assert (cfg.device, cfg.threads, cfg.compile) == ("cpu", None, False)
    assert cfg.predictor.hidden == 16 and cfg.embedding.levels == 4  # the representation still comes from the file
    args.set = ["device=cpu", "threads=2"]
    assert fitted_config(args).threads == 2  # --set still decides

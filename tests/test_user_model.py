"""A user's own network through the CLI, by reference only: examples/my_cnn.py and a weights file, no class
written for it; and the one-line errors for a wrong reference, a non-Module factory and weights that do not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nern.artifacts import read_metadata
from nern.cli import main
from nern.config import ModelConfig
from nern.errors import NernError
from nern.models import build_model, load_model, model_overrides

from helpers import fashion_mnist_root  # noqa: F401 (fixture)
from helpers import fmnist_args, sets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_cnn.py"
FACTORY = f"{EXAMPLE}:make_cnn"
# the example expects raw 0..255 pixels
RAW_PIXELS = sets("data.input_range=255", "data.mean=[0]", "data.std=[1]")
TINY_FIT = sets("predictor.hidden=16", "embedding.levels=4", "iterations=3", "eval_every=0", "progress=false",
                "sampling.batch=64")


def example_state(width: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """The random init of the example network, built through the reference (as a user's script would save it)."""
    torch.manual_seed(seed)
    return build_model(ModelConfig(factory=FACTORY, kwargs={"width": width}, in_channels=1)).state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Saved like the public CIFAR weights: nested under "state_dict", with DataParallel's "module." prefix."""
    path = tmp_path_factory.mktemp("weights") / "my_cnn.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in example_state().items()}, "epoch": 3}, path)
    return path


def import_args(root: Path, checkpoint: Path, out: Path, factory: str = FACTORY, *extra: str,
                inputs: list[str] = RAW_PIXELS) -> list[str]:
    return ["import", "--out", str(out), "--mlflow-uri", "none", *fmnist_args(root), *inputs,
            *sets(f"model.factory={factory}", "model.kwargs={width: 16}", "model.in_channels=1",
                  f"model.checkpoint={checkpoint}"), *extra]


@pytest.fixture(scope="module")
def imported(weights, fashion_mnist_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("import")
    assert main(import_args(fashion_mnist_root, weights, out)) == 0
    return out / "model.safetensors"


def test_import_records_the_reference_so_later_stages_need_only_the_file(imported):
    stored = read_metadata(imported)["model"]
    assert stored["factory"] == FACTORY and stored["kwargs"] == {"width": 16} and stored["in_channels"] == 1
    cfg = model_overrides(str(imported))["model"]
    model = load_model(ModelConfig(**cfg))
    assert type(model).__name__ == "MyCNN"
    for key, value in example_state().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_whole_cli_flow_on_a_user_network(imported, weights, fashion_mnist_root, tmp_path, capsys):
    model, data = str(imported), [*fmnist_args(fashion_mnist_root), *RAW_PIXELS]
    imported_top1 = json.loads((imported.parent / "metrics.json").read_text())["test_top1"]
    perm = tmp_path / "perm.safetensors"
    assert main(["permute", "--model", model, "--mode", "crossfilter", "--out", str(perm), "--quiet",
                 "--mlflow-uri", "none"]) == 0
    assert json.loads(perm.with_suffix(".json").read_text())["layers"] == ["features.0", "features.3", "features.6"]
    fit = tmp_path / "fit"
    assert main(["fit", "--model", model, "--permutation", str(perm), "--out", str(fit), "--mlflow-uri", "none",
                 *data, *TINY_FIT]) == 0
    fitted = json.loads((fit / "metrics.json").read_text())
    # the fit saw the inputs the network expects: the same original accuracy as at import ...
    assert fitted["original_top1"] == pytest.approx(imported_top1)
    standard = tmp_path / "standard"
    assert main(import_args(fashion_mnist_root, weights, standard, inputs=[])) == 0
    # ... which standard-normalised inputs would not give
    assert json.loads((standard / "metrics.json").read_text())["test_top1"] != pytest.approx(imported_top1)
    evaluated = tmp_path / "eval.json"
    assert main(["evaluate", "--model", model, "--predictor", str(fit / "predictor.safetensors"),
                 "--out", str(evaluated), "--mlflow-uri", "none", *data]) == 0
    assert json.loads(evaluated.read_text())["reconstructed_top1"] == pytest.approx(fitted["reconstructed_top1"])
    compressed = tmp_path / "compress"
    assert main(["compress", "--model", model, "--predictor", str(fit / "predictor.safetensors"), "--out",
                 str(compressed), "--mlflow-uri", "none", "--sparsities", "0,0.6", "--finetune", "none",
                 "--precisions", "fp32,int8", "--set", "progress=false"]) == 0
    # compress takes the data keys from the fit: same original accuracy without repeating them
    assert json.loads((compressed / "metrics.json").read_text())["original_top1"] == pytest.approx(imported_top1)
    importance = tmp_path / "importance"
    assert main(["importance", "--model", model, "--predictor", str(fit / "predictor.safetensors"), "--out",
                 str(importance), "--mlflow-uri", "none", "--sparsities", "0,0.5", "--set", "progress=false"]) == 0
    assert (importance / "importance.csv").is_file()


def test_plain_safetensors_weights_and_the_module_form(fashion_mnist_root, monkeypatch, tmp_path):
    """Weights as a foreign .safetensors (no nern metadata), the factory as package.module:function on sys.path."""
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    path = tmp_path / "my_cnn.safetensors"
    save_file(example_state(seed=1), str(path))
    assert main(import_args(fashion_mnist_root, path, tmp_path / "out", "my_cnn:make_cnn")) == 0
    stored = read_metadata(tmp_path / "out" / "model.safetensors")["model"]
    assert stored["factory"] == "my_cnn:make_cnn"


# ---------------------------------------------------------------------------------------------------------
# One line for each user error


def run_bad(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"nern {args[0]}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "not_a_net.py").write_text("def make(**kwargs):\n    return {'conv': 3}\n\nWIDTH = 16\n")
    state = example_state()
    files = {"factories": tmp / "not_a_net.py"}
    for name, bad in {
        "narrow": example_state(width=8),
        "missing": {k: v for k, v in state.items() if k != "classifier.bias"},
        "unexpected": {**state, "features.9.weight": torch.zeros(3)},
    }.items():
        files[name] = tmp / f"{name}.pt"
        torch.save(bad, files[name])
    return files


BAD_REFERENCES = [
    # (factory, weights, extra --set, texts the error line must contain)
    ("no_such_pkg.nets:make_cnn", None, [], ["no_such_pkg.nets:make_cnn", "no module named 'no_such_pkg'",
                                             "PYTHONPATH"]),
    (f"{EXAMPLE}:make_cnnn", None, [], ["make_cnnn", "has no attribute", "make_cnn"]),
    (f"{EXAMPLE.parent / 'nope.py'}:make_cnn", None, [], ["nope.py", "not found"]),
    ("examples/my_cnn.py", None, [], ["not a reference", "package.module:function"]),
    ("{factories}:make", None, [], ["not_a_net.py:make", "returned a dict, not a torch.nn.Module"]),
    ("{factories}:WIDTH", None, [], ["WIDTH", "type int, not a function"]),
    (FACTORY, None, ["model.kwargs={depth: 3}"], ["model.kwargs", "depth", "make_cnn(in_channels"]),
    (FACTORY, None, ["model.in_channels=3"], ["first conv takes 1 channel", "model.in_channels=1"]),
    (FACTORY, "narrow", [], ["narrow.pt", "does not fit", "make_cnn", "features.0.weight (8, 1, 3, 3) vs (16, 1, 3, 3)",
                             "model.kwargs"]),
    (FACTORY, "missing", [], ["missing.pt", "missing classifier.bias"]),
    (FACTORY, "unexpected", [], ["unexpected.pt", "unexpected features.9.weight"]),
]


@pytest.mark.parametrize("factory,weights_name,extra,needles", BAD_REFERENCES,
                         ids=["no module", "no attribute", "no file", "not a reference", "returns no module",
                              "not callable", "wrong kwargs", "wrong in_channels", "shape mismatch", "missing key",
                              "unexpected key"])
def test_user_errors_are_one_line_naming_the_reference(factory, weights_name, extra, needles, bad_files, weights,
                                                       fashion_mnist_root, tmp_path, capsys):
    factory = factory.format(factories=bad_files["factories"])
    checkpoint = bad_files[weights_name] if weights_name else weights
    out = tmp_path / "out"
    line = run_bad(import_args(fashion_mnist_root, checkpoint, out, factory, *sets(*extra)), capsys)
    for needle in needles:
        assert needle in line, line
    assert not (out / "model.safetensors").exists()


def test_a_reference_as_model_argument(monkeypatch):
    """`--model` takes a factory reference or a built-in arch besides a checkpoint; a missing file says so."""
    assert model_overrides(FACTORY) == {"model": {"factory": FACTORY}}
    assert model_overrides("resnet8") == {"model": {"arch": "resnet8"}}
    assert model_overrides("torchvision:IMAGENET1K_V1") == {"model": {"checkpoint": "torchvision:IMAGENET1K_V1"}}
    with pytest.raises(NernError, match="model file not found: nope.safetensors"):
        model_overrides("nope.safetensors")


def test_a_weights_file_of_another_factory_is_refused_by_name(imported, tmp_path):
    """model.safetensors remembers its factory: loading it as a built-in network names the key to fix."""
    with pytest.raises(NernError, match=r"model\.factory=.*my_cnn\.py:make_cnn"):
        load_model(ModelConfig(arch="resnet8", in_channels=1, checkpoint=str(imported)))


def test_a_missing_module_in_a_real_process_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "nern", "permute", "--model", "no_such_pkg:make", "--mode", "none",
                           "--out", str(tmp_path / "p.safetensors"), "--mlflow-uri", "none"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nern permute: error: model.factory 'no_such_pkg:make'"), lines

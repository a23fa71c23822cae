"""CIFAR ResNets, torchvision ResNet18 and checkpoint loading/saving (nern.models)."""

from __future__ import annotations

import copy
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from nern.config import DataConfig, ModelConfig
from nern.data import ImageSet, dataset_info, eval_batches, load_arrays
from nern.errors import NernError
from nern.models import (
    ZeroPadShortcut,
    build_model,
    count_parameters,
    load_model,
    load_weights,
    model_config_from_checkpoint,
    save_model,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PUBLIC_RESNET20 = SHARED_DATA / "pretrained" / "resnet20-12fca82f.th"
CIFAR10_JPEG = SHARED_DATA / "cifar10-jpeg"


def _randomise_buffers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh BNs have mean 0 / var 1 everywhere; random stats make round-trip checks meaningful."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("arch, params", [("resnet20", 269_722), ("resnet56", 853_018), ("resnet18", 11_689_512)])
def test_parameter_counts_match_the_published_networks(arch: str, params: int) -> None:
    num_classes = 1000 if arch == "resnet18" else 10
    assert count_parameters(build_model(ModelConfig(arch=arch, num_classes=num_classes))) == params


def test_option_a_has_no_shortcut_parameters_and_pads_symmetrically() -> None:
    model = build_model(ModelConfig(arch="resnet20", shortcut="A"))
    assert not [k for k in model.state_dict() if "shortcut" in k]
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = ZeroPadShortcut(16, 32)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_option_b_adds_projection_shortcuts_at_the_two_downsampling_blocks() -> None:
    state = build_model(ModelConfig(arch="resnet20", shortcut="B")).state_dict()
    convs = {k: tuple(v.shape) for k, v in state.items() if k.endswith("shortcut.0.weight")}
    assert convs == {"layer2.0.shortcut.0.weight": (32, 16, 1, 1), "layer3.0.shortcut.0.weight": (64, 32, 1, 1)}
    assert "layer3.0.shortcut.1.running_var" in state


def test_every_activation_is_a_relu_module_call() -> None:
    """Feature-map hooks rely on it: stem + 2 per block = 19 ReLU calls for ResNet20, block output = relu2's."""
    model = build_model(ModelConfig(arch="resnet20")).eval()
    calls: list[str] = []
    outputs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls.append(name)
            outputs[name] = output
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(record(name))
    block_out = {}
    model.layer2[1].register_forward_hook(lambda m, i, o: block_out.update(x=o))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 19 and len(set(calls)) == 19
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert torch.equal(outputs["layer2.1.relu2"], block_out["x"])


def test_models_deepcopy_and_pickle() -> None:
    model = build_model(ModelConfig(arch="resnet8"))
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), clone.eval()(x))


def test_one_channel_models_run_on_28x28() -> None:
    cifar = build_model(ModelConfig(arch="resnet20", in_channels=1, num_classes=10)).eval()
    assert cifar(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    tv = build_model(ModelConfig(arch="resnet18", in_channels=1, num_classes=10)).eval()
    assert tv.conv1.weight.shape == (64, 1, 7, 7)
    assert tv(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_unknown_arch_lists_the_allowed_ones() -> None:
    with pytest.raises(NernError, match="resnet20.*resnet18"):
        build_model(ModelConfig(arch="resnet19"))


def test_safetensors_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = _randomise_buffers(build_model(ModelConfig(arch="resnet20", shortcut="B", num_classes=7)))
    path = tmp_path / "model.safetensors"
    save_model(model, path, {"top1": 0.5})
    cfg = model_config_from_checkpoint(path)
    assert cfg == ModelConfig(arch="resnet20", num_classes=7, shortcut="B", checkpoint=str(path))
    loaded = load_model(cfg)
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert load_weights(build_model(cfg), str(path))["top1"] == 0.5


def test_user_module_without_config_saves_and_reports_none(tmp_path: Path) -> None:
    path = tmp_path / "user.safetensors"
    save_model(nn.Conv2d(3, 4, 3), path)
    assert model_config_from_checkpoint(path) is None


def test_torch_checkpoint_with_dataparallel_prefix_loads(tmp_path: Path) -> None:
    source = _randomise_buffers(build_model(ModelConfig(arch="resnet8")))
    path = tmp_path / "wrapped.th"
    torch.save({"best_prec1": 1.0, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = build_model(ModelConfig(arch="resnet8"))
    load_weights(target, str(path))
    assert torch.equal(target.layer3[0].bn2.running_mean, source.layer3[0].bn2.running_mean)


def test_checkpoint_of_another_architecture_names_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "resnet20b.pt"
    torch.save(build_model(ModelConfig(arch="resnet20", shortcut="B")).state_dict(), path)
    with pytest.raises(NernError, match=r"unexpected layer2\.0\.shortcut\.0\.weight"):
        load_weights(build_model(ModelConfig(arch="resnet20", shortcut="A")), str(path))
    with pytest.raises(NernError, match=r"missing layer1\.3\.conv1\.weight.*in all"):
        load_weights(build_model(ModelConfig(arch="resnet32", shortcut="B")), str(path))
    with pytest.raises(NernError, match=r"linear\.weight \(10, 64\) vs \(100, 64\)"):
        load_weights(build_model(ModelConfig(arch="resnet20", shortcut="B", num_classes=100)), str(path))


def test_load_model_rejects_a_checkpoint_saved_for_another_config(tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    save_model(build_model(ModelConfig(arch="resnet20", shortcut="B")), path)
    with pytest.raises(NernError, match="model.shortcut='B'"):
        load_model(ModelConfig(arch="resnet20", shortcut="A", checkpoint=str(path)))


def test_nan_weights_are_rejected_by_name(tmp_path: Path) -> None:
    model = build_model(ModelConfig(arch="resnet8"))
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_model(model, path)
    with pytest.raises(NernError, match=r"layer2\.0\.conv1\.weight"):
        load_weights(build_model(ModelConfig(arch="resnet8")), str(path))


@pytest.mark.parametrize("name", ["missing.th", "corrupt.th", "corrupt.safetensors", "weights.bin"])
def test_missing_corrupt_or_unknown_files_are_user_errors(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name != "missing.th":
        path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(NernError, match=str(path)):
        load_weights(build_model(ModelConfig(arch="resnet8")), str(path))


def test_torchvision_weights_offline_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    model = build_model(ModelConfig(arch="resnet18", num_classes=1000))
    with pytest.raises(NernError, match="could not download torchvision weights.*offline"):
        load_weights(model, "torchvision:IMAGENET1K_V1")
    with pytest.raises(NernError, match="torchvision:IMAGENET1K_V1"):
        load_weights(model, "torchvision:IMAGENET1K_V9")


@pytest.mark.skipif(not PUBLIC_RESNET20.is_file(), reason="shared data (../shared/data) is absent")
def test_public_resnet20_loads_by_name_and_classifies_cifar10(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = load_model(ModelConfig(arch="resnet20", shortcut="A", checkpoint=str(PUBLIC_RESNET20)))
    public = torch.load(PUBLIC_RESNET20, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.layer3[2].conv2.weight, public["module.layer3.2.conv2.weight"])
    if not CIFAR10_JPEG.is_dir():
        pytest.skip("cifar10-jpeg is absent")
    # every 20th test image, linked into a small ImageFolder: the folder is sorted by class, so the first 500
    # would all be airplanes; decoding 500 JPEGs instead of 10,000 keeps the test fast
    for path in sorted((CIFAR10_JPEG / "test").glob("*/*.jpg"))[::20]:
        link = tmp_path / "cifar" / "test" / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    monkeypatch.setenv("NERN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "cifar"))
    subset = ImageSet(*load_arrays(cfg, "test"), dataset_info(DataConfig(name="cifar10")))
    assert len(subset) == 500 and subset.labels.bincount().tolist() == [50] * 10
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in eval_batches(subset, 250))
    assert correct / 500 > 0.7  # 81.03% on the full JPEG test set, chance is 10%

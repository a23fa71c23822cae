"""Weight-space symmetry permutations of the original network (nern.symmetry)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nern.config import ModelConfig, RepresentConfig
from nern.errors import NernError
from nern.models import build_model, load_model
from nern.symmetry import (
    ChannelGroup,
    channel_groups,
    check_permutations,
    compose_permutations,
    identity_chain_quality,
    permute_groups,
    symmetry_permute,
)

# the shared data sit next to the main checkout (../shared) or, from a worktree under wt/, two levels up
PUBLIC_RESNET20 = next((p for p in (Path(__file__).resolve().parents[k] / "shared" / "data" / "pretrained" /
                                    "resnet20-12fca82f.th" for k in (2, 3)) if p.is_file()), Path("absent"))
ALL_CONVS = RepresentConfig(preset="none")


class PlainCNN(nn.Module):
    """Conv biases, max-pooling (module and function), a 1x1 conv, a spatial mean, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv3 = nn.Conv2d(12, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.conv3(x).mean((2, 3)))


class DepthwiseNet(nn.Module):
    """A depthwise conv keeps its input's channels; BatchNorm1d on a Linear's output; view-flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU6())
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pointwise = nn.Conv2d(12, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(16, 20)
        self.bn_hidden = nn.BatchNorm1d(20)
        self.out = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.pointwise(F.relu(self.depthwise(self.stem(x)))))
        x = self.pool(F.relu(x)).view(x.size(0), -1)
        return self.out(F.relu(self.bn_hidden(self.hidden(x))))


class CumsumNet(nn.Module):
    """`cumsum` over channels mixes them: the analysis does not know it and must leave conv1's channels alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cumsum(F.relu(self.bn1(self.conv1(x))), dim=1)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv3(x), 1), 1))


class ConcatNet(nn.Module):
    """Two branches concatenated on the channel axis (not handled: both stay unpermuted)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 5, 3, padding=1)
        self.d = nn.Conv2d(5, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.d(torch.relu(x)).amax((2, 3))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y  # data-dependent control flow


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh norms are 1/0 everywhere, which would hide a norm tensor left unpermuted."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for t in (module.weight, module.bias, module.running_mean):
                t.data.copy_(torch.randn(t.shape, generator=gen))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


MODELS = {
    "resnet20-A": lambda: build_model(ModelConfig(arch="resnet20", shortcut="A")),
    "resnet20-B": lambda: build_model(ModelConfig(arch="resnet20", shortcut="B")),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "plain-cnn": PlainCNN,
    "depthwise": DepthwiseNet,
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomise(MODELS[name]())


def _assert_same_function(a: nn.Module, b: nn.Module, shape: tuple[int, ...] = (4, 3, 32, 32)) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= 1e-5 * ya.abs().max()


def _random_perms(groups: list[ChannelGroup], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    orders = [None if g.fixed else torch.randperm(g.own_slots().numel(), generator=gen) for g in groups]
    return compose_permutations(groups, orders)


def _moved(perms: list[torch.Tensor]) -> int:
    return sum(int((p != torch.arange(p.numel())).sum()) for p in perms)


def _differ(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(MODELS))
def test_symmetry_permuted_network_computes_the_same_function(name: str) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permuted, report = symmetry_permute(model, ALL_CONVS)
    assert report["moved_channels"] > 0 and report["permutation_bytes"] == 0
    assert _differ(model, permuted)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    _assert_same_function(model, permuted)


@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutations_of_the_groups_keep_the_function(name: str) -> None:
    model = _model(name)
    groups = channel_groups(model)
    for seed in range(2):
        perms = _random_perms(groups, seed)
        assert _moved(perms) > 0
        _assert_same_function(model, permute_groups(model, groups, perms))


def test_input_and_logits_are_fixed_and_residual_streams_are_one_group() -> None:
    model = _model("resnet20-B")
    groups = channel_groups(model)
    by_tensor = {binding: g for g in groups for binding in g.bindings}
    assert by_tensor[("conv1.weight", 1)].fixed == "network input"
    assert by_tensor[("linear.weight", 0)].fixed == "network output"
    stream = by_tensor[("layer2.0.bn2.weight", 0)]
    assert stream.fixed is None
    for binding in [("layer2.0.shortcut.1.weight", 0), ("layer2.2.conv1.weight", 1), ("layer3.0.conv1.weight", 1),
                    ("layer3.0.shortcut.0.weight", 1), ("layer2.1.bn2.running_var", 0)]:
        assert by_tensor[binding] is stream
    inner = by_tensor[("layer2.1.conv1.weight", 0)]
    assert inner is by_tensor[("layer2.1.bn1.running_mean", 0)] is by_tensor[("layer2.1.conv2.weight", 1)]
    assert inner is not stream and inner.fixed is None


def test_option_a_padding_embeds_the_narrow_stream_and_leaves_the_padding_free() -> None:
    model = _model("resnet20-A")
    groups = channel_groups(model)
    by_tensor = {binding: i for i, g in enumerate(groups) for binding in g.bindings}
    narrow, wide = by_tensor[("layer1.2.bn2.weight", 0)], by_tensor[("layer2.0.bn2.weight", 0)]
    pad = model.layer2[0].shortcut.pad_front
    assert groups[wide].inherits == [(narrow, pad, 16)]
    assert groups[wide].own_slots().tolist() == [*range(pad), *range(pad + 16, 32)]
    perms = _random_perms(groups, 3)
    assert torch.equal(perms[wide][pad:pad + 16], perms[narrow] + pad)


def test_an_unknown_op_leaves_its_channels_alone() -> None:
    model = _randomise(CumsumNet())
    groups = channel_groups(model, torch.zeros(2, 3, 16, 16))
    by_tensor = {binding: g for g in groups for binding in g.bindings}
    assert "cumsum" in by_tensor[("conv1.weight", 0)].fixed
    assert by_tensor[("bn1.running_var", 0)] is by_tensor[("conv1.weight", 0)]
    assert by_tensor[("conv2.weight", 0)].fixed is None  # the unknown op only pins what it reads
    perms = _random_perms(groups, 0)
    assert _moved(perms) > 0
    _assert_same_function(model, permute_groups(model, groups, perms), (3, 3, 16, 16))
    permuted, _ = symmetry_permute(model, example_input=torch.zeros(2, 3, 16, 16))
    _assert_same_function(model, permuted, (3, 3, 16, 16))
    assert torch.equal(permuted.conv1.weight, model.conv1.weight)


def test_a_concat_pins_both_branches() -> None:
    model = ConcatNet().eval()
    groups = channel_groups(model)
    by_tensor = {binding: g for g in groups for binding in g.bindings}
    assert by_tensor[("a.weight", 0)].fixed and by_tensor[("b.bias", 0)].fixed
    assert by_tensor[("c.weight", 0)].fixed is None
    _assert_same_function(model, permute_groups(model, groups, _random_perms(groups, 0)))


def test_permutations_that_break_the_constraints_are_rejected() -> None:
    groups = channel_groups(_model("resnet20-A"))
    fixed = next(i for i, g in enumerate(groups) if g.fixed)
    wide = next(i for i, g in enumerate(groups) if g.inherits)
    perms = _random_perms(groups, 0)
    bad = list(perms)
    bad[fixed] = torch.roll(perms[fixed], 1)
    with pytest.raises(ValueError, match="fixed"):
        check_permutations(groups, bad)
    bad = list(perms)
    bad[wide] = torch.arange(groups[wide].size)
    with pytest.raises(ValueError, match="copy"):
        check_permutations(groups, bad)


def test_untraceable_models_are_a_user_error() -> None:
    with pytest.raises(NernError, match="crossfilter"):
        symmetry_permute(Untraceable())


def test_shape_propagation_leaves_training_mode_and_statistics_alone() -> None:
    model = _model("resnet20-A").train()
    stats = model.bn1.running_mean.clone()
    permuted, _ = symmetry_permute(model)
    assert model.training and model.layer1[0].bn1.training and permuted.training
    assert torch.equal(model.bn1.running_mean, stats)


def _smooth_cnn(width: int = 24) -> nn.Module:
    """Convs whose kernels turn smoothly with the input channel: neighbouring channels are alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3), nn.ReLU(),
                          nn.Conv2d(width, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))
    for conv in (model[2], model[4]):
        a, b = torch.randn(2, width, 1, 3, 3)
        angle = torch.linspace(0, math.pi, width).reshape(1, width, 1, 1)
        conv.weight.data.copy_(a * torch.cos(angle) + b * torch.sin(angle))
    return model.eval()


def test_symmetry_recovers_shuffled_structure() -> None:
    smooth = _smooth_cnn()
    groups = channel_groups(smooth)
    shuffled = permute_groups(smooth, groups, _random_perms(groups, 0))
    permuted, report = symmetry_permute(shuffled, ALL_CONVS)
    assert report["chain_quality_none"] == pytest.approx(identity_chain_quality(shuffled, ALL_CONVS))
    assert report["chain_quality"] == pytest.approx(identity_chain_quality(permuted, ALL_CONVS))
    assert report["chain_quality"] > report["chain_quality_none"] + 0.1
    _assert_same_function(shuffled, permuted)


@pytest.mark.skipif(not PUBLIC_RESNET20.is_file(), reason="shared data (../shared/data) is absent")
def test_symmetry_smooths_the_public_resnet20() -> None:
    model = load_model(ModelConfig(arch="resnet20", shortcut="A", checkpoint=str(PUBLIC_RESNET20)))
    permuted, report = symmetry_permute(model)
    assert report["chain_quality"] > report["chain_quality_none"]
    _assert_same_function(model, permuted)


def test_unknown_feature_choice_is_a_user_error() -> None:
    with pytest.raises(NernError, match="features"):
        symmetry_permute(PlainCNN(), features="rows")  # type: ignore[arg-type]

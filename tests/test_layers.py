import pytest
import torch
import torchvision
from torch import nn

from nern.config import ModelConfig, RepresentConfig
from nern.errors import NernError
from nern.feature_maps import FeatureMapRecorder, count_feature_maps, map_graph
from nern.layers import find_conv_layers, represented_params
from nern.models import build_model

from helpers import UserCNN


def test_resnet20_option_b_layers_match_paper():
    model = build_model(ModelConfig(arch="resnet20", shortcut="B"))
    layers = find_conv_layers(model)
    assert len(layers) == 21
    assert sum(layer.num_kernels for layer in layers) == 32_304
    assert represented_params(layers) == 270_256
    names = [layer.name for layer in layers]
    # projection conv right after its block's conv2
    i = names.index("layer2.0.conv2")
    assert names[i + 1] == "layer2.0.shortcut.0"


def test_resnet20_option_a_has_no_shortcut_convs():
    layers = find_conv_layers(build_model(ModelConfig(arch="resnet20", shortcut="A")))
    assert len(layers) == 19 and not any("shortcut" in layer.name for layer in layers)


def test_resnet18_preset_block_convs_only():
    layers = find_conv_layers(torchvision.models.resnet18())
    assert len(layers) == 16
    assert sum(layer.num_kernels for layer in layers) == 1_220_608
    assert represented_params(layers) == 10_985_472


def test_user_cnn_generic_discovery_keeps_5x5_verbatim():
    layers = find_conv_layers(UserCNN())
    assert [layer.name for layer in layers] == ["features.3", "features.5", "features.8"]
    assert [layer.kernel_size for layer in layers] == [3, 1, 3]


def test_include_exclude_patterns():
    model = build_model(ModelConfig(arch="resnet20"))
    only_stage3 = find_conv_layers(model, RepresentConfig(include=[r"^layer3\."]))
    assert all(layer.name.startswith("layer3.") for layer in only_stage3) and len(only_stage3) == 6
    no_stem = find_conv_layers(model, RepresentConfig(exclude=[r"^conv1$"]))
    assert len(no_stem) == 18
    with pytest.raises(NernError, match="represent"):
        find_conv_layers(model, RepresentConfig(include=["nothing-matches"]))


def test_resnet20_has_the_papers_28_feature_maps():
    for shortcut in "AB":
        model = build_model(ModelConfig(arch="resnet20", shortcut=shortcut)).eval()
        assert count_feature_maps(model, torch.randn(2, 3, 32, 32)) == 28


def test_feature_maps_are_pre_activation_and_include_residual_sum():
    model = build_model(ModelConfig(arch="resnet20")).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureMapRecorder(model) as rec, torch.no_grad(), rec.record() as maps:
        model(x)
    assert (maps[0] < 0).any()  # stem BN output before its ReLU
    block = model.layer1[0]
    with torch.no_grad():
        stem_bn = model.bn1(model.conv1(x))
        stem = model.relu(stem_bn)
        bn1 = block.bn1(block.conv1(stem))
        bn2 = block.bn2(block.conv2(block.relu1(bn1)))
        residual = bn2 + block.shortcut(stem)
    for got, want in zip(maps[:4], (stem_bn, bn1, bn2, residual)):  # stem, then bn1, bn2, sum of block 1
        assert torch.allclose(got, want, atol=1e-6)


def test_torchvision_inplace_relu_maps_are_pre_activation():
    model = torchvision.models.resnet18().eval()
    with FeatureMapRecorder(model) as rec, torch.no_grad(), rec.record() as maps:
        model(torch.randn(1, 3, 64, 64))
    assert len(maps) == 1 + 8 * 3
    assert all((m < 0).any() for m in maps)


def test_user_cnn_maps_are_conv_outputs_feeding_relus():
    """No normalisation: the maps are exactly the outputs of the four convs, each the input of a ReLU."""
    model = UserCNN().eval()
    x = torch.randn(2, 1, 28, 28)
    assert count_feature_maps(model, x) == 4
    convs = [model.features[i] for i in (0, 3, 5, 8)]
    expected = []
    for conv in convs:
        conv.register_forward_hook(lambda m, i, o: expected.append(o.detach().clone()))
    _, maps = _hook_maps(model, x)
    assert len(maps) == len(expected) == 4
    for got, want in zip(maps, expected):
        assert torch.equal(got, want) and (got < 0).any()  # pre-activation: the ReLU has not cut it


def _hook_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with FeatureMapRecorder(model) as rec, torch.no_grad(), rec.record() as maps:
        out = model(x)
    return out, list(maps)


@pytest.mark.parametrize("name", ["resnet20-A", "resnet20-B", "torchvision-resnet18", "user-cnn"])
def test_map_graph_returns_exactly_the_hook_recorders_maps(name: str) -> None:
    """The fx graph that torch.compile fuses must distil the same maps as the hooks (in-place ops included)."""
    torch.manual_seed(0)
    if name.startswith("resnet20"):
        model, x = build_model(ModelConfig(arch="resnet20", shortcut=name[-1])), torch.randn(2, 3, 32, 32)
    elif name == "torchvision-resnet18":
        model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    else:
        model, x = UserCNN(), torch.randn(2, 1, 28, 28)
    model.eval()
    expected_out, expected = _hook_maps(model, x)
    graph = map_graph(model)
    assert graph is not None
    with torch.no_grad():
        out, maps = graph(x)
    assert torch.equal(out, expected_out)
    assert len(maps) == len(expected) > 0
    for got, want in zip(maps, expected):
        assert torch.equal(got, want)


def test_map_graph_is_none_for_an_untraceable_model() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else self.conv(-x)  # data-dependent: fx cannot trace it

    assert map_graph(Branchy()) is None

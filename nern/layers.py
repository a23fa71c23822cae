"""Which conv layers the predictor represents, discovered from the module itself (docs/METHOD.md §1).

Default: every `nn.Conv2d` with a square kernel of at most `max_kernel`, in registration order (for CIFAR
ResNets with option-B shortcuts that puts the projection conv right after its block's `conv2`, as in the
paper). The preset `resnet18_blocks` keeps only the block convs of a torchvision ResNet (the paper's
ImageNet choice: the 7x7 stem and 1x1 downsample convs are copied). Everything else is copied verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from nern.config import RepresentConfig
from nern.errors import NernError

RESNET_BLOCK_CONV = r"^layer\d+\.\d+\.conv\d+$"


@dataclass(frozen=True)
class ConvLayer:
    """A represented conv layer: its module path and weight shape (Cout, Cin, k, k)."""

    name: str
    shape: tuple[int, int, int, int]

    @property
    def param(self) -> str:
        return f"{self.name}.weight"

    @property
    def num_kernels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def kernel_size(self) -> int:
        return self.shape[2]

    @property
    def num_weights(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2] * self.shape[3]


def _is_torchvision_resnet(model: nn.Module) -> bool:
    try:
        from torchvision.models import ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(model, ResNet)


def _preset_patterns(model: nn.Module, cfg: RepresentConfig) -> list[str]:
    if cfg.preset == "resnet18_blocks" or (cfg.preset == "auto" and _is_torchvision_resnet(model)):
        return [RESNET_BLOCK_CONV]
    return []


def find_conv_layers(model: nn.Module, cfg: RepresentConfig | None = None) -> list[ConvLayer]:
    """The represented convs of `model`, in registration order; include/exclude are regexes on module paths."""
    cfg = cfg or RepresentConfig()
    include = list(cfg.include) + _preset_patterns(model, cfg)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        kh, kw = module.kernel_size
        if kh != kw or kh > cfg.max_kernel:
            continue
        if include and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in cfg.exclude):
            continue
        layers.append(ConvLayer(name, tuple(module.weight.shape)))
    if not layers:
        raise NernError(
            "no conv layer to represent was found in the model; check represent.include/exclude/max_kernel"
        )
    return layers


def conv_weights(model: nn.Module, layers: list[ConvLayer]) -> list[torch.Tensor]:
    """The original weights of the represented layers (detached views)."""
    params = dict(model.named_parameters())
    return [params[layer.param].detach() for layer in layers]


def represented_params(layers: list[ConvLayer]) -> int:
    return sum(layer.num_weights for layer in layers)

"""Small networks and paths shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRETRAINED_RESNET20 = SHARED_DATA / "pretrained" / "resnet20-12fca82f.th"
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg"


class UserCNN(nn.Module):
    """A user's own CNN: conv biases, max-pooling, no BatchNorm, a 1x1 conv and a 5x5 conv (kept verbatim)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
            nn.Conv2d(12, 12, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory) -> Path:
    """A data root holding real Fashion-MNIST, unpacked once per session from Debian's package."""
    if not list(DEBIAN_FASHION_MNIST.glob("*.gz")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    return tmp_path_factory.mktemp("fashion-mnist")


def fmnist_args(root: Path) -> list[str]:
    """CLI overrides for a tiny, fast slice of real Fashion-MNIST."""
    return sets("data.name=fashion_mnist", f"data.root={root}", "data.download=false", "data.val_size=200",
                "data.eval_limit=200", "data.batch_size=32")


def sets(*items: str) -> list[str]:
    """`--set` flags for each KEY=VALUE."""
    return [arg for item in items for arg in ("--set", item)]


def save_resnet8(path: Path, in_channels: int = 1, seed: int = 0) -> Path:
    """A randomly initialised ResNet8 checkpoint: enough network for the CLI and fault tests."""
    from nern.config import ModelConfig
    from nern.models import build_model, save_model

    torch.manual_seed(seed)
    cfg = ModelConfig(arch="resnet8", in_channels=in_channels)
    save_model(build_model(cfg), path, {"model": {**cfg.__dict__}})
    return path


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory) -> Path:
    """A one-channel ResNet8 checkpoint, built once per test module."""
    return save_resnet8(tmp_path_factory.mktemp("model") / "model.safetensors")


class Recorder:
    """A tracker that remembers every point it was sent."""

    run_id = "test"

    def __init__(self) -> None:
        self.points: list[tuple[str, int, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.points += [(name, step, value) for name, value in metrics.items()]

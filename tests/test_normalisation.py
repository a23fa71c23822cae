"""data.mean / data.std / data.input_range: what the network is fed, checked against the data set's channels."""

from __future__ import annotations

import pytest
import torch

from nern.config import DataConfig, FitConfig, load_config
from nern.data import (
    GREY_MEAN,
    GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSet,
    NoiseStream,
    dataset_info,
    eval_batches,
    normalise,
)
from nern.errors import NernError

# CIFAR-10's own statistics, as published in 0..1 and in 0..255 units
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def pixels(channels: int, n: int = 4, size: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def test_defaults_are_todays_statistics_bit_for_bit():
    for name, mean, std in (("cifar10", IMAGENET_MEAN, IMAGENET_STD), ("fashion_mnist", GREY_MEAN, GREY_STD)):
        info = dataset_info(DataConfig(name=name))
        assert (info.mean, info.std, info.noise_mean, info.noise_std) == (mean, std, None, None)
        x = pixels(info.in_channels)
        expected = (x.float() - torch.tensor(mean).view(1, -1, 1, 1) * 255) * (
            1 / (torch.tensor(std).view(1, -1, 1, 1) * 255))
        assert torch.equal(normalise(x, info), expected)


def test_raw_pixels_reach_the_network_unchanged():
    info = dataset_info(DataConfig(name="cifar10", input_range=255, mean=[0, 0, 0], std=[1, 1, 1]))
    x = pixels(3)
    torch.testing.assert_close(normalise(x, info), x.float())
    images = ImageSet(x, torch.zeros(len(x), dtype=torch.int64), info)
    torch.testing.assert_close(next(eval_batches(images, 8))[0], x.float())


def test_unit_range_without_statistics_gives_zero_to_one():
    info = dataset_info(DataConfig(name="fashion_mnist", mean=[0], std=[1]))
    x = pixels(1)
    torch.testing.assert_close(normalise(x, info), x.float() / 255)


def test_statistics_in_either_unit_mean_the_same_inputs():
    in_unit = dataset_info(DataConfig(name="cifar10", mean=CIFAR_MEAN, std=CIFAR_STD))
    in_255 = dataset_info(DataConfig(name="cifar10", input_range=255, mean=[m * 255 for m in CIFAR_MEAN],
                                     std=[s * 255 for s in CIFAR_STD]))
    x = pixels(3)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, -1, 1, 1), torch.tensor(CIFAR_STD).view(1, -1, 1, 1)
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(normalise(x, in_unit), expected)
    torch.testing.assert_close(normalise(x, in_255), expected)


def test_only_mean_keeps_the_standard_std():
    info = dataset_info(DataConfig(name="fashion_mnist", mean=[0.25]))
    assert info.mean == (0.25,) and info.std == GREY_STD


@pytest.mark.parametrize("cfg,needle", [
    (DataConfig(name="fashion_mnist", mean=[0, 0, 0]), "data.mean has 3 value(s) but data.name=fashion_mnist has 1"),
    (DataConfig(name="cifar10", std=[0.5]), "data.std has 1 value(s) but data.name=cifar10 has 3"),
    (DataConfig(name="cifar10", input_range=255), "data.input_range=255 needs data.mean and data.std"),
    (DataConfig(name="cifar10", input_range=255, mean=[0, 0, 0]), "data.input_range=255 needs data.mean and data.std"),
    (DataConfig(name="fashion_mnist", std=[0]), "data.std=[0.0] must be > 0"),
])
def test_bad_normalisation_names_the_key(cfg, needle):
    with pytest.raises(NernError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        dataset_info(cfg)


def test_config_keys_parse_from_the_command_line():
    cfg = load_config(FitConfig, overrides=["data.mean=[0, 0, 0]", "data.std=1,1,1", "data.input_range=255"])
    assert (cfg.data.mean, cfg.data.std, cfg.data.input_range) == ([0.0] * 3, [1.0] * 3, 255)
    assert load_config(FitConfig).data.mean is None
    with pytest.raises(NernError, match="data.input_range.*choose one of 1, 255"):
        load_config(FitConfig, overrides=["data.input_range=100"])
    with pytest.raises(NernError, match="data.mean"):
        load_config(FitConfig, overrides=["data.mean=abc"])


def _pixel_space(x: torch.Tensor, info) -> torch.Tensor:
    """Invert the network's normalisation: which 0..1 pixels `x` stands for."""
    return x * torch.tensor(info.std).view(1, -1, 1, 1) + torch.tensor(info.mean).view(1, -1, 1, 1)


def test_data_free_noise_is_the_same_pixel_noise_whatever_the_network_expects():
    """docs/METHOD.md §7: U[-2, 2] in the standard normalised space; a raw-pixel network gets it in its own units."""
    standard = dataset_info(DataConfig(name="cifar10"))
    raw = dataset_info(DataConfig(name="cifar10", input_range=255, mean=[0, 0, 0], std=[1, 1, 1]))
    a, b = NoiseStream(standard, 16, seed=3).next()[0], NoiseStream(raw, 16, seed=3).next()[0]
    assert a.min() >= -2 and a.max() <= 2  # default: the stream is untouched
    torch.testing.assert_close(_pixel_space(a, standard), _pixel_space(b, raw))
    assert b.abs().max() > 100  # raw units: the noise spans the pixel range, not +-2 of 255

"""In-memory data sets, exactly resumable batch streams, noise, and the ImageNet-style streaming path (nern.data)."""

from __future__ import annotations

import dataclasses

import warnings
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

import nern.data as data_mod
from nern.artifacts import load_tensors
from nern.config import DataConfig
from nern.data import (
    DatasetInfo,
    ImageSet,
    NoiseStream,
    StreamingBatches,
    augment_batch,
    build_splits,
    check_compatible,
    dataset_info,
    eval_batches,
    load_arrays,
    normalise,
    random_crop,
    train_stream,
)
from nern.errors import NernError

RGB32 = DatasetInfo(3, 10, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32)
GREY28 = DatasetInfo(1, 10, (0.5,), (0.5,), 28)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _random_images(n: int, info: DatasetInfo, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, info.in_channels, info.image_size, info.image_size), generator=g, dtype=torch.uint8)
    return images, torch.arange(n)


def _write_image_folder(root: Path, splits: dict[str, int], classes: int = 2, size: int = 8) -> None:
    """PNGs (lossless) whose first pixel encodes (split, index), so every image is distinguishable after decoding."""
    for s, (split, per_class) in enumerate(splits.items()):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = torch.full((3, size, size), 7, dtype=torch.uint8)
                image[:, 0, 0] = torch.tensor([s, c, i], dtype=torch.uint8)
                with warnings.catch_warnings():  # torchvision 0.29 deprecates its image I/O in favour of TorchCodec
                    warnings.simplefilter("ignore", DeprecationWarning)
                    write_png(image, str(folder / f"{i:03d}.png"))


def _take(stream, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.next() for _ in range(count)]


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_resumed_stream_yields_exactly_the_uninterrupted_batches() -> None:
    images, labels = _random_images(100, RGB32)
    uninterrupted = _take(train_stream(DataConfig(batch_size=16), 3, ImageSet(images, labels, RGB32)), 15)
    first = train_stream(DataConfig(batch_size=16), 3, ImageSet(images, labels, RGB32))
    head = _take(first, 8)  # 6 batches per epoch: the cut falls inside epoch 1
    state = first.state_dict()
    resumed = train_stream(DataConfig(batch_size=16), 3, ImageSet(images, labels, RGB32))
    resumed.load_state_dict(state)
    assert resumed.epoch_float == pytest.approx(8 / 6)
    assert _same_batches(uninterrupted, head + _take(resumed, 7))
    other_seed = _take(train_stream(DataConfig(batch_size=16), 4, ImageSet(images, labels, RGB32)), 15)
    assert not _same_batches(uninterrupted, other_seed)


def test_an_epoch_visits_distinct_images_and_drops_the_last_partial_batch() -> None:
    images, labels = _random_images(100, RGB32)
    stream = train_stream(DataConfig(batch_size=16, augment=False), 0, ImageSet(images, labels, RGB32))
    epoch0 = torch.cat([y for _, y in _take(stream, 6)])
    assert stream.epoch_float == 1.0 and len(epoch0.unique()) == 96
    epoch1 = torch.cat([y for _, y in _take(stream, 6)])
    assert len(epoch1.unique()) == 96 and not torch.equal(epoch0, epoch1)


def test_resume_with_another_data_config_is_refused() -> None:
    images, labels = _random_images(100, RGB32)
    state = train_stream(DataConfig(batch_size=16), 0, ImageSet(images, labels, RGB32)).state_dict()
    with pytest.raises(NernError, match="batch_size"):
        train_stream(DataConfig(batch_size=32), 0, ImageSet(images, labels, RGB32)).load_state_dict(state)


def test_augmentation_changes_images_keeps_shapes_and_labels() -> None:
    images, labels = _random_images(64, RGB32)
    plain = _take(train_stream(DataConfig(batch_size=32, augment=False), 1, ImageSet(images, labels, RGB32)), 2)
    augmented = _take(train_stream(DataConfig(batch_size=32, augment=True), 1, ImageSet(images, labels, RGB32)), 2)
    for (xp, yp), (xa, ya) in zip(plain, augmented):
        assert xa.shape == xp.shape == (32, 3, 32, 32) and xa.dtype == torch.float32
        assert torch.equal(ya, yp) and not torch.equal(xa, xp)
    grey, grey_labels = _random_images(8, GREY28)
    assert augment_batch(grey, GREY28, torch.Generator().manual_seed(0)).shape == (8, 1, 28, 28)


def test_random_crop_is_a_window_of_the_zero_padded_image() -> None:
    images, _ = _random_images(6, DatasetInfo(3, 10, (0,) * 3, (1,) * 3, 10))
    cropped = random_crop(images, 4, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for original, crop in zip(padded, cropped):
        windows = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(original[:, dy:dy + 10, dx:dx + 10], crop)]
        assert windows


def test_normalise_and_eval_batches_keep_order_and_the_last_batch() -> None:
    images, labels = _random_images(10, RGB32)
    batches = list(eval_batches(ImageSet(images, labels, RGB32), 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    black = normalise(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), RGB32).flatten()
    assert torch.allclose(black, -torch.tensor(RGB32.mean) / torch.tensor(RGB32.std))


def test_noise_stream_is_bounded_deterministic_and_resumable() -> None:
    a, b = NoiseStream(RGB32, 64, seed=5), NoiseStream(RGB32, 64, seed=5)
    x, y = a.next()
    assert x.shape == (64, 3, 32, 32) and bool((y == -1).all())
    assert x.min() >= -2 and x.max() <= 2 and x.min() < -1.9 and x.max() > 1.9 and abs(float(x.mean())) < 0.05
    assert torch.equal(x, b.next()[0])
    state = a.state_dict()
    expected = a.next()[0]
    resumed = NoiseStream(RGB32, 64, seed=5)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next()[0], expected)
    assert not torch.equal(NoiseStream(RGB32, 64, seed=6).next()[0], x)


def test_val_is_carved_from_train_disjointly_and_test_is_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NERN_CACHE_DIR", str(tmp_path / "cache"))
    _write_image_folder(tmp_path / "data", {"train": 10, "test": 4})
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "data"), val_size=5, eval_limit=6)
    splits = build_splits(cfg)
    tags = {name: {tuple(img[:, 0, 0].tolist()) for img in getattr(splits, name).images} for name in ("train", "val", "test")}
    assert len(splits.train) == 15 and len(splits.val) == 5 and len(splits.test) == 6
    assert not tags["train"] & tags["val"] and len(tags["train"] | tags["val"]) == 20
    assert {t[0] for t in tags["test"]} == {1} and {t[1] for t in tags["test"]} == {0, 1}  # limit spans both classes
    assert splits.train.info == DatasetInfo(3, 2, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 8)
    cached, meta = load_tensors(next((tmp_path / "cache").glob("*/train.safetensors")))
    assert torch.equal(torch.cat([splits.train.images, splits.val.images]).sort(0).values,
                       cached["images"].sort(0).values) and meta["classes"] == ["class0", "class1"]
    monkeypatch.setattr(data_mod, "_decode_all", _no_decoding)
    again = build_splits(cfg)  # served from the cache: decoding would fail
    assert torch.equal(again.val.images, splits.val.images)
    assert not torch.equal(build_splits(dataclasses.replace(cfg, split_seed=1)).val.images, splits.val.images)


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded images that the cache holds")


def test_a_changed_image_invalidates_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NERN_CACHE_DIR", str(tmp_path / "cache"))
    _write_image_folder(tmp_path / "data", {"train": 3, "test": 1})
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "data"))
    before, _ = load_arrays(cfg, "train")
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        write_png(image, str(tmp_path / "data" / "train" / "class1" / "001.png"))
    after, _ = load_arrays(cfg, "train")
    assert not torch.equal(before, after) and torch.equal(after[4], image)  # class1/001 is the 5th image
    monkeypatch.setattr(data_mod, "_decode_all", _no_decoding)
    assert torch.equal(load_arrays(cfg, "train")[0], after)  # the rebuilt cache is used


def test_missing_or_empty_data_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(NernError, match="no class subfolders"):
        load_arrays(DataConfig(name="imagefolder", root=str(tmp_path / "empty")), "train")
    with pytest.raises(NernError, match="does not exist"):
        load_arrays(DataConfig(name="imagefolder", root=str(tmp_path / "nowhere")), "test")
    with pytest.raises(NernError, match="cifar10 not found under"):
        load_arrays(DataConfig(name="cifar10", root=str(tmp_path), download=False), "test")


@pytest.mark.skipif(not list(DEBIAN_FASHION_MNIST.glob("*.gz")), reason="Debian's dataset-fashion-mnist is absent")
def test_fashion_mnist_loads_offline_from_the_debian_package(tmp_path: Path) -> None:
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), download=False)
    images, labels = load_arrays(cfg, "test")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.bincount().tolist() == [1000] * 10
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    assert dataset_info(cfg) == GREY28


def test_debian_directory_is_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NERN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(NernError, match="fashion_mnist not found"):
        load_arrays(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False), "train")


def test_grey_data_into_an_rgb_model_is_refused() -> None:
    check_compatible(RGB32, 3)
    with pytest.raises(NernError, match=r"1 channel.*expects 3.*model\.in_channels=1"):
        check_compatible(GREY28, 3)


def test_streaming_batches_resume_exactly(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, {"train": 6, "val": 2}, size=12)
    cfg = DataConfig(name="imagenet", root=str(tmp_path), batch_size=4, val_size=2)
    splits = build_splits(cfg)
    assert len(splits.train) == 10 and len(splits.test) == 4
    stream = train_stream(cfg, 0, splits.train)
    assert isinstance(stream, StreamingBatches)
    uninterrupted = _take(stream, 5)
    assert uninterrupted[0][0].shape == (4, 3, 224, 224)
    first = train_stream(cfg, 0, splits.train)
    head = _take(first, 3)
    resumed = train_stream(cfg, 0, splits.train)
    resumed.load_state_dict(first.state_dict())
    assert _same_batches(uninterrupted, head + _take(resumed, 2))
    assert [x.shape[0] for x, _ in eval_batches(splits.test, 3)] == [3, 1]


def test_dataset_identity_names_the_folder_and_its_digest_follows_the_files(tmp_path: Path) -> None:
    """What MLflow records as the run's dataset input: a digest that changes when a file is added or changed."""
    from nern.data import dataset_identity

    for cls, name in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / "train" / name).mkdir(parents=True)
        (tmp_path / "imgs" / "train" / name / "0.png").write_bytes(b"x" * (cls + 1))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "imgs"))
    name, source, digest = dataset_identity(cfg)
    assert (name, source) == ("imagefolder:imgs", str(tmp_path / "imgs"))
    (tmp_path / "imgs" / ".nern-cache").mkdir()
    (tmp_path / "imgs" / ".nern-cache" / "decoded.safetensors").write_bytes(b"cache")
    assert dataset_identity(cfg)[2] == digest  # our own decode cache is not the data
    (tmp_path / "imgs" / "train" / "dog" / "1.png").write_bytes(b"y")
    assert dataset_identity(cfg)[2] != digest
    fmnist = dataset_identity(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert fmnist[1] == str(tmp_path / "FashionMNIST" / "raw") and fmnist[2] != digest

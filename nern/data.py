"""Task images for NeRN: small data sets in memory, batches as a pure function of (seed, epoch, position).

Why not a DataLoader: the distillation losses only need the original network's inputs, so a CIFAR batch
should cost microseconds and a resumed fit should see exactly the batches an uninterrupted one would. Small
data sets (CIFAR, (Fashion-)MNIST, small ImageFolders) are therefore held as uint8 tensors; each epoch
draws a permutation from a generator seeded by (seed, epoch), and augmentation runs batch-wise on tensors
with the stream's own generator, whose state is saved with the position. ImageNet does not fit in memory
and is streamed from disk by `StreamingBatches` (same interface).

Normalisation: by default CIFAR and RGB ImageFolders use the ImageNet statistics, as NeRN and the public
CIFAR weights do (docs/METHOD.md §7); grey data (MNIST, Fashion-MNIST) uses mean 0.5, std 0.5, which maps [0, 1]
to [-1, 1]. `data.mean`, `data.std` and `data.input_range` replace them with what another network expects
(raw 0..255 pixels, 0..1, other statistics). Data-free noise keeps its meaning, U[-2, 2] in the data set's
standard normalised space, and is mapped into the network's input space like an image would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import ImageReadMode

from nern.artifacts import atomic_path, load_tensors, save_tensors
from nern.config import DataConfig
from nern.errors import NernError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5,)
GREY_STD = (0.5,)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NOISE_RANGE = 2.0  # data-free NeRN: U[-2, 2] in normalised input space
NOISE_EPOCH_SIZE = 50_000  # a noise "epoch" is as long as a CIFAR one, so epoch counts stay comparable
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DECODE_CHUNK = 512


@dataclass
class DatasetInfo:
    """What a model needs to know about its inputs: shape, label count and normalisation.

    `mean`/`std` are in 0..1 pixel units. `noise_mean`/`noise_std` are set only when they differ from the data
    set's standard statistics: the data-free noise is drawn in that standard space, then mapped to this one.
    """

    in_channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    noise_mean: tuple[float, ...] | None = None
    noise_std: tuple[float, ...] | None = None


@dataclass
class ImageSet:
    """An in-memory split: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FolderSet:
    """A split streamed from disk (ImageNet): (path, label) pairs decoded per batch."""

    samples: list[tuple[str, int]]
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class Splits:
    """train / val (carved from train, never from test) / test."""

    train: ImageSet | FolderSet
    val: ImageSet | FolderSet | None  # None when data.val_size is 0
    test: ImageSet | FolderSet


# ---------------------------------------------------------------------------------------------------------
# Data set descriptions


def _rgb_info(num_classes: int, image_size: int) -> DatasetInfo:
    return DatasetInfo(3, num_classes, IMAGENET_MEAN, IMAGENET_STD, image_size)


def _grey_info(num_classes: int, image_size: int) -> DatasetInfo:
    return DatasetInfo(1, num_classes, GREY_MEAN, GREY_STD, image_size)


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Shape and normalisation of `cfg`'s images: the standard statistics unless data.mean/std/input_range differ."""
    return with_normalisation(_standard_info(cfg), cfg)


def _standard_info(cfg: DataConfig) -> DatasetInfo:
    fixed = {
        "cifar10": _rgb_info(10, 32),
        "cifar100": _rgb_info(100, 32),
        "fashion_mnist": _grey_info(10, 28),
        "mnist": _grey_info(10, 28),
    }
    if cfg.name in fixed:
        return fixed[cfg.name]
    if cfg.name == "imagenet":
        return _rgb_info(len(_class_names(Path(cfg.root) / "train")), 224)
    if cfg.name == "imagefolder":
        return _imagefolder_info(Path(cfg.root))
    raise NernError(f"unknown data.name {cfg.name!r}; choose cifar10, cifar100, fashion_mnist, mnist, "
                    "imagefolder or imagenet")


def _per_channel(values: list[float] | None, standard: tuple[float, ...], key: str, cfg: DataConfig,
                 channels: int) -> tuple[float, ...]:
    if values is None:
        return standard
    if len(values) != channels:
        raise NernError(f"{key} has {len(values)} value(s) but data.name={cfg.name} has {channels} channel(s); "
                        f"give {channels}, one per channel")
    return tuple(float(v) for v in values)


def with_normalisation(info: DatasetInfo, cfg: DataConfig) -> DatasetInfo:
    """`info` with cfg's normalisation, converted to 0..1 pixel units: (p * R - m) / s = (p - m / R) / (s / R)."""
    if cfg.mean is None and cfg.std is None and cfg.input_range == 1:
        return info  # the standard statistics, bit for bit
    if cfg.input_range != 1 and (cfg.mean is None or cfg.std is None):
        zeros, ones = ", ".join(["0"] * info.in_channels), ", ".join(["1"] * info.in_channels)
        raise NernError(f"data.input_range={cfg.input_range} needs data.mean and data.std in 0..{cfg.input_range} "
                        f"units (the standard ones are in 0..1); set both, e.g. data.mean=[{zeros}] data.std=[{ones}] "
                        "for raw pixels")
    mean = _per_channel(cfg.mean, info.mean, "data.mean", cfg, info.in_channels)
    std = _per_channel(cfg.std, info.std, "data.std", cfg, info.in_channels)
    if not all(s > 0 for s in std):
        raise NernError(f"data.std={list(std)} must be > 0 in every channel; fix data.std")
    scale = float(cfg.input_range)
    mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
    if (mean, std) == (info.mean, info.std):
        return info
    return dataclasses.replace(info, mean=mean, std=std, noise_mean=info.mean, noise_std=info.std)


def check_compatible(info: DatasetInfo, model_in_channels: int) -> None:
    """Grey images into an RGB model (or the reverse) would fail deep inside the first conv: say so up front."""
    if info.in_channels != model_in_channels:
        raise NernError(f"the data has {info.in_channels} channel(s) but the model expects {model_in_channels}; "
                        f"set model.in_channels={info.in_channels} (and train or load a matching checkpoint)")


# ---------------------------------------------------------------------------------------------------------
# torchvision data sets


def _missing_data(name: str, root: Path, where: str, exc: Exception) -> NernError:
    return NernError(f"{name} not found under {root / where} and could not be downloaded ({str(exc).splitlines()[0]}); "
                     f"place the files there (or set data.download=true with internet access)")


def _load_cifar(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(cfg.root)
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except (RuntimeError, OSError) as exc:
        raise _missing_data(cfg.name, root, cls.base_folder, exc) from exc
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _fashion_mnist_debian_dir() -> Path:
    return Path(os.environ.get("NERN_FASHION_MNIST_DIR", FASHION_MNIST_DEBIAN_DIR))


def _unpack_debian_fashion_mnist(raw: Path) -> None:
    """Debian ships the original .gz files; torchvision reads the gunzipped ones from `raw`, offline."""
    source = _fashion_mnist_debian_dir()
    for gz in sorted(source.glob("*-ubyte.gz")):
        target = raw / gz.name[: -len(".gz")]
        if target.is_file():
            continue
        with gzip.open(gz, "rb") as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _load_mnist_like(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cls = torchvision.datasets.FashionMNIST if cfg.name == "fashion_mnist" else torchvision.datasets.MNIST
    root = Path(cfg.root)
    raw = root / cls.__name__ / "raw"
    if cfg.name == "fashion_mnist":
        _unpack_debian_fashion_mnist(raw)
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except (RuntimeError, OSError) as exc:
        raise _missing_data(cfg.name, root, f"{cls.__name__}/raw", exc) from exc
    return ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)


# ---------------------------------------------------------------------------------------------------------
# ImageFolder: decoded once, cached as safetensors


def _class_names(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise NernError(f"image folder {directory} does not exist; data.root must hold train/ and test/ "
                        "(val/ for imagenet) with one subfolder per class")
    names = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise NernError(f"image folder {directory} has no class subfolders; put the images in {directory}/<class>/")
    return names


def scan_image_folder(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, (path, label) pairs) with classes sorted by name, as torchvision's ImageFolder does."""
    classes = _class_names(directory)
    samples = []
    for label, name in enumerate(classes):
        for path in sorted((directory / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                samples.append((str(path), label))
    if not samples:
        raise NernError(f"image folder {directory} holds no {'/'.join(IMAGE_SUFFIXES)} images; check data.root")
    return classes, samples


@contextlib.contextmanager
def _quiet_image_io() -> Iterator[None]:
    """torchvision 0.29 warns on every decode call that its decoders move to TorchCodec; one run is 10^4 calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        yield


def _decode_file(path: str, mode: ImageReadMode) -> torch.Tensor:
    try:
        with _quiet_image_io():
            return torchvision.io.decode_image(torchvision.io.read_file(path), mode=mode)
    except RuntimeError as exc:
        raise NernError(f"cannot decode image {path} ({str(exc).splitlines()[0]}); remove or replace the file") from exc


def _decode_chunk(paths: Sequence[str], mode: ImageReadMode) -> list[torch.Tensor]:
    """The batched JPEG decoder is several times faster than one call per file; fall back to find a bad file."""
    if all(p.lower().endswith((".jpg", ".jpeg")) for p in paths):
        try:
            return list(torchvision.io.decode_jpeg([torchvision.io.read_file(p) for p in paths], mode=mode))
        except RuntimeError:
            pass
    return [_decode_file(p, mode) for p in paths]


def _decode_all(paths: list[str], mode: ImageReadMode) -> list[torch.Tensor]:
    chunks = [paths[i:i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    threads = max(1, min(4, os.cpu_count() or 1))
    with _quiet_image_io(), ThreadPoolExecutor(threads) as pool:
        return [img for chunk in pool.map(lambda c: _decode_chunk(c, mode), chunks) for img in chunk]


def _stack_same_size(images: list[torch.Tensor], paths: list[str], directory: Path) -> torch.Tensor:
    shape = images[0].shape
    for image, path in zip(images, paths):
        if image.shape != shape:
            raise NernError(f"images in {directory} differ in size ({paths[0]} is {tuple(shape)}, {path} is "
                            f"{tuple(image.shape)}); resize them to one size or use data.name=imagenet to stream")
    return torch.stack(images)


def _image_mode(first_path: str) -> ImageReadMode:
    """Grey folders stay one-channel; everything else is decoded as RGB."""
    channels = _decode_file(first_path, ImageReadMode.UNCHANGED).shape[0]
    return ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB


def _imagefolder_info(root: Path) -> DatasetInfo:
    classes, samples = scan_image_folder(root / "train")
    first = _decode_file(samples[0][0], _image_mode(samples[0][0]))
    make = _grey_info if first.shape[0] == 1 else _rgb_info
    return make(len(classes), int(first.shape[-1]))


def _is_writable_dir(directory: Path) -> bool:
    """A probe write, refused when the data root has no write bit at all: a root-run job could write anywhere,
    but a directory marked read-only (shared data) should not grow a cache."""
    try:
        if not directory.parent.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            return False
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def cache_dir(root: Path) -> Path:
    """$NERN_CACHE_DIR/<key>, else <root>/.nern-cache if writable, else ~/.cache/nern/<key>; key = hash of root."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    if os.environ.get("NERN_CACHE_DIR"):
        return Path(os.environ["NERN_CACHE_DIR"]) / key
    local = root / ".nern-cache"
    if _is_writable_dir(local):
        return local
    return Path.home() / ".cache" / "nern" / key


def _fingerprint(samples: list[tuple[str, int]], directory: Path) -> str:
    """Paths, sizes and mtimes: a changed, added or removed image invalidates the cache."""
    digest = hashlib.sha256()
    for path, label in samples:
        info = os.stat(path)
        digest.update(f"{os.path.relpath(path, directory)}:{label}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        tensors, metadata = load_tensors(path)
    except NernError:
        return None  # a damaged cache is rebuilt, not reported
    if metadata.get("fingerprint") != fingerprint or set(tensors) != {"images", "labels"}:
        return None
    return tensors["images"], tensors["labels"]


def _load_imagefolder(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    directory = root / split
    classes, samples = scan_image_folder(directory)
    fingerprint = _fingerprint(samples, directory)
    cache_file = cache_dir(root) / f"{split}.safetensors"
    cached = _read_cache(cache_file, fingerprint)
    if cached is not None:
        return cached
    paths = [p for p, _ in samples]
    images = _stack_same_size(_decode_all(paths, _image_mode(paths[0])), paths, directory)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    metadata = {"fingerprint": fingerprint, "classes": classes, "source": str(directory.resolve())}
    save_tensors(cache_file, {"images": images, "labels": labels}, metadata)
    return images, labels


def load_arrays(cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) of `split` ("train" or "test") for an in-memory data set."""
    if split not in ("train", "test"):
        raise NernError(f"split {split!r} is not available; use 'train' or 'test' (val is carved from train)")
    if cfg.name in ("cifar10", "cifar100"):
        return _load_cifar(cfg, split == "train")
    if cfg.name in ("fashion_mnist", "mnist"):
        return _load_mnist_like(cfg, split == "train")
    if cfg.name == "imagefolder":
        return _load_imagefolder(Path(cfg.root), split)
    if cfg.name == "imagenet":
        raise NernError(f"data.name={cfg.name} has no in-memory arrays; use build_splits / NoiseStream instead")
    raise NernError(f"unknown data.name {cfg.name!r}; choose cifar10, cifar100, fashion_mnist, mnist, "
                    "imagefolder or imagenet")


def _dataset_folder(cfg: DataConfig) -> Path:
    """The folder holding a data set's files, as the loaders above lay it out."""
    root = Path(cfg.root).resolve()
    folders = {"fashion_mnist": root / "FashionMNIST" / "raw", "mnist": root / "MNIST" / "raw",
               "cifar10": root / "cifar-10-batches-py", "cifar100": root / "cifar-100-python"}
    return folders.get(cfg.name, root)


def dataset_identity(cfg: DataConfig) -> tuple[str, str, str]:
    """(name, source, digest) of the task data, as MLflow records a dataset input. The digest hashes the
    relative names and sizes of the data set's files (not their bytes: cheap on 60k images, and still changes
    when a file is added, removed or re-encoded); our decode cache is left out."""
    folder = _dataset_folder(cfg)
    name = f"imagefolder:{folder.name}" if cfg.name == "imagefolder" else cfg.name
    digest = hashlib.sha256(name.encode())
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".nern-cache" not in p.parts) if folder.is_dir() else []
    for path in files:
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
    return name, str(folder), digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Splits


def _val_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), a seeded partition of range(n)."""
    if val_size >= n:
        raise NernError(f"data.val_size={val_size} leaves no training images out of {n}; lower data.val_size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _limit_indices(n: int, limit: int | None) -> torch.Tensor | None:
    """`eval_limit` images spread evenly over the split, so class-sorted folders still cover every class."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise NernError(f"data.eval_limit={limit} must be at least 1 (or null for the full split)")
    return torch.linspace(0, n - 1, limit).round().long()


def _subset(dataset: ImageSet | FolderSet, indices: torch.Tensor | None) -> ImageSet | FolderSet:
    if indices is None:
        return dataset
    if isinstance(dataset, FolderSet):
        return FolderSet([dataset.samples[i] for i in indices.tolist()], dataset.info)
    return ImageSet(dataset.images[indices], dataset.labels[indices], dataset.info)


def build_splits(cfg: DataConfig) -> Splits:
    """train / val / test; val is `cfg.val_size` train images chosen by `cfg.split_seed`, never by a fit's or a
    pretraining's seed, so every seed and stage of a network sees the same validation images (docs/PROTOCOL.md);
    `cfg.eval_limit` trims val and test."""
    info = dataset_info(cfg)
    if cfg.name == "imagenet":
        full: ImageSet | FolderSet = FolderSet(scan_image_folder(Path(cfg.root) / "train")[1], info)
        test: ImageSet | FolderSet = FolderSet(scan_image_folder(Path(cfg.root) / "val")[1], info)
    else:
        full = ImageSet(*load_arrays(cfg, "train"), info)
        test = ImageSet(*load_arrays(cfg, "test"), info)
    train_idx, val_idx = _val_indices(len(full), cfg.val_size, cfg.split_seed)
    train = _subset(full, train_idx)
    val = _subset(full, val_idx)
    val = _subset(val, _limit_indices(len(val), cfg.eval_limit)) if cfg.val_size else None  # 0: no split
    return Splits(train, val, _subset(test, _limit_indices(len(test), cfg.eval_limit)))


# ---------------------------------------------------------------------------------------------------------
# Batches


def normalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float, standardised per channel: (x / 255 - mean) / std, in two in-place ops."""
    shift = torch.tensor(info.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(info.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255.0)
    return images.float().sub_(shift).mul_(scale)


def augmentation_policy(info: DatasetInfo) -> tuple[int, bool]:
    """(crop padding, horizontal flip): CIFAR's pad 4 + flip for RGB; pad 2, no flip for grey (digits are not
    mirror-symmetric, and one rule for MNIST and Fashion-MNIST keeps the recipe simple)."""
    return (4, True) if info.in_channels == 3 else (2, False)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and cut one random same-size window per image, all images in one gather.

    Offsets are drawn on the CPU generator and the gather runs wherever the images are, so a stream on a GPU
    draws the same crops as one on the CPU.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    width = w + 2 * padding
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    window = (torch.arange(h)[:, None] * width + torch.arange(w)[None, :]).view(1, -1)  # [1, H*W]
    flat_index = ((top * width + left)[:, None] + window).to(images.device)  # [B, H*W] into the padded plane
    crops = padded.view(b, c, -1).gather(2, flat_index[:, None, :].expand(b, c, h * w))
    return crops.view(b, c, h, w)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augment_batch(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    padding, flip = augmentation_policy(info)
    images = random_crop(images, padding, generator)
    return random_flip(images, generator) if flip else images


def _derived_seed(seed: int, purpose: str) -> int:
    """Independent generators for independent purposes, so the permutation and augmentation draws never share bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _check_batch_size(batch_size: int, n: int) -> int:
    if batch_size > n:
        raise NernError(f"data.batch_size={batch_size} exceeds the {n} training images; lower data.batch_size")
    return n // batch_size


def _check_resume(state: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if key in state and int(state[key]) != value:
            raise NernError(f"the saved data stream has {key}={int(state[key])} but this run has {value}; "
                            "resume with the original data config and seed, or start a fresh run")


class BatchStream:
    """Endless training batches from in-memory images; drop_last, reshuffled every epoch, exactly resumable."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, batch_size: int,
                 augment: bool, seed: int, device: str | torch.device | None = None) -> None:
        """`device`: where batches are augmented and returned (default: where `images` are); the uint8 images
        can live on the GPU too, which keeps the whole stream there."""
        self.images, self.labels, self.info = images, labels, info
        self.device = torch.device(device) if device is not None else images.device
        self.batch_size, self.augment, self.seed = batch_size, augment, seed
        self.batches_per_epoch = _check_batch_size(batch_size, len(labels))
        self.epoch = 0
        self.position = 0  # batches already drawn in this epoch
        self.generator = torch.Generator().manual_seed(_derived_seed(seed, "augment"))
        self._order: torch.Tensor | None = None

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.position / self.batches_per_epoch

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_permutation(len(self.labels), self.seed, self.epoch)
        index = self._order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        images = self.images[index.to(self.images.device)].to(self.device, non_blocking=True)
        labels = self.labels[index.to(self.labels.device)].to(self.device, non_blocking=True)
        if self.augment:
            images = augment_batch(images, self.info, self.generator)
        return normalise(images, self.info), labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state(),
                "seed": self.seed, "batch_size": self.batch_size, "num_images": len(self.labels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_resume(state, {"seed": self.seed, "batch_size": self.batch_size, "num_images": len(self.labels)})
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"])
        self._order = None


def noise_to_input_space(noise: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Noise drawn in the standard normalised space, as the network would see it after its own normalisation:
    the same pixel-space noise whatever data.mean/std/input_range the network expects (identity by default)."""
    if info.noise_mean is None or info.noise_std is None:
        return noise
    view = lambda v: torch.tensor(v, dtype=noise.dtype).view(1, -1, 1, 1)  # noqa: E731
    pixels = noise * view(info.noise_std) + view(info.noise_mean)
    return (pixels - view(info.mean)) / view(info.std)


class NoiseStream:
    """Data-free NeRN: i.i.d. U[-2, 2] inputs in the standard normalised space, labels -1, from the stream's own
    generator; mapped to the network's input space when data.mean/std/input_range differ from the standard."""

    def __init__(self, info: DatasetInfo, batch_size: int, seed: int, epoch_size: int = NOISE_EPOCH_SIZE,
                 device: str | torch.device = "cpu") -> None:
        self.info, self.batch_size, self.seed = info, batch_size, seed
        self.device = torch.device(device)
        self.batches_per_epoch = _check_batch_size(batch_size, epoch_size)
        self.iterations = 0
        self.generator = torch.Generator().manual_seed(_derived_seed(seed, "noise"))

    @property
    def epoch_float(self) -> float:
        return self.iterations / self.batches_per_epoch

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch_size, self.info.in_channels, self.info.image_size, self.info.image_size)
        x = noise_to_input_space(torch.rand(shape, generator=self.generator) * (2 * NOISE_RANGE) - NOISE_RANGE,
                                 self.info)
        self.iterations += 1
        labels = torch.full((self.batch_size,), -1, dtype=torch.int64)
        return x.to(self.device, non_blocking=True), labels.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "generator": self.generator.get_state(),
                "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_resume(state, {"seed": self.seed, "batch_size": self.batch_size})
        self.iterations = int(state["iterations"])
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------------------------------------------------
# ImageNet: streamed from disk


def imagenet_transform(info: DatasetInfo, train: bool) -> torch.nn.Module:
    """The standard recipe: RandomResizedCrop + flip for training, resize 256 / centre crop 224 for evaluation."""
    from torchvision.transforms import v2

    size = info.image_size
    geometry = ([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if train
                else [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)])
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)])


class _FolderDataset(torch.utils.data.Dataset):
    """Item k of an epoch's order, transformed under a seed of (seed, epoch, k): the batch at a given position
    is the same whichever worker decodes it and whether or not the run was resumed."""

    def __init__(self, samples: list[tuple[str, int]], order: torch.Tensor | None, transform: torch.nn.Module,
                 seed: int, epoch: int) -> None:
        self.samples, self.order, self.transform = samples, order, transform
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.samples) if self.order is None else len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[k if self.order is None else int(self.order[k])]
        image = _decode_file(path, ImageReadMode.RGB)
        if self.order is None:  # evaluation: deterministic transform, no seeding needed
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derived_seed(self.seed, f"{self.epoch}:{k}"))
            return self.transform(image), label


class StreamingBatches:
    """`BatchStream`'s interface over a `FolderSet` through a DataLoader (for ImageNet-sized data).

    The order is the same seeded per-epoch permutation and each image's augmentation is seeded by its slot, so
    resume reproduces the batches too; it is slower to restart (the loader and its workers start again).
    """

    def __init__(self, dataset: FolderSet, batch_size: int, augment: bool, seed: int, workers: int = 0) -> None:
        self.samples, self.info = dataset.samples, dataset.info
        self.batch_size, self.augment, self.seed, self.workers = batch_size, augment, seed, workers
        self.batches_per_epoch = _check_batch_size(batch_size, len(self.samples))
        self.transform = imagenet_transform(self.info, train=augment)
        self.epoch = 0
        self.position = 0
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.position / self.batches_per_epoch

    def _start_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_permutation(len(self.samples), self.seed, self.epoch)
        dataset = _FolderDataset(self.samples, order, self.transform, self.seed, self.epoch)
        slots = range(self.position * self.batch_size, self.batches_per_epoch * self.batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=slots,
                                             num_workers=self.workers, drop_last=True)
        return iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        if self._batches is None:
            self._batches = self._start_loader()
        x, y = next(self._batches)
        self.position += 1
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "num_images": len(self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_resume(state, {"seed": self.seed, "batch_size": self.batch_size, "num_images": len(self.samples)})
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None


# ---------------------------------------------------------------------------------------------------------
# Entry points for the training loops


def train_stream(cfg: DataConfig, seed: int, train: ImageSet | FolderSet | None = None,
                 data_free: bool = False,
                 device: str | torch.device | None = None) -> BatchStream | NoiseStream | StreamingBatches:
    """The training stream `cfg` asks for; data-free runs get U[-2, 2] noise shaped like `cfg`'s images.
    `device` applies to the in-memory and noise streams; StreamingBatches yields CPU batches."""
    if data_free:
        return NoiseStream(dataset_info(cfg), cfg.batch_size, seed, device=device or "cpu")
    if train is None:
        raise NernError(f"data.name={cfg.name} needs its train split; build it with build_splits first")
    if isinstance(train, FolderSet):
        return StreamingBatches(train, cfg.batch_size, cfg.augment, seed, cfg.workers)
    return BatchStream(train.images, train.labels, train.info, cfg.batch_size, cfg.augment, seed, device=device)


def eval_batches(dataset: ImageSet | FolderSet, batch_size: int,
                 workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (x, y) in order, no augmentation, last batch kept."""
    if isinstance(dataset, FolderSet):
        folder = _FolderDataset(dataset.samples, None, imagenet_transform(dataset.info, train=False), 0, 0)
        yield from torch.utils.data.DataLoader(folder, batch_size=batch_size, num_workers=workers)
        return
    for start in range(0, len(dataset), batch_size):
        end = start + batch_size
        yield normalise(dataset.images[start:end], dataset.info), dataset.labels[start:end]

"""The networks NeRN represents, and their checkpoints.

CIFAR ResNets (He et al. 2016, 6n+2 layers) follow the layout of the public `akamaster` weights so those
files load by name; option A is their parameter-free zero-pad shortcut, option B the 1x1 projection that
adds one represented conv per downsampling block (docs/METHOD.md §1). ResNet18 is torchvision's, unchanged.

Every activation is an `nn.ReLU` module and each block ends in its own ReLU after the residual sum, so
`nern.feature_maps` can hook every feature map the distillation loss needs without knowing the class.

Any other network comes by reference: `model.factory` names a function (or class) returning an nn.Module,
either "package.module:function" on sys.path or "path/to/file.py:function". Nothing else is written for
it: layers and feature maps are discovered from the module, and the reference plus `model.kwargs` travel in
every file's metadata so each later stage rebuilds the network the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import pickle
import re
import sys
import types
import urllib.error
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nern.artifacts import load_tensors, read_metadata, save_tensors
from nern.codec import FILE_SUFFIX
from nern.config import ModelConfig
from nern.errors import NernError
from nern.nnc import NNC_SUFFIX

# blocks per stage: depth = 6n + 2
CIFAR_RESNETS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
TORCHVISION_RESNETS = ("resnet18",)
ARCHS = (*CIFAR_RESNETS, *TORCHVISION_RESNETS)
CIFAR_WIDTHS = (16, 32, 64)
TORCH_SUFFIXES = (".th", ".pt", ".pth", ".tar", ".ckpt")
CODEC_SUFFIXES = (FILE_SUFFIX, NNC_SUFFIX)  # `nern compress` files: `nern import` rebuilds the network they hold
TORCHVISION_PREFIX = "torchvision:"
# prefixes added by nn.DataParallel / DistributedDataParallel and torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------------------------------------------
# CIFAR ResNets


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels on both sides, as the public weights expect."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        extra = planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back))


def projection_shortcut(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Option B: 1x1 conv + BN, named `shortcut.0` / `shortcut.1`."""
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; the residual sum passes through `relu2` so a hook sees the block output."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(in_planes, planes)
            else:
                self.shortcut = projection_shortcut(in_planes, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """conv3x3 stem, three stages of `blocks` BasicBlocks (16/32/64 wide), global average pool, linear."""

    def __init__(self, blocks: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, CIFAR_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(CIFAR_WIDTHS[0])
        self.relu = nn.ReLU()
        in_planes = CIFAR_WIDTHS[0]
        stages = []
        for stage, planes in enumerate(CIFAR_WIDTHS):
            stride = 1 if stage == 0 else 2
            layer = []
            for j in range(blocks):
                layer.append(BasicBlock(in_planes, planes, stride if j == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(CIFAR_WIDTHS[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs, the usual choice for ReLU ResNets trained from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def torchvision_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet18 as is; a non-RGB input only swaps the 7x7 stem for one with `in_channels`."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


# ---------------------------------------------------------------------------------------------------------
# User networks by reference

FACTORY_FORMS = "package.module:function or path/to/file.py:function"
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FACTORY_REFERENCE = re.compile(rf"^(?P<source>{_DOTTED}|[^:]+\.py):(?P<attr>{_DOTTED})$")


def is_factory_reference(text: str) -> bool:
    """True for "pkg.mod:fn" and "file.py:fn"; `torchvision:<WEIGHTS>` is a weights source, not a factory."""
    return not text.startswith(TORCHVISION_PREFIX) and _FACTORY_REFERENCE.match(text) is not None


def _import_file(path: Path, ref: str) -> types.ModuleType:
    """Import a .py file under a name unique to its absolute path, once per process (so classes stay identical)."""
    if not path.is_file():
        raise NernError(f"model.factory {ref!r}: file {path} not found (relative paths start at {Path.cwd()}); "
                        "fix the path or use the form package.module:function")
    resolved = path.resolve()
    name = f"_nern_factory_{path.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise NernError(f"model.factory {ref!r}: {path} cannot be imported as Python; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_source(source: str, ref: str) -> types.ModuleType:
    """The module holding the factory; a missing module (or a missing dependency of it) is a user error."""
    if source.endswith(".py"):
        return _import_file(Path(source), ref)
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if exc.name and (source == exc.name or source.startswith(exc.name + ".")):
            raise NernError(f"model.factory {ref!r}: no module named {exc.name!r} on the Python path; add its "
                            f"folder to PYTHONPATH, or give the file as {source.replace('.', '/')}.py:"
                            f"{ref.split(':')[-1]}") from None
        raise NernError(f"model.factory {ref!r}: importing {source} failed ({exc}); install the missing "
                        "package") from None


def resolve_factory(ref: str) -> Any:
    """The callable `ref` names, imported on demand."""
    match = _FACTORY_REFERENCE.match(ref) if not ref.startswith(TORCHVISION_PREFIX) else None
    if match is None:
        raise NernError(f"model.factory {ref!r} is not a reference; write it as {FACTORY_FORMS}")
    module = _import_source(match["source"], ref)
    target: Any = module
    for part in match["attr"].split("."):
        if not hasattr(target, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise NernError(f"model.factory {ref!r}: {match['source']} has no attribute {match['attr']!r}; "
                            f"fix the name after ':' (callables there: {_first_few(names) or 'none'})")
        target = getattr(target, part)
    if not callable(target):
        raise NernError(f"model.factory {ref!r} names an object of type {type(target).__name__}, not a function "
                        "or class; point it at a function that returns the network")
    return target


def build_from_factory(ref: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call the user's factory with `kwargs`, checking the arguments before the call so a TypeError raised
    inside the factory is not mistaken for a bad model.kwargs."""
    factory = resolve_factory(ref)
    if not isinstance(kwargs, dict):
        raise NernError(f"model.kwargs must be a mapping of keyword arguments for {ref}, got {kwargs!r}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: let the call speak
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise NernError(f"model.kwargs {kwargs} do not fit {ref}{signature} ({exc}); fix model.kwargs") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise NernError(f"model.factory {ref!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                        "make it return the network")
    return model


def _check_input_channels(model: nn.Module, cfg: ModelConfig) -> None:
    """The data is checked against model.in_channels, so for a user network it must say what the first conv takes."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != cfg.in_channels:
        raise NernError(f"model.factory {cfg.factory!r} builds a network whose first conv takes {first.in_channels} "
                        f"channel(s) but model.in_channels={cfg.in_channels}; "
                        f"set model.in_channels={first.in_channels}")


# ---------------------------------------------------------------------------------------------------------
# Building


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised network for `cfg`; the config rides along as `model.nern_config` for saving."""
    if cfg.factory:
        model: nn.Module = build_from_factory(cfg.factory, cfg.kwargs)
        _check_input_channels(model, cfg)
    elif cfg.arch in CIFAR_RESNETS:
        if cfg.shortcut not in ("A", "B"):
            raise NernError(f"model.shortcut {cfg.shortcut!r} is not allowed; choose 'A' or 'B'")
        model = CifarResNet(CIFAR_RESNETS[cfg.arch], cfg.num_classes, cfg.in_channels, cfg.shortcut)
    elif cfg.arch == "resnet18":
        model = torchvision_resnet18(cfg.num_classes, cfg.in_channels)
    else:
        raise NernError(f"unknown model.arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}, "
                        f"or set model.factory to {FACTORY_FORMS}")
    model.nern_config = dataclasses.replace(cfg)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None,
               config: ModelConfig | None = None) -> None:
    """Write the state dict as safetensors; the model config goes into the metadata so `load_model` can check it.

    The config comes from `config`, else `metadata["model"]`, else the one `build_model` attached; a
    user-built module without any is saved without it (`model_config_from_checkpoint` then gives None).
    """
    meta = dict(metadata or {})
    config = config or getattr(model, "nern_config", None)
    if config is not None and "model" not in meta:
        meta["model"] = dataclasses.asdict(config)
    save_tensors(path, dict(model.state_dict()), meta)


def model_config_from_checkpoint(path: str | Path) -> ModelConfig | None:
    """The ModelConfig stored by `save_model`, pointing at `path` itself; None when the file has none."""
    stored = read_metadata(path).get("model")
    if not isinstance(stored, dict):
        return None
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in stored.items() if k in names})
    cfg.checkpoint = str(path)
    return cfg


def model_overrides(model_arg: str | None) -> dict[str, Any]:
    """The `model:` config keys a stage's `--model` stands for, so a user need not repeat them.

    A checkpoint file gives its stored config (ours carry one) plus itself as `checkpoint`; `torchvision:<WEIGHTS>`
    is a checkpoint too; a built-in arch name or a factory reference (FACTORY_FORMS) sets `arch` or `factory`,
    with weights from model.checkpoint if the config sets one (random init otherwise).
    """
    if not model_arg:
        return {}
    if not Path(model_arg).is_file():
        if is_factory_reference(model_arg):
            return {"model": {"factory": model_arg}}
        if model_arg in ARCHS:
            return {"model": {"arch": model_arg}}
        if not model_arg.startswith(TORCHVISION_PREFIX):
            raise NernError(f"model file not found: {model_arg}; check the path or run `nern pretrain`/`nern import` "
                            f"(or give a built-in arch, or a factory {FACTORY_FORMS})")
    stored = model_config_from_checkpoint(model_arg) if model_arg.endswith(".safetensors") else None
    base = dataclasses.asdict(stored) if stored is not None else {}
    base["checkpoint"] = model_arg
    return {"model": base}


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d dict holding `state_dict`, or a raw state dict; only tensors and plain data are unpickled."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise NernError(f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0]}); "
                        "re-download or re-export it as a plain state dict") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NernError(f"{path} holds neither a state dict nor a dict with 'state_dict'; "
                        "save it with torch.save({'state_dict': model.state_dict()}, path)")
    return obj


def _torchvision_state_dict(source: str, arch: str) -> dict[str, torch.Tensor]:
    """Fetch torchvision's published weights by enum name through its own API (cached in the torch hub dir)."""
    name = source[len(TORCHVISION_PREFIX):]
    try:
        weights_enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise NernError(f"{source}: torchvision publishes no weights for {arch}; "
                        f"use a local checkpoint or model.arch={TORCHVISION_RESNETS[0]}") from None
    try:
        weights = weights_enum[name]
    except KeyError:
        allowed = ", ".join(TORCHVISION_PREFIX + w.name for w in weights_enum)
        raise NernError(f"unknown torchvision weights {name!r} for {arch}; choose one of {allowed}") from None
    try:
        return weights.get_state_dict(progress=False)
    except urllib.error.URLError as exc:
        raise NernError(f"could not download torchvision weights {weights_enum.__name__}.{name} ({exc.reason}; offline?); "
                        f"place the file {Path(weights.url).name} in the torch hub cache "
                        f"({Path(torch.hub.get_dir()) / 'checkpoints'}) or pass a local checkpoint") from exc


def read_state_dict(source: str, arch: str = "resnet18") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from our safetensors, a torch file, or `torchvision:<WEIGHTS>` (for `arch`)."""
    if source.startswith(TORCHVISION_PREFIX):
        return _torchvision_state_dict(source, arch), {}
    path = Path(source)
    if not path.is_file():
        raise NernError(f"checkpoint not found: {path}; check model.checkpoint or run the stage that writes it")
    if path.suffix == ".safetensors":
        state, metadata = load_tensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        state, metadata = _read_torch_file(path), {}
    elif path.suffix in CODEC_SUFFIXES:
        raise NernError(f"checkpoint {path} is a file `nern compress` wrote; rebuild the network from it first: "
                        f"nern import --set model.checkpoint={path} --out DIR (then use DIR/model.safetensors)")
    else:
        raise NernError(f"checkpoint {path} has an unknown extension; use .safetensors or one of "
                        f"{', '.join(TORCH_SUFFIXES)} (or torchvision:<WEIGHTS>)")
    return _strip_wrapper_prefixes(state), metadata


def _first_few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def check_state_dict_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Name the tensors that do not match before torch's own, longer error would; then check values are finite."""
    expected = model.state_dict()
    # old checkpoints predate BatchNorm's counter; BatchNorm fills it in itself
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first_few(unexpected)}")
    if wrong_shape:
        problems.append(f"shape checkpoint vs model: {_first_few(wrong_shape)}")
    if problems:
        cfg = getattr(model, "nern_config", None)
        if getattr(cfg, "factory", None):
            raise NernError(f"checkpoint {source} does not fit the network of model.factory {cfg.factory} "
                            f"({'; '.join(problems)}); check model.factory and model.kwargs, or save the weights "
                            "of that very network (model.state_dict())")
        arch = getattr(cfg, "arch", type(model).__name__)
        raise NernError(f"checkpoint {source} does not fit {arch} ({'; '.join(problems)}); "
                        "check model.arch, model.shortcut, model.num_classes and model.in_channels")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise NernError(f"checkpoint {source} holds NaN or inf in {key}; use a checkpoint from a healthy run")


def load_weights(model: nn.Module, source: str) -> dict[str, Any]:
    """Load `source` into `model` in place after checking names, shapes and values; returns the file's metadata."""
    arch = getattr(getattr(model, "nern_config", None), "arch", "resnet18")
    state, metadata = read_state_dict(str(source), arch)
    check_state_dict_fits(model, state, str(source))
    model.load_state_dict(state, strict=True)
    return metadata


def check_stored_config(cfg: ModelConfig, stored: dict[str, Any]) -> None:
    """A safetensors checkpoint (or a `nern compress` file) records what it was built as; disagreeing with the run
    config is a user error."""
    if cfg.factory:
        fields = ["factory", "kwargs", "num_classes", "in_channels"]
    else:
        fields = ["factory", "arch", "num_classes", "in_channels"]
        fields += ["shortcut"] if cfg.arch in CIFAR_RESNETS else []
    for name in fields:
        if name in stored and stored[name] != getattr(cfg, name):
            raise NernError(f"checkpoint {cfg.checkpoint} was saved with model.{name}={stored[name]!r} but the config "
                            f"says {getattr(cfg, name)!r}; set model.{name}={stored[name]} or pick another checkpoint")


def load_model(cfg: ModelConfig) -> nn.Module:
    """Build `cfg.arch`, load `cfg.checkpoint` if set, and put it in eval mode (NeRN never trains it further)."""
    model = build_model(cfg)
    if cfg.checkpoint:
        state, metadata = read_state_dict(cfg.checkpoint, cfg.arch)
        if isinstance(metadata.get("model"), dict):
            check_stored_config(cfg, metadata["model"])
        check_state_dict_fits(model, state, cfg.checkpoint)
        model.load_state_dict(state, strict=True)
    return model.eval()

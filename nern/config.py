"""Typed run configuration: dataclasses, filled from YAML plus `a.b=value` overrides, validated at the boundary.

A typo or a value out of range fails before any work starts, with the dotted key and the allowed values in
the message. Defaults are the paper's ResNet20/CIFAR-10 settings (docs/METHOD.md); presets live in YAML files.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from nern.errors import NernError

SAMPLING_METHODS = (
    "all",
    "random_batch",
    "random_batch_without_replacement",
    "sequential_layer",
    "random_layer",
    "random_weighted_batch",
)
PermutationMode = Literal["none", "infilter", "crossfilter"]
# The one list of coordinate-permutation modes (docs/METHOD.md §6): the CLI, the tables, the workflow and
# nern.permutation take it from here (this module imports no torch, so the Snakefile can read it cheaply).
PERMUTATIONS: tuple[str, ...] = get_args(PermutationMode)
# Permutations of the network itself (nern.symmetry): the fit sees a permuted, equivalent network and identity
# coordinates, so nothing is stored. The pipeline's grid takes both kinds.
NETWORK_PERMUTATIONS: tuple[str, ...] = ("symmetry",)
GRID_PERMUTATIONS: tuple[str, ...] = (*PERMUTATIONS, *NETWORK_PERMUTATIONS)


@dataclass
class ModelConfig:
    """Which network is represented: a built-in `arch`, or a user's `factory` (which then wins over `arch`).

    `factory` is "package.module:function" (importable on sys.path / PYTHONPATH) or "path/to/file.py:function"
    (relative to the working directory), called with `kwargs`; `nern import` records both in model.safetensors
    so later stages rebuild the network from that file alone. `checkpoint` is a weights file (.safetensors, or
    a torch state dict, also one nested under "state_dict"), or `torchvision:<WEIGHTS>` for torchvision's.
    """

    arch: str = "resnet20"
    num_classes: int = 10
    in_channels: int = 3
    shortcut: Literal["A", "B"] = "A"
    checkpoint: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where task images come from (evaluation always uses the real val/test split, also in data-free fits)."""

    name: Literal["cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder", "imagenet"] = "cifar10"
    root: str = "data"
    batch_size: int = 256
    eval_batch_size: int = 500
    val_size: int = 5000
    split_seed: int = 0  # which train images are the validation split: fixed per data set, not per fit seed
    augment: bool = True
    workers: int = 0
    download: bool = True
    eval_limit: int | None = None  # evaluate on N evenly spaced test/val images only (smoke runs)
    # What the network expects as input, per channel: (pixel / 255 * input_range - mean) / std. mean/std are in
    # units of input_range; null keeps the data set's standard statistics (ImageNet's for RGB, 0.5/0.5 for grey),
    # which an input_range of 255 cannot use (give both then, e.g. mean [0], std [1] for raw 0..255 pixels).
    mean: list[float] | None = None
    std: list[float] | None = None
    input_range: Literal[1, 255] = 1


@dataclass
class RepresentConfig:
    """Which conv layers the predictor represents (docs/METHOD.md §1); the rest is copied verbatim."""

    max_kernel: int = 3
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    preset: Literal["auto", "resnet18_blocks", "none"] = "auto"


@dataclass
class EmbeddingConfig:
    """Positional embedding (docs/METHOD.md §2): b = 0.76 is the smooth variant, 1.25 the non-smooth one."""

    levels: int = 40
    base: float = 0.76


@dataclass
class PredictorConfig:
    """Plain MLP (docs/METHOD.md §3): `depth` linear layers of width `hidden`, 9 outputs."""

    hidden: int = 180
    depth: int = 5
    init: Literal["default", "variance"] = "default"
    normalize_targets: bool = False  # fast recipe: predict per-layer standardised kernels, store scales
    # fit through learnt-step quantisers (nern.qat) from the first step: the predictor's Linear weights are
    # `quantise_bits`-bit integers times one step per row, stored exactly so by `nern compress` (int<bits>).
    # Post-training quantisation below 8 bits destroys a fitted predictor; a fit that sees the rounding does not
    quantise_bits: int | None = None


@dataclass
class LossConfig:
    """L = rec * L_rec + kd * L_KD + fmd * L_FMD; distillation terms are zero before `warmup` iterations."""

    rec: float = 1.0
    kd: float = 1e-4
    fmd: float = 1e-4
    warmup: int = 0
    temperature: float = 1.0
    # raw: the paper's RMSE over all weights, dominated by the layers with the largest weights; normalized:
    # each layer's error in units of its own weight std (fast recipe), so small-weight layers are learnt too
    rec_space: Literal["raw", "normalized"] = "raw"
    # Not the paper's: the student's cross-entropy on the task's labels, weighted like kd/fmd (same schedule).
    # 0 keeps NeRN label-free, as published; > 0 needs labelled images (not data_free).
    ce: float = 0.0


@dataclass
class SamplingConfig:
    """Which predicted kernels carry gradient each iteration (docs/METHOD.md §5)."""

    method: Literal[
        "all",
        "random_batch",
        "random_batch_without_replacement",
        "sequential_layer",
        "random_layer",
        "random_weighted_batch",
    ] = "random_weighted_batch"
    batch: int = 4096
    uniform_prob: float = 0.8


@dataclass
class OptimConfig:
    """Ranger with a per-iteration cosine schedule (docs/METHOD.md §7)."""

    name: Literal["ranger", "adam"] = "ranger"
    lr: float = 5e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-5
    weight_decay: float = 1e-3
    min_lr: float = 1e-6
    warmup_iterations: int = 0
    # cap the predictor's gradient L2 norm (null: no cap); the step's norm before clipping is logged as grad_norm
    clip_grad_norm: float | None = None
    # peak learning rate of the reconstruction-only phase (null: optim.lr); that phase has its own cosine schedule
    rec_only_lr: float | None = None
    # the learnt quantiser steps' learning rate (predictor.quantise_bits) as a multiple of the weights'. They are
    # learnt as logarithms, where an update of lr moves a step by lr relative, ~25x less than the raw steps of
    # LSQ moved at 4 bits; never weight-decayed (decay would pull log s to 0, every step towards 1)
    step_lr_scale: float = 1.0


@dataclass
class FitConfig:
    """One NeRN fit. `iterations` wins over `epochs` when both are set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    represent: RepresentConfig = field(default_factory=RepresentConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    iterations: int | None = 600
    epochs: float | None = None
    # Reconstruction-only steps BEFORE the distillation schedule (fast recipe): no images, so each is a few times
    # cheaper than an iteration; they have their own cosine schedule (peak optim.rec_only_lr), and the optimiser
    # state is reset when distillation starts. `iterations`/`epochs` count the distillation schedule only.
    rec_only_iterations: int = 0
    # Kernels per reconstruction-only step (a fresh uniform subset each step; null: all of them). Only those rows
    # go through the predictor, so a step costs batch/N of a full one: many more, cheaper steps per second.
    rec_only_batch: int | None = None
    data_free: bool = False  # distil on U[-2, 2] noise in normalised input space instead of task images
    # Distillation also trains the tensors NeRN stores verbatim (BatchNorm affine, FC, unrepresented convs) of the
    # reconstructed network; the predictor file carries them (`tuned.<name>`). They are stored anyway, so a codec
    # gets their adjustment to the predicted kernels for no bytes. Off: the original's, as in the paper.
    tune_verbatim: bool = False
    # validation every N iterations, counted from the end of the reconstruction-only phase (evaluated there);
    # 0: only the final iterate. The test set is measured once, at the end (docs/PROTOCOL.md)
    eval_every: int = 200
    checkpoint_every: int = 100
    select_best_on_val: bool = False
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    compile: bool = False
    # Predictor and reconstructed network in bfloat16 (losses fp32). "auto": on where the device computes in bf16
    # natively (bf16_native), else off. "reconstruction": as "auto", but only in the reconstruction-only steps
    # (rec_only_batch), where bf16 measured fidelity-neutral; distillation stays fp32. metrics.json records what
    # ran (`bf16`: the distillation phase, `bf16_reconstruction`)
    autocast_bf16: bool | Literal["auto", "reconstruction"] = False
    progress: bool = True


@dataclass
class PretrainConfig:
    """Training the ORIGINAL network (docs/METHOD.md §6-7): standard CIFAR recipe plus the smoothness regulariser."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=128))
    represent: RepresentConfig = field(default_factory=RepresentConfig)
    epochs: float = 200
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: list[float] = field(default_factory=lambda: [100, 150])
    gamma: float = 0.1
    smoothness: float = 0.0
    eval_every_epochs: float = 1.0
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    # NHWC activations and weights: the same step up to summation order. Off: on a quiet 2-core CPU it gave 1.03x
    # the images/s of a ResNet20 step already at 78% of matmul (bench/pretrain.py, docs/PERFORMANCE.md); not a
    # result-changing key
    channels_last: bool = False
    # Forward and backward in bfloat16 (torch.autocast; weights, SGD and the loss stay fp32): fast only where the
    # device has bf16 arithmetic (bf16_native); "auto" turns it on there; a result-changing key
    autocast_bf16: bool | Literal["auto"] = False


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise naming the key and what is allowed."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except NernError as exc:
                errors.append(str(exc))
        if not errors:
            raise NernError(f"config key '{key}': invalid value {value!r}")
        prefix = f"config key '{key}': "
        raise NernError(prefix + "; or ".join(e.removeprefix(prefix) for e in errors))
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise NernError(f"config key '{key}': {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise NernError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise NernError(f"config key '{key}': expected a mapping of names to values, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise NernError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool / int / float / str from YAML or `--set` text; a bool is never silently a number."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise NernError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise NernError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise NernError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise NernError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise NernError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise NernError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise NernError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys here: {', '.join(prefix + n for n in names)}"
        )
    default = cls()
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name)
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise NernError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['predictor.hidden=140', 'loss.kd=0'] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise NernError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, what: str = "config file", fix: str = "") -> dict[str, Any]:
    """A YAML file holding a mapping (a config, a manifest, published numbers); a missing or invalid file, or one
    holding something else, is a user error naming `what` (and, when it is missing, `fix`)."""
    path = Path(path)
    if not path.is_file():
        raise NernError(f"{what} not found: {path}" + (f"; {fix}" if fix else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise NernError(f"{what} {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise NernError(f"{what} {path} must hold a mapping of keys")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Any:
    """Build a validated `cls` from (optional) dict, YAML file and dotted overrides, in that order."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree = _merge(tree, read_yaml(path))
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = _build(cls, tree)
    validate(cfg)
    return cfg


def check_overrides(cls: type, overrides: list[str]) -> None:
    """Key names and value types of some overrides alone, without range checks: a bad key is bad in any
    combination, so the pipeline can name the config tree it came from before validating the merged one."""
    _build(cls, parse_overrides(overrides))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} and {'a.b': 1} both become {'a.b': 1} (None: {}): the form MLflow params, table columns
    and the pipeline's per-job overrides take."""
    out: dict[str, Any] = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise NernError(f"config key '{key}': {message}")


def check_device(device: str, key: str = "device") -> None:
    """Fail before any data is read when the run asks for an accelerator this machine lacks."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise NernError(f"config key '{key}': {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda":
        _require(torch.cuda.is_available(), key, f"{device!r} asked for, but this machine has no CUDA GPU "
                 "(torch.cuda.is_available() is False); set device=cpu")
    if kind == "mps":
        _require(torch.backends.mps.is_available(), key, f"{device!r} asked for, but MPS is not available here; "
                 "set device=cpu")


def bf16_native(device: str) -> bool:
    """Whether `device` computes in bfloat16 natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU that supports it);
    elsewhere bf16 is emulated and slower than fp32."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def use_bf16(setting: bool | str, device: str, *, reconstruction_phase: bool = False) -> bool:
    """The `autocast_bf16` setting resolved on this machine for one phase: true, false, "auto" = bf16_native(device),
    "reconstruction" = bf16_native(device) in the reconstruction-only phase and off elsewhere."""
    if setting == "reconstruction":
        return reconstruction_phase and bf16_native(device)
    return bf16_native(device) if setting == "auto" else bool(setting)


def validate(cfg: Any) -> None:
    """Range checks the types cannot express."""
    if isinstance(cfg, (FitConfig, PretrainConfig)):
        _require(cfg.model.num_classes >= 2, "model.num_classes", "must be >= 2")
        _require(cfg.model.in_channels >= 1, "model.in_channels", "must be >= 1")
        _require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
        _require(cfg.data.val_size >= 0, "data.val_size", "must be >= 0")
        _require(cfg.represent.max_kernel >= 1, "represent.max_kernel", "must be >= 1")
        check_device(cfg.device)
    if isinstance(cfg, FitConfig):
        _require(cfg.predictor.hidden >= 1, "predictor.hidden", f"must be a positive integer, got {cfg.predictor.hidden}")
        _require(cfg.predictor.depth >= 2, "predictor.depth", f"must be >= 2 linear layers, got {cfg.predictor.depth}")
        _require(cfg.optim.step_lr_scale > 0, "optim.step_lr_scale", "must be > 0, e.g. 1 or 10")
        bits = cfg.predictor.quantise_bits
        _require(bits is None or 2 <= bits <= 8, "predictor.quantise_bits",
                 f"must be an integer in [2, 8] or null (float predictor), got {bits}")
        _require(cfg.embedding.levels >= 1, "embedding.levels", "must be >= 1")
        _require(cfg.embedding.base > 0, "embedding.base", "must be > 0")
        for name in ("rec", "kd", "fmd", "ce"):
            _require(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be >= 0")
        _require(not (cfg.loss.ce > 0 and cfg.data_free), "loss.ce",
                 "needs the task's labels: set loss.ce=0 or data_free=false (noise has no labels)")
        _require(cfg.loss.warmup >= 0, "loss.warmup", "must be >= 0")
        _require(cfg.loss.temperature > 0, "loss.temperature", "must be > 0")
        _require(cfg.sampling.batch >= 1, "sampling.batch", "must be >= 1")
        _require(0.0 <= cfg.sampling.uniform_prob <= 1.0, "sampling.uniform_prob", "must be in [0, 1]")
        _require(cfg.optim.lr > 0, "optim.lr", "must be > 0")
        _require(len(cfg.optim.betas) == 2, "optim.betas", "must hold two numbers")
        _require(cfg.optim.warmup_iterations >= 0, "optim.warmup_iterations", "must be >= 0")
        if cfg.optim.clip_grad_norm is not None:
            _require(cfg.optim.clip_grad_norm > 0, "optim.clip_grad_norm",
                     f"must be > 0 or null (no clipping), got {cfg.optim.clip_grad_norm}")
        if cfg.optim.rec_only_lr is not None:
            _require(cfg.optim.rec_only_lr > 0, "optim.rec_only_lr",
                     f"must be > 0 or null (use optim.lr), got {cfg.optim.rec_only_lr}")
        _require(cfg.rec_only_iterations >= 0, "rec_only_iterations", f"must be >= 0, got {cfg.rec_only_iterations}")
        if cfg.rec_only_batch is not None:
            _require(cfg.rec_only_batch >= 1, "rec_only_batch",
                     f"must be >= 1 or null (all kernels), got {cfg.rec_only_batch}")
        _require(cfg.iterations is not None or cfg.epochs is not None, "iterations", "set iterations or epochs")
        if cfg.iterations is not None:
            _require(cfg.iterations >= 0, "iterations", "must be >= 0")
        if cfg.epochs is not None:
            _require(cfg.epochs > 0, "epochs", "must be > 0")
        _require(cfg.eval_every >= 0, "eval_every", "must be >= 0 (0 evaluates only at the end)")
        _require(not (cfg.tune_verbatim and cfg.select_best_on_val), "tune_verbatim",
                 "cannot be combined with select_best_on_val (the selected iterate keeps only the predictor); "
                 "set one of them to false")
        _require(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 disables checkpoints)")
    if isinstance(cfg, PretrainConfig):
        _require(cfg.epochs > 0, "epochs", "must be > 0")
        _require(cfg.lr > 0, "lr", "must be > 0")
        _require(cfg.smoothness >= 0, "smoothness", "must be >= 0")

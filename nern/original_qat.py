"""The original network trained through the predictor's quantisers: the equal-budget baseline of `nern compress`.

A NeRN file is trained (distillation, optionally labels) while post-training quantisation and NNCodec of the
original are not, so "NeRN beats NNCodec at equal bytes" mixes compression with training (issue 34). The
baseline a compression researcher would put beside it is quantisation-aware training of the network itself at
the same budget. Here the ORIGINAL network's represented conv weights (optionally its FC too) go through the
same learnt-step quantisers as a quantised predictor (`nern.qat`) and are trained with what the NeRN fit had:

- the same data stream (`data.train_stream` with the fit's data config and seed: the same batches in the same
  order as the fit's distillation phase; noise where the fit was data-free);
- the same terms against the same teacher, the frozen unquantised original: l_kd L_KD + l_fmd L_FMD on the
  pre-activation maps (`nern.feature_maps`), plus l_ce L_CE where the fit used labels (`nern.losses`). There is
  no L_rec (no predictor to fit) and no loss.warmup (its iterations distil from the first step, the budget
  stays the same number of distillation iterations);
- the same optimiser, parameter groups (steps at `optim.step_lr_scale` x the lr, no weight decay), schedule
  (the fit's distillation cosine, its warm-up included), gradient clipping and bfloat16 autocast;
- the same number of distillation iterations (`optim.total_iterations`), times `scale` (default 1);
- what else trains follows the fit: with tune_verbatim the other float parameters (BatchNorm affine, FC,
  unrepresented convs) train unquantised, as the NeRN file's verbatim tensors did; without it they stay the
  original's. Pruned entries (a keep-mask per weight) stay exactly zero.

`Budget` records the values the run actually used, so a table row can be checked against the fit's config.
Both networks stay in eval mode, as in a NeRN fit.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nern import data as data_mod
from nern.config import FitConfig, use_bf16
from nern.errors import NernError
from nern.feature_maps import FeatureMapRecorder
from nern.layers import ConvLayer
from nern.losses import LossWeights, distillation_terms, label_term, nern_objective
from nern.optim import optimizer_and_schedule, param_groups, total_iterations
from nern.pruning import mask_parameters
from nern.qat import attach_weight_quantisers, detach_quantisers, learnt_step_parameters, learnt_steps


@dataclass(frozen=True)
class Budget:
    """What the baseline's training used, read off the objects it ran with (the row records it as budget_*)."""

    iterations: int  # steps taken
    batch_size: int  # images per step, as seen
    stream_seed: int
    data_free: bool
    kd: float
    fmd: float
    ce: float
    temperature: float
    optimizer: str
    lr: float  # group 0's peak
    step_lr: float | None  # the quantiser steps' group's peak
    weight_decay: float
    min_lr: float
    warmup_iterations: int
    clip_grad_norm: float | None

    def row(self) -> dict[str, Any]:
        return {f"budget_{k}": v for k, v in dataclasses.asdict(self).items()}


def baseline_iterations(cfg: FitConfig, batches_per_epoch: int, scale: float = 1.0) -> int:
    """The NeRN fit's distillation iterations (its reconstruction-only steps see no data and are not counted),
    times `scale`."""
    if scale <= 0:
        raise NernError(f"--qat-original-scale {scale} must be positive; pass e.g. 1 (the fit's iterations)")
    return max(1, round(scale * total_iterations(cfg, batches_per_epoch)))


def baseline_config(cfg: FitConfig) -> FitConfig:
    """The fit's config with its schedule reduced to the distillation phase (no reconstruction-only phase)."""
    return dataclasses.replace(cfg, rec_only_iterations=0, rec_only_batch=None)


class OriginalQAT:
    """The student (a copy of the original, weights through N-bit quantisers), the frozen teacher, the stream
    and the optimiser; `step()` is one iteration. Both networks are copies of `model` (left untouched) carrying
    feature-map hooks: `close()` it."""

    def __init__(self, cfg: FitConfig, model: nn.Module, layers: list[ConvLayer], splits: Any, bits: int,
                 masks: dict[str, torch.Tensor], quantise_fc: bool = False, scale: float = 1.0):
        self.cfg, self.device = baseline_config(cfg), torch.device(cfg.device)
        self.bf16 = use_bf16(self.cfg.autocast_bf16, self.cfg.device)  # resolved once, not every step
        torch.manual_seed(cfg.seed)
        self.teacher = copy.deepcopy(model).to(self.device).eval()  # frozen, unquantised; the caller's untouched
        self.student = copy.deepcopy(self.teacher).eval()
        self.teacher.requires_grad_(False)
        self.quantised = attach_student_quantisers(self.student, layers, bits, quantise_fc)
        self.trainable = trainable_parameters(self.student, self.quantised, cfg.tune_verbatim)
        self.params = masked_parameters(self.student, masks)
        self.masks = {n: m.to(self.device, self.params[n].dtype) for n, m in masks.items()}
        self.hooks = [self.params[n].register_hook(lambda g, m=m: g * m) for n, m in self.masks.items()
                      if self.params[n].requires_grad]  # frozen ones (FC without tune_verbatim) are zeroed once
        mask_parameters(self.params, self.masks)
        train = getattr(splits, "train", None)  # none needed data-free
        self.stream = data_mod.train_stream(cfg.data, cfg.seed, train, data_free=cfg.data_free,
                                            device=None if self.device.type == "cpu" else self.device)
        self.total = baseline_iterations(cfg, self.stream.batches_per_epoch, scale)
        steps = set(learnt_step_parameters(self.student))
        groups = param_groups(self.trainable, steps, self.cfg.optim)
        self.optimizer, self.scheduler = optimizer_and_schedule(self.cfg, groups, self.total)
        self.weights = LossWeights(0.0, cfg.loss.kd, cfg.loss.fmd, cfg.loss.ce)
        self.teacher_maps, self.student_maps = FeatureMapRecorder(self.teacher), FeatureMapRecorder(self.student)
        self.iteration, self.batch_size = 0, None

    def step(self) -> dict[str, float]:
        """KD + FMD (+ CE) of the quantised student against the teacher on the next batch -> one optimiser step."""
        x, labels = (t.to(self.device, non_blocking=True) for t in self.stream.next())
        self.batch_size = self.batch_size or x.shape[0]
        with torch.no_grad(), self.teacher_maps.record() as maps:
            teacher_logits = self.teacher(x)
            teacher_maps = list(maps)
        lam = self.weights
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            with self.student_maps.record() as maps:
                logits = self.student(x)
                student_maps = list(maps)
            kd, fmd = distillation_terms(logits, student_maps, teacher_logits, teacher_maps,
                                         self.cfg.loss.temperature, lam.kd > 0, lam.fmd > 0)
            ce = label_term(logits, labels, lam.ce > 0)
        loss = nern_objective(lam, kd.new_zeros(()), kd, fmd, ce)
        if not torch.isfinite(loss):
            raise NernError(f"the original's quantisation-aware loss became {loss.item()} at iteration "
                            f"{self.iteration}; lower optim.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        mask_parameters(self.params, self.masks)  # weight decay / Lookahead must not revive pruned entries
        self.iteration += 1
        return {"loss": loss.item(), "kd": kd.item(), "fmd": fmd.item(), "ce": ce.item()}

    def budget(self) -> Budget:
        groups, o = self.optimizer.param_groups, self.cfg.optim
        return Budget(self.iteration, self.batch_size or 0, self.stream.seed, self.cfg.data_free, self.weights.kd,
                      self.weights.fmd, self.weights.ce, self.cfg.loss.temperature, type(self.optimizer).__name__,
                      groups[0]["initial_lr"], groups[1]["initial_lr"] if len(groups) > 1 else None,
                      groups[0]["weight_decay"], o.min_lr, o.warmup_iterations, o.clip_grad_norm)

    def close(self) -> None:
        """Remove the gradient-mask and feature-map hooks."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.teacher_maps.close()
        self.student_maps.close()


def attach_student_quantisers(student: nn.Module, layers: list[ConvLayer], bits: int, quantise_fc: bool) -> list[str]:
    """Quantisers on the represented convs (those NeRN predicts) and, with `quantise_fc`, every Linear."""
    represented = {layer.name for layer in layers}
    return attach_weight_quantisers(
        student, bits, lambda name, m: name in represented or (quantise_fc and isinstance(m, nn.Linear)))


def trainable_parameters(student: nn.Module, quantised: list[str], tune_verbatim: bool) -> list[nn.Parameter]:
    """The quantised weights and their steps; with tune_verbatim also every other float parameter."""
    quantised_params = {f"{n.rpartition('.')[0]}.parametrizations.weight.original" for n in quantised}
    chosen = []
    for name, p in student.named_parameters():
        if name in quantised_params or name.endswith(".log_step") or (tune_verbatim and p.is_floating_point()):
            chosen.append(p)
    for p in student.parameters():
        p.requires_grad_(any(p is c for c in chosen))
    return chosen


def masked_parameters(student: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Each mask's parameter in a network or a predictor; a quantised weight keeps its float value under
    `parametrizations.weight.original`."""
    params = dict(student.named_parameters())
    found = {}
    for name in masks:
        module, _, attr = name.rpartition(".")
        found[name] = params[name] if name in params else params[f"{module}.parametrizations.{attr}.original"]
    return found


@dataclass
class TrainedOriginal:
    network: nn.Module  # on the CPU, quantised weights = the trained integers times their steps
    steps: dict[str, torch.Tensor]  # each quantised weight's learnt steps (what the file must store)
    quantised: list[str]  # the quantised weights' names
    budget: Budget


def train_original(cfg: FitConfig, model: nn.Module, layers: list[ConvLayer], splits: Any, bits: int,
                   masks: dict[str, torch.Tensor], quantise_fc: bool = False, scale: float = 1.0,
                   progress: bool = False) -> TrainedOriginal:
    """The original network trained through `bits`-bit quantisers at the NeRN fit's budget (module docstring)."""
    run = OriginalQAT(cfg, model, layers, splits, bits, masks, quantise_fc, scale)
    try:
        for _ in tqdm(range(run.total), desc=f"original, quantisation-aware int{bits}", disable=not progress,
                      leave=False):
            run.step()
    finally:
        run.close()
    return finish(run)


def finish(run: OriginalQAT) -> TrainedOriginal:
    """The trained student with its quantisers removed (weights = integers times steps), on the CPU, frozen."""
    steps = learnt_steps(run.student)
    detach_quantisers(run.student)
    network = run.student.cpu().eval().requires_grad_(False)
    return TrainedOriginal(network, steps, run.quantised, run.budget())


def unquantised_precisions(trained: TrainedOriginal, precision: str = "int8") -> dict[str, str]:
    """The file precision of every matrix the quantisers did not train (FC, unrepresented convs): `precision`,
    as a quantisation-aware NeRN file stores its verbatim matrices; the quantised ones go at their own width."""
    return {name: precision for name, t in trained.network.state_dict().items()
            if t.is_floating_point() and t.dim() >= 2 and name not in trained.steps}


def trained_integers(network: nn.Module, steps: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The integers a trained network's quantised weights are (weight / step, rounded and clipped): what the file
    must hold."""
    levels = 2 ** (bits - 1) - 1
    params = dict(network.named_parameters())
    out = {}
    for name, step in steps.items():
        w = params[name].detach().float()
        out[name] = torch.round(w / step.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-levels, levels).to(torch.int16)
    return out

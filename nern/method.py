"""NeRN, the paper's method (docs/METHOD.md §1-7), top-down on one screen: `Method.step` is one iteration.

    kernel coordinates (layer, filter, channel), permuted -> positional embedding, once   §1-2  fit_setup.prepare
    embedding -> predictor (an MLP) -> one k x k kernel per coordinate                     §3    predictor.py
    every kernel predicted; the gradient flows only through the sampled ones               §5    sampling.py
    kernels -> the reconstructed network: the original module run with these conv weights       reconstruct.py
    L = l_rec L_rec + l_kd L_KD + l_fmd L_FMD on a batch of task images (or noise)         §4    losses.py
    -> a Ranger step, the learning rate on a cosine stepped every iteration                §7    optim.py

Both networks stay in eval mode. The fast recipe departs from the paper through the hooks of `Recipe` and
`KernelRows` (below `Method`); `DEPARTURES` lists every switch by which a fit may depart, with its config key,
the paper's value, why, and the code it acts through (docs/METHOD.md §13 describes each). With the paper's
settings every hook is the paper's plain behaviour. nern/fit.py runs a `Method` to the end (evaluation,
checkpoints, outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nern import data as data_mod
from nern.config import FitConfig, flatten, to_dict, use_bf16
from nern.errors import NernError
from nern.fit_setup import FitSetup, attach_tuned, build_predictor, layer_scales
from nern.losses import (LossWeights, Terms, distillation_terms, kernel_rows_reconstruction_loss, label_term,
                         nern_objective, reconstruction_loss)
from nern.optim import optimizer_and_schedule, param_groups, total_iterations
from nern.qat import learnt_step_parameters
from nern.reconstruct import NetworkPair, kernels_to_weights, predict_kernels, weights_to_kernels
from nern.sampling import KernelSampler


class Method:
    """One NeRN fit's parts and its iteration. Holds forward hooks on the original model (unless compiled):
    `close()` it, or use it as a context manager."""

    def __init__(self, cfg: FitConfig, setup: FitSetup):
        self.cfg, self.s, self.device = cfg, setup, torch.device(cfg.device)
        # departure autocast_bf16, resolved on this machine: distillation / reconstruction-only steps
        self.bf16 = use_bf16(cfg.autocast_bf16, cfg.device)
        self.bf16_reconstruction = use_bf16(cfg.autocast_bf16, cfg.device, reconstruction_phase=True)
        torch.manual_seed(cfg.seed)
        self.predictor, self.forward_predictor = build_predictor(cfg, setup, self.device)  # §3
        self.tuned = attach_tuned(cfg, setup)  # departure tune_verbatim, else None
        self.stream = data_mod.train_stream(cfg.data, cfg.seed, setup.splits.train, data_free=cfg.data_free,
                                            device=None if self.device.type == "cpu" else self.device)
        self.distillation_total = total_iterations(cfg, self.stream.batches_per_epoch)
        self.total = cfg.rec_only_iterations + self.distillation_total
        self.optimizer, self.scheduler = self.fresh_optimizer(0)  # §7
        self.sampler = KernelSampler(cfg.sampling.method, cfg.sampling.batch, setup.rep.offsets,  # §5
                                     setup.targets.norm(dim=1), cfg.sampling.uniform_prob, seed=cfg.seed)
        self.originals = [w.to(self.device) for w in setup.originals]
        self.recipe = Recipe(cfg, setup.originals)
        self.rec_targets = self.recipe.rec_targets(self.originals)
        self.rec_rows = (kernel_rows(cfg, setup, self.recipe.rec_layer_weights, self.device)
                         if cfg.rec_only_batch else None)  # departure rec_only_batch
        scales = setup.rep.kernel_scales()
        self.scales = scales.to(self.device) if scales is not None else None
        self.iteration = 0
        # last: from here on the original model carries hooks (unless fused), removed by close()
        self.networks = NetworkPair(setup.model, setup.rep, fused=cfg.compile)
        self._distil = torch.compile(self._student_terms) if self.networks.fused else self._student_terms

    # -- one iteration ------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Objective -> gradient (clipped by the recipe) -> optimiser step -> learning rate of the next one."""
        if self.recipe.restarts_optimizer(self.iteration):
            self.optimizer.state.clear()
        lam = self.recipe.loss_weights(self.iteration)
        minibatch = self.rec_rows is not None and self.iteration < self.cfg.rec_only_iterations
        terms = self.kernel_rows_objective(lam) if minibatch else self.full_objective(lam)
        if not torch.isfinite(terms.loss):
            raise NernError(f"the loss became {terms.loss.item()} at iteration {self.iteration}; lower optim.lr "
                            "or check the original weights for NaN/inf")
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        grad_norm = self.recipe.clip_gradients(self.trainable())
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.iteration += 1
        return {"loss": terms.loss.item(), "rec": terms.rec.item(), "kd": terms.kd.item(),
                "fmd": terms.fmd.item(), "ce": terms.ce.item(), "lr": lr, "grad_norm": grad_norm.item()}

    def full_objective(self, lam: LossWeights) -> Terms:
        """The paper's iteration: sample the kernels that carry gradient, predict the network, compute L."""
        sampled = self.sampler.sample()
        if sampled is not None:
            sampled = sampled.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            weights = self.predict_weights(sampled)
        return self.objective(weights, lam)

    def predict_weights(self, sampled: torch.Tensor | None) -> list[torch.Tensor]:
        """embeddings -> predictor -> kernels (gradient only through `sampled`; None: all) -> conv weights."""
        kernels = predict_kernels(self.forward_predictor, self.s.embeddings, sampled, self.scales)
        return kernels_to_weights(kernels, self.s.rep)

    def objective(self, weights: list[torch.Tensor], lam: LossWeights) -> Terms:
        """L from the predicted weights and, when this iteration distils, both networks on one batch."""
        rec = self.reconstruction(weights)
        kd = fmd = ce = torch.zeros((), device=self.device)
        if lam.distils:
            x, labels = (t.to(self.device, non_blocking=True) for t in self.stream.next())
            with torch.no_grad():
                teacher_logits, teacher_maps = self.networks.teacher(x)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                kd, fmd, ce = self._distil(weights, x, labels, teacher_logits, teacher_maps, lam.kd > 0, lam.fmd > 0,
                                           lam.ce > 0)
        return Terms(nern_objective(lam, rec, kd, fmd, ce), rec, kd, fmd, ce)

    def reconstruction(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """L_rec against the recipe's targets (the original weights, or scaled per layer: loss.rec_space)."""
        return reconstruction_loss(weights, self.rec_targets, self.recipe.rec_layer_weights)

    def _student_terms(self, weights: list[torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                       teacher_logits: torch.Tensor, teacher_maps: list[torch.Tensor], use_kd: bool, use_fmd: bool,
                       use_ce: bool) -> tuple[torch.Tensor, ...]:
        """The reconstructed network on `x` and its distillation (and label) terms: one graph when compiled."""
        logits, maps = self.networks.student(weights, x)
        kd, fmd = distillation_terms(logits, maps, teacher_logits, teacher_maps, self.cfg.loss.temperature, use_kd,
                                     use_fmd)
        return kd, fmd, label_term(logits, labels, use_ce)

    def kernel_rows_objective(self, lam: LossWeights) -> Terms:
        """Departure rec_only_batch: a reconstruction-only step on a subset of kernel rows, only those through
        the predictor."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_reconstruction):
            rec = self.rec_rows.term(self.forward_predictor, self.s.embeddings)
        zero = rec.new_zeros(())
        return Terms(nern_objective(lam, rec, zero, zero), rec, zero, zero, zero)

    # -- what the optimiser trains ------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        """The predictor's parameters (quantiser steps included) and, with tune_verbatim, the verbatim tensors."""
        return [*self.predictor.parameters(), *(self.tuned.parameters() if self.tuned is not None else ())]

    def fresh_optimizer(self, iteration: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        groups = param_groups(self.trainable(), set(learnt_step_parameters(self.predictor)), self.cfg.optim)
        return optimizer_and_schedule(self.cfg, groups, self.distillation_total, iteration)

    def rebuild_optimizer(self) -> None:
        """A fresh optimiser and schedule over the predictor's parameters as they are now (e.g. with the learnt
        quantiser steps of `nern.qat` attached); the schedule continues where the fit is."""
        self.optimizer, self.scheduler = self.fresh_optimizer(self.iteration)

    def stateful(self) -> dict[str, Any]:
        """Everything the next step depends on, by checkpoint key."""
        parts = {"predictor": self.predictor, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "sampler": self.sampler, "stream": self.stream}
        if self.tuned is not None:
            parts["tuned"] = self.tuned
        return {**parts, "rec_sampler": self.rec_rows.sampler} if self.rec_rows is not None else parts

    def close(self) -> None:
        """Remove the feature-map hooks from the original model (it may be the user's, or reused by another fit)."""
        self.networks.close()

    def __enter__(self) -> Method:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- where a fit departs from the paper: the hooks ----------------------------------------------------------

def distillation_weights(cfg: FitConfig, iteration: int) -> tuple[float, float, float]:
    """(kd, fmd, ce) weights at this step: zero in the reconstruction-only phase and in the `loss.warmup`
    iterations after it (the paper's warm-up for ResNet56 and ImageNet)."""
    if iteration < cfg.rec_only_iterations + cfg.loss.warmup:
        return 0.0, 0.0, 0.0
    return cfg.loss.kd, cfg.loss.fmd, cfg.loss.ce


class Recipe:
    """The code of the departures that act during an iteration: the two phases, the normalised reconstruction
    error and gradient clipping. With the paper's settings each method is the paper's plain behaviour."""

    def __init__(self, cfg: FitConfig, originals: list[torch.Tensor]):
        self.cfg = cfg
        # rec_space=normalized: each layer's error weighed by 1/std of its original weights
        self.rec_layer_weights = ([float(1 / s) for s in layer_scales(originals)]
                                  if cfg.loss.rec_space == "normalized" else None)

    def loss_weights(self, iteration: int) -> LossWeights:
        return LossWeights(self.cfg.loss.rec, *distillation_weights(self.cfg, iteration))

    def restarts_optimizer(self, iteration: int) -> bool:
        """At the first distillation step after a reconstruction-only phase (fresh moments, fresh Lookahead)."""
        return iteration == self.cfg.rec_only_iterations and iteration > 0

    def rec_targets(self, originals: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.rec_layer_weights is None:
            return originals
        return [w * r for w, r in zip(originals, self.rec_layer_weights)]

    def clip_gradients(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The gradient's L2 norm before clipping (a cheap divergence warning in the curves), clipped to
        optim.clip_grad_norm when that is set."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.clip_grad_norm, norm)
        return norm


@dataclass
class KernelRows:
    """The reconstruction targets as rows of the kernel matrix, in the space L_rec is measured in (rec_space),
    for reconstruction-only steps on a subset of kernels (rec_only_batch)."""

    targets: torch.Tensor  # [N, k*k]
    factor: torch.Tensor  # [N, 1]: predictor output -> that space (the layer's stored scale, times 1/std)
    mask: torch.Tensor  # [N, k*k]: 0 on the zero padding of kernels smaller than k x k
    sampler: KernelSampler  # a fresh uniform subset of rec_only_batch rows per step

    def select(self, embeddings: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if rows is None:
            return embeddings, self.targets, self.factor, self.mask
        return embeddings[rows], self.targets[rows], self.factor[rows], self.mask[rows]

    def term(self, predictor: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        """L_rec of this step's rows, only those rows through the predictor."""
        rows = self.sampler.sample()
        emb, target, factor, mask = self.select(embeddings, rows.to(self.targets.device) if rows is not None else None)
        return kernel_rows_reconstruction_loss(predictor(emb).float() * factor, target, mask)


def kernel_rows(cfg: FitConfig, setup: FitSetup, layer_weights: list[float] | None,
                device: torch.device) -> KernelRows:
    counts = torch.tensor([layer.num_kernels for layer in setup.rep.layers])
    per_row = torch.repeat_interleave(torch.tensor(layer_weights or [1.0] * len(counts)), counts).unsqueeze(1)
    scales = setup.rep.kernel_scales()
    factor = per_row if scales is None else per_row * scales
    mask = weights_to_kernels([torch.ones_like(w) for w in setup.originals], setup.rep.kernel_size)
    sampler = KernelSampler("random_batch", cfg.rec_only_batch, setup.rep.offsets, setup.targets.norm(dim=1),
                            seed=cfg.seed)
    return KernelRows((setup.targets * per_row.to(setup.targets)).to(device), factor.to(device), mask.to(device),
                      sampler)


@dataclass(frozen=True)
class Departure:
    key: str  # the config key
    paper: Any  # its value in the paper's recipe (config/recipes/paper.yaml): the switch is off
    why: str
    hook: str  # the code it acts through


# Every code path by which a fit may depart from the paper's recipe. config/recipes/fast.yaml switches the first
# seven on (docs/PERFORMANCE.md has the measurements); its other changes are plain values (learning rates,
# Ranger's beta1, loss weights, the embedding base).
DEPARTURES = (
    Departure("rec_only_iterations", 0,
              "reconstruct first, without images (a few times cheaper per step), on its own cosine schedule peaking "
              "at optim.rec_only_lr; the optimiser's moments are reset when distillation starts, since they belong "
              "to a far smaller gradient (ResNet20: norm ~0.01 at the end of the phase, ~400 once distilling)",
              "Recipe.loss_weights, Recipe.restarts_optimizer, optim.make_scheduler"),
    Departure("rec_only_batch", None,
              "each reconstruction-only step fits a fresh uniform subset of the kernels, and only those go through "
              "the predictor: a step costs batch/N of a full one (the phase is minibatch regression)",
              "KernelRows, Method.kernel_rows_objective"),
    Departure("loss.rec_space", "raw",
              "the reconstruction error in units of each layer's weight std, so layers with small weights are "
              "learnt as well as those with large ones", "Recipe.rec_layer_weights, Recipe.rec_targets"),
    Departure("predictor.normalize_targets", False,
              "the predictor emits per-layer standardised kernels, rescaled by one stored fp32 scalar per layer "
              "(counted in the size as scale_bytes)", "fit_setup.prepare (Representation.scales)"),
    Departure("predictor.init", "default", "He (variance-preserving) init: deep or wide predictors start with "
              "outputs of a sensible scale", "predictor.variance_preserving_init"),
    Departure("sampling.method", "random_weighted_batch",
              "all: every kernel carries gradient each iteration, 7x more signal per step for ResNet20",
              "sampling.KernelSampler"),
    Departure("optim.clip_grad_norm", None,
              "cap the gradient norm: RAdam's first steps are un-normalised SGD steps, and the first distillation "
              "gradient after the reconstruction phase has norm ~860", "Recipe.clip_gradients"),
    Departure("tune_verbatim", False,
              "distillation also trains the reconstructed network's verbatim tensors (BatchNorm affine, FC): they "
              "are stored anyway, so a codec gets their adjustment to the predicted kernels for no bytes",
              "fit_setup.attach_tuned"),
    Departure("loss.ce", 0.0, "a cross-entropy term on the task's labels beside KD and FMD: the paper's NeRN uses "
              "no labels; a codec that may see them can spend a small predictor's capacity on the task",
              "losses.label_term"),
    Departure("optim.warmup_iterations", 0, "a linear learning-rate warm-up of the distillation phase",
              "optim.make_scheduler"),
    Departure("autocast_bf16", False, "predictor and reconstructed network in bfloat16 (throughput); losses in fp32; "
              "'reconstruction': only in the reconstruction-only steps",
              "torch.autocast in Method"),
    Departure("compile", False, "torch.compile: one fused graph per network (throughput, same losses to ~1e-3)",
              "fit_setup.build_predictor, reconstruct.NetworkPair(fused)"),
)


def departures(cfg: FitConfig) -> dict[str, Any]:
    """The departures `cfg` switches on, with their values."""
    flat = flatten(to_dict(cfg))
    return {d.key: flat[d.key] for d in DEPARTURES if flat[d.key] != d.paper}

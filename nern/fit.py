"""Fitting a NeRN predictor to a pretrained network (METHOD.md 2-7), in the order the paper describes it.

One iteration (`Fitter.step`): the kernel coordinates' positional embeddings (computed once, `prepare`) ->
the predictor -> every kernel, the gradient flowing only through the sampled ones -> the reconstructed
network's weights -> the objective L = l_rec * L_rec + l_kd * L_KD + l_fmd * L_FMD on a batch of task images
(or noise) run through the original and the reconstructed network (nern/objective.py) -> a Ranger step,
cosine learning rate per iteration. Both networks stay in eval mode. We report the LAST iterate (and
optionally the best on a validation split carved from the train set); the test set is never used for
selection. The switches by which a fit may depart from the paper are listed in one place: `DEPARTURES`.
nern/loop.py runs the iterations (evaluation, checkpoints, resumption, pre-emption, tracking).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nern import data as data_mod
from nern.artifacts import remove_stale_temporaries, save_tensors, write_json
from nern.checkpoint import fingerprint, tensor_digest
from nern.config import FitConfig, flatten, to_dict
from nern.errors import NernError
from nern.evaluate import layer_errors, size_report, top_k_accuracy
from nern.layers import ConvLayer, conv_weights, find_conv_layers
from nern.loop import CHECKPOINT_FILE, History, LoopPlan, TrainingLoop, clear_resume_state, write_curves
from nern.objective import (
    LossWeights,
    distillation_terms,
    label_term,
    kernel_reconstruction_term,
    nern_objective,
    reconstruction_term,
)
from nern.predictor import Predictor
from nern.qat import attach_quantisers, learnt_step_parameters, plain_state
from nern.reconstruct import (
    NetworkPair,
    Representation,
    TunedTensors,
    identity_positions,
    kernels_to_weights,
    predict_kernels,
    run_reconstructed,
    weights_to_kernels,
)
from nern.sampling import KernelSampler

# Settings that do not change the numbers a run produces: a resumed run may change them.
NON_RESULT_KEYS = ("progress", "eval_every", "checkpoint_every", "threads", "device", "compile")
PREDICTOR_FILE = "predictor.safetensors"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.csv"


# -- what is represented ----------------------------------------------------------------------------------

@dataclass
class FitSetup:
    """Everything a fit needs that is derived, not learned."""

    model: nn.Module
    rep: Representation
    originals: list[torch.Tensor]
    targets: torch.Tensor
    embeddings: torch.Tensor
    splits: Any
    permutation_mode: str
    permutation_bytes: int


def layer_scales(originals: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer standard deviation of the original weights: the predictor then sees unit-scale targets."""
    return torch.stack([w.float().std().clamp_min(1e-8) for w in originals])


def _positions(layers: list[ConvLayer], permutation: str | Path | list[torch.Tensor] | None
               ) -> tuple[list[torch.Tensor], str, int]:
    """(each layer's coordinate permutation, its mode, the bytes it costs to store)."""
    if permutation is None:
        return identity_positions(layers), "none", 0
    from nern import permutation as perm_mod

    if isinstance(permutation, (str, Path)):
        shapes = [(layer.shape[0], layer.shape[1]) for layer in layers]
        positions, meta = perm_mod.load_permutations(permutation, expected_shapes=shapes)
        mode = meta.get("mode", "unknown")
        # symmetry: the network itself was permuted (nern.symmetry); its identity coordinates cost nothing
        return positions, mode, 0 if mode in ("none", "symmetry") else perm_mod.permutation_bytes(positions)
    positions = list(permutation)
    return positions, "custom", perm_mod.permutation_bytes(positions)


def prepare(cfg: FitConfig, model: nn.Module | None = None, permutation: str | list[torch.Tensor] | None = None,
            splits: Any = None) -> FitSetup:
    """The represented layers, their targets and the kernel coordinates' embeddings (METHOD.md 1-2)."""
    from nern import models

    if model is None:
        torch.manual_seed(cfg.seed)  # a config without a checkpoint gets the same random original every time
        model = models.load_model(cfg.model)
    model = model.to(cfg.device).eval()
    model.requires_grad_(False)
    layers = find_conv_layers(model, cfg.represent)
    originals = conv_weights(model, layers)
    positions, mode, perm_bytes = _positions(layers, permutation)
    scales = layer_scales(originals).cpu() if cfg.predictor.normalize_targets else None
    rep = Representation(layers, [p.cpu() for p in positions], kernel_size=3, scales=scales)
    targets = weights_to_kernels(originals, rep.kernel_size)
    embeddings = rep.embeddings(cfg.embedding.levels, cfg.embedding.base).to(cfg.device)
    if splits is None:
        splits = data_mod.build_splits(cfg.data, seed=cfg.seed)
    data_mod.check_compatible(splits.test.info, _in_channels(model))
    return FitSetup(model, rep, originals, targets, embeddings, splits, mode, perm_bytes)


def _in_channels(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


# -- where a fit departs from the paper -------------------------------------------------------------------

@dataclass(frozen=True)
class Departure:
    key: str  # the config key
    paper: Any  # its value in the paper's recipe (config/presets/paper.yaml): the switch is off
    why: str


# Every code path by which a fit may depart from the paper's recipe. config/presets/fast.yaml switches the
# first six on (docs/PERFORMANCE.md has the measurements); its other changes are plain values (learning rates,
# Ranger's beta1, loss weights, the embedding base). `Recipe` below is the code of the first, second and
# sixth; the others act where the fit is built (prepare, Predictor, KernelSampler, make_scheduler, Fitter).
DEPARTURES = (
    Departure("rec_only_iterations", 0,
              "reconstruct first, without images (a few times cheaper per step), on its own cosine schedule peaking "
              "at optim.rec_only_lr; the optimiser's moments are reset when distillation starts, since they belong "
              "to a far smaller gradient (ResNet20: norm ~0.01 at the end of the phase, ~400 once distilling)"),
    Departure("rec_only_batch", None,
              "each reconstruction-only step fits a fresh uniform subset of the kernels, and only those go through "
              "the predictor: a step costs batch/N of a full one (the phase is minibatch regression)"),
    Departure("loss.rec_space", "raw",
              "the reconstruction error in units of each layer's weight std, so layers with small weights are "
              "learnt as well as those with large ones"),
    Departure("predictor.normalize_targets", False,
              "the predictor emits per-layer standardised kernels, rescaled by one stored fp32 scalar per layer "
              "(counted in the size as scale_bytes)"),
    Departure("predictor.init", "default", "He (variance-preserving) init: deep or wide predictors start with "
              "outputs of a sensible scale"),
    Departure("sampling.method", "random_weighted_batch",
              "all: every kernel carries gradient each iteration, 7x more signal per step for ResNet20"),
    Departure("optim.clip_grad_norm", None,
              "cap the gradient norm: RAdam's first steps are un-normalised SGD steps, and the first distillation "
              "gradient after the reconstruction phase has norm ~860"),
    Departure("tune_verbatim", False,
              "distillation also trains the reconstructed network's verbatim tensors (BatchNorm affine, FC): they "
              "are stored anyway, so a codec gets their adjustment to the predicted kernels for no bytes"),
    Departure("loss.ce", 0.0, "a cross-entropy term on the task's labels beside KD and FMD: the paper's NeRN uses "
              "no labels; a codec that may see them can spend a small predictor's capacity on the task"),
    Departure("optim.warmup_iterations", 0, "a linear learning-rate warm-up of the distillation phase"),
    Departure("autocast_bf16", False, "predictor and reconstructed network in bfloat16 (throughput); losses in fp32"),
    Departure("compile", False, "torch.compile: one fused graph per network (throughput, same losses to ~1e-3)"),
)


def departures(cfg: FitConfig) -> dict[str, Any]:
    """The departures `cfg` switches on, with their values."""
    flat = flatten(to_dict(cfg))
    return {d.key: flat[d.key] for d in DEPARTURES if flat[d.key] != d.paper}


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
        return kernel_reconstruction_term(predictor(emb).float() * factor, target, mask)


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


# -- optimiser and schedule (METHOD.md 7) -----------------------------------------------------------------

def make_optimizer(cfg: FitConfig, params: Any) -> torch.optim.Optimizer:
    """`params`: parameters or param groups (a group's own lr / weight_decay win over optim's)."""
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    try:
        from pytorch_ranger import Ranger
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise NernError("pytorch-ranger is not installed; run `pip install pytorch-ranger` or set optim.name=adam") from exc
    import warnings

    warnings.filterwarnings("ignore", message=".*addcmul_.*", category=UserWarning)
    return Ranger(params, lr=o.lr, alpha=0.5, k=6, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def make_scheduler(cfg: FitConfig, optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Two phases on one step counter, each annealing to `min_lr` with a cosine stepped every iteration: the
    reconstruction-only steps (peak optim.rec_only_lr), then the `total` distillation iterations (optional
    linear warm-up, peak optim.lr). A fitted-to-the-weights predictor needs a far gentler distillation step
    than a random one, hence the two peaks."""
    rec = cfg.rec_only_iterations
    rec_peak = (cfg.optim.rec_only_lr or cfg.optim.lr) / cfg.optim.lr
    warm = cfg.optim.warmup_iterations
    floor = cfg.optim.min_lr / cfg.optim.lr

    def cosine(progress: float, peak: float) -> float:
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def factor(step: int) -> float:
        if step < rec:
            return cosine(step / rec, rec_peak)
        step -= rec
        if step < warm:
            return (step + 1) / warm
        return cosine((step - warm) / max(1, total - warm), 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_iterations(cfg: FitConfig, batches_per_epoch: int) -> int:
    """The distillation iterations (`rec_only_iterations` come on top)."""
    if cfg.iterations is not None:
        return cfg.iterations
    return max(1, math.ceil(cfg.epochs * batches_per_epoch))


def check_compile_toolchain(device: torch.device) -> None:
    """torch.compile on CPU generates C++: fail at the start with the fix, not deep inside the first step."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise NernError("compile=true on the CPU needs a C++ compiler (g++); install one (e.g. apt-get install "
                        "g++) or set compile=false")


def top1(forward: Any, imageset: Any, cfg: FitConfig, device: torch.device) -> float:
    batches = data_mod.eval_batches(imageset, cfg.data.eval_batch_size)
    return top_k_accuracy(forward, batches, (1,), device)["top1"]


class Scorer:
    """The accuracies a fit reports: validation while fitting (the test set costs twice as much and must not steer
    anything), validation and test at the end; the test set every time when there is no validation split."""

    def __init__(self, cfg: FitConfig, setup: FitSetup, device: torch.device):
        self.cfg, self.s, self.device = cfg, setup, device

    def top1(self, weights: list[torch.Tensor] | None, split: str) -> float:
        """The original (weights None) or the network with these reconstructed weights, on one split."""
        model, rep = self.s.model, self.s.rep
        forward = model if weights is None else (lambda x: run_reconstructed(model, rep, weights, x))
        return top1(forward, getattr(self.s.splits, split), self.cfg, self.device)

    def measure(self, weights: list[torch.Tensor] | None, final: bool) -> dict[str, float]:
        splits = ["test"] if self.s.splits.val is None else ["val", "test"] if final else ["val"]
        return {f"{split}_top1": self.top1(weights, split) for split in splits}


# -- the fit -----------------------------------------------------------------------------------------------

@dataclass
class Terms:
    """One iteration's objective and its three terms."""

    loss: torch.Tensor
    rec: torch.Tensor
    kd: torch.Tensor
    fmd: torch.Tensor
    ce: torch.Tensor


class Fitter:
    """The training state of one fit; `step()` is one iteration, `run()` trains to the end in `out_dir`.

    Holds forward hooks on the original model (unless compiled): `close()` it, or use it as a context manager.
    """

    def __init__(self, cfg: FitConfig, setup: FitSetup, out_dir: Path, tracker: Any = None, cleanup: bool = True):
        self.cfg, self.s, self.out, self.tracker = cfg, setup, Path(out_dir), tracker
        self.cleanup = cleanup  # False: the caller clears the resume state once it has logged the results
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.predictor = Predictor(setup.embeddings.shape[1], cfg.predictor.hidden, cfg.predictor.depth,
                                   setup.rep.kernel_size, cfg.predictor.init).to(self.device)
        if cfg.predictor.quantise_bits:  # every step, the reconstruction phase included, sees the rounding
            attach_quantisers(self.predictor, cfg.predictor.quantise_bits)
        if cfg.compile:
            check_compile_toolchain(self.device)
        self.forward_predictor: nn.Module = torch.compile(self.predictor) if cfg.compile else self.predictor
        # tune_verbatim: the student's BatchNorm/FC are trainable copies, seen through setup.rep.tuned
        self.tuned = TunedTensors(setup.model, setup.rep) if cfg.tune_verbatim else None
        if self.tuned is not None:
            setup.rep.tuned = self.tuned.overrides()
        self.stream = data_mod.train_stream(cfg.data, cfg.seed, setup.splits.train, data_free=cfg.data_free,
                                            device=None if self.device.type == "cpu" else self.device)
        self.distillation_total = total_iterations(cfg, self.stream.batches_per_epoch)
        self.total = cfg.rec_only_iterations + self.distillation_total
        self.optimizer = make_optimizer(cfg, self.param_groups())
        self.scheduler = make_scheduler(cfg, self.optimizer, self.distillation_total)
        self.sampler = KernelSampler(cfg.sampling.method, cfg.sampling.batch, setup.rep.offsets,
                                     setup.targets.norm(dim=1), cfg.sampling.uniform_prob, seed=cfg.seed)
        self.originals = [w.to(self.device) for w in setup.originals]
        self.recipe = Recipe(cfg, setup.originals)
        self.rec_targets = self.recipe.rec_targets(self.originals)
        # rec_only_batch: the reconstruction-only steps see a fresh subset of kernel rows each (KernelRows)
        self.rec_rows = (kernel_rows(cfg, setup, self.recipe.rec_layer_weights, self.device)
                         if cfg.rec_only_batch else None)
        self.scorer = Scorer(cfg, setup, self.device)
        scales = setup.rep.kernel_scales()
        self.scales = scales.to(self.device) if scales is not None else None
        self.iteration = 0
        self.best: dict[str, Any] | None = None
        self.original_acc: dict[str, float] | None = None
        inputs = tensor_digest([setup.targets, *setup.rep.positions])
        self.fingerprint = fingerprint({**flatten(to_dict(cfg)), "inputs": inputs}, NON_RESULT_KEYS)
        # last: from here on the original model carries hooks (unless fused), removed by close()
        self.networks = NetworkPair(setup.model, setup.rep, fused=cfg.compile)
        self._distil = torch.compile(self._student_terms) if self.networks.fused else self._student_terms

    def trainable(self) -> list[nn.Parameter]:
        """The predictor's parameters (quantiser steps included) and, with tune_verbatim, the verbatim tensors."""
        return [*self.predictor.parameters(), *(self.tuned.parameters() if self.tuned is not None else ())]

    def param_groups(self) -> list[dict[str, Any]]:
        """`trainable()` for the optimiser: the quantiser steps (nern.qat) in a group of their own, at
        optim.step_lr_scale x the lr and without weight decay; the rest first, so group 0's lr is the logged one."""
        steps = set(learnt_step_parameters(self.predictor))
        if not steps:
            return [{"params": self.trainable()}]
        o = self.cfg.optim
        trainable = self.trainable()  # in order: the optimiser's state of a resumed fit is matched by position
        return [{"params": [p for p in trainable if p not in steps]},
                {"params": [p for p in trainable if p in steps], "lr": o.lr * o.step_lr_scale, "weight_decay": 0.0}]

    # -- one iteration: embeddings -> predictor -> kernels -> reconstructed network -> losses -> step -----
    def predict_weights(self, sampled: torch.Tensor | None) -> list[torch.Tensor]:
        kernels = predict_kernels(self.forward_predictor, self.s.embeddings, sampled, self.scales)
        return kernels_to_weights(kernels, self.s.rep)

    def reconstruction(self, weights: list[torch.Tensor]) -> torch.Tensor:
        return reconstruction_term(weights, self.rec_targets, self.recipe.rec_layer_weights)

    def _student_terms(self, weights: list[torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                       teacher_logits: torch.Tensor, teacher_maps: list[torch.Tensor], use_kd: bool, use_fmd: bool,
                       use_ce: bool) -> tuple[torch.Tensor, ...]:
        """The reconstructed network on `x` and its distillation (and label) terms: one graph when compiled."""
        logits, maps = self.networks.student(weights, x)
        kd, fmd = distillation_terms(logits, maps, teacher_logits, teacher_maps, self.cfg.loss.temperature, use_kd,
                                     use_fmd)
        return kd, fmd, label_term(logits, labels, use_ce)

    def objective(self, weights: list[torch.Tensor], lam: LossWeights) -> Terms:
        """L from the predicted weights and, when this iteration distils, both networks on one batch."""
        rec = self.reconstruction(weights)
        kd = fmd = ce = torch.zeros((), device=self.device)
        if lam.distils:
            x, labels = (t.to(self.device, non_blocking=True) for t in self.stream.next())
            with torch.no_grad():
                teacher_logits, teacher_maps = self.networks.teacher(x)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
                kd, fmd, ce = self._distil(weights, x, labels, teacher_logits, teacher_maps, lam.kd > 0, lam.fmd > 0,
                                           lam.ce > 0)
        return Terms(nern_objective(lam, rec, kd, fmd, ce), rec, kd, fmd, ce)

    def kernel_rows_objective(self, lam: LossWeights) -> Terms:
        """A reconstruction-only step on `rec_only_batch` kernel rows: only those go through the predictor."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
            rec = self.rec_rows.term(self.forward_predictor, self.s.embeddings)
        zero = rec.new_zeros(())
        return Terms(nern_objective(lam, rec, zero, zero), rec, zero, zero, zero)

    def full_objective(self, lam: LossWeights) -> Terms:
        sampled = self.sampler.sample()
        if sampled is not None:
            sampled = sampled.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
            weights = self.predict_weights(sampled)
        return self.objective(weights, lam)

    def step(self) -> dict[str, float]:
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

    def rebuild_optimizer(self) -> None:
        """A fresh optimiser and schedule over the predictor's parameters as they are now (e.g. with the learnt
        quantiser steps of `nern.qat` attached)."""
        self.optimizer = make_optimizer(self.cfg, self.param_groups())
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.distillation_total)
        for _ in range(self.iteration):  # the schedule continues where the fit is
            self.scheduler.step()

    # -- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstructed_weights(self) -> list[torch.Tensor]:
        return [w.float() for w in self.predict_weights(None)]

    def evaluate(self, weights: list[torch.Tensor] | None = None) -> dict[str, float]:
        """The reconstructed network's accuracies (Scorer: validation while fitting, the test set at the end) and
        L_rec; remembered when best on validation (select_best_on_val), which then gets its test pass at the end."""
        weights = weights if weights is not None else self.reconstructed_weights()
        final = self.iteration >= self.total
        result: dict[str, Any] = {"iteration": self.iteration, **self.scorer.measure(weights, final),
                                  "rec_rmse": float(reconstruction_term(weights, self.originals))}
        if self.cfg.select_best_on_val and "val_top1" in result:
            if self.best is None or result["val_top1"] > self.best["val_top1"]:
                self.best = {**result, "state": copy.deepcopy(self.predictor.state_dict())}
            if final and "test_top1" not in self.best:
                self.best["test_top1"] = self.scorer.top1(weights_of_state(self, self.best["state"]), "test")
        return result

    def test_top1(self) -> float:
        """The current iterate on the test set (benchmarks that stop a fit early report it)."""
        return self.scorer.top1(self.reconstructed_weights(), "test")

    def evaluate_original(self) -> dict[str, float]:
        return self.scorer.measure(None, final=True)

    # -- state --------------------------------------------------------------------------------------------
    def _stateful(self) -> dict[str, Any]:
        """Everything the next step depends on, by checkpoint key."""
        parts = {"predictor": self.predictor, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "sampler": self.sampler, "stream": self.stream}
        if self.tuned is not None:
            parts["tuned"] = self.tuned
        return {**parts, "rec_sampler": self.rec_rows.sampler} if self.rec_rows is not None else parts

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, **{k: part.state_dict() for k, part in self._stateful().items()},
                "best": self.best, "original_acc": self.original_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        for key, part in self._stateful().items():
            part.load_state_dict(state[key])
        self.best, self.original_acc = state["best"], state["original_acc"]

    def training_loop(self) -> TrainingLoop:
        return TrainingLoop(self, fit_plan(self.cfg, self.total), self.out / CHECKPOINT_FILE, self.fingerprint,
                            self.tracker)

    def run(self) -> dict[str, Any]:
        return run_fit(self)

    def close(self) -> None:
        """Remove the feature-map hooks from the original model (it may be the user's, or reused by another fit)."""
        self.networks.close()

    def __enter__(self) -> Fitter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@torch.no_grad()
def weights_of_state(fitter: Fitter, state: dict[str, Any]) -> list[torch.Tensor]:
    """The reconstructed weights of a stored predictor state (the fitter's own is left as it was)."""
    current = copy.deepcopy(fitter.predictor.state_dict())
    fitter.predictor.load_state_dict(state)
    try:
        return fitter.reconstructed_weights()
    finally:
        fitter.predictor.load_state_dict(current)


# -- the run -----------------------------------------------------------------------------------------------

def fit(cfg: FitConfig, out_dir: str | Path, *, model: nn.Module | None = None,
        permutation: str | list[torch.Tensor] | None = None, splits: Any = None, tracker: Any = None,
        cleanup: bool = True) -> dict[str, Any]:
    """Fit (or resume) a NeRN into `out_dir`; returns the metrics also written to metrics.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = prepare(cfg, model=model, permutation=permutation, splits=splits)
    remove_stale_temporaries(out_dir, [CHECKPOINT_FILE, PREDICTOR_FILE, METRICS_FILE, CURVES_FILE, "curves.png"])
    with Fitter(cfg, setup, Path(out_dir), tracker, cleanup=cleanup) as fitter:
        return fitter.run()


def fit_plan(cfg: FitConfig, total: int) -> LoopPlan:
    """About 100 curves rows per run, at most one per 10 iterations."""
    return LoopPlan("fit", total, log_every=max(1, min(10, total // 100 or 1)), eval_every=cfg.eval_every,
                    checkpoint_every=cfg.checkpoint_every, progress=cfg.progress, postfix=("loss", "rec", "kd", "fmd"))


def run_fit(fitter: Fitter) -> dict[str, Any]:
    """Train `fitter` to the end (resuming from its checkpoint), then write its outputs."""
    loop = fitter.training_loop()
    resumed = loop.resume()
    if fitter.original_acc is None:
        fitter.original_acc = fitter.evaluate_original()
    history = loop.run()
    metrics = fit_metrics(fitter, history, resumed)
    save_predictor(fitter.out / PREDICTOR_FILE, fitter.predictor, fitter.s.rep, fitter.cfg,
                   {"permutation": fitter.s.permutation_mode, "reconstructed_top1": metrics["reconstructed_top1"]})
    write_curves(fitter.out / CURVES_FILE, history, loop.plan.eval_column)
    write_json(fitter.out / METRICS_FILE, metrics)  # last: its presence means the run is complete
    if fitter.cleanup:
        clear_resume_state(fitter.out)
    return metrics


def fit_metrics(fitter: Fitter, history: History, resumed: bool) -> dict[str, Any]:
    """metrics.json: the final iterate's accuracies and errors, the sizes, and the time it took."""
    from nern.models import count_parameters

    final, s, it, rec_only = history.evals[-1], fitter.s, fitter.iteration, fitter.cfg.rec_only_iterations
    sizes = size_report(count_parameters(fitter.predictor), s.rep.layers, s.permutation_bytes,
                        0 if s.rep.scales is None else len(s.rep.scales))
    metrics: dict[str, Any] = {
        "original_top1": fitter.original_acc["test_top1"],
        "original_val_top1": fitter.original_acc.get("val_top1"),
        "reconstructed_top1": final["test_top1"],
        "reconstructed_val_top1": final.get("val_top1"),
        "rec_rmse": final["rec_rmse"],
        **sizes,
        "permutation": s.permutation_mode,
        "iterations": it,
        "rec_only_iterations": min(it, rec_only),
        "distillation_iterations": max(0, it - rec_only),
        "wall_seconds": history.train_seconds + history.eval_seconds,
        "train_seconds": history.train_seconds,
        "eval_seconds": history.eval_seconds,
        "seconds_per_iteration": history.train_seconds / max(1, it),
        "final_loss": history.curves[-1]["loss"] if history.curves else None,
        "data_free": fitter.cfg.data_free,
        "resumed": resumed,
        "layers": layer_errors(fitter.reconstructed_weights(), fitter.originals, s.rep.layers),
    }
    if fitter.best is not None:
        metrics["best_val_iteration"] = fitter.best["iteration"]
        metrics["best_val_top1"] = fitter.best["val_top1"]
        metrics["best_val_test_top1"] = fitter.best["test_top1"]
    return metrics


# -- the predictor file ------------------------------------------------------------------------------------

def save_predictor(path: Path, predictor: Predictor, rep: Representation, cfg: FitConfig,
                   extra: dict[str, Any]) -> None:
    """One self-contained file: predictor weights, permutations and scales, plus how to decode them. A
    quantised predictor (predictor.quantise_bits) is stored as its quantised weights under the plain names, with
    its learnt steps beside them (`steps.<weight name>`, read by `fitted_steps`); verbatim tensors the fit
    trained (tune_verbatim) as `tuned.<parameter name>`."""
    state, steps = plain_state(predictor)
    tensors = {f"predictor.{k}": v for k, v in state.items()}
    tensors.update({f"steps.{k}": v for k, v in steps.items()})
    tensors.update({f"tuned.{k}": v.detach().float().cpu().clone() for k, v in rep.tuned.items()})
    for i, pos in enumerate(rep.positions):
        tensors[f"permutation.{i}"] = pos.to(torch.int32)
    if rep.scales is not None:
        tensors["scales"] = rep.scales.float()
    meta = {
        "kind": "nern-predictor",
        "config": to_dict(cfg),
        "layers": [{"name": layer.name, "shape": list(layer.shape)} for layer in rep.layers],
        "kernel_size": rep.kernel_size,
        **extra,
    }
    save_tensors(path, tensors, meta)


def portable_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A predictor file's fit config without where and how the fit ran (device, threads, compile, progress):
    a predictor fitted on a cluster GPU is read back on a laptop with that machine's settings."""
    return {k: copy.deepcopy(v) for k, v in stored.items() if k not in NON_RESULT_KEYS}


def load_predictor(path: str | Path, model: nn.Module) -> tuple[Predictor, Representation, FitConfig]:
    """Rebuild predictor and representation from a predictor file; refuses a file made for another model."""
    from nern.artifacts import load_tensors
    from nern.config import load_config

    tensors, meta = load_tensors(path)
    if meta.get("kind") != "nern-predictor":
        raise NernError(f"{path} is not a NeRN predictor file; pass the predictor.safetensors written by `nern fit`")
    cfg = load_config(FitConfig, base=portable_config(meta["config"]))
    layers = find_conv_layers(model, cfg.represent)
    stored = [(d["name"], tuple(d["shape"])) for d in meta["layers"]]
    actual = [(layer.name, layer.shape) for layer in layers]
    if stored != actual:
        diff = next(((s, a) for s, a in zip(stored, actual) if s != a), (len(stored), len(actual)))
        raise NernError(
            f"predictor {path} was fitted to another model (first difference: {diff[0]} vs {diff[1]}); "
            "pass the model it was fitted to"
        )
    positions = [tensors[f"permutation.{i}"].long() for i in range(len(layers))]
    tuned = {k.removeprefix("tuned."): v for k, v in tensors.items() if k.startswith("tuned.")}
    rep = Representation(layers, positions, meta["kernel_size"], tensors.get("scales"), tuned)
    state = {k.removeprefix("predictor."): v for k, v in tensors.items() if k.startswith("predictor.")}
    predictor = Predictor(6 * cfg.embedding.levels, cfg.predictor.hidden, cfg.predictor.depth, rep.kernel_size)
    predictor.load_state_dict(state)
    return predictor.eval(), rep, cfg


def fitted_steps(path: str | Path) -> dict[str, torch.Tensor]:
    """The learnt quantiser steps of a predictor fitted with predictor.quantise_bits ({} for a float fit), by
    weight name in the plain predictor's state dict: the codec stores exactly the integers the fit trained."""
    from nern.artifacts import load_tensors

    tensors, _ = load_tensors(path)
    return {k.removeprefix("steps."): v for k, v in tensors.items() if k.startswith("steps.")}


@torch.no_grad()
def decode_weights(predictor: Predictor, rep: Representation, cfg: FitConfig) -> list[torch.Tensor]:
    """The reconstructed conv weights a predictor file stands for."""
    embeddings = rep.embeddings(cfg.embedding.levels, cfg.embedding.base)
    kernels = predict_kernels(predictor, embeddings, None, rep.kernel_scales())
    return kernels_to_weights(kernels, rep)


__all__ = ["fit", "Fitter", "prepare", "load_predictor", "fitted_steps", "decode_weights", "save_predictor",
           "clear_resume_state", "ConvLayer", "CHECKPOINT_FILE", "DEPARTURES", "departures"]

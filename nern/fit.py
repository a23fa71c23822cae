"""Fitting a NeRN predictor to a pretrained network (METHOD.md 4-7).

One iteration: a batch of task images (or noise) -> the original network's logits and feature maps ->
predict every kernel (gradient only through the sampled ones) -> the reconstructed network's logits and
maps -> L = rec * RMSE + kd * KL + fmd * FMD -> Ranger step, cosine learning rate per iteration. Both
networks stay in eval mode. We report the LAST iterate (and optionally the best on a validation split
carved from the train set); the test set is never used for selection.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nern import data as data_mod
from nern.artifacts import remove_stale_temporaries, save_tensors, write_json
from nern.checkpoint import (
    Preempted,
    PreemptionGuard,
    fingerprint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tensor_digest,
)
from nern.config import FitConfig, flatten, to_dict
from nern.errors import NernError
from nern.evaluate import layer_errors, size_report, top_k_accuracy
from nern.feature_maps import FeatureMapRecorder, map_graph
from nern.layers import ConvLayer, conv_weights, find_conv_layers
from nern.losses import fmd_loss, kd_loss, reconstruction_loss
from nern.predictor import Predictor, count_params
from nern.reconstruct import (
    Representation,
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
CHECKPOINT_FILE = "checkpoint.pt"


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


def make_optimizer(cfg: FitConfig, params: Any) -> torch.optim.Optimizer:
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


def distillation_weights(cfg: FitConfig, iteration: int) -> tuple[float, float]:
    """(kd, fmd) weights at this step: zero in the reconstruction-only phase and the `loss.warmup` iterations
    after it."""
    if iteration < cfg.rec_only_iterations + cfg.loss.warmup:
        return 0.0, 0.0
    return cfg.loss.kd, cfg.loss.fmd


def layer_scales(originals: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer standard deviation of the original weights: the predictor then sees unit-scale targets."""
    return torch.stack([w.float().std().clamp_min(1e-8) for w in originals])


def prepare(cfg: FitConfig, model: nn.Module | None = None, permutation: str | list[torch.Tensor] | None = None,
            splits: Any = None) -> FitSetup:
    from nern import models

    if model is None:
        torch.manual_seed(cfg.seed)  # a config without a checkpoint gets the same random original every time
        model = models.load_model(cfg.model)
    model = model.to(cfg.device).eval()
    model.requires_grad_(False)
    layers = find_conv_layers(model, cfg.represent)
    originals = conv_weights(model, layers)
    mode, perm_bytes = "none", 0
    if permutation is None:
        positions = identity_positions(layers)
    elif isinstance(permutation, (str, Path)):
        from nern import permutation as perm_mod

        shapes = [(layer.shape[0], layer.shape[1]) for layer in layers]
        positions, meta = perm_mod.load_permutations(permutation, expected_shapes=shapes)
        mode = meta.get("mode", "unknown")
        perm_bytes = 0 if mode == "none" else perm_mod.permutation_bytes(positions)
    else:
        from nern import permutation as perm_mod

        positions, mode = list(permutation), "custom"
        perm_bytes = perm_mod.permutation_bytes(positions)
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


def check_compile_toolchain(device: torch.device) -> None:
    """torch.compile on CPU generates C++: fail at the start with the fix, not deep inside the first step."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise NernError("compile=true on the CPU needs a C++ compiler (g++); install one (e.g. apt-get install "
                        "g++) or set compile=false")


def total_iterations(cfg: FitConfig, batches_per_epoch: int) -> int:
    if cfg.iterations is not None:
        return cfg.iterations
    return max(1, math.ceil(cfg.epochs * batches_per_epoch))


class Fitter:
    """The training state of one fit; `run()` trains to the end, resuming from `out_dir` when possible."""

    def __init__(self, cfg: FitConfig, setup: FitSetup, out_dir: Path, tracker: Any = None, cleanup: bool = True):
        self.cfg, self.s, self.out = cfg, setup, Path(out_dir)
        self.cleanup = cleanup  # False: the caller clears the resume state once it has logged the results
        self.tracker = tracker
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.predictor = Predictor(setup.embeddings.shape[1], cfg.predictor.hidden, cfg.predictor.depth,
                                   setup.rep.kernel_size, cfg.predictor.init).to(self.device)
        if cfg.compile:
            check_compile_toolchain(self.device)
        self.forward_predictor: nn.Module = torch.compile(self.predictor) if cfg.compile else self.predictor
        self.teacher, self.student = self._networks(cfg.compile)
        self.stream = data_mod.train_stream(cfg.data, cfg.seed, setup.splits.train, data_free=cfg.data_free,
                                            device=None if self.device.type == "cpu" else self.device)
        self.distillation_total = total_iterations(cfg, self.stream.batches_per_epoch)
        self.total = cfg.rec_only_iterations + self.distillation_total
        self.optimizer = make_optimizer(cfg, self.predictor.parameters())
        self.scheduler = make_scheduler(cfg, self.optimizer, self.distillation_total)
        norms = setup.targets.norm(dim=1)
        self.sampler = KernelSampler(cfg.sampling.method, cfg.sampling.batch, setup.rep.offsets, norms,
                                     cfg.sampling.uniform_prob, seed=cfg.seed)
        self.targets = setup.targets.to(self.device)
        self.originals = [w.to(self.device) for w in setup.originals]
        # rec_space=normalized: each layer's error in units of its weight std (1/std per layer)
        self.rec_weights: list[float] | None = None
        self.originals_rec = self.originals
        if cfg.loss.rec_space == "normalized":
            self.rec_weights = [float(1 / s) for s in layer_scales(setup.originals)]
            self.originals_rec = [w * r for w, r in zip(self.originals, self.rec_weights)]
        self.scales = setup.rep.kernel_scales()
        if self.scales is not None:
            self.scales = self.scales.to(self.device)
        self.iteration = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.curves: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.best: dict[str, Any] | None = None
        self.original_acc: dict[str, float] | None = None
        self.run_id: str | None = None
        # Metrics reach the tracker when a checkpoint is written: iterations replayed after a kill are then
        # logged once, not twice (their first values died with the process).
        self._pending_metrics: list[tuple[dict[str, float], int]] = []
        inputs = tensor_digest([setup.targets, *setup.rep.positions])
        self.fingerprint = fingerprint({**flatten(to_dict(cfg)), "inputs": inputs}, NON_RESULT_KEYS)

    # -- one iteration ------------------------------------------------------------------------------------
    def predict_weights(self, sampled: torch.Tensor | None) -> list[torch.Tensor]:
        kernels = predict_kernels(self.forward_predictor, self.s.embeddings, sampled, self.scales)
        return kernels_to_weights(kernels, self.s.rep)

    def step(self) -> dict[str, float]:
        if self.iteration == self.cfg.rec_only_iterations and self.iteration > 0:
            self.reset_optimizer_state()
        kd_w, fmd_w = distillation_weights(self.cfg, self.iteration)
        sampled = self.sampler.sample()
        if sampled is not None:
            sampled = sampled.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
            weights = self.predict_weights(sampled)
        rec = self.reconstruction(weights)
        loss = self.cfg.loss.rec * rec
        kd = fmd = torch.zeros((), device=self.device)
        if kd_w > 0 or fmd_w > 0:
            x, _ = self.stream.next()
            x = x.to(self.device, non_blocking=True)
            with torch.no_grad():
                teacher_logits, teacher_maps = self.teacher(x)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
                kd, fmd = self.student(weights, x, teacher_logits, teacher_maps, kd_w > 0, fmd_w > 0)
            loss = loss + kd_w * kd + fmd_w * fmd
        if not torch.isfinite(loss):
            raise NernError(
                f"the loss became {loss.item()} at iteration {self.iteration}; lower optim.lr or check the "
                "original weights for NaN/inf"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.iteration += 1
        return {"loss": loss.item(), "rec": rec.item(), "kd": kd.item(), "fmd": fmd.item(), "lr": lr,
                "grad_norm": grad_norm.item()}

    def reset_optimizer_state(self) -> None:
        """Distillation starts with fresh moments (and a fresh Lookahead anchor): the reconstruction phase's
        moments belong to a far smaller gradient (ResNet20: norm ~0.01 at its end, ~400 once distilling)."""
        self.optimizer.state.clear()

    def clip_gradients(self) -> torch.Tensor:
        """The gradient's L2 norm before clipping (a cheap divergence warning in the curves), clipped to
        optim.clip_grad_norm when that is set."""
        grads = [p.grad for p in self.predictor.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.predictor.parameters(), self.cfg.optim.clip_grad_norm, norm)
        return norm

    def _networks(self, compiled: bool) -> tuple[Any, Any]:
        """(teacher, student): teacher(x) -> (logits, maps); student(weights, x, teacher outputs, use_kd,
        use_fmd) -> (kd, fmd). Compiled: one fx graph per network returning its maps, so torch.compile fuses
        normalisation, activation and the distillation reductions; eager (or an untraceable model): hooks."""
        graph = map_graph(self.s.model) if compiled else None
        self._recorder: FeatureMapRecorder | None = None
        if graph is None:
            recorder = self._recorder = FeatureMapRecorder(self.s.model)

            def teacher(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
                with recorder.record() as maps:
                    return self.s.model(x), list(maps)

            def student_outputs(weights: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
                with recorder.record() as maps:
                    return run_reconstructed(self.s.model, self.s.rep, weights, x), list(maps)
        else:
            teacher = torch.compile(graph)

            def student_outputs(weights: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
                logits, maps = run_reconstructed(graph, self.s.rep, weights, x)
                return logits, list(maps)

        temperature = self.cfg.loss.temperature

        def student(weights: list[torch.Tensor], x: torch.Tensor, teacher_logits: torch.Tensor,
                    teacher_maps: list[torch.Tensor], use_kd: bool, use_fmd: bool) -> tuple[torch.Tensor, torch.Tensor]:
            logits, maps = student_outputs(weights, x)
            zero = logits.new_zeros(())
            kd = kd_loss(logits.float(), teacher_logits.float(), temperature) if use_kd else zero
            fmd = fmd_loss([m.float() for m in maps], [m.float() for m in teacher_maps]) if use_fmd else zero
            return kd, fmd

        return teacher, (torch.compile(student) if graph is not None else student)

    def close(self) -> None:
        """Remove the feature-map hooks from the original model (it may be reused by another fit)."""
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None

    def reconstruction(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """L_rec: the paper's RMSE over all weights, or (rec_space=normalized) over per-layer standardised ones."""
        if self.rec_weights is None:
            return reconstruction_loss([w.float() for w in weights], self.originals)
        return reconstruction_loss([w.float() * r for w, r in zip(weights, self.rec_weights)], self.originals_rec)

    # -- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstructed_weights(self) -> list[torch.Tensor]:
        return [w.float() for w in self.predict_weights(None)]

    def _accuracy(self, forward: Any, imageset: Any) -> float:
        batches = data_mod.eval_batches(imageset, self.cfg.data.eval_batch_size)
        return top_k_accuracy(forward, batches, (1,), self.device)["top1"]

    def evaluate(self, weights: list[torch.Tensor] | None = None) -> dict[str, float]:
        start = time.perf_counter()
        weights = weights if weights is not None else self.reconstructed_weights()
        forward = lambda x: run_reconstructed(self.s.model, self.s.rep, weights, x)  # noqa: E731
        result = {"iteration": self.iteration, "test_top1": self._accuracy(forward, self.s.splits.test)}
        if self.s.splits.val is not None:
            result["val_top1"] = self._accuracy(forward, self.s.splits.val)
        result["rec_rmse"] = float(reconstruction_loss(weights, self.originals))
        self.eval_seconds += time.perf_counter() - start
        return result

    def evaluate_original(self) -> dict[str, float]:
        result = {"test_top1": self._accuracy(self.s.model, self.s.splits.test)}
        if self.s.splits.val is not None:
            result["val_top1"] = self._accuracy(self.s.model, self.s.splits.val)
        return result

    def _record_eval(self, result: dict[str, float]) -> None:
        self.evals.append(result)
        self._log_metrics({f"eval/{k}": v for k, v in result.items() if k != "iteration"})
        if self.cfg.select_best_on_val and "val_top1" in result:
            if self.best is None or result["val_top1"] > self.best["val_top1"]:
                self.best = {**result, "state": copy.deepcopy(self.predictor.state_dict())}

    # -- checkpointing ------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint, "iteration": self.iteration, "predictor": self.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(), "stream": self.stream.state_dict(), "rng": rng_state(),
            "curves": self.curves, "evals": self.evals, "best": self.best, "original_acc": self.original_acc,
            "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds, "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        self.curves, self.evals, self.best = state["curves"], state["evals"], state["best"]
        self.original_acc = state["original_acc"]
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]
        self.run_id = state["run_id"]

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self._pending_metrics.append((metrics, self.iteration))

    def flush_metrics(self) -> None:
        while self._pending_metrics:
            metrics, step = self._pending_metrics[0]
            self.tracker.log_metrics(metrics, step=step)
            self._pending_metrics.pop(0)

    def save(self) -> None:
        self.flush_metrics()
        save_checkpoint(self.checkpoint_path, self.state_dict())

    def try_resume(self) -> bool:
        state = load_checkpoint(self.checkpoint_path, self.fingerprint)
        if state is None:
            return False
        self.load_state_dict(state)
        return True

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.try_resume()
        if self.original_acc is None:
            self.original_acc = self.evaluate_original()
        bar = tqdm(total=self.total, initial=self.iteration, desc="fit", disable=not cfg.progress,
                   dynamic_ncols=True, mininterval=1.0)
        log_every = max(1, min(10, self.total // 100 or 1))
        with PreemptionGuard() as guard:
            while self.iteration < self.total:
                start = time.perf_counter()
                losses = self.step()
                self.train_seconds += time.perf_counter() - start
                if self.iteration % log_every == 0 or self.iteration == self.total:
                    row = {"iteration": self.iteration, **losses}
                    self.curves.append(row)
                    self._log_metrics({f"train/{k}": v for k, v in losses.items()})
                bar.set_postfix(loss=f"{losses['loss']:.4g}", rec=f"{losses['rec']:.3g}", kd=f"{losses['kd']:.3g}",
                                fmd=f"{losses['fmd']:.3g}", refresh=False)
                bar.update(1)
                if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.iteration < self.total:
                    result = self.evaluate()
                    self._record_eval(result)
                    bar.write(f"[fit] iteration {self.iteration}: test top-1 {result['test_top1']:.2f}%"
                              + (f", val top-1 {result['val_top1']:.2f}%" if "val_top1" in result else ""))
                if guard.requested or (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0):
                    self.save()
                if guard.requested:
                    bar.close()
                    raise Preempted(f"stopped by SIGTERM at iteration {self.iteration}; checkpoint saved")
        bar.close()
        final = self.evaluate()
        self._record_eval(final)
        return self.finish(final, resumed)

    def finish(self, final: dict[str, float], resumed: bool) -> dict[str, Any]:
        weights = self.reconstructed_weights()
        sizes = size_report(count_params(self.predictor), self.s.rep.layers, self.s.permutation_bytes,
                            0 if self.s.rep.scales is None else len(self.s.rep.scales))
        metrics: dict[str, Any] = {
            "original_top1": self.original_acc["test_top1"],
            "original_val_top1": self.original_acc.get("val_top1"),
            "reconstructed_top1": final["test_top1"],
            "reconstructed_val_top1": final.get("val_top1"),
            "rec_rmse": final["rec_rmse"],
            **sizes,
            "permutation": self.s.permutation_mode,
            "iterations": self.iteration,
            "rec_only_iterations": min(self.iteration, self.cfg.rec_only_iterations),
            "distillation_iterations": max(0, self.iteration - self.cfg.rec_only_iterations),
            "wall_seconds": self.train_seconds + self.eval_seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "seconds_per_iteration": self.train_seconds / max(1, self.iteration),
            "final_loss": self.curves[-1]["loss"] if self.curves else None,
            "data_free": self.cfg.data_free,
            "resumed": resumed,
            "layers": layer_errors(weights, self.originals, self.s.rep.layers),
        }
        if self.best is not None:
            metrics["best_val_iteration"] = self.best["iteration"]
            metrics["best_val_top1"] = self.best["val_top1"]
            metrics["best_val_test_top1"] = self.best["test_top1"]
        self.write_outputs(metrics)
        return metrics

    def write_outputs(self, metrics: dict[str, Any]) -> None:
        self.flush_metrics()
        save_predictor(self.out / PREDICTOR_FILE, self.predictor, self.s.rep, self.cfg,
                       {"permutation": self.s.permutation_mode, "reconstructed_top1": metrics["reconstructed_top1"]})
        write_curves(self.out / CURVES_FILE, self.curves, self.evals)
        write_json(self.out / METRICS_FILE, metrics)  # last: its presence means the run is complete
        if self.cleanup:
            clear_resume_state(self.out)


def write_curves(path: Path, curves: list[dict[str, float]], evals: list[dict[str, float]]) -> None:
    from nern.artifacts import atomic_path

    rows: dict[int, dict[str, float]] = {}
    for row in curves:
        rows.setdefault(int(row["iteration"]), {}).update(row)
    for row in evals:
        rows.setdefault(int(row["iteration"]), {}).update({f"eval_{k}": v for k, v in row.items() if k != "iteration"})
    columns = sorted({k for r in rows.values() for k in r} - {"iteration"})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["iteration", *columns])
        for it in sorted(rows):
            writer.writerow([it, *(rows[it].get(c, "") for c in columns)])


def save_predictor(path: Path, predictor: Predictor, rep: Representation, cfg: FitConfig,
                   extra: dict[str, Any]) -> None:
    """One self-contained file: predictor weights, permutations and scales, plus how to decode them."""
    tensors = {f"predictor.{k}": v for k, v in predictor.state_dict().items()}
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


def load_predictor(path: str | Path, model: nn.Module) -> tuple[Predictor, Representation, FitConfig]:
    """Rebuild predictor and representation from a predictor file; refuses a file made for another model."""
    from nern.artifacts import load_tensors
    from nern.config import load_config

    tensors, meta = load_tensors(path)
    if meta.get("kind") != "nern-predictor":
        raise NernError(f"{path} is not a NeRN predictor file; pass the predictor.safetensors written by `nern fit`")
    cfg = load_config(FitConfig, base=meta["config"])
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
    rep = Representation(layers, positions, meta["kernel_size"], tensors.get("scales"))
    state = {k.removeprefix("predictor."): v for k, v in tensors.items() if k.startswith("predictor.")}
    predictor = Predictor(6 * cfg.embedding.levels, cfg.predictor.hidden, cfg.predictor.depth, rep.kernel_size)
    predictor.load_state_dict(state)
    return predictor.eval(), rep, cfg


@torch.no_grad()
def decode_weights(predictor: Predictor, rep: Representation, cfg: FitConfig) -> list[torch.Tensor]:
    """The reconstructed conv weights a predictor file stands for."""
    embeddings = rep.embeddings(cfg.embedding.levels, cfg.embedding.base)
    kernels = predict_kernels(predictor, embeddings, None, rep.kernel_scales())
    return kernels_to_weights(kernels, rep)


RUN_ID_FILE = "mlflow_run_id"


def checkpointed_run_id(out_dir: str | Path) -> str | None:
    """The MLflow run id of an interrupted run in `out_dir`, so its resumption logs to the same run.

    The CLI writes it to a small file as soon as the run exists (a kill before the first checkpoint must not
    orphan the run); older outputs have it only inside the checkpoint.
    """
    out = Path(out_dir)
    if (out / RUN_ID_FILE).is_file():
        return (out / RUN_ID_FILE).read_text().strip() or None
    if not (out / CHECKPOINT_FILE).is_file():
        return None
    try:
        return torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=False).get("run_id")
    except Exception:
        return None


def clear_resume_state(out_dir: str | Path) -> None:
    """After a run is complete AND logged: nothing left to resume, so a rerun starts afresh."""
    for name in (CHECKPOINT_FILE, RUN_ID_FILE):
        (Path(out_dir) / name).unlink(missing_ok=True)


def fit(cfg: FitConfig, out_dir: str | Path, *, model: nn.Module | None = None,
        permutation: str | list[torch.Tensor] | None = None, splits: Any = None, tracker: Any = None,
        cleanup: bool = True) -> dict[str, Any]:
    """Fit (or resume) a NeRN into `out_dir`; returns the metrics also written to metrics.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = prepare(cfg, model=model, permutation=permutation, splits=splits)
    remove_stale_temporaries(out_dir, [CHECKPOINT_FILE, PREDICTOR_FILE, METRICS_FILE, CURVES_FILE, "curves.png"])
    fitter = Fitter(cfg, setup, Path(out_dir), tracker, cleanup=cleanup)
    if tracker is not None:
        fitter.run_id = getattr(tracker, "run_id", None)
    return fitter.run()


__all__ = ["fit", "Fitter", "prepare", "load_predictor", "decode_weights", "save_predictor", "ConvLayer"]

"""One NeRN fit, run to the end: `fit()` -> `Fitter` (nern/method.py's `Method`, plus what a run adds) -> outputs.

The method itself, one iteration top-down, is nern/method.py. A `Fitter` adds what a run needs around it: the
accuracies it reports (validation while fitting, the test set once at the end: `nern.measure.Scorer`; we report
the LAST iterate, and optionally the best on a validation split carved from the train set, never selected on
test), its state for exact resumption, and its outputs (predictor.safetensors, metrics.json, curves.csv).
nern/loop.py runs the iterations (evaluation, checkpoints, resumption, pre-emption, tracking).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nern.artifacts import remove_stale_temporaries, write_json
from nern.checkpoint import fingerprint, tensor_digest
from nern.config import FitConfig, flatten, to_dict
from nern.evaluate import layer_errors, size_report
from nern.fit_setup import FitSetup, prepare
from nern.loop import CHECKPOINT_FILE, History, LoopPlan, TrainingLoop, clear_resume_state, write_curves
from nern.losses import reconstruction_loss
from nern.measure import Scorer
from nern.method import Method
from nern.predictor_file import NON_RESULT_KEYS, PREDICTOR_FILE, save_predictor

METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.csv"


class Fitter(Method):
    """The training state of one fit; `step()` is one iteration (nern/method.py), `run()` trains to the end in
    `out_dir`. Holds forward hooks on the original model (unless compiled): `close()` it, or use it as a context
    manager."""

    def __init__(self, cfg: FitConfig, setup: FitSetup, out_dir: Path, tracker: Any = None, cleanup: bool = True):
        self.out, self.tracker = Path(out_dir), tracker
        self.cleanup = cleanup  # False: the caller clears the resume state once it has logged the results
        self.scorer = Scorer(cfg, setup, torch.device(cfg.device))
        self.best: dict[str, Any] | None = None
        self.original_acc: dict[str, float] | None = None
        inputs = tensor_digest([setup.targets, *setup.rep.positions])
        self.fingerprint = fingerprint({**flatten(to_dict(cfg)), "inputs": inputs}, NON_RESULT_KEYS)
        super().__init__(cfg, setup)  # last: from here on the original model carries hooks

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
                                  "rec_rmse": float(reconstruction_loss(weights, self.originals))}
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

    # -- state and the run --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, **{k: part.state_dict() for k, part in self.stateful().items()},
                "best": self.best, "original_acc": self.original_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        for key, part in self.stateful().items():
            part.load_state_dict(state[key])
        self.best, self.original_acc = state["best"], state["original_acc"]

    def training_loop(self) -> TrainingLoop:
        return TrainingLoop(self, fit_plan(self.cfg, self.total), self.out / CHECKPOINT_FILE, self.fingerprint,
                            self.tracker)

    def run(self) -> dict[str, Any]:
        return run_fit(self)

    def __enter__(self) -> Fitter:
        return self


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
    """About 100 curves rows per run, at most one per 10 iterations. Evaluations count from the end of the
    reconstruction-only phase (evaluated once there): its L_rec is in every curves row, and validation passes
    during it cost more than the phase's own steps (25 of them in a fast fit's 4,800 steps at eval_every 200)."""
    return LoopPlan("fit", total, log_every=max(1, min(10, total // 100 or 1)), eval_every=cfg.eval_every,
                    eval_from=min(cfg.rec_only_iterations, total),
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
        "agreement": final["test_agreement"],  # with the original, on the test set (docs/PROTOCOL.md)
        "kl_to_original": final["test_kl_to_original"],
        "val_agreement": final.get("val_agreement"),
        "val_kl_to_original": final.get("val_kl_to_original"),
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
        "bf16": fitter.bf16,  # autocast_bf16 as it ran on this machine ("auto" resolved): distillation
        "bf16_reconstruction": fitter.bf16_reconstruction,  # and the reconstruction-only steps
        "resumed": resumed,
        "layers": layer_errors(fitter.reconstructed_weights(), fitter.originals, s.rep.layers),
    }
    if fitter.best is not None:
        metrics["best_val_iteration"] = fitter.best["iteration"]
        metrics["best_val_top1"] = fitter.best["val_top1"]
        metrics["best_val_test_top1"] = fitter.best["test_top1"]
    return metrics

"""Training the ORIGINAL network: the standard CIFAR recipe plus the smoothness regulariser (docs/METHOD.md §6).

SGD (momentum 0.9, lr 0.1, wd 1e-4), batch 128, step decay at epochs 100/150, crop + flip: every number
is a config key. `smoothness > 0` adds the regulariser on the layers NeRN will represent. With
`model.checkpoint` set, training starts from those weights instead of the architecture's init: fine-tuning
published weights on the task's own training split (validation held out) gives an in-domain original. The iterations run
through nern/loop.py like a fit's: checkpoint every N iterations, exact resumption, SIGTERM saves and stops.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nern import data as data_mod
from nern.artifacts import remove_stale_temporaries, write_json
from nern.checkpoint import fingerprint
from nern.config import PretrainConfig, flatten, to_dict, use_bf16
from nern.errors import NernError
from nern.layers import find_conv_layers
from nern.loop import CHECKPOINT_FILE, LoopPlan, TrainingLoop, clear_resume_state, write_curves
from nern.measure import split_top1
from nern.smoothness import smoothness_penalty

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.csv"
NON_RESULT_KEYS = ("progress", "eval_every_epochs", "checkpoint_every", "threads", "device", "channels_last")
LOG_EVERY = 10  # a curves row every 10 iterations, and at every evaluation


def _accuracy(model: nn.Module, imageset: Any, batch_size: int, device: str) -> float:
    model.eval()
    return split_top1(model, imageset, batch_size, device)


class Pretraining:
    """The original network's training state; `step()` is one SGD step on cross-entropy (+ smoothness)."""

    def __init__(self, cfg: PretrainConfig, model: nn.Module, splits: Any):
        self.cfg, self.model, self.splits = cfg, model, splits
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.bf16 = use_bf16(cfg.autocast_bf16, cfg.device)
        model.to(memory_format=self.memory_format)
        self.stream = data_mod.train_stream(cfg.data, cfg.seed, splits.train)
        self.per_epoch = self.stream.batches_per_epoch
        self.total = max(1, math.ceil(cfg.epochs * self.per_epoch))
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        milestones = sorted(int(m * self.per_epoch) for m in cfg.milestones)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=cfg.gamma)
        params = dict(model.named_parameters())
        layers = find_conv_layers(model, cfg.represent) if cfg.smoothness > 0 else []
        self.smoothed = [params[layer.param] for layer in layers]
        self.eval_every = max(1, int(cfg.eval_every_epochs * self.per_epoch))
        self.iteration = 0

    def step(self) -> dict[str, float]:
        self.model.train()
        x, y = self.stream.next()
        x, y = x.to(self.cfg.device, memory_format=self.memory_format), y.to(self.cfg.device)
        with torch.autocast(torch.device(self.cfg.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
        ce = F.cross_entropy(logits.float(), y)
        loss = ce
        if self.smoothed:
            loss = loss + self.cfg.smoothness * smoothness_penalty(self.smoothed)
        if not torch.isfinite(loss):
            raise NernError(f"the training loss became {loss.item()} at iteration {self.iteration}; lower lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        return {"epoch": self.iteration / self.per_epoch, "loss": loss.item(), "ce": ce.item()}

    def evaluate(self) -> dict[str, float]:
        val = self.splits.val
        return {"val_top1": self.accuracy(val) if val else float("nan")}

    def accuracy(self, imageset: Any) -> float:
        return _accuracy(self.model, imageset, self.cfg.data.eval_batch_size, self.cfg.device)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])

    def training_loop(self, out: Path, tracker: Any = None) -> TrainingLoop:
        # the evaluation is one column (val_top1) of its iteration's row, as the tracker's "val_top1"
        plan = LoopPlan("pretrain", self.total, log_every=LOG_EVERY, eval_every=self.eval_every,
                        checkpoint_every=self.cfg.checkpoint_every, progress=self.cfg.progress, eval_in_row=True)
        fp = fingerprint(flatten(to_dict(self.cfg)), NON_RESULT_KEYS)
        return TrainingLoop(self, plan, out / CHECKPOINT_FILE, fp, tracker)


def starting_model(cfg: PretrainConfig) -> nn.Module:
    """The architecture's init, or the weights of `model.checkpoint` (checked against the architecture)."""
    from nern import models

    return models.load_model(cfg.model) if cfg.model.checkpoint else models.build_model(cfg.model)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, model: nn.Module | None = None, splits: Any = None,
             tracker: Any = None, cleanup: bool = True) -> dict[str, Any]:
    """Train (or resume) the original network into `out_dir`; returns the metrics written to metrics.json."""
    from nern import models

    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = (model if model is not None else starting_model(cfg)).to(cfg.device)
    splits = splits or data_mod.build_splits(cfg.data)
    data_mod.check_compatible(splits.train.info, cfg.model.in_channels)
    task = Pretraining(cfg, model, splits)
    remove_stale_temporaries(out, [CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, CURVES_FILE, "curves.png"])
    loop = task.training_loop(out, tracker)
    loop.resume()
    history = loop.run()
    model.eval().to(memory_format=torch.contiguous_format)  # the saved tensors in the usual layout
    metrics = {
        "test_top1": task.accuracy(splits.test),
        "val_top1": task.accuracy(splits.val) if splits.val else None,
        "epochs": cfg.epochs,
        "iterations": task.iteration,
        "smoothness": cfg.smoothness,
        "start_checkpoint": cfg.model.checkpoint,
        "bf16": task.bf16,  # autocast_bf16 as it ran on this machine ("auto" resolved)
        "wall_seconds": history.train_seconds,
        "seconds_per_iteration": history.train_seconds / max(1, task.iteration),
    }
    metrics["original_top1"] = metrics["test_top1"]
    models.save_model(model, out / MODEL_FILE, {"model": to_dict(cfg.model), "test_top1": metrics["test_top1"],
                                               "pretrain": to_dict(cfg)})
    write_curves(out / CURVES_FILE, history, loop.plan.eval_column)
    write_json(out / METRICS_FILE, metrics)  # last: its presence means the run is complete
    if cleanup:
        clear_resume_state(out)
    return metrics

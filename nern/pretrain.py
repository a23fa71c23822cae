"""Training the ORIGINAL network: the standard CIFAR recipe plus the smoothness regulariser (METHOD.md 6).

SGD (momentum 0.9, lr 0.1, wd 1e-4), batch 128, step decay at epochs 100/150, crop + flip: every number
is a config key. `smoothness > 0` adds the regulariser on the layers NeRN will represent. Resumable
exactly like a fit: checkpoint every N iterations, SIGTERM saves and stops.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nern import data as data_mod
from nern.checkpoint import Preempted, PreemptionGuard, fingerprint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nern.config import PretrainConfig, flatten, to_dict
from nern.errors import NernError
from nern.evaluate import top_k_accuracy
from nern.layers import find_conv_layers
from nern.smoothness import smoothness_penalty

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.csv"
CHECKPOINT_FILE = "checkpoint.pt"
NON_RESULT_KEYS = ("progress", "eval_every_epochs", "checkpoint_every", "threads", "device")


def _accuracy(model: nn.Module, imageset: Any, batch_size: int, device: str) -> float:
    model.eval()
    acc = top_k_accuracy(model, data_mod.eval_batches(imageset, batch_size), (1,), device)["top1"]
    return acc


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, model: nn.Module | None = None, splits: Any = None,
             tracker: Any = None, cleanup: bool = True) -> dict[str, Any]:
    """Train (or resume) the original network into `out_dir`; returns the metrics written to metrics.json."""
    from nern import models

    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = (model or models.build_model(cfg.model)).to(cfg.device)
    splits = splits or data_mod.build_splits(cfg.data, seed=cfg.seed)
    data_mod.check_compatible(splits.train.info, cfg.model.in_channels)
    stream = data_mod.train_stream(cfg.data, cfg.seed, splits.train)
    per_epoch = stream.batches_per_epoch
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    milestones = sorted(int(m * per_epoch) for m in cfg.milestones)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    layers = find_conv_layers(model, cfg.represent) if cfg.smoothness > 0 else []
    params = dict(model.named_parameters())
    eval_every = max(1, int(cfg.eval_every_epochs * per_epoch))

    from nern.artifacts import remove_stale_temporaries

    remove_stale_temporaries(out, [CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, CURVES_FILE, "curves.png"])
    fp = fingerprint(flatten(to_dict(cfg)), NON_RESULT_KEYS)
    state = load_checkpoint(out / CHECKPOINT_FILE, fp)
    it, seconds, curves = 0, 0.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        it, seconds, curves = state["iteration"], state["seconds"], state["curves"]

    def checkpoint() -> None:
        save_checkpoint(out / CHECKPOINT_FILE, {
            "fingerprint": fp, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "stream": stream.state_dict(), "rng": rng_state(),
            "iteration": it, "seconds": seconds, "curves": curves,
            "run_id": getattr(tracker, "run_id", None),
        })

    bar = tqdm(total=total, initial=it, desc="pretrain", disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0)
    with PreemptionGuard() as guard:
        while it < total:
            start = time.perf_counter()
            model.train()
            x, y = stream.next()
            x, y = x.to(cfg.device), y.to(cfg.device)
            ce = F.cross_entropy(model(x), y)
            loss = ce
            if layers:
                loss = loss + cfg.smoothness * smoothness_penalty([params[layer.param] for layer in layers])
            if not torch.isfinite(loss):
                raise NernError(f"the training loss became {loss.item()} at iteration {it}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            it += 1
            seconds += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            row: dict[str, float] = {"iteration": it, "epoch": it / per_epoch, "loss": loss.item(), "ce": ce.item()}
            if it % eval_every == 0 or it == total:
                row["val_top1"] = _accuracy(model, splits.val, cfg.data.eval_batch_size, cfg.device) if splits.val else float("nan")
                bar.write(f"[pretrain] epoch {it / per_epoch:.2f}: val top-1 {row['val_top1']:.2f}%")
            if it % 10 == 0 or "val_top1" in row:
                curves.append(row)
                if tracker is not None:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=it)
            if guard.requested or (cfg.checkpoint_every and it % cfg.checkpoint_every == 0):
                checkpoint()
            if guard.requested:
                bar.close()
                raise Preempted(f"stopped by SIGTERM at iteration {it}; checkpoint saved")
    bar.close()
    model.eval()
    metrics = {
        "test_top1": _accuracy(model, splits.test, cfg.data.eval_batch_size, cfg.device),
        "val_top1": _accuracy(model, splits.val, cfg.data.eval_batch_size, cfg.device) if splits.val else None,
        "epochs": cfg.epochs,
        "iterations": it,
        "smoothness": cfg.smoothness,
        "wall_seconds": seconds,
        "seconds_per_iteration": seconds / max(1, it),
    }
    metrics["original_top1"] = metrics["test_top1"]
    from nern.fit import write_curves

    models.save_model(model, out / MODEL_FILE, {"model": to_dict(cfg.model), "test_top1": metrics["test_top1"],
                                               "pretrain": to_dict(cfg)})
    write_curves(out / CURVES_FILE, curves, [])
    from nern.artifacts import write_json

    write_json(out / METRICS_FILE, metrics)  # last: its presence means the run is complete
    if cleanup:
        from nern.fit import clear_resume_state

        clear_resume_state(out)
    return metrics

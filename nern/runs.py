"""What every stage command does around its work: its arguments, its MLflow run and params, its logged
outputs, and (for the stages applied to a fitted NeRN) its inputs.

It sits above the training stages (it reads a fitted predictor with `nern.predictor_file.load_predictor`) and below
the application stages and the CLI, so `nern.compress`, `nern.importance` and `nern.cli` share it without
importing one another.

One MLflow run per job: the run is found again in the store by the job's output directory and a digest of
its result-affecting config (`nern.tracking.find_job_run`), so no run id is kept beside the outputs or in a
checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nern.config import DataConfig, FitConfig, load_config
from nern.errors import NernError
from nern.journal import JOURNAL_NAME
from nern.predictor import Predictor
from nern.reconstruct import Representation
from nern.tracking import Tracker, config_digest

DEFAULT_EXPERIMENT = "nern"
# Set by the pipeline for every job it starts (environment, not arguments: they do not change results, so
# they must not change a job's command line and rerun it).
PARENT_ENV = "NERN_MLFLOW_PARENT"
SYSTEM_METRICS_ENV = "NERN_MLFLOW_SYSTEM_METRICS"


# -- arguments ---------------------------------------------------------------------------------------------


def add_stage_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    """The config, output and MLflow options every stage takes."""
    p.add_argument("--config", help="YAML config file (defaults: the paper's ResNet20/CIFAR-10 settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set predictor.hidden=140 (repeatable)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--mlflow-uri", help="tracking URI; 'none' disables (default: $NERN_MLFLOW_URI, "
                                        "$MLFLOW_TRACKING_URI or ./results/mlflow.db)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="MLflow tag (repeatable)")
    p.add_argument("--parent-run", default=os.environ.get(PARENT_ENV) or None, metavar="NAME",
                   help=f"group this run under the MLflow parent run NAME (default: ${PARENT_ENV}; the pipeline "
                        "sets it to its preset)")
    p.add_argument("--system-metrics", action="store_true", default=os.environ.get(SYSTEM_METRICS_ENV) == "1",
                   help=f"log CPU/memory/disk usage into the run every 10 s (default: ${SYSTEM_METRICS_ENV}=1)")


def parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        if "=" not in item:
            raise NernError(f"--tag '{item}' must look like key=value")
        key, value = item.split("=", 1)
        tags[key] = value
    return tags


def comma_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NernError(f"{what} {text!r} must be comma-separated numbers, e.g. 0,0.5,0.7,0.9") from None


def comma_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# -- the MLflow run ----------------------------------------------------------------------------------------


def result_params(params: Mapping[str, Any], non_result_keys: tuple[str, ...]) -> dict[str, Any]:
    """The params that decide a stage's results: a rerun may change the others (threads, progress, ...)."""
    return {k: v for k, v in params.items() if k.split(".")[0] not in non_result_keys}


def stage_tracker(args: argparse.Namespace, stage: str, digest: str | None = None) -> Tracker:
    """The (not yet started) run of this stage's job, keyed by its output directory."""
    name = args.run_name or f"{stage}:{Path(args.out).name if args.out else ''}"
    tags = {"nern.stage": stage, **parse_tags(args.tag)}
    resume_key = str(Path(args.out).resolve()) if args.out else None
    journal = Path(args.out) / JOURNAL_NAME if args.out else None  # what the job logs, kept with its outputs
    return Tracker(args.mlflow_uri, args.experiment, name, tags, resume_key=resume_key, digest=digest,
                   parent=getattr(args, "parent_run", None), system_metrics=getattr(args, "system_metrics", False),
                   journal=journal)


@contextlib.contextmanager
def stage_run(args: argparse.Namespace, stage: str, params: Mapping[str, Any],
              non_result_keys: tuple[str, ...] = (), data: DataConfig | None = None,
              data_free: bool = False) -> Iterator[Tracker]:
    """Start (or reopen) the job's run, log its params and the data set it reads; the run ends with the block
    (FINISHED on success).

    A reopened run keeps the values it logged first for the keys that do not affect results (MLflow refuses
    to change a logged param), so only the others are logged again.
    """
    results = result_params(params, non_result_keys)
    with stage_tracker(args, stage, config_digest(results)) as tracker:
        tracker.log_params(results if tracker.resumed else params)
        yield tracker
        if data is not None and tracker.enabled:  # after the work: a loader may have unpacked the files only now
            log_data(tracker, stage, data, data_free, params.get("seed"))


def log_data(tracker: Tracker, stage: str, data: DataConfig, data_free: bool, seed: Any = None) -> None:
    """The task data as an MLflow dataset input: training data for the stages that train on it, evaluation
    data otherwise (a data-free fit trains on noise and only evaluates on the task data)."""
    from nern.data import dataset_identity

    name, source, digest = dataset_identity(data)
    trains = stage in ("pretrain", "fit") and not data_free
    tracker.log_dataset(name, source, digest, "training" if trains else "evaluation")
    if stage == "fit" and data_free:
        tracker.log_dataset("noise:uniform[-2,2]", "generated", f"seed{seed}", "training")


def log_outputs(tracker: Tracker, out: Path, metrics: Mapping[str, Any], files: list[str]) -> None:
    """Scalar metrics at the final step, and each output file that exists."""
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(scalars, step=int(metrics.get("iterations", 0)))
    for name in files:
        if (out / name).is_file():
            tracker.log_artifact(out / name)


# -- inputs ------------------------------------------------------------------------------------------------


def fitted_config(args: argparse.Namespace) -> FitConfig:
    """The fit's own config (data, embedding, losses) from the predictor file, then --model, --config, --set."""
    from nern.artifacts import read_metadata
    from nern.models import model_overrides
    from nern.predictor_file import portable_config

    stored = read_metadata(args.predictor).get("config")
    if not isinstance(stored, dict):
        raise NernError(f"{args.predictor} holds no fit config; pass the predictor.safetensors written by `nern fit`")
    base = portable_config(stored)  # this machine's device and threads unless --set says otherwise
    base["model"] = {**base.get("model", {}), **model_overrides(args.model).get("model", {})}
    return load_config(FitConfig, args.config, args.set, base=base)


def load_fitted(args: argparse.Namespace) -> tuple[FitConfig, nn.Module, Predictor, Representation, Any]:
    """Config, original network, predictor, representation and data splits: what the stages applied to a
    fitted NeRN (compress, importance) need."""
    from nern import data as data_mod
    from nern import models
    from nern.predictor_file import load_predictor

    cfg = fitted_config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = models.load_model(cfg.model)
    predictor, rep, fitted = load_predictor(args.predictor, model)
    # how to decode is the file's business: --set may change data or device, never the representation
    cfg = dataclasses.replace(cfg, embedding=fitted.embedding, predictor=fitted.predictor, represent=fitted.represent)
    splits = data_mod.build_splits(cfg.data)
    data_mod.check_compatible(splits.test.info, cfg.model.in_channels)
    return cfg, model, predictor, rep, splits

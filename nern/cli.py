"""`nern <stage>`: the command line every pipeline rule calls.

Each stage takes explicit input and output paths, a YAML config plus `--set key=value` overrides, and logs
to MLflow. A user error ends with one line `nern <stage>: error: ...` and exit status 2; SIGTERM
(pre-emption) saves a checkpoint and exits 143 so the job can be rerun and resume.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nern.errors import NernError

DEFAULT_EXPERIMENT = "nern"


def default_tracking_uri() -> str:
    """NERN_MLFLOW_URI if set, else an embedded SQLite store under ./results (no server needed)."""
    return os.environ.get("NERN_MLFLOW_URI") or f"sqlite:///{Path('results').resolve() / 'mlflow.db'}"


def _tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        if "=" not in item:
            raise NernError(f"--tag '{item}' must look like key=value")
        key, value = item.split("=", 1)
        tags[key] = value
    return tags


def _tracker(args: argparse.Namespace, stage: str, run_id: str | None = None) -> Any:
    from nern.tracking import Tracker

    uri = args.mlflow_uri or default_tracking_uri()
    name = args.run_name or f"{stage}:{Path(args.out).name if args.out else ''}"
    tags = {"nern.stage": stage, **_tags(args.tag)}
    resume_key = str(Path(args.out).resolve()) if args.out else None
    return Tracker(uri, args.experiment, name, tags, run_id=run_id, enabled=uri.lower() != "none",
                   resume_key=resume_key)


def _run_params(cfg: Any, resumed: bool, non_result_keys: tuple[str, ...]) -> dict[str, Any]:
    """Flattened config for MLflow; a resumed run may change the keys that do not affect results, so those
    are not logged again (MLflow refuses to change a logged param)."""
    from nern.config import flatten, to_dict

    flat = flatten(to_dict(cfg))
    if resumed:
        flat = {k: v for k, v in flat.items() if k.split(".")[0] not in non_result_keys}
    return flat


def _model_base(model_path: str | None) -> dict[str, Any]:
    """Model settings stored in one of our checkpoints, so a user need not repeat them."""
    from nern.config import to_dict
    from nern.models import model_config_from_checkpoint

    if not model_path:
        return {}
    if not Path(model_path).is_file() and not model_path.startswith("torchvision:"):
        raise NernError(f"model file not found: {model_path}; check the path or run `nern pretrain`/`nern import`")
    stored = model_config_from_checkpoint(model_path) if model_path.endswith(".safetensors") else None
    base = to_dict(stored) if stored is not None else {}
    base["checkpoint"] = model_path
    return {"model": base}


def _log_outputs(tracker: Any, out: Path, metrics: dict[str, Any], files: list[str]) -> None:
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(scalars, step=int(metrics.get("iterations", 0)))
    for name in files:
        if (out / name).is_file():
            tracker.log_artifact(out / name)


def _plot_curves(out: Path) -> None:
    from nern.plots import plot_training_curves

    if (out / "curves.csv").is_file():
        plot_training_curves(out / "curves.csv", out / "curves.png")


# -- stages ------------------------------------------------------------------------------------------------

def cmd_pretrain(args: argparse.Namespace) -> None:
    from nern.config import PretrainConfig, load_config
    from nern.pretrain import pretrain

    from nern.loop import CHECKPOINT_FILE, clear_resume_state
    from nern.pretrain import NON_RESULT_KEYS

    cfg = load_config(PretrainConfig, args.config, args.set)
    out = Path(args.out)
    with _tracker(args, "pretrain") as tracker:  # finds an unfinished run of `out` by its tag
        tracker.log_params(_run_params(cfg, (out / CHECKPOINT_FILE).is_file(), NON_RESULT_KEYS))
        metrics = pretrain(cfg, out, tracker=tracker, cleanup=False)
        _plot_curves(out)
        _log_outputs(tracker, out, metrics, ["metrics.json", "curves.csv", "curves.png", "model.safetensors"])
    clear_resume_state(out)
    print(f"[pretrain] test top-1 {metrics['test_top1']:.2f}% -> {out}")


def cmd_import(args: argparse.Namespace) -> None:
    """Published weights (a checkpoint file or torchvision:<WEIGHTS>) -> our safetensors plus their accuracy."""
    from nern import data as data_mod
    from nern import models
    from nern.artifacts import write_json
    from nern.config import PretrainConfig, flatten, load_config, to_dict
    from nern.evaluate import top_k_accuracy

    cfg = load_config(PretrainConfig, args.config, args.set)
    if not cfg.model.checkpoint:
        raise NernError("nern import needs model.checkpoint (a file or torchvision:<WEIGHTS>); pass --set model.checkpoint=...")
    out = Path(args.out)
    with _tracker(args, "import") as tracker:
        tracker.log_params(flatten(to_dict(cfg)))
        model = models.load_model(cfg.model)
        splits = data_mod.build_splits(cfg.data, seed=cfg.seed)
        data_mod.check_compatible(splits.test.info, cfg.model.in_channels)
        ks = (1, 5) if cfg.data.name == "imagenet" else (1,)
        test = top_k_accuracy(model, data_mod.eval_batches(splits.test, cfg.data.eval_batch_size), ks, cfg.device)
        metrics: dict[str, Any] = {"test_top1": test["top1"], "original_top1": test["top1"], "source": cfg.model.checkpoint}
        if "top5" in test:
            metrics["test_top5"] = test["top5"]
        if splits.val is not None:
            val = top_k_accuracy(model, data_mod.eval_batches(splits.val, cfg.data.eval_batch_size), (1,), cfg.device)
            metrics["val_top1"] = val["top1"]
        model_cfg = to_dict(cfg.model)
        model_cfg["checkpoint"] = None
        models.save_model(model, out / "model.safetensors", {"model": model_cfg, "test_top1": test["top1"],
                                                              "source": cfg.model.checkpoint})
        write_json(out / "metrics.json", metrics)
        _log_outputs(tracker, out, metrics, ["metrics.json"])
    print(f"[import] {cfg.model.checkpoint}: test top-1 {metrics['test_top1']:.2f}% -> {out}")


def cmd_permute(args: argparse.Namespace) -> None:
    from nern import models
    from nern.artifacts import write_json
    from nern.config import FitConfig, load_config
    from nern.layers import conv_weights, find_conv_layers
    from nern.permutation import chain_quality_of_positions, compute_permutations, save_permutations

    cfg = load_config(FitConfig, args.config, args.set, base=_model_base(args.model))
    model = models.load_model(cfg.model)
    layers = find_conv_layers(model, cfg.represent)
    weights = conv_weights(model, layers)
    start = time.perf_counter()
    perms = compute_permutations(weights, args.mode, method=args.method, progress=not args.quiet)
    seconds = time.perf_counter() - start
    quality = chain_quality_of_positions(weights, perms)
    meta = {"mode": args.mode, "method": args.method, "layers": [layer.name for layer in layers],
            "shapes": [[layer.shape[0], layer.shape[1]] for layer in layers], "seconds": seconds}
    save_permutations(args.out, perms, meta)
    write_json(Path(args.out).with_suffix(".json"), {**meta, "chain_quality": quality})
    print(f"[permute] {args.mode}: {len(layers)} layers in {seconds:.1f}s, chain quality {quality:.4f} -> {args.out}")


def cmd_fit(args: argparse.Namespace) -> None:
    from nern.config import FitConfig, load_config
    from nern.fit import CHECKPOINT_FILE, NON_RESULT_KEYS, clear_resume_state, fit

    cfg = load_config(FitConfig, args.config, args.set, base=_model_base(args.model))
    if args.permutation and not Path(args.permutation).is_file():
        raise NernError(f"permutation file not found: {args.permutation}; run `nern permute` first")
    out = Path(args.out)
    with _tracker(args, "fit") as tracker:  # finds an unfinished run of `out` by its tag
        tracker.log_params(_run_params(cfg, (out / CHECKPOINT_FILE).is_file(), NON_RESULT_KEYS))
        metrics = fit(cfg, out, permutation=args.permutation, tracker=tracker, cleanup=False)
        _plot_curves(out)
        _log_outputs(tracker, out, metrics, ["metrics.json", "curves.csv", "curves.png", "predictor.safetensors"])
    clear_resume_state(out)  # only once the run is complete and logged
    print(f"[fit] original {metrics['original_top1']:.2f}% -> reconstructed {metrics['reconstructed_top1']:.2f}% "
          f"(size ratio {metrics['size_ratio']:.3f}, {metrics['seconds_per_iteration']:.3f} s/it) -> {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Rebuild the network from a predictor file and measure both networks."""
    from nern import data as data_mod
    from nern import models
    from nern.artifacts import write_json
    from nern.config import FitConfig, load_config
    from nern.evaluate import layer_errors, top_k_accuracy
    from nern.fit import decode_weights, load_predictor
    from nern.layers import conv_weights
    from nern.reconstruct import reconstructed_model

    cfg = load_config(FitConfig, args.config, args.set, base=_model_base(args.model))
    model = models.load_model(cfg.model)
    predictor, rep, _ = load_predictor(args.predictor, model)
    fit_cfg = load_config(FitConfig, base=_predictor_config(args.predictor))
    weights = decode_weights(predictor, rep, fit_cfg)
    rebuilt = reconstructed_model(model, rep, weights)
    splits = data_mod.build_splits(cfg.data, seed=cfg.seed)
    ks = (1, 5) if cfg.data.name == "imagenet" else (1,)
    batches = lambda: data_mod.eval_batches(splits.test, cfg.data.eval_batch_size)  # noqa: E731
    original = top_k_accuracy(model, batches(), ks, cfg.device)
    recon = top_k_accuracy(rebuilt, batches(), ks, cfg.device)
    metrics = {"original_top1": original["top1"], "reconstructed_top1": recon["top1"],
               "layers": layer_errors(weights, conv_weights(model, rep.layers), rep.layers)}
    if "top5" in original:
        metrics["original_top5"], metrics["reconstructed_top5"] = original["top5"], recon["top5"]
    write_json(args.out, metrics)
    print(f"[evaluate] original {original['top1']:.2f}% reconstructed {recon['top1']:.2f}% -> {args.out}")


def _predictor_config(path: str) -> dict[str, Any]:
    from nern.artifacts import read_metadata

    return read_metadata(path).get("config", {})


# -- argument parsing --------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--config", help="YAML config file (defaults: the paper's ResNet20/CIFAR-10 settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set predictor.hidden=140 (repeatable)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--mlflow-uri", help="tracking URI; 'none' disables (default: $NERN_MLFLOW_URI or ./results/mlflow.db)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="MLflow tag (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("pretrain", help="train the original network (optionally with the smoothness regulariser)")
    _common(p, "output directory (model.safetensors, metrics.json, curves.csv)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("import", help="import published weights (file or torchvision:<WEIGHTS>) and measure them")
    _common(p, "output directory (model.safetensors, metrics.json)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("permute", help="compute coordinate permutations of the represented layers")
    _common(p, "output .safetensors file (a .json summary is written beside it)")
    p.add_argument("--model", required=True, help="model checkpoint (.safetensors from pretrain/import, or a .th file)")
    p.add_argument("--mode", required=True, choices=["none", "infilter", "crossfilter"])
    p.add_argument("--method", default="auto", help="chain search: auto, greedy (the paper's), or a fast method")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_permute)

    p = sub.add_parser("fit", help="fit a NeRN predictor to a pretrained network")
    _common(p, "output directory (predictor.safetensors, metrics.json, curves.csv, checkpoint.pt)")
    p.add_argument("--model", required=True, help="model checkpoint")
    p.add_argument("--permutation", help="permutation file from `nern permute` (default: none)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="rebuild a network from a predictor file and measure it")
    _common(p, "output metrics .json file")
    p.add_argument("--model", required=True, help="model checkpoint the predictor was fitted to")
    p.add_argument("--predictor", required=True, help="predictor.safetensors from `nern fit`")
    p.set_defaults(func=cmd_evaluate)

    for name, register in _extra_stages():
        register(sub, name)
    return parser


def _extra_stages() -> list[tuple[str, Callable[[Any, str], None]]]:
    """Stages living in their own modules (tables, applications) register their sub-commands here."""
    stages = []
    for module_name in ("nern.tables", "nern.compress", "nern.importance"):
        try:
            module = __import__(module_name, fromlist=["register_cli"])
        except ImportError:
            continue
        if hasattr(module, "register_cli"):
            stages.append((module_name.split(".")[-1], module.register_cli))
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nern.checkpoint import Preempted

    try:
        args.func(args)
    except NernError as exc:
        print(f"nern {args.stage}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"nern {args.stage}: {exc}; rerun the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"nern {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

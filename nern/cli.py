"""`nern <stage>`: the command line every pipeline rule calls.

Each stage takes explicit input and output paths, a YAML config plus `--set key=value` overrides, and logs
to MLflow. A user error ends with one line `nern <stage>: error: ...` and exit status 2; SIGTERM
(pre-emption) saves a checkpoint and exits 143 so the job can be rerun and resume.

The package is layered; a module imports only from its own layer or below (tests/test_imports.py checks it):

1. foundations: `errors`, `artifacts`, `config`;
2. building blocks and services: models, data, layers, embedding, predictor, reconstruct, sampling, losses
   (NeRN's objective and its terms), chain (the TSP chain solver), permutation, feature_maps, smoothness,
   checkpoint, evaluate, measure, tracking, journal, plots, codec, nnc, qat, pruning, table_format, grid (the
   experiment design), symmetry, loop (the shared training loop), optim;
3. the method: `method` (NeRN's iteration on one screen, the departures beside it), `fit_setup` (what a fit
   is built from), `predictor_file` (the file a fit writes, read back);
4. training stages: `fit`, `pretrain`, `original_qat` (the original network trained through the quantisers
   at a fit's budget, compress's equal-budget baseline);
5. stage plumbing: `runs` (arguments, the MLflow run of a job, a fitted NeRN's inputs), `network_files` (NeRN
   and original-network files and the network rebuilt from one);
6. application stages: `compress`, `importance`;
7. reports: `tables`;
8. this CLI, which registers every sub-command explicitly (a broken import is an error, not a missing
   sub-command); only `__main__` imports it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from nern import compress, importance, tables
from nern.checkpoint import Preempted
from nern.config import NETWORK_PERMUTATIONS, PERMUTATIONS, FitConfig, PretrainConfig, flatten, load_config, to_dict
from nern.errors import NernError
from nern.models import model_overrides
from nern.runs import add_stage_arguments, log_outputs, stage_run

# -- stages ------------------------------------------------------------------------------------------------


def cmd_pretrain(args: argparse.Namespace) -> None:
    from nern import pretrain
    from nern.fit import clear_resume_state

    cfg = load_config(PretrainConfig, args.config, args.set)
    out = Path(args.out)
    with stage_run(args, "pretrain", flatten(to_dict(cfg)), pretrain.NON_RESULT_KEYS, data=cfg.data) as tracker:
        metrics = pretrain.pretrain(cfg, out, tracker=tracker, cleanup=False)
        _plot_curves(out)
        log_outputs(tracker, out, metrics, ["metrics.json", "curves.csv", "curves.png", "model.safetensors"])
    clear_resume_state(out)  # only once the run is complete and logged
    print(f"[pretrain] test top-1 {metrics['test_top1']:.2f}% -> {out}")


def cmd_import(args: argparse.Namespace) -> None:
    """Published weights (a checkpoint file or torchvision:<WEIGHTS>), or a file `nern compress` wrote (.nernz /
    .nnc, decoded) -> our safetensors plus their accuracy."""
    from nern import models
    from nern.artifacts import write_json
    from nern.pretrain import NON_RESULT_KEYS

    cfg = load_config(PretrainConfig, args.config, args.set)
    if not cfg.model.checkpoint:
        raise NernError("nern import needs model.checkpoint (a file or torchvision:<WEIGHTS>); pass --set model.checkpoint=...")
    out = Path(args.out)
    with stage_run(args, "import", flatten(to_dict(cfg)), NON_RESULT_KEYS, data=cfg.data) as tracker:
        model = _imported_network(cfg)
        metrics = _imported_accuracy(model, cfg)
        model_cfg = {**to_dict(cfg.model), "checkpoint": None}
        models.save_model(model, out / "model.safetensors", {"model": model_cfg, "test_top1": metrics["test_top1"],
                                                              "source": cfg.model.checkpoint})
        write_json(out / "metrics.json", metrics)
        log_outputs(tracker, out, metrics, ["metrics.json"])
    print(f"[import] {cfg.model.checkpoint}: test top-1 {metrics['test_top1']:.2f}% -> {out}")


def _imported_network(cfg: PretrainConfig) -> Any:
    """Published weights, or the network a `nern compress` file holds (decoded from that file alone)."""
    from nern import models
    from nern.network_files import read_codec_file

    source = cfg.model.checkpoint or ""
    if Path(source).suffix in models.CODEC_SUFFIXES:
        return read_codec_file(source, cfg.model)
    return models.load_model(cfg.model)


def _imported_accuracy(model: Any, cfg: PretrainConfig) -> dict[str, Any]:
    """Test top-1 (and top-5 on ImageNet, where it is the published figure) and validation top-1."""
    from nern import data as data_mod
    from nern.evaluate import top_k_accuracy

    splits = data_mod.build_splits(cfg.data)
    data_mod.check_compatible(splits.test.info, cfg.model.in_channels)
    test = top_k_accuracy(model, data_mod.eval_batches(splits.test, cfg.data.eval_batch_size), _ks(cfg), cfg.device)
    metrics: dict[str, Any] = {"test_top1": test["top1"], "original_top1": test["top1"], "source": cfg.model.checkpoint}
    if "top5" in test:
        metrics["test_top5"] = test["top5"]
    if splits.val is not None:
        val = top_k_accuracy(model, data_mod.eval_batches(splits.val, cfg.data.eval_batch_size), (1,), cfg.device)
        metrics["val_top1"] = val["top1"]
    return metrics


def _ks(cfg: PretrainConfig | FitConfig) -> tuple[int, ...]:
    """ImageNet results are published as top-1 and top-5; the small tasks as top-1 only."""
    return (1, 5) if cfg.data.name == "imagenet" else (1,)


def cmd_permute(args: argparse.Namespace) -> None:
    from nern import models
    from nern.artifacts import write_json
    from nern.layers import conv_weights, find_conv_layers
    from nern.permutation import chain_quality_of_positions, compute_permutations, save_permutations

    cfg = load_config(FitConfig, args.config, args.set, base=model_overrides(args.model))
    model = models.load_model(cfg.model)
    start = time.perf_counter()
    if args.mode == SYMMETRY:
        model, report = _permute_network(args, cfg, model)
    layers = find_conv_layers(model, cfg.represent)
    weights = conv_weights(model, layers)
    mode = "none" if args.mode == SYMMETRY else args.mode
    perms = compute_permutations(weights, mode, method=args.method, progress=not args.quiet)
    seconds = time.perf_counter() - start
    quality = chain_quality_of_positions(weights, perms)
    meta = {"mode": args.mode, "method": args.method, "layers": [layer.name for layer in layers],
            "shapes": [[layer.shape[0], layer.shape[1]] for layer in layers], "seconds": seconds}
    save_permutations(args.out, perms, meta)
    summary = {**meta, "chain_quality": quality, **({"symmetry": report} if args.mode == SYMMETRY else {})}
    write_json(Path(args.out).with_suffix(".json"), summary)
    print(f"[permute] {args.mode}: {len(layers)} layers in {seconds:.1f}s, chain quality {quality:.4f} -> {args.out}")


SYMMETRY = NETWORK_PERMUTATIONS[0]


def _permute_network(args: argparse.Namespace, cfg: FitConfig, model: Any) -> tuple[Any, dict[str, Any]]:
    """--mode symmetry: permute the network itself along its weight-space symmetries (nern.symmetry), written
    to --model-out; the fit then uses that network with identity coordinates, so nothing is stored."""
    import dataclasses

    from nern import models
    from nern.symmetry import symmetry_permute

    if not args.model_out:
        raise NernError("--mode symmetry writes a permuted copy of the network: pass --model-out model.safetensors "
                        "(and fit that network with this permutation file)")
    permuted, report = symmetry_permute(model, cfg.represent)
    models.save_model(permuted, args.model_out, config=dataclasses.replace(cfg.model, checkpoint=None))
    return permuted, report


def cmd_fit(args: argparse.Namespace) -> None:
    from nern.fit import NON_RESULT_KEYS, clear_resume_state, fit

    cfg = load_config(FitConfig, args.config, args.set, base=model_overrides(args.model))
    if args.permutation and not Path(args.permutation).is_file():
        raise NernError(f"permutation file not found: {args.permutation}; run `nern permute` first")
    out = Path(args.out)
    with stage_run(args, "fit", flatten(to_dict(cfg)), NON_RESULT_KEYS, data=cfg.data,
                   data_free=cfg.data_free) as tracker:
        metrics = fit(cfg, out, permutation=args.permutation, tracker=tracker, cleanup=False)
        _plot_curves(out)
        log_outputs(tracker, out, metrics, ["metrics.json", "curves.csv", "curves.png", "predictor.safetensors"])
    clear_resume_state(out)  # only once the run is complete and logged
    print(f"[fit] original {metrics['original_top1']:.2f}% -> reconstructed {metrics['reconstructed_top1']:.2f}% "
          f"(size ratio {metrics['size_ratio']:.3f}, {metrics['seconds_per_iteration']:.3f} s/it) -> {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Rebuild the network from a predictor file and measure both networks."""
    from nern import data as data_mod
    from nern import models
    from nern.artifacts import read_metadata, write_json
    from nern.evaluate import layer_errors, top_k_accuracy
    from nern.layers import conv_weights
    from nern.predictor_file import decode_weights, load_predictor
    from nern.reconstruct import reconstructed_model

    cfg = load_config(FitConfig, args.config, args.set, base=model_overrides(args.model))
    model = models.load_model(cfg.model)
    predictor, rep, _ = load_predictor(args.predictor, model)
    fit_cfg = load_config(FitConfig, base=read_metadata(args.predictor).get("config", {}))
    weights = decode_weights(predictor, rep, fit_cfg)
    rebuilt = reconstructed_model(model, rep, weights)
    splits = data_mod.build_splits(cfg.data)
    batches = lambda: data_mod.eval_batches(splits.test, cfg.data.eval_batch_size)  # noqa: E731
    original = top_k_accuracy(model, batches(), _ks(cfg), cfg.device)
    recon = top_k_accuracy(rebuilt, batches(), _ks(cfg), cfg.device)
    metrics = {"original_top1": original["top1"], "reconstructed_top1": recon["top1"],
               "layers": layer_errors(weights, conv_weights(model, rep.layers), rep.layers)}
    if "top5" in original:
        metrics["original_top5"], metrics["reconstructed_top5"] = original["top5"], recon["top5"]
    write_json(args.out, metrics)
    print(f"[evaluate] original {original['top1']:.2f}% reconstructed {recon['top1']:.2f}% -> {args.out}")


def _plot_curves(out: Path) -> None:
    from nern.plots import plot_training_curves

    if (out / "curves.csv").is_file():
        plot_training_curves(out / "curves.csv", out / "curves.png")


# -- argument parsing --------------------------------------------------------------------------------------


def _add_pretrain(sub: Any) -> None:
    p = sub.add_parser("pretrain", help="train the original network (optionally with the smoothness regulariser)")
    add_stage_arguments(p, "output directory (model.safetensors, metrics.json, curves.csv)")
    p.set_defaults(func=cmd_pretrain)


def _add_import(sub: Any) -> None:
    p = sub.add_parser("import", help="import published weights (file or torchvision:<WEIGHTS>) or decode a "
                                           "`nern compress` file (.nernz/.nnc), and measure them")
    add_stage_arguments(p, "output directory (model.safetensors, metrics.json)")
    p.set_defaults(func=cmd_import)


def _add_permute(sub: Any) -> None:
    p = sub.add_parser("permute", help="compute coordinate permutations of the represented layers")
    add_stage_arguments(p, "output .safetensors file (a .json summary is written beside it)")
    p.add_argument("--model", required=True, help="model checkpoint (.safetensors from pretrain/import, or a .th file)")
    p.add_argument("--mode", required=True, choices=(*PERMUTATIONS, SYMMETRY),
                   help="coordinate permutation (none, infilter, crossfilter), or symmetry: permute the network "
                        "itself, at no storage cost (needs --model-out)")
    p.add_argument("--model-out", help="with --mode symmetry: where to write the permuted network (.safetensors)")
    p.add_argument("--method", default="auto", help="chain search: auto, greedy (the paper's), or a fast method")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_permute)


def _add_fit(sub: Any) -> None:
    p = sub.add_parser("fit", help="fit a NeRN predictor to a pretrained network")
    add_stage_arguments(p, "output directory (predictor.safetensors, metrics.json, curves.csv, checkpoint.pt)")
    p.add_argument("--model", required=True, help="model checkpoint")
    p.add_argument("--permutation", help="permutation file from `nern permute` (default: none)")
    p.set_defaults(func=cmd_fit)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="rebuild a network from a predictor file and measure it")
    add_stage_arguments(p, "output metrics .json file")
    p.add_argument("--model", required=True, help="model checkpoint the predictor was fitted to")
    p.add_argument("--predictor", required=True, help="predictor.safetensors from `nern fit`")
    p.set_defaults(func=cmd_evaluate)


def cmd_track_sync(args: argparse.Namespace) -> None:
    """Make a store hold a results tree's runs, from the journals the jobs wrote beside their outputs."""
    import os

    from nern.tracking import DISABLED, backfill_journals, default_tracking_uri, redact, sync_results

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one line per job is ours to print
    uri = default_tracking_uri(args.mlflow_uri, args.results_dir)
    if uri == DISABLED:
        raise NernError("nern track sync needs a store; pass --mlflow-uri http://host:port or sqlite:///<path>")
    backfilled = backfill_journals(args.results_dir)
    if backfilled:
        print(f"[track sync] wrote the journals of {backfilled} jobs logged to {args.results_dir}/mlflow.db before "
              "jobs kept journals")
    done = sync_results(args.results_dir, uri)
    for job in done:
        if any(job.sent.values()) or job.created:
            sent = ", ".join(f"{n} {kind}" for kind, n in job.sent.items() if n)
            print(f"[track sync] {job.journal.parent}: run {job.run_id} {'created' if job.created else 'found'}"
                  f"{'; sent ' + sent if sent else ''}")
    created, unfinished = sum(j.created for j in done), sum(j.status is None for j in done)
    points = sum(j.sent.get("metrics", 0) for j in done)
    print(f"[track sync] {len(done)} jobs in {redact(uri)}: {created} runs created, {len(done) - created} found, "
          f"{points} metric points sent, {unfinished} jobs never ended")


def _add_track(sub: Any) -> None:
    p = sub.add_parser("track", help="MLflow tracking of a results tree")
    actions = p.add_subparsers(dest="action", required=True)
    sync = actions.add_parser("sync", help="log a results tree into an MLflow store from its jobs' journals "
                                           "(idempotent: a rerun sends only what the store lacks)")
    sync.add_argument("results_dir", metavar="RESULTS_DIR", help="results directory (searched recursively)")
    sync.add_argument("--mlflow-uri", help="the store to fill (default: $NERN_MLFLOW_URI, $MLFLOW_TRACKING_URI, "
                                           "else RESULTS_DIR/mlflow.db); credentials from MLFLOW_TRACKING_USERNAME/"
                                           "PASSWORD")
    sync.set_defaults(func=cmd_track_sync)


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command, registered explicitly, in the order of the pipeline."""
    parser = argparse.ArgumentParser(prog="nern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for register in (_add_pretrain, _add_import, _add_permute, _add_fit, _add_evaluate, _add_track):
        register(sub)
    tables.register_cli(sub, "tables")
    compress.register_cli(sub, "compress")
    importance.register_cli(sub, "importance")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

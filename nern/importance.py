"""Weight importance from NeRN's reconstruction error (docs/METHOD.md §9).

The paper observes that NeRN reconstructs first the weights that matter most to the network's function, so
a kernel it reconstructs well is important and one it reconstructs badly is not. Direction used here: LOW
relative reconstruction error = important, i.e. pruning by NeRN error removes the weights (or kernels) with
the HIGHEST relative error |w - w_hat| / |w| first ("nern-error"). The opposite order ("nern-error-inverse")
is measured too, so the comparison does not assume the answer.

What is measured, on the ORIGINAL network (never the reconstruction), without fine-tuning:
- scores per weight (unstructured) and per kernel (structured: a whole k x k kernel is kept or dropped);
- methods: nern-error, nern-error-inverse, magnitude (|w|, kernel L2 norm), random (seeded);
- every represented conv layer is pruned to the same sparsity (per-layer scope), so the methods differ only
  in WHICH weights of a layer go, not in how many; FC and unrepresented convs are untouched.

Relative error per weight is |w - w_hat| / |w|, which grows like 1/|w|: it shares much of its ordering with
magnitude. The overlap of the pruned sets with magnitude pruning is reported so a reader can see how much of
any difference is NeRN's own signal.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nern.artifacts import atomic_path, write_json
from nern.config import FitConfig, flatten, to_dict
from nern.errors import NernError
from nern.layers import ConvLayer, conv_weights
from nern.evaluate import Predictions, agreement
from nern.measure import split_predictions
from nern.plots import pyplot, save_figure
from nern.predictor_file import NON_RESULT_KEYS, decode_weights
from nern.pruning import lowest_score_masks
from nern.reconstruct import Representation, run_reconstructed
from nern.runs import add_stage_arguments, comma_floats, comma_names, load_fitted, log_outputs, stage_run
from nern.table_format import to_markdown

METHODS = ("nern-error", "nern-error-inverse", "magnitude", "random")
GRANULARITIES = ("unstructured", "kernel")
DIRECTION = "prune highest relative NeRN error first (low error = important)"
TINY = 1e-12
CSV_FILE, MD_FILE, METRICS_FILE = "importance.csv", "importance.md", "metrics.json"
PRUNING_FIGURE, OVERVIEW_FIGURE, KERNELS_FIGURE, MAPS_DIR = "pruning.png", "error_maps.png", "kernels.png", "error_maps"


# ---------------------------------------------------------------------------------------------------------
# Reconstruction error maps


@dataclass
class LayerErrors:
    """One layer's errors: per kernel [Cout, Cin], per filter [Cout], per weight [Cout, Cin, k, k]."""

    layer: ConvLayer
    kernel_abs: torch.Tensor  # mean |w - w_hat| over the kernel's k*k weights
    kernel_rel: torch.Tensor  # ||w - w_hat|| / ||w|| over the kernel
    filter_abs: torch.Tensor
    filter_rel: torch.Tensor
    weight_rel: torch.Tensor  # |w - w_hat| / |w|


def layer_error_maps(original: torch.Tensor, reconstructed: torch.Tensor, layer: ConvLayer) -> LayerErrors:
    w, w_hat = original.detach().float().cpu(), reconstructed.detach().float().cpu()
    diff = w_hat - w
    kernel_norm = w.flatten(2).norm(dim=2)
    filter_norm = w.flatten(1).norm(dim=1)
    return LayerErrors(
        layer=layer,
        kernel_abs=diff.abs().flatten(2).mean(dim=2),
        kernel_rel=diff.flatten(2).norm(dim=2) / kernel_norm.clamp_min(TINY),
        filter_abs=diff.abs().flatten(1).mean(dim=1),
        filter_rel=diff.flatten(1).norm(dim=1) / filter_norm.clamp_min(TINY),
        weight_rel=diff.abs() / w.abs().clamp_min(TINY),
    )


def error_maps(originals: list[torch.Tensor], reconstructed: list[torch.Tensor],
               layers: list[ConvLayer]) -> list[LayerErrors]:
    return [layer_error_maps(o, r, layer) for o, r, layer in zip(originals, reconstructed, layers)]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (scipy: ties get their average rank); NaN when either side is constant."""
    import warnings

    from scipy.stats import spearmanr

    x, y = a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: scipy warns and returns NaN, which is the answer
        return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------------------------------------------------
# Pruning the original network by score


def keep_scores(method: str, granularity: str, original: torch.Tensor, errors: LayerErrors,
                generator: torch.Generator) -> torch.Tensor:
    """Higher = keep. Per weight for `unstructured`, per kernel [Cout, Cin] for `kernel`."""
    w = original.detach().float().cpu()
    per_kernel = granularity == "kernel"
    if method == "magnitude":
        return w.flatten(2).norm(dim=2) if per_kernel else w.abs()
    if method == "nern-error":
        return -(errors.kernel_rel if per_kernel else errors.weight_rel)
    if method == "nern-error-inverse":
        return errors.kernel_rel if per_kernel else errors.weight_rel
    if method == "random":
        shape = w.shape[:2] if per_kernel else w.shape
        return torch.rand(shape, generator=generator)
    raise NernError(f"unknown importance method {method!r}; choose from {', '.join(METHODS)}")


def pruning_masks(method: str, granularity: str, sparsity: float, originals: list[torch.Tensor],
                  errors: list[LayerErrors], seed: int = 0) -> list[torch.Tensor]:
    """Per-layer keep-masks shaped like each conv weight, each layer at exactly `sparsity` of its scored units."""
    if granularity not in GRANULARITIES:
        raise NernError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    generator = torch.Generator().manual_seed(seed)
    scores = {str(i): keep_scores(method, granularity, o, e, generator)
              for i, (o, e) in enumerate(zip(originals, errors))}
    masks = lowest_score_masks(scores, sparsity, "layer")
    out = []
    for i, o in enumerate(originals):
        m = masks[str(i)]
        out.append(m[:, :, None, None].expand(o.shape).clone() if granularity == "kernel" else m)
    return out


def pruned_fraction(masks: list[torch.Tensor]) -> float:
    return 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def overlap(masks_a: list[torch.Tensor], masks_b: list[torch.Tensor]) -> float:
    """Share of the pruned weights two methods agree on (|A and B| / |A|; both prune equally many)."""
    both = sum(int((~a & ~b).sum()) for a, b in zip(masks_a, masks_b))
    pruned = sum(int((~a).sum()) for a in masks_a)
    return both / pruned if pruned else 1.0


# ---------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class ImportanceOptions:
    sparsities: list[float]
    methods: list[str]
    granularities: list[str]
    random_seeds: int = 1
    kernel_layer: str | None = None
    kernel_filters: int = 2
    kernel_channels: int = 6


def check_options(opts: ImportanceOptions) -> None:
    for s in opts.sparsities:
        if not 0.0 <= s < 1.0:
            raise NernError(f"sparsity {s} is outside [0, 1); pass fractions such as --sparsities 0.3,0.5,0.7,0.9")
    checks = (("method", opts.methods, METHODS), ("granularity", opts.granularities, GRANULARITIES))
    for name, values, allowed in checks:
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise NernError(f"{name} {bad[0] if bad else '(none)'!r} is not allowed; choose from {', '.join(allowed)}")
    if opts.random_seeds < 1:
        raise NernError("--random-seeds must be at least 1")


def _predictions(model: nn.Module, rep: Representation, weights: list[torch.Tensor] | None, splits: Any,
                 cfg: FitConfig) -> Predictions:
    """The original (weights None) or the network with these conv weights on the test set."""
    model = model.to(cfg.device).eval()
    if weights is None:
        forward = model
    else:
        on_device = [w.to(cfg.device) for w in weights]
        forward = lambda x: run_reconstructed(model, rep, on_device, x)  # noqa: E731
    return split_predictions(forward, splits.test, cfg.data.eval_batch_size, cfg.device)


def pruning_curves(model: nn.Module, rep: Representation, originals: list[torch.Tensor], errors: list[LayerErrors],
                   splits: Any, cfg: FitConfig, opts: ImportanceOptions, original: Predictions) -> list[dict[str, Any]]:
    """Accuracy of the original network pruned by each method, granularity and sparsity (no fine-tuning), and its
    agreement with the unpruned original."""
    original_top1 = original.top1()
    cpu = [o.detach().float().cpu() for o in originals]
    jobs = [(g, m, s) for g in opts.granularities for s in sorted(set(opts.sparsities)) for m in opts.methods]
    rows = []
    for granularity, method, sparsity in tqdm(jobs, desc="importance", disable=not cfg.progress, dynamic_ncols=True):
        if sparsity == 0:
            rows.append(_row(granularity, method, 0.0, [original_top1], [100.0], 0.0, 1.0, original_top1))
            continue
        seeds = range(opts.random_seeds) if method == "random" else [0]
        reference = pruning_masks("magnitude", granularity, sparsity, cpu, errors)
        accs, agreements, achieved, agree = [], [], 0.0, 0.0
        for seed in seeds:
            masks = pruning_masks(method, granularity, sparsity, cpu, errors, seed=cfg.seed + seed)
            pruned = _predictions(model, rep, [o * m for o, m in zip(cpu, masks)], splits, cfg)
            accs.append(pruned.top1())
            agreements.append(agreement(original, pruned)["agreement"])
            achieved, agree = pruned_fraction(masks), overlap(masks, reference)
        rows.append(_row(granularity, method, sparsity, accs, agreements, achieved, agree, original_top1))
    return rows


def _row(granularity: str, method: str, sparsity: float, accs: list[float], agreements: list[float], achieved: float,
         agree: float, original_top1: float) -> dict[str, Any]:
    mean = sum(accs) / len(accs)
    std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
    return {"granularity": granularity, "method": method, "sparsity": sparsity, "top1": mean, "top1_std": std,
            "seeds": len(accs), "delta_top1": mean - original_top1, "agreement": sum(agreements) / len(agreements),
            "achieved_sparsity": achieved, "overlap_with_magnitude": agree}


def layer_summary(errors: list[LayerErrors], originals: list[torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for e, o in zip(errors, originals):
        norms = o.detach().float().cpu().flatten(2).norm(dim=2)
        rows.append({"layer": e.layer.name, "kernels": e.layer.num_kernels,
                     "mean_kernel_rel_error": float(e.kernel_rel.mean()),
                     "median_kernel_rel_error": float(e.kernel_rel.median()),
                     "mean_kernel_abs_error": float(e.kernel_abs.mean()),
                     "spearman_rel_error_vs_kernel_norm": spearman(e.kernel_rel, norms)})
    return rows


def run_importance(model: nn.Module, rep: Representation, reconstructed: list[torch.Tensor], cfg: FitConfig,
                   splits: Any, out: str | Path,
                   opts: ImportanceOptions) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Error maps, pruning curves, kernel figure, table and metrics of one fitted NeRN into `out`."""
    check_options(opts)
    out = Path(out)
    start = time.perf_counter()
    originals = conv_weights(model, rep.layers)
    errors = error_maps(originals, reconstructed, rep.layers)
    original = _predictions(model, rep, None, splits, cfg)
    rebuilt = _predictions(model, rep, reconstructed, splits, cfg)
    rows = pruning_curves(model, rep, originals, errors, splits, cfg, opts, original)
    layers = layer_summary(errors, originals)
    metrics = summary_metrics(rows, layers, original.top1(), rebuilt.top1(), time.perf_counter() - start)
    metrics.update(agreement(original, rebuilt))  # the reconstruction's, beside reconstructed_top1
    write_outputs(out, rows, metrics, errors, originals, reconstructed, opts)
    return rows, metrics


def summary_metrics(rows: list[dict[str, Any]], layers: list[dict[str, Any]], original_top1: float,
                    reconstructed_top1: float, seconds: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {"original_top1": original_top1, "reconstructed_top1": reconstructed_top1,
                               "direction": DIRECTION, "wall_seconds": seconds, "layers": layers}
    spearmans = [row["spearman_rel_error_vs_kernel_norm"] for row in layers]
    metrics["mean_spearman_rel_error_vs_kernel_norm"] = sum(spearmans) / len(spearmans)
    metrics["mean_kernel_rel_error"] = sum(row["mean_kernel_rel_error"] for row in layers) / len(layers)
    by_key = {(r["granularity"], r["method"], r["sparsity"]): r for r in rows}
    for (granularity, method, sparsity), row in by_key.items():
        if sparsity == 0:
            continue
        metrics[f"top1/{granularity}/{method}/{sparsity:g}"] = row["top1"]
        magnitude = by_key.get((granularity, "magnitude", sparsity))
        if method == "nern-error" and magnitude is not None:
            metrics[f"nern_minus_magnitude/{granularity}/{sparsity:g}"] = row["top1"] - magnitude["top1"]
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Table and figures


def write_outputs(out: Path, rows: list[dict[str, Any]], metrics: dict[str, Any], errors: list[LayerErrors],
                  originals: list[torch.Tensor], reconstructed: list[torch.Tensor], opts: ImportanceOptions) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    with atomic_path(out / CSV_FILE) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / MD_FILE) as tmp:
        tmp.write_text(markdown_table(df, metrics))
    plot_pruning(df, metrics["original_top1"], out / PRUNING_FIGURE)
    for i, e in enumerate(errors):
        plot_layer_errors(e, out / MAPS_DIR / f"{i:02d}_{e.layer.name}.png")
    plot_error_overview(errors, out / OVERVIEW_FIGURE)
    plot_kernels(originals, reconstructed, errors, out / KERNELS_FIGURE, opts)
    write_json(out / METRICS_FILE, metrics)  # last: its presence means the stage finished


def markdown_table(df: Any, metrics: dict[str, Any]) -> str:
    """Top-1 by sparsity (rows) and method (columns), one block per granularity."""
    parts = [f"**Pruning the ORIGINAL network without fine-tuning, every represented conv layer at the same "
             f"sparsity. nern-error: {DIRECTION}; nern-error-inverse: the opposite order. Original "
             f"{metrics['original_top1']:.2f}%, NeRN reconstruction {metrics['reconstructed_top1']:.2f}%.**\n"]
    for granularity, block in df.groupby("granularity", sort=False):
        wide = block.pivot(index="sparsity", columns="method", values="top1")
        methods = [m for m in METHODS if m in wide.columns]
        table = wide[methods].rename(columns={m: f"{m} top-1" for m in methods}).reset_index()
        if "nern-error top-1" in table and "magnitude top-1" in table:
            table["Δ nern-error − magnitude"] = table["nern-error top-1"] - table["magnitude top-1"]
        parts.append(f"\n*{granularity}*\n\n" + to_markdown(table))
    return "".join(parts)


METHOD_STYLE = {"nern-error": ("tab:blue", "-"), "nern-error-inverse": ("tab:cyan", "--"),
                "magnitude": ("tab:red", "-"), "random": ("tab:gray", ":")}


def plot_pruning(df: Any, original_top1: float, path: Path) -> None:
    plt = pyplot()
    granularities = list(dict.fromkeys(df["granularity"]))
    fig, axes = plt.subplots(1, len(granularities), figsize=(5.2 * len(granularities), 3.8), squeeze=False)
    for ax, granularity in zip(axes[0], granularities):
        block = df[df["granularity"] == granularity]
        for method, (colour, style) in METHOD_STYLE.items():
            line = block[block["method"] == method].sort_values("sparsity")
            if len(line):
                ax.plot(line["sparsity"], line["top1"], color=colour, ls=style, marker="o", ms=3, label=method)
        ax.axhline(original_top1, color="black", lw=0.8, ls=":", label="original")
        ax.set_title(f"{granularity} pruning (per layer, no fine-tune)")
        ax.set_xlabel("sparsity of the represented convs")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _clip(values: torch.Tensor) -> float:
    """Colour limit at the 99th percentile: a few near-zero kernels have huge relative error."""
    finite = values[torch.isfinite(values)].reshape(-1)
    return float(torch.quantile(finite.float(), 0.99)) if finite.numel() else 1.0


def plot_layer_errors(e: LayerErrors, path: Path) -> None:
    """Absolute and relative per-kernel error (filter x channel) and the per-filter relative error."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 1, 0.35]})
    for ax, values, title in ((axes[0], e.kernel_abs, "mean |w - ŵ| per kernel"),
                              (axes[1], e.kernel_rel, "‖w - ŵ‖ / ‖w‖ per kernel")):
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=_clip(values),
                          interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("input channel")
        ax.set_ylabel("filter")
        fig.colorbar(image, ax=ax, fraction=0.046)
    filters = torch.arange(len(e.filter_rel))
    axes[2].barh(filters.numpy(), e.filter_rel.numpy(), color="tab:blue")
    axes[2].invert_yaxis()
    axes[2].set_title("per filter (relative)", fontsize=9)
    axes[2].set_xlabel("‖W_f - Ŵ_f‖ / ‖W_f‖")
    fig.suptitle(f"{e.layer.name} {tuple(e.layer.shape)}", fontsize=10)
    save_figure(fig, path)


def plot_error_overview(errors: list[LayerErrors], path: Path) -> None:
    plt = pyplot()
    cols = min(6, len(errors))
    rows = -(-len(errors) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, errors):
        ax.axis("on")
        ax.imshow(e.kernel_rel.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=_clip(e.kernel_rel),
                  interpolation="nearest")
        ax.set_title(f"{e.layer.name}\nmean rel {float(e.kernel_rel.mean()):.3f}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("relative reconstruction error per kernel (rows: filters, columns: input channels)", fontsize=9)
    save_figure(fig, path)


def kernel_layer_index(errors: list[LayerErrors], name: str | None) -> int:
    """The requested layer, else the middle one of the layers with k x k kernels (k > 1)."""
    if name is not None:
        for i, e in enumerate(errors):
            if e.layer.name == name:
                return i
        raise NernError(f"--kernel-layer {name!r} is not a represented layer; choose one of "
                        f"{', '.join(e.layer.name for e in errors)}")
    spatial = [i for i, e in enumerate(errors) if e.layer.kernel_size > 1] or list(range(len(errors)))
    return spatial[len(spatial) // 2]


def plot_kernels(originals: list[torch.Tensor], reconstructed: list[torch.Tensor], errors: list[LayerErrors],
                 path: Path, opts: ImportanceOptions) -> None:
    """Original and reconstructed kernels of the best- and worst-reconstructed filters of one layer."""
    plt = pyplot()
    index = kernel_layer_index(errors, opts.kernel_layer)
    e = errors[index]
    w, w_hat = originals[index].detach().float().cpu(), reconstructed[index].detach().float().cpu()
    order = torch.argsort(e.filter_rel)
    count = min(opts.kernel_filters, len(order) // 2 or 1)
    filters = list(dict.fromkeys(order[:count].tolist() + order[-count:].tolist()))
    channels = min(opts.kernel_channels, w.shape[1])
    fig, axes = plt.subplots(2 * len(filters), channels, figsize=(1.3 * channels + 1.6, 1.35 * 2 * len(filters)),
                             squeeze=False)
    for r, f in enumerate(filters):
        limit = float(w[f, :channels].abs().max()) or 1.0
        for c in range(channels):
            for k, (source, name) in enumerate(((w, "original"), (w_hat, "NeRN"))):
                ax = axes[2 * r + k, c]
                ax.imshow(source[f, c].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    label = f"f{f} {name}" + (f"\nrel {float(e.filter_rel[f]):.2f}" if k == 1 else "")
                    ax.set_ylabel(label, fontsize=7)
                if r == 0 and k == 0:
                    ax.set_title(f"ch {c}", fontsize=7)
    fig.suptitle(f"{e.layer.name}: best and worst reconstructed filters", fontsize=9)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# CLI


def cmd_importance(args: argparse.Namespace) -> None:
    opts = ImportanceOptions(comma_floats(args.sparsities, "--sparsities"), comma_names(args.methods),
                             comma_names(args.granularities), args.random_seeds, args.kernel_layer)
    check_options(opts)
    cfg, model, predictor, rep, splits = load_fitted(args)
    reconstructed = [w.float() for w in decode_weights(predictor, rep, cfg)]
    out = Path(args.out)
    params = {**flatten(to_dict(cfg)), "importance.sparsities": args.sparsities, "importance.methods": args.methods,
              "importance.granularities": args.granularities, "importance.random_seeds": args.random_seeds,
              "predictor_file": args.predictor}
    with stage_run(args, "importance", params, NON_RESULT_KEYS, data=cfg.data) as tracker:
        rows, metrics = run_importance(model, rep, reconstructed, cfg, splits, out, opts)
        log_outputs(tracker, out, {k: v for k, v in metrics.items() if k != "layers"},
                     [CSV_FILE, MD_FILE, METRICS_FILE, PRUNING_FIGURE, OVERVIEW_FIGURE, KERNELS_FIGURE])
    deltas = {k: v for k, v in metrics.items() if k.startswith("nern_minus_magnitude/")}
    shown = ", ".join(f"{k.removeprefix('nern_minus_magnitude/')}: {v:+.2f}" for k, v in deltas.items())
    print(f"[importance] NeRN-error minus magnitude pruning top-1 ({shown}) -> {out}")


def register_cli(subparsers: Any, name: str) -> None:
    p = subparsers.add_parser(name, help="NeRN reconstruction error maps; prune the original by NeRN error vs "
                                         "magnitude vs random")
    add_stage_arguments(p, f"output directory ({CSV_FILE}, {MD_FILE}, {METRICS_FILE}, figures)")
    p.add_argument("--model", required=True, help="the original network's checkpoint the predictor was fitted to")
    p.add_argument("--predictor", required=True, help="predictor.safetensors from `nern fit`")
    p.add_argument("--sparsities", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                   help="per-layer pruning fractions of the represented convs, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--granularities", default=",".join(GRANULARITIES), help="unstructured (weights), kernel (k x k)")
    p.add_argument("--random-seeds", type=int, default=1, help="random-pruning repetitions to average")
    p.add_argument("--kernel-layer", help="layer of the kernels figure (default: the middle k x k layer)")
    p.set_defaults(func=cmd_importance)

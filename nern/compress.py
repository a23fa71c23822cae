"""Meta-compression of a fitted NeRN (METHOD.md 9), measured in bytes on disk against codecs on the original.

The paper prunes the predictor and reports parameter counts. A parameter count hides what a file needs besides
the predictor (permutations, per-layer scales, BatchNorm, the FC layer, unrepresented convs) and what a
general-purpose compressor would do to the original network anyway. So every variant here is a real file
(`nern.codec`'s container: lossless(safetensors(encoded tensors, JSON metadata))):

- a NeRN file holds the predictor (pruned and/or quantised), the permutations, the per-layer scales and every
  tensor NeRN does not represent;
- the same tensor codecs write the baselines (the ORIGINAL network at fp32/fp16/intN, magnitude-pruned at the
  same sparsities), so both sides pay for the same things under the same lossless compressor (zstd or lzma).

Every accuracy in the table is measured on a network rebuilt from the file READ BACK from disk, starting from
a freshly initialised skeleton, so nothing of the original network can leak into a NeRN row.

The predictor is pruned by weight magnitude (Linear weights, not biases; `nern.pruning`), globally or per
layer, then optionally fine-tuned with the fit's own losses (`nern.fit.Fitter`) with the mask held fixed
(gradients of pruned weights are zeroed and the mask is re-applied after every step), on task images or on
noise (data-free), and finally quantised.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nern.artifacts import atomic_path, write_json
from nern.codec import COMPRESSORS, FILE_SUFFIX, PRECISIONS, Encoded, read_container, write_container
from nern.config import EmbeddingConfig, FitConfig, ModelConfig, flatten, to_dict
from nern.errors import NernError
from nern.evaluate import top_k_accuracy
from nern.fit import NON_RESULT_KEYS, Fitter, decode_weights, prepare
from nern.layers import ConvLayer, conv_weights
from nern.losses import reconstruction_loss
from nern.models import build_model
from nern.plots import pyplot, save_figure
from nern.predictor import Predictor
from nern.pruning import (
    SCOPES,
    apply_masks,
    magnitude_masks,
    mask_sparsity,
    prunable_network_weights,
    pruned_predictor,
)
from nern.reconstruct import Representation
from nern.runs import add_stage_arguments, comma_floats, comma_names, load_fitted, log_outputs, stage_run
from nern.table_format import to_markdown

FINETUNES = ("none", "data", "data-free")


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning a pruned predictor with the fit's losses


def finetune_config(cfg: FitConfig, iterations: int, lr: float, data_free: bool) -> FitConfig:
    """The fit's config for a short fine-tune: same losses (distillation on from step 0), cosine from `lr`."""
    return dataclasses.replace(
        cfg, iterations=iterations, epochs=None, data_free=data_free, eval_every=0, checkpoint_every=0,
        rec_only_iterations=0, compile=False, progress=False, select_best_on_val=False,
        loss=dataclasses.replace(cfg.loss, warmup=0),
        optim=dataclasses.replace(cfg.optim, lr=lr, warmup_iterations=0, min_lr=min(cfg.optim.min_lr, lr)),
    )


def finetune_pruned(predictor: Predictor, masks: dict[str, torch.Tensor], cfg: FitConfig, model: nn.Module,
                    rep: Representation, splits: Any, iterations: int, lr: float, data_free: bool,
                    out_dir: Path, progress: bool = False) -> Predictor:
    """Fine-tune with `nern.fit.Fitter`, keeping pruned weights at exactly zero; returns a fresh predictor."""
    ft_cfg = finetune_config(cfg, iterations, lr, data_free)
    setup = prepare(ft_cfg, model=model, permutation=rep.positions, splits=splits)
    setup.rep.scales = rep.scales  # the file's scales, not a recomputation
    fitter = Fitter(ft_cfg, setup, out_dir)
    fitter.predictor.load_state_dict(predictor.state_dict())
    params = dict(fitter.predictor.named_parameters())
    device_masks = {name: m.to(fitter.device, params[name].dtype) for name, m in masks.items()}
    hooks = [params[name].register_hook(lambda g, m=m: g * m) for name, m in device_masks.items()]
    apply_masks(fitter.predictor, device_masks)
    mode = "data-free" if data_free else "data"
    for _ in tqdm(range(iterations), desc=f"fine-tune ({mode})", disable=not progress, leave=False):
        fitter.step()
        apply_masks(fitter.predictor, device_masks)  # the optimiser's weight decay / lookahead must not revive them
    for hook in hooks:
        hook.remove()
    tuned = copy.deepcopy(predictor).cpu()
    tuned.load_state_dict({k: v.detach().cpu() for k, v in fitter.predictor.state_dict().items()})
    return tuned.eval()


# ---------------------------------------------------------------------------------------------------------
# NeRN files and original-network files


def _model_meta(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "nern_config", None)
    if cfg is None:
        return None
    stored = dataclasses.asdict(cfg)
    stored["checkpoint"] = None  # the file must not need the original checkpoint
    return stored


def _position_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 1 << 15 else torch.int32


def encode_nern(predictor: Predictor, masks: dict[str, torch.Tensor], precision: str, rep: Representation,
                embedding: EmbeddingConfig, model: nn.Module) -> Encoded:
    """Predictor (pruned and/or quantised), permutations, per-layer scales and every tensor NeRN does not represent."""
    linears = [m for m in predictor if isinstance(m, nn.Linear)]
    enc = Encoded.empty("nern", {
        "model": _model_meta(model),
        "embedding": {"levels": embedding.levels, "base": embedding.base},
        "predictor": {"in_dim": linears[0].in_features, "hidden": linears[0].out_features, "depth": len(linears),
                      "kernel_size": rep.kernel_size},
        "layers": [{"name": layer.name, "shape": list(layer.shape)} for layer in rep.layers],
        "identity_permutations": [],
    })
    for name, t in predictor.state_dict().items():
        enc.add(f"predictor.{name}", t, precision, "predictor", masks.get(name))
    for i, (layer, pos) in enumerate(zip(rep.layers, rep.positions)):
        if torch.equal(pos.long(), torch.arange(layer.num_kernels)):
            enc.meta["identity_permutations"].append(i)  # the identity costs nothing to store
        else:
            enc.add(f"permutation.{i}", pos.to(_position_dtype(layer.num_kernels)), "fp32", "permutation")
    if rep.scales is not None:
        enc.add("scales", rep.scales.float(), "fp32", "scales")
    represented = {layer.param for layer in rep.layers}
    for name, t in model.state_dict().items():
        if name not in represented:
            enc.add(f"verbatim.{name}", t, precision, "verbatim")
    return enc


def encode_network(model: nn.Module, masks: dict[str, torch.Tensor], precision: str) -> Encoded:
    """The original network's whole state dict (the baselines), pruned entries masked out."""
    enc = Encoded.empty("network", {"model": _model_meta(model)})
    for name, t in model.state_dict().items():
        part = "weights" if t.is_floating_point() and t.dim() >= 2 else "other"
        enc.add(f"state.{name}", t, precision, part, masks.get(name))
    return enc


def _skeleton(meta: dict[str, Any], skeleton: nn.Module | None, path: Path) -> nn.Module:
    """A freshly built network to load the file into (its initial values are all overwritten)."""
    if skeleton is not None:
        return skeleton
    if meta.get("model") is None:
        raise NernError(f"{path} records no model config (a user-built network); pass the network as `skeleton`")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return build_model(ModelConfig(**{k: v for k, v in meta["model"].items() if k in names}))


def _load_strict(network: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    expected = set(network.state_dict())
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise NernError(f"{path} does not fit this network (missing {missing}, unexpected {extra}); "
                        "pass the architecture the file was written for")
    network.load_state_dict(state, strict=True)
    return network.eval()


def decode_predictor(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Predictor:
    p = meta["predictor"]
    predictor = Predictor(p["in_dim"], p["hidden"], p["depth"], p["kernel_size"])
    state = {k.removeprefix("predictor."): v for k, v in tensors.items() if k.startswith("predictor.")}
    predictor.load_state_dict(state)
    return predictor.eval()


def decode_representation(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Representation:
    layers = [ConvLayer(d["name"], tuple(d["shape"])) for d in meta["layers"]]
    identity = set(meta["identity_permutations"])
    positions = [torch.arange(layer.num_kernels) if i in identity else tensors[f"permutation.{i}"].long()
                 for i, layer in enumerate(layers)]
    return Representation(layers, positions, meta["predictor"]["kernel_size"], tensors.get("scales"))


def read_network(path: str | Path, skeleton: nn.Module | None = None) -> nn.Module:
    """Rebuild a network from a NeRN or original-network file; uses nothing but the file (and the architecture)."""
    path = Path(path)
    tensors, meta = read_container(path)
    network = _skeleton(meta, skeleton, path)
    if meta["kind"] == "network":
        state = {k.removeprefix("state."): v for k, v in tensors.items()}
        return _load_strict(network, state, path)
    predictor = decode_predictor(tensors, meta)
    rep = decode_representation(tensors, meta)
    state = {k.removeprefix("verbatim."): v for k, v in tensors.items() if k.startswith("verbatim.")}
    embedding = EmbeddingConfig(levels=meta["embedding"]["levels"], base=meta["embedding"]["base"])
    with torch.no_grad():
        weights = decode_weights(predictor, rep, FitConfig(embedding=embedding))
    for layer, w in zip(rep.layers, weights):
        state[layer.param] = w
    return _load_strict(network, state, path)


# ---------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class CompressOptions:
    sparsities: list[float]
    scopes: list[str]
    finetunes: list[str]
    precisions: list[str]
    finetune_iterations: int | None = None  # None: 5% of the fit's iterations, within [10, 2000]
    finetune_lr: float | None = None  # None: a fifth of the fit's peak learning rate
    compressor: str = "zstd"
    keep_files: bool = True


def check_options(opts: CompressOptions) -> None:
    for s in opts.sparsities:
        if not 0.0 <= s < 1.0:
            raise NernError(f"sparsity {s} is outside [0, 1); pass fractions such as --sparsities 0,0.5,0.7,0.9")
    for name, values, allowed in (("scope", opts.scopes, SCOPES), ("fine-tune", opts.finetunes, FINETUNES),
                                  ("precision", opts.precisions, PRECISIONS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise NernError(f"{name} {bad[0] if bad else '(none)'!r} is not allowed; choose from {', '.join(allowed)}")
    if opts.compressor not in COMPRESSORS:
        raise NernError(f"unknown compressor {opts.compressor!r}; choose one of {', '.join(COMPRESSORS)}")


@dataclass
class Bench:
    """Where and how every variant is measured: its file is written, read back and evaluated."""

    files: Path
    opts: CompressOptions
    splits: Any
    cfg: FitConfig
    originals: list[torch.Tensor]
    layers: list[ConvLayer]
    bar: Any

    def measure(self, enc: Encoded, row: dict[str, Any]) -> dict[str, Any]:
        """Write the file, read it back into a fresh network, measure accuracy there."""
        path = self.files / f"{_label(row)}{FILE_SUFFIX}"
        sizes = write_container(path, enc, self.opts.compressor)
        network = read_network(path)
        rebuilt = conv_weights(network, self.layers)
        rmse = reconstruction_loss([w.float() for w in rebuilt], [o.float() for o in self.originals])
        row = {**row, "file": path.name, **sizes, "top1": _accuracy(network, self.splits, self.cfg),
               "rec_rmse": float(rmse)}
        if not self.opts.keep_files:
            path.unlink()
        self.bar.update(1)
        return row


def default_finetune_iterations(cfg: FitConfig, splits: Any) -> int:
    fit_iterations = cfg.iterations
    if fit_iterations is None:
        fit_iterations = math.ceil((cfg.epochs or 1) * max(1, len(splits.train) // cfg.data.batch_size))
    return int(min(2000, max(10, round(0.05 * fit_iterations))))


def _accuracy(network: nn.Module, splits: Any, cfg: FitConfig) -> float:
    from nern import data as data_mod

    network = network.to(cfg.device).eval()
    batches = data_mod.eval_batches(splits.test, cfg.data.eval_batch_size)
    return top_k_accuracy(network, batches, (1,), cfg.device)["top1"]


def _label(row: dict[str, Any]) -> str:
    scope = f"-{row['scope']}" if row["sparsity"] else ""
    ft = f"-ft-{row['finetune']}" if row["finetune"] != "none" else ""
    return f"{row['representation']}-s{row['sparsity']:g}{scope}{ft}-{row['precision']}"


def nern_variants(opts: CompressOptions) -> list[tuple[float, str, str]]:
    """(sparsity, scope, fine-tune) of every predictor to write; sparsity 0 needs neither scope nor fine-tune."""
    variants = []
    for s in sorted(set(opts.sparsities)):
        if s == 0:
            variants.append((0.0, "-", "none"))
            continue
        variants += [(s, scope, ft) for scope in opts.scopes for ft in opts.finetunes]
    return variants


def baseline_variants(opts: CompressOptions) -> list[tuple[float, str]]:
    variants = []
    for s in sorted(set(opts.sparsities)):
        variants += [(0.0, "-")] if s == 0 else [(s, scope) for scope in opts.scopes]
    return variants


def run_compress(model: nn.Module, predictor: Predictor, rep: Representation, cfg: FitConfig, splits: Any,
                 out: str | Path, opts: CompressOptions) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every NeRN variant and baseline as a file, measured from the file read back; writes the table and figure."""
    check_options(opts)
    out = Path(out)
    start = time.perf_counter()
    originals = conv_weights(model, rep.layers)
    iterations = opts.finetune_iterations or default_finetune_iterations(cfg, splits)
    lr = opts.finetune_lr or cfg.optim.lr / 5
    original_top1 = _accuracy(model, splits, cfg)
    jobs = len(nern_variants(opts)) + len(baseline_variants(opts))
    bar = tqdm(total=jobs * len(opts.precisions), desc="compress", disable=not cfg.progress, dynamic_ncols=True)
    bench = Bench(out / "files", opts, splits, cfg, originals, rep.layers, bar)
    rows = nern_rows(bench, model, predictor, rep, iterations, lr, out) + baseline_rows(bench, model)
    bar.close()
    add_comparisons(rows, original_top1, opts)
    metrics = summary_metrics(rows, original_top1, opts, iterations, lr, time.perf_counter() - start)
    write_outputs(out, rows, metrics, cfg)
    return rows, metrics


def nern_rows(bench: Bench, model: nn.Module, predictor: Predictor, rep: Representation, iterations: int,
              lr: float, out: Path) -> list[dict[str, Any]]:
    """The predictor pruned, fine-tuned and quantised as each variant asks, each written as a NeRN file."""
    cfg, rows = bench.cfg, []
    for sparsity, scope, ft in nern_variants(bench.opts):
        pruned, masks = pruned_predictor(predictor, sparsity, scope if sparsity else "global")
        if ft != "none":
            pruned = finetune_pruned(pruned, masks, cfg, model, rep, bench.splits, iterations, lr, ft == "data-free",
                                     out, cfg.progress)
        for precision in bench.opts.precisions:
            base = {"representation": "nern", "sparsity": sparsity, "scope": scope, "finetune": ft,
                    "precision": precision, "achieved_sparsity": mask_sparsity(masks) if masks else 0.0,
                    "finetune_iterations": iterations if ft != "none" else 0}
            rows.append(bench.measure(encode_nern(pruned, masks, precision, rep, cfg.embedding, model), base))
    return rows


def baseline_rows(bench: Bench, model: nn.Module) -> list[dict[str, Any]]:
    """The original network magnitude-pruned and quantised the same ways, each written as a network file."""
    cpu_model, rows = copy.deepcopy(model).cpu(), []
    for sparsity, scope in baseline_variants(bench.opts):
        weights = prunable_network_weights(cpu_model)
        masks = magnitude_masks(weights, sparsity, scope) if sparsity else {}
        for precision in bench.opts.precisions:
            base = {"representation": "original", "sparsity": sparsity, "scope": scope, "finetune": "none",
                    "precision": precision, "achieved_sparsity": mask_sparsity(masks) if masks else 0.0,
                    "finetune_iterations": 0}
            pruned = copy.deepcopy(cpu_model)
            apply_masks(pruned, masks)
            rows.append(bench.measure(encode_network(pruned, masks, precision), base))
    return rows


def add_comparisons(rows: list[dict[str, Any]], original_top1: float, opts: CompressOptions) -> None:
    """Each row's label, its size against the unpruned fp32 original, and its accuracy change."""
    fp32 = next(r["bytes"] for r in rows if r["representation"] == "original" and r["sparsity"] == 0
                and r["precision"] == "fp32") if 0.0 in opts.sparsities and "fp32" in opts.precisions else None
    for row in rows:
        row["label"] = _label(row)
        row["ratio_vs_original_fp32"] = row["bytes"] / fp32 if fp32 else None
        row["delta_top1"] = row["top1"] - original_top1


def summary_metrics(rows: list[dict[str, Any]], original_top1: float, opts: CompressOptions, iterations: int,
                    lr: float, seconds: float) -> dict[str, Any]:
    """Scalars for metrics.json and MLflow: each unpruned file's bytes and accuracy, per representation."""
    metrics: dict[str, Any] = {"original_top1": original_top1, "compressor": opts.compressor,
                               "finetune_iterations": iterations, "finetune_lr": lr, "variants": len(rows),
                               "wall_seconds": seconds}
    for row in rows:
        if row["sparsity"] == 0:
            key = f"{row['representation']}_{row['precision']}"
            metrics[f"{key}_bytes"] = row["bytes"]
            metrics[f"{key}_top1"] = row["top1"]
    metrics["frontier"] = {rep: pareto_front([r for r in rows if r["representation"] == rep])
                           for rep in ("nern", "original")}
    return metrics


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats in both bytes and accuracy, smallest first."""
    front, best = [], -math.inf
    for row in sorted(rows, key=lambda r: (r["bytes"], -r["top1"])):
        if row["top1"] > best:
            front.append({"label": row["label"], "bytes": row["bytes"], "top1": row["top1"]})
            best = row["top1"]
    return front


# ---------------------------------------------------------------------------------------------------------
# Table and figure

TABLE_COLUMNS = {"representation": "representation", "sparsity": "sparsity", "scope": "scope",
                 "finetune": "fine-tune", "precision": "precision", "bytes": "bytes on disk",
                 "ratio_vs_original_fp32": "ratio vs original fp32", "top1": "top-1", "delta_top1": "Δ top-1",
                 "predictor_bytes": "predictor bytes", "verbatim_bytes": "verbatim bytes",
                 "permutation_bytes": "permutation bytes", "weights_bytes": "weights bytes"}
CSV_FILE, MD_FILE, FIGURE_FILE = "compression.csv", "compression.md", "accuracy_vs_bytes.png"
METRICS_FILE = "metrics.json"


def write_outputs(out: Path, rows: list[dict[str, Any]], metrics: dict[str, Any], cfg: FitConfig) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    front = ["label", "representation", "sparsity", "scope", "finetune", "precision", "bytes", "top1"]
    df = df[front + [c for c in df.columns if c not in front]]
    with atomic_path(out / CSV_FILE) as tmp:
        df.to_csv(tmp, index=False)
    shown = df[[c for c in TABLE_COLUMNS if c in df.columns]].rename(columns=TABLE_COLUMNS)
    caption = (f"**Meta-compression: bytes on disk ({metrics['compressor']} on top of every file) and test top-1 "
               f"measured on the network rebuilt from the file read back. Original network: "
               f"{metrics['original_top1']:.2f}%. Fine-tunes: {metrics['finetune_iterations']} iterations.**\n\n")
    with atomic_path(out / MD_FILE) as tmp:
        tmp.write_text(caption + to_markdown(shown))
    plot_accuracy_vs_bytes(rows, metrics["original_top1"], out / FIGURE_FILE, metrics["compressor"])
    write_json(out / METRICS_FILE, metrics)  # last: its presence means the stage finished


FAMILY_STYLE = {("nern", "none"): ("tab:blue", "NeRN"), ("nern", "data"): ("tab:green", "NeRN + fine-tune"),
                ("nern", "data-free"): ("tab:olive", "NeRN + data-free fine-tune"),
                ("original", "none"): ("tab:red", "original network")}
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "int6": "D", "int4": "v"}


def plot_accuracy_vs_bytes(rows: list[dict[str, Any]], original_top1: float, path: Path, compressor: str) -> None:
    """All variants as points (colour: family, marker: precision), each family's Pareto front as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (rep, ft), (colour, name) in FAMILY_STYLE.items():
        family = [r for r in rows if r["representation"] == rep and r["finetune"] == ft]
        if not family:
            continue
        for precision, marker in PRECISION_MARKERS.items():
            pts = [r for r in family if r["precision"] == precision]
            if pts:
                ax.scatter([r["bytes"] for r in pts], [r["top1"] for r in pts], c=colour, marker=marker, s=28,
                           alpha=0.75, edgecolors="none")
        front = pareto_front(family)
        ax.plot([r["bytes"] for r in front], [r["top1"] for r in front], color=colour, label=name, lw=1.2)
    for precision, marker in PRECISION_MARKERS.items():
        if any(r["precision"] == precision for r in rows):
            ax.scatter([], [], c="grey", marker=marker, label=precision)
    ax.axhline(original_top1, color="black", ls=":", lw=1, label=f"original {original_top1:.2f}%")
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes on disk (whole file, {compressor})")
    ax.set_ylabel("test top-1 (%) of the network read back")
    ax.set_title("Accuracy vs bytes on disk: NeRN variants and codecs on the original")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------------------
# CLI


def cmd_compress(args: argparse.Namespace) -> None:
    opts = CompressOptions(comma_floats(args.sparsities, "--sparsities"), comma_names(args.scopes),
                           comma_names(args.finetune), comma_names(args.precisions), args.finetune_iterations,
                           args.finetune_lr, args.compressor, args.keep_files == "all")
    check_options(opts)
    cfg, model, predictor, rep, splits = load_fitted(args)
    out = Path(args.out)
    options = {f"compress.{k}": v for k, v in dataclasses.asdict(opts).items()}
    params = {**flatten(to_dict(cfg)), **options, "predictor_file": args.predictor}
    with stage_run(args, "compress", params, NON_RESULT_KEYS, data=cfg.data) as tracker:
        rows, metrics = run_compress(model, predictor, rep, cfg, splits, out, opts)
        log_outputs(tracker, out, {k: v for k, v in metrics.items() if k != "frontier"},
                     [CSV_FILE, MD_FILE, FIGURE_FILE, METRICS_FILE])
    nern_best = metrics.get("nern_int8_bytes"), metrics.get("nern_int8_top1")
    print(f"[compress] {len(rows)} files measured; original {metrics['original_top1']:.2f}%"
          + (f", NeRN int8 {nern_best[0]:,} B at {nern_best[1]:.2f}%" if nern_best[0] else "") + f" -> {out}")


def register_cli(subparsers: Any, name: str) -> None:
    p = subparsers.add_parser(name, help="prune/quantise a fitted NeRN into real files; accuracy vs bytes on disk")
    add_stage_arguments(p, f"output directory ({CSV_FILE}, {MD_FILE}, {FIGURE_FILE}, {METRICS_FILE}, files/)")
    p.add_argument("--model", required=True, help="the original network's checkpoint the predictor was fitted to")
    p.add_argument("--predictor", required=True, help="predictor.safetensors from `nern fit`")
    p.add_argument("--sparsities", default="0,0.5,0.7,0.9", help="pruning fractions of the predictor's (and, for "
                   "the baseline, the original's) weights, comma-separated")
    p.add_argument("--scopes", default="global", help="magnitude-pruning scopes: global and/or layer (per-layer)")
    p.add_argument("--finetune", default="none,data,data-free",
                   help="after pruning: none, data (task images) and/or data-free (noise) fine-tunes")
    p.add_argument("--finetune-iterations", type=int, help="fine-tune length (default: 5%% of the fit's, 10..2000)")
    p.add_argument("--finetune-lr", type=float, help="fine-tune peak learning rate (default: the fit's / 5)")
    p.add_argument("--precisions", default="fp32,fp16,int8,int4", help=f"from {', '.join(PRECISIONS)}")
    p.add_argument("--compressor", default="zstd", choices=list(COMPRESSORS), help="lossless codec on every file")
    p.add_argument("--keep-files", default="all", choices=["all", "none"],
                   help="keep the measured files under OUT/files (none: delete each after measuring)")
    p.set_defaults(func=cmd_compress)

"""The paper's tables and figures, aggregated from run outputs only: `nern tables`.

The pipeline writes a manifest (which run fills which row of which table, from the preset's config); every
number here is read from the runs' own files: `metrics.json`, `curves.csv`, and the resolved config stored
in `predictor.safetensors`. Published numbers (config/published.yaml) are shown beside ours as references,
in columns marked `paper`, never mixed into ours.

Tables (each as CSV, Markdown and LaTeX): `main` (per task and network: original accuracy and, per
permutation mode and predictor size, the reconstructed accuracy, predictor size and size ratio),
`regularisation`, `ablation_<group>` and `data_free`, and `rate_distortion` where fits were compressed (every
file of every `nern compress` job with its fit, the original's codecs beside them, the Pareto front marked).
Figures: reconstructed accuracy against predictor size per permutation mode, training curves per network, and
accuracy against bytes on disk per compressed network.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from nern.artifacts import atomic_path, read_json, read_metadata
from nern.config import GRID_PERMUTATIONS, NETWORK_PERMUTATIONS, flatten, read_yaml
from nern.errors import NernError
from nern.compress import CSV_FILE as COMPRESSION_CSV
from nern.compress import PRECISION_MARKERS, marker_key
from nern.grid import Manifest, seed_tag
from nern.measure import pareto_front
from nern.plots import pyplot, save_figure
from nern.table_format import MISSING_MD, format_cell, formatted, to_markdown  # noqa: F401 (re-exported)
from nern.table_format import is_missing as _is_missing
from nern.table_format import is_numeric as _numeric

PERMUTATION_ORDER = GRID_PERMUTATIONS
PERMUTATION_COLOURS = {"none": "tab:blue", "infilter": "tab:orange", "crossfilter": "tab:green",
                       "symmetry": "tab:purple"}
PRESET_STYLES = ("-", "--", ":", "-.")
MISSING_TEX = "--"

# -- inputs ------------------------------------------------------------------------------------------------


def read_yaml_file(path: str | Path, what: str) -> dict[str, Any]:
    return read_yaml(path, what, fix="run the pipeline (snakemake) that writes it")


def load_manifest(path: str | Path) -> Manifest:
    """The manifest's schema is nern.grid's, which writes it: a missing or unknown key is a user error."""
    return Manifest.from_dict(read_yaml_file(path, "manifest"), f"manifest {path}")


def load_published(path: str | Path | None) -> dict[str, Any]:
    """Published reference numbers by network key ({} without a file)."""
    if path is None:
        return {}
    return read_yaml_file(path, "published-numbers file").get("networks", {})


def run_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise NernError(f"{path} not found: the fit did not finish; rerun the pipeline to complete it")
    return read_json(path)


def resolved_config(run_dir: str | Path) -> dict[str, Any]:
    """The flattened FitConfig a fit actually ran with (stored in its predictor file), {} if unavailable."""
    path = Path(run_dir) / "predictor.safetensors"
    if not path.is_file():
        return {}
    return flatten(read_metadata(path).get("config", {}))


def fit_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """The table columns one fit's metrics.json fills."""
    return {
        "original_top1": metrics.get("original_top1"),
        "reconstructed_top1": metrics.get("reconstructed_top1"),
        "predictor_params": metrics.get("predictor_params"),
        "size_ratio": metrics.get("size_ratio"),
        "rec_rmse": metrics.get("rec_rmse"),
        "agreement": metrics.get("agreement"),
        "kl_to_original": metrics.get("kl_to_original"),
        "iterations": metrics.get("distillation_iterations", metrics.get("iterations")),  # the data budget
    }


# The columns whose spread over a row's seeds the tables show (as "<column> sd").
SPREAD_COLUMNS = ("reconstructed_top1", "agreement", "kl_to_original")


def seed_values(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """A row over its seeds' fits: the mean of each column, the sample sd of SPREAD_COLUMNS (None for one seed),
    and how many seeds it aggregates."""
    out: dict[str, Any] = {"seeds": len(per_seed)}
    for key in per_seed[0]:
        values = [v[key] for v in per_seed if v[key] is not None]
        out[key] = statistics.fmean(values) if values else None
    for key in SPREAD_COLUMNS:
        values = [v[key] for v in per_seed if v[key] is not None]
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def load_rows(manifest: Manifest) -> pd.DataFrame:
    """One frame row per manifest row (its columns are nern.grid.Row's fields), joined with the metrics of the
    runs that fill it: one fit's, or the mean (and sd) over the fits of its seeds."""
    records = []
    cache: dict[str, dict[str, Any]] = {}
    for row in manifest.rows:
        for run_dir in row.fit_dirs:
            if run_dir not in cache:
                cache[run_dir] = fit_values(run_metrics(run_dir))
        records.append({**dataclasses.asdict(row), **seed_values([cache[run_dir] for run_dir in row.fit_dirs])})
    if not records:
        raise NernError("the manifest lists no runs; add a grid to the preset's networks")
    return pd.DataFrame.from_records(records)


# -- tables ------------------------------------------------------------------------------------------------


def _published_value(published: dict[str, Any], key: str | None, *path: Any) -> float | None:
    node: Any = published.get(key) if key else None
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part, node.get(str(part)))
    return float(node) if isinstance(node, (int, float)) else None


def _sorted(df: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    order = {name: i for i, name in enumerate(PERMUTATION_ORDER)}
    network_order = {name: i for i, name in enumerate(dict.fromkeys(df["network"]))}
    keyed = df.assign(_net=df["network"].map(network_order), _perm=df["permutation"].map(order),
                      _s=df["smoothness"].fillna(-1.0))
    return keyed.sort_values(["_net", "_s", *extra], kind="stable").drop(columns=["_net", "_perm", "_s"])


def main_table(rows: pd.DataFrame, published: dict[str, Any]) -> pd.DataFrame:
    """Per task and network: original accuracy; per permutation and h: accuracy, predictor size and ratio."""
    main = _sorted(rows[rows["group"] == "main"], ["_perm", "hidden"])
    table = pd.DataFrame({
        "task": main["task"],
        "model": main["arch"],
        "smoothness": main["smoothness"],
        "original top-1": main["original_top1"],
        "permutation": main["permutation"],
        "h": main["hidden"],
        "fit preset": main["fit_preset"],
        "predictor params": main["predictor_params"],
        "size ratio": main["size_ratio"],
        "top-1": main["reconstructed_top1"],
        "Δ top-1": main["reconstructed_top1"] - main["original_top1"],
        **fidelity_columns(main),
    })
    if main["published"].notna().any():
        keys = main["published"].tolist()
        table["paper original top-1"] = [_published_value(published, k, "original_top1") for k in keys]
        table["paper top-1"] = [_published_value(published, k, "nern_top1", p, int(h))
                                for k, p, h in zip(keys, main["permutation"], main["hidden"])]
        # the paper's networks and data are its own (e.g. option-B ResNets on the original CIFAR-10): its gap to
        # its original is what compares with our Δ top-1, not its raw accuracy
        table["paper Δ top-1"] = [None if t is None or o is None else t - o
                                  for t, o in zip(table["paper top-1"], table["paper original top-1"])]
        table["paper size ratio"] = [_published_value(published, k, "size_ratio", int(h))
                                     for k, h in zip(keys, main["hidden"])]
    return table.reset_index(drop=True)


def fidelity_columns(rows: pd.DataFrame) -> dict[str, pd.Series]:
    """Beside Δ top-1: how often the reconstruction predicts what its original predicts on the test set, and how far
    its output distribution is from the original's (a reconstruction can match the accuracy while changing answers);
    where a row aggregates several seeds, their number and the sd of top-1 and agreement over them."""
    columns = {"agreement": rows["agreement"], "KL to original": rows["kl_to_original"]}
    if "seeds" in rows and (rows["seeds"] > 1).any():
        columns |= {"seeds": rows["seeds"], "top-1 sd": rows["reconstructed_top1_sd"],
                    "agreement sd": rows["agreement_sd"]}
    return columns


def regularisation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Originals pretrained with each smoothness factor, and NeRN fitted to them."""
    reg = _sorted(rows[rows["group"] == "regularisation"], ["_perm", "hidden"])
    return pd.DataFrame({
        "task": reg["task"],
        "model": reg["arch"],
        "smoothness": reg["smoothness"],
        "original top-1": reg["original_top1"],
        "permutation": reg["permutation"],
        "h": reg["hidden"],
        "top-1": reg["reconstructed_top1"],
        "Δ top-1": reg["reconstructed_top1"] - reg["original_top1"],
        **fidelity_columns(reg),
        "rec RMSE": reg["rec_rmse"],
    }).reset_index(drop=True)


def ablation_table(rows: pd.DataFrame, group: str,
                   config_of: Callable[[str], dict[str, Any]] = resolved_config) -> pd.DataFrame:
    """One row per variant at the reference point; the varied settings as each fit resolved them."""
    ab = rows[rows["group"] == group]
    varied = sorted({key for overrides in ab["overrides"] for key in (overrides or {})})
    table = pd.DataFrame({
        "task": ab["task"],
        "model": ab["arch"],
        "fit preset": ab["fit_preset"],
        "permutation": ab["permutation"],
        "h": ab["hidden"],
        "variant": ab["label"],
    })
    for key in varied:
        values = []
        for run_dir, overrides in zip(ab["dir"], ab["overrides"]):
            resolved = config_of(run_dir)
            values.append(resolved.get(key, (overrides or {}).get(key)))
        table[key] = [_cell(v) for v in values]
    table["original top-1"] = ab["original_top1"]
    table["top-1"] = ab["reconstructed_top1"]
    table["Δ top-1"] = ab["reconstructed_top1"] - ab["original_top1"]
    for column, values in fidelity_columns(ab).items():
        table[column] = values
    table["rec RMSE"] = ab["rec_rmse"]
    return table.reset_index(drop=True)


def _cell(value: Any) -> Any:
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def data_free_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Data-free fits beside the same fits with task images."""
    free = rows[rows["group"] == "data_free"]
    keys = ["network", "task", "arch", "fit_preset", "original", "permutation", "hidden"]
    out = []
    for key, part in free.groupby(keys, sort=False):
        by_label = {label: r for label, r in zip(part["label"], part.to_dict("records"))}
        data, noise = by_label.get("task data"), by_label.get("data-free")
        first = part.iloc[0]
        out.append({
            "task": first["task"], "model": first["arch"], "fit preset": first["fit_preset"],
            "permutation": first["permutation"], "h": first["hidden"],
            "original top-1": first["original_top1"],
            "top-1 (task data)": data["reconstructed_top1"] if data else None,
            "top-1 (data-free)": noise["reconstructed_top1"] if noise else None,
            "agreement (task data)": data["agreement"] if data else None,
            "agreement (data-free)": noise["agreement"] if noise else None,
        })
    table = pd.DataFrame(out)
    if not table.empty:
        table["Δ data-free"] = table["top-1 (data-free)"] - table["top-1 (task data)"]
    return table


def build_tables(rows: pd.DataFrame, published: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Every table the manifest asks for, in the manifest's order."""
    tables: dict[str, pd.DataFrame] = {}
    for group in dict.fromkeys(rows["group"]):
        if group == "main":
            tables[group] = main_table(rows, published)
        elif group == "regularisation":
            tables[group] = regularisation_table(rows)
        elif group.startswith("ablation_"):
            tables[group] = ablation_table(rows, group)
        elif group == "data_free":
            tables[group] = data_free_table(rows)
        else:
            raise NernError(f"manifest table group '{group}' is unknown; use main, regularisation, "
                            "ablation_<name> or data_free")
    return tables


# -- formatting --------------------------------------------------------------------------------------------


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$",
                "–": "--"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular inside a table float."""
    align = "".join("r" if _numeric(table, c) else "l" for c in table.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(tex_escape(str(c)) for c in table.columns) + r" \\", r"\midrule"]
    for row in formatted(table):
        lines.append(" & ".join(tex_escape(c) if c else MISSING_TEX for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_table(table: pd.DataFrame, directory: str | Path, name: str, caption: str) -> list[Path]:
    """`name`.csv (raw values), `name`.md and `name`.tex (formatted) in `directory`."""
    directory = Path(directory)
    paths = [directory / f"{name}.csv", directory / f"{name}.md", directory / f"{name}.tex"]
    with atomic_path(paths[0]) as tmp:
        table.to_csv(tmp, index=False)
    _write_text(paths[1], f"**{caption}**\n\n" + to_markdown(table))
    _write_text(paths[2], to_latex(table, caption))
    return paths


def table_caption(preset: str, name: str) -> str:
    if name == "main":
        return f"NeRN reconstruction accuracy by predictor size and permutation ({preset})"
    if name == "regularisation":
        return f"Smoothness regularisation of the original network ({preset})"
    if name == RATE_DISTORTION:
        return (f"Every file of every compressed fit: bytes on disk and test top-1 of the network read back, the "
                f"original network's codecs (NNCodec included) beside them; pareto marks the front ({preset})")
    if name == "data_free":
        return f"Data-free NeRN ({preset})"
    return f"Ablation: {name.removeprefix('ablation_').replace('_', ' ')} ({preset})"


# -- figures -----------------------------------------------------------------------------------------------


def plot_accuracy_vs_size(rows: pd.DataFrame, published: dict[str, Any], path: str | Path) -> None:
    """Per network: reconstructed top-1 against size ratio, one line per permutation mode and fit preset."""
    plt = pyplot()
    main = rows[rows["group"] == "main"]
    networks = list(dict.fromkeys(main["network"]))
    fig, axes = plt.subplots(1, len(networks), figsize=(5.2 * len(networks), 3.8), squeeze=False)
    for ax, network in zip(axes[0], networks):
        part = main[main["network"] == network]
        presets = list(dict.fromkeys(part["fit_preset"]))
        several_originals = part["original"].nunique() > 1
        for (preset, original, perm), line in part.groupby(["fit_preset", "original", "permutation"], sort=False):
            line = line.sort_values("size_ratio")
            label = f"{perm} ({preset}{', ' + original if several_originals else ''})"
            ax.plot(line["size_ratio"], line["reconstructed_top1"], marker="o", label=label,
                    color=PERMUTATION_COLOURS.get(perm), linestyle=PRESET_STYLES[presets.index(preset) % 4])
        ax.axhline(float(part["original_top1"].iloc[0]), color="grey", linestyle="--", linewidth=1,
                   label="original")
        _plot_published(ax, published, part["published"].iloc[0])
        ax.set_title(f"{part['task'].iloc[0]} {part['arch'].iloc[0]}")
        ax.set_xlabel("predictor size / represented weights")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _plot_published(ax: Any, published: dict[str, Any], key: str | None) -> None:
    entry = published.get(key) if key else None
    if not entry:
        return
    ratios = entry.get("size_ratio", {})
    for perm, points in (entry.get("nern_top1") or {}).items():
        xs = [ratios.get(h) for h in points]
        ys = list(points.values())
        keep = [(x, y) for x, y in zip(xs, ys) if x is not None]
        if keep:
            ax.scatter(*zip(*keep), marker="x", color=PERMUTATION_COLOURS.get(perm), label=f"{perm} (paper)")


def _read_curves(run_dir: str | Path) -> pd.DataFrame | None:
    path = Path(run_dir) / "curves.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path)


def accuracy_column(curves: pd.DataFrame) -> str | None:
    """The curve's accuracy column: validation when the fit had a split (a fit measures the test set only at its
    end), else test."""
    return next((c for c in ("eval_val_top1", "eval_test_top1") if c in curves and curves[c].notna().any()), None)


def plot_network_curves(rows: pd.DataFrame, network: str, path: str | Path) -> None:
    """Loss and accuracy (validation when measured during the fit) against iteration for a network's main-grid
    fits."""
    plt = pyplot()
    split = "test"
    part = rows[(rows["group"] == "main") & (rows["network"] == network)]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for row in part.to_dict("records"):
        curves = _read_curves(row["dir"])
        if curves is None:
            continue
        label = f"{row['fit_preset']} {row['permutation']} h={row['hidden']}"
        if row["smoothness"] not in (None, 0.0) and not _is_missing(row["smoothness"]):
            label += f" s={row['smoothness']:g}"
        if "loss" in curves and curves["loss"].notna().any():
            loss = curves[["iteration", "loss"]].dropna()
            ax_loss.plot(loss["iteration"], loss["loss"].clip(lower=1e-12), label=label, linewidth=1)
        column = accuracy_column(curves)
        if column is not None:
            acc = curves[["iteration", column]].dropna()
            ax_acc.plot(acc["iteration"], acc[column], marker="o", markersize=3, label=label)
            split = column.removeprefix("eval_").removesuffix("_top1")
    if not part.empty:
        if split == "test":  # the original's validation accuracy is not in the rows
            ax_acc.axhline(float(part["original_top1"].iloc[0]), color="grey", linestyle="--", linewidth=1,
                           label="original")
        fig.suptitle(f"{part['task'].iloc[0]} {part['arch'].iloc[0]}: NeRN training curves")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training loss")
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel(f"{split} top-1 (%)")
    ax_acc.set_title("reconstructed network")
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(fontsize=7)
    save_figure(fig, path)


# -- the rate-distortion sweep: every file of every compress job ---------------------------------------------

RATE_DISTORTION = "rate_distortion"
RATE_DISTORTION_COLUMNS = ["network", "fit", "representation", "precision", "sparsity", "finetune", "bytes",
                           "top1", "delta_top1", "pareto"]


def compression_csv(run_dir: str | Path) -> Path:
    """Where `nern compress` (rule compress) writes a fit's table."""
    return Path(run_dir) / "compress" / COMPRESSION_CSV


def _fit_name(row: Any, seed: int = 0) -> str:
    variant = "" if row.variant in ("", "default") else f"/{row.variant}"
    return f"{row.fit_preset}/{row.permutation}/h{row.hidden}{seed_tag(seed)}{variant}"


def rate_distortion_rows(manifest: Manifest) -> pd.DataFrame:
    """Every file the manifest's compressed fits measured, with the fit it came from; the original network's
    files (the same in every job of a network) once per network and permutation of the network itself. Empty
    when no fit was compressed."""
    frames, seen = [], set()
    for row, seed, run_dir in ((row, seed, d) for row in manifest.rows for seed, d in zip(row.seeds, row.fit_dirs)):
        path = compression_csv(run_dir)
        if run_dir in seen or not path.is_file():
            continue
        seen.add(run_dir)
        df = pd.read_csv(path)
        original = df["representation"] == "original"
        # a network permutation (symmetry) hands compress the permuted network: its own original rows
        df["fit"] = _fit_name(row, seed)
        df.loc[original, "fit"] = "original" + (f" ({row.permutation})" if row.permutation in NETWORK_PERMUTATIONS
                                                 else "")
        df["network"] = row.network
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=RATE_DISTORTION_COLUMNS)
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(["network", "fit", "label"], ignore_index=True)
    rows["pareto"] = False
    for _, part in rows.groupby("network", sort=False):
        rows.loc[pareto_index(part), "pareto"] = True
    return rows


def pareto_index(rows: pd.DataFrame) -> list[Any]:
    """Index of the rows no other row beats in both bytes and accuracy."""
    return [rows.index[i] for i in pareto_front(list(zip(rows["bytes"], rows["top1"])))]


def rate_distortion_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Smallest first per network, the columns a reader compares."""
    return rows.sort_values(["network", "bytes"])[RATE_DISTORTION_COLUMNS].reset_index(drop=True)


def plot_rate_distortion(rows: pd.DataFrame, path: str | Path) -> None:
    """One network: every file of every fit (colour: fit, marker: precision), the original network's files
    and NNCodec's in red, and the Pareto front over all of them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    fits = list(dict.fromkeys(rows["fit"]))
    palette = plt.get_cmap("tab10")
    nern_fits = [f for f in fits if not f.startswith("original")]
    for fit in fits:
        part = rows[rows["fit"] == fit]
        colour = "tab:red" if fit.startswith("original") else palette(nern_fits.index(fit) % 10)
        for precision, marker in PRECISION_MARKERS.items():
            pts = part[part["precision"].map(marker_key) == precision]
            if not pts.empty:
                ax.scatter(pts["bytes"], pts["top1"], color=colour, marker=marker, s=34, alpha=0.8,
                           edgecolors="none")
        ax.scatter([], [], color=colour, marker="o", label=f"NeRN {fit}" if fit in nern_fits else fit)
    front = rows[rows["pareto"]].sort_values("bytes")
    ax.plot(front["bytes"], front["top1"], color="black", lw=2.5, alpha=0.25, label="Pareto front (all files)")
    for precision, marker in PRECISION_MARKERS.items():
        if (rows["precision"].map(marker_key) == precision).any():
            ax.scatter([], [], color="grey", marker=marker, label="NNCodec qp" if precision == "nnc" else precision)
    original = rows[(rows["representation"] == "original") & (rows["precision"] == "fp32")]
    if not original.empty:
        top1 = float(original["top1"].iloc[0])
        ax.axhline(top1, color="black", ls=":", lw=1, label=f"original fp32 {top1:.2f}%")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (whole file)")
    ax.set_ylabel("test top-1 (%) of the network read back")
    ax.set_title(f"{rows['network'].iloc[0]}: accuracy vs bytes, every NeRN file and the original's codecs")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, dpi=120)


# -- the stage ---------------------------------------------------------------------------------------------


def make_tables(manifest_path: str | Path, published_path: str | Path | None, tables_dir: str | Path,
                figures_dir: str | Path) -> list[Path]:
    """Write every table and figure of a manifest; returns the paths written."""
    manifest = load_manifest(manifest_path)
    published = load_published(published_path)
    rows = load_rows(manifest)
    written: list[Path] = []
    for name, table in build_tables(rows, published).items():
        written += write_table(table, tables_dir, name, table_caption(manifest.preset, name))
    figures = Path(figures_dir)
    plot_accuracy_vs_size(rows, published, figures / "accuracy_vs_size.png")
    written.append(figures / "accuracy_vs_size.png")
    for network in manifest.networks:
        path = figures / f"training_curves_{network.name}.png"
        plot_network_curves(rows, network.name, path)
        written.append(path)
    sweep = rate_distortion_rows(manifest)
    if not sweep.empty:
        written += write_table(rate_distortion_table(sweep), tables_dir, RATE_DISTORTION,
                               table_caption(manifest.preset, RATE_DISTORTION))
        for network, part in sweep.groupby("network", sort=False):
            path = figures / f"rate_distortion_{network}.png"
            plot_rate_distortion(part, path)
            written.append(path)
    return written


def cmd_tables(args: argparse.Namespace) -> None:
    written = make_tables(args.manifest, args.published, args.tables, args.figures)
    print(f"[tables] {len(written)} files -> {args.tables}, {args.figures}")


def register_cli(subparsers: Any, name: str) -> None:
    p = subparsers.add_parser(name, help="aggregate run outputs into the paper's tables and figures")
    p.add_argument("--manifest", required=True, help="manifest YAML written by the pipeline (rows -> run dirs)")
    p.add_argument("--published", help="YAML of published reference numbers shown beside ours")
    p.add_argument("--tables", required=True, help="output directory of the tables (.csv, .md, .tex)")
    p.add_argument("--figures", required=True, help="output directory of the figures (.png)")
    p.set_defaults(func=cmd_tables)

"""One accuracy-vs-bytes front over several recorded runs (<record>/tables/rate_distortion.csv, e.g. the codec
sweeps' records experiments/codec/<name>/ or a preset's docs/results/<name>/).

    python workflow/scripts/merge_frontiers.py experiments/codec/cifar10-codec-*/ --network cifar10-resnet20 \
        --out docs/measurements/codec/frontier [--max-bytes 300000] [--target 50000:80.03 --target 100000:80.73]

Each run's rows keep their fit name, prefixed by the run's record directory (its preset's name); the original network's files (its intN and
NNCodec baselines, the same in every run of one network) are kept once, from the first run that has them. The
front is recomputed over the merged rows. Writes <out>.csv (every row, `pareto` marked), <out>.md (the front)
and <out>.png (NeRN's own files by width, the original's codecs, the front, each target as the corner a file must
reach). Generated from the runs' own tables, never typed in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from nern.compress import PRECISION_MARKERS, marker_key
from nern.plots import pyplot, save_figure
from nern.tables import pareto_index

RUN_TABLE = Path("tables") / "rate_distortion.csv"


def load_run(run_dir: Path, network: str) -> pd.DataFrame:
    """One recorded run's rows of `network`, NeRN fits named <preset>:<fit>."""
    rows = pd.read_csv(run_dir / RUN_TABLE)
    rows = rows[rows["network"] == network].copy()
    nern = rows["representation"] != "original"
    rows.loc[nern, "fit"] = run_dir.name + ":" + rows.loc[nern, "fit"]
    return rows


def merge(run_dirs: list[Path], network: str, max_bytes: int | None) -> pd.DataFrame:
    rows = pd.concat([load_run(d, network) for d in run_dirs], ignore_index=True)
    rows = rows.drop_duplicates(["representation", "fit", "precision", "sparsity", "finetune", "bytes"],
                                ignore_index=True)
    if max_bytes:
        rows = rows[rows["bytes"] <= max_bytes].reset_index(drop=True)
    rows["pareto"] = False
    rows.loc[pareto_index(rows), "pareto"] = True
    return rows.sort_values("bytes").reset_index(drop=True)


def parse_target(text: str) -> tuple[int, float]:
    """'50000:80.03' -> (50000, 80.03): at most that many bytes, at least that top-1."""
    try:
        size, top1 = text.split(":")
        return int(size), float(top1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"target {text!r} is not BYTES:TOP1, e.g. 50000:80.03") from None


def plot_front(rows: pd.DataFrame, targets: list[tuple[int, float]], title: str, path: Path) -> None:
    """NeRN's own files in blue by width, the original's intN in grey and its NNCodec files in black; a target is
    met by a point in the shaded corner above-left of it. The y axis starts where the front turns useful (60%)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    groups = (("NeRN file", (rows["representation"] == "nern"), "tab:blue"),
              ("NeRN + NNCodec", (rows["representation"] == "nern+nnc"), "tab:cyan"),
              ("original, intN / fp16", (rows["representation"] == "original") & ~rows["precision"].str.startswith("nnc"),
               "grey"),
              ("original, NNCodec", (rows["representation"] == "original") & rows["precision"].str.startswith("nnc"),
               "black"))
    for label, mask, colour in groups:
        part = rows[mask]
        for precision, marker in PRECISION_MARKERS.items():
            pts = part[part["precision"].map(marker_key) == precision]
            ax.scatter(pts["bytes"], pts["top1"], color=colour, marker=marker, s=30, alpha=0.75, edgecolors="none")
        ax.scatter([], [], color=colour, marker="o", label=label)
    for precision, marker in PRECISION_MARKERS.items():
        if (rows["precision"].map(marker_key) == precision).any():
            ax.scatter([], [], color="grey", marker=marker, label="NNCodec qp" if precision == "nnc" else precision)
    front = rows[rows["pareto"]].sort_values("bytes")
    ax.step(front["bytes"], front["top1"], where="post", color="black", lw=2, alpha=0.3, label="Pareto front")
    for size, top1 in targets:
        ax.fill_between([rows["bytes"].min() * 0.9, size], top1, 100, color="tab:green", alpha=0.12)
        ax.annotate(f"target: <= {size:,} B, >= {top1}%", (size, top1), fontsize=7, ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_ylim(60, max(rows["top1"].max(), *(t for _, t in targets)) + 1.5)
    ax.set_xlabel("bytes on disk (whole file)")
    ax.set_ylabel("test top-1 (%) of the network read back")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="recorded runs' directories (record_run.py's --out)")
    parser.add_argument("--network", required=True)
    parser.add_argument("--out", required=True, type=Path, help="path without suffix")
    parser.add_argument("--max-bytes", type=int, help="leave out files larger than this")
    parser.add_argument("--target", type=parse_target, action="append", default=[],
                        help="BYTES:TOP1 drawn as the corner a file must reach, e.g. 50000:80.03 (repeatable)")
    args = parser.parse_args()
    missing = [str(d) for d in args.runs if not (d / RUN_TABLE).is_file()]
    if missing:
        parser.error(f"no {RUN_TABLE} in: {', '.join(missing)}")
    rows = merge(args.runs, args.network, args.max_bytes)
    if rows.empty:
        parser.error(f"no rows of network {args.network!r} in these runs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out.with_suffix(".csv"), index=False)
    front = rows[rows["pareto"]].drop(columns=["network", "pareto"])
    caption = (f"**Pareto front of {args.network} over {', '.join(d.name for d in args.runs)}: bytes on disk, "
               "test top-1 of the network read back (merge_frontiers.py)**\n\n")
    args.out.with_suffix(".md").write_text(caption + front.to_markdown(index=False) + "\n")
    plot_front(rows, args.target, f"{args.network}: every recorded file, {len(args.runs)} runs", args.out.with_suffix(".png"))
    print(f"[frontier] {len(rows)} files, {len(front)} on the front -> {args.out}.{{csv,md,png}}")


if __name__ == "__main__":
    main()

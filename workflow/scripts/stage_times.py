"""Wall time per pipeline stage, from the `benchmark:` files Snakemake writes for every job.

    python workflow/scripts/stage_times.py benchmarks/<preset> [--markdown]

A stage is the rule: its jobs' benchmark files live under the same relative layout as their outputs
(`benchmarks/<preset>/<net>/fit/...tsv`, `.../original/...tsv`), so the stage is read from the path. Prints
jobs, total and mean seconds per stage, and the sum (CPU-busy time; with `--cores 2` the pipeline's wall
time is lower, since two jobs run at once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

# First path component under <net>/ (or the file name) -> the stage it belongs to.
STAGES = {"original": "pretrain / import", "permutation": "permute", "fit": "fit", "ablation": "fit_ablation",
          "data-free": "fit_data_free", "compress.tsv": "compress", "importance.tsv": "importance"}


def stage_of(relative: Path) -> str:
    if relative.name in STAGES:
        return STAGES[relative.name]
    parts = relative.parts
    return STAGES.get(parts[1] if len(parts) > 1 else parts[0], parts[0])


def stage_times(root: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted(root.rglob("*.tsv")):
        seconds = pd.read_csv(tsv, sep="\t")["s"].iloc[-1]
        rows.append({"stage": stage_of(tsv.relative_to(root)), "seconds": float(seconds)})
    if not rows:
        raise SystemExit(f"no benchmark files under {root}: run the pipeline first")
    table = pd.DataFrame(rows).groupby("stage")["seconds"].agg(jobs="count", total_s="sum", mean_s="mean")
    table = table.sort_values("total_s", ascending=False)
    table.loc["all stages"] = [table["jobs"].sum(), table["total_s"].sum(), float("nan")]
    return table.round(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="benchmarks/<preset>")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    table = stage_times(args.root)
    sys.stdout.write((table.to_markdown() if args.markdown else table.to_string()) + "\n")


if __name__ == "__main__":
    main()

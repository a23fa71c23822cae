"""One markdown table over fits measured as files: each fit directory holds `nern fit`'s metrics.json and
predictor.safetensors, and `nern compress`'s output under compress/ (the accuracy of the file read back).

    python experiments/codec/scripts/long_fits_table.py LABEL=DIR [LABEL=DIR ...] [--precision int4] \
        [--group "fmd weight,KD T"]

--group adds a second table: per setting (the named columns), how many fits and the mean +- sd (n-1) of the
accuracies, so that settings are compared over seeds, not by their luckiest draw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from nern.artifacts import read_metadata
from nern.table_format import to_markdown


def row(label: str, fit_dir: Path, precision: str | None) -> dict:
    """The fit's schedule (from the predictor file's own config), its accuracies, and its file's bytes and top-1
    (the file at `precision`, by default the fit's own intN)."""
    metrics = json.loads((fit_dir / "metrics.json").read_text())
    cfg = read_metadata(fit_dir / "predictor.safetensors")["config"]
    bits = cfg["predictor"]["quantise_bits"]
    files = pd.read_csv(fit_dir / "compress" / "compression.csv")
    nern = files[(files.representation == "nern") & (files.precision == (precision or f"int{bits}"))].iloc[0]
    return {"fit": label, "bits": bits, "h": cfg["predictor"]["hidden"], "depth": cfg["predictor"]["depth"],
            "levels L": cfg["embedding"]["levels"], "fmd weight": cfg["loss"]["fmd"], "kd weight": cfg["loss"]["kd"],
            "KD T": cfg["loss"]["temperature"], "ce weight": cfg["loss"].get("ce", 0.0),  # older fits: no label term
            "weight decay": cfg["optim"]["weight_decay"],
            "lr": cfg["optim"]["lr"], "reconstruction lr": cfg["optim"]["rec_only_lr"],
            "seed": cfg["seed"],
            "reconstruction steps": cfg["rec_only_iterations"], "distillation iterations": cfg["iterations"],
            "validation top-1": metrics["reconstructed_val_top1"],
            "fit top-1 (its own test)": metrics["reconstructed_top1"],
            "file bytes": int(nern["bytes"]), "file top-1 (10,000 test images)": float(nern["top1"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fits", nargs="+", help="LABEL=DIR")
    p.add_argument("--precision", default=None, help="file precision to report (default: the fit's own intN)")
    p.add_argument("--group", default=None, help="comma-separated columns: also print mean +- sd per setting")
    args = p.parse_args()
    rows = pd.DataFrame([row(label, Path(directory), args.precision)
                         for label, _, directory in (item.partition("=") for item in args.fits)])
    print(to_markdown(rows), end="")
    if args.group:
        print("\n" + to_markdown(group_summary(rows, args.group.split(","))), end="")


ACCURACIES = ["validation top-1", "fit top-1 (its own test)", "file top-1 (10,000 test images)"]


def group_summary(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean +- sample sd of every accuracy column per setting, with the number of fits and the best file."""
    if missing := [k for k in keys if k not in rows.columns]:
        raise SystemExit(f"--group: unknown column(s) {missing}; choose from {', '.join(rows.columns)}")
    grouped = rows.groupby(keys, sort=False)
    out = grouped.size().rename("fits").to_frame()
    for column in ACCURACIES:
        stats = grouped[column].agg(["mean", "std"])
        out[column + " (mean +- sd)"] = [f"{m:.2f} +- {s:.2f}" for m, s in zip(stats["mean"], stats["std"].fillna(0))]
    out["best file top-1"] = grouped[ACCURACIES[-1]].max()
    return out.reset_index()


if __name__ == "__main__":
    main()

"""One markdown table over fits measured as files: each fit directory holds `nern fit`'s metrics.json and
predictor.safetensors, and `nern compress`'s output under compress/ (the accuracy of the file read back).

    python bench/long_fits_table.py LABEL=DIR [LABEL=DIR ...] [--precision int4]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nern.artifacts import read_metadata  # noqa: E402


def row(label: str, fit_dir: Path, precision: str) -> str:
    metrics = json.loads((fit_dir / "metrics.json").read_text())
    cfg = read_metadata(fit_dir / "predictor.safetensors")["config"]
    files = list(csv.DictReader((fit_dir / "compress" / "compression.csv").open()))
    nern = next(r for r in files if r["representation"] == "nern" and r["precision"] == precision)
    return (f"| {label} | {cfg['predictor']['quantise_bits']} | {cfg['predictor']['hidden']} | {cfg['seed']} "
            f"| {cfg['rec_only_iterations']:,} | {cfg['iterations']:,} | {metrics['reconstructed_val_top1']:.2f} "
            f"| {metrics['reconstructed_top1']:.2f} | {int(nern['bytes']):,} | {float(nern['top1']):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fits", nargs="+", help="LABEL=DIR")
    p.add_argument("--precision", default=None, help="file precision to report (default: the fit's own intN)")
    args = p.parse_args()
    print("| fit | bits | h | seed | reconstruction steps | distillation iterations | validation top-1 "
          "| fit top-1 (its own test) | file | file top-1 (10,000 test images) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for item in args.fits:
        label, _, directory = item.partition("=")
        fit_dir = Path(directory)
        bits = read_metadata(fit_dir / "predictor.safetensors")["config"]["predictor"]["quantise_bits"]
        print(row(label, fit_dir, args.precision or f"int{bits}"))


if __name__ == "__main__":
    main()

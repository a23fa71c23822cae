"""Figures of single runs (training curves) and the pyplot set-up every stage's figures share; tables and
cross-run figures live in `nern.tables`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nern.artifacts import atomic_path

if TYPE_CHECKING:
    import pandas as pd


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (jobs run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def distillation_start(df: "pd.DataFrame") -> float | None:
    """The first logged iteration with a distillation term, when a reconstruction-only phase came first: the
    losses jump there, and a reader should see why."""
    columns = [c for c in ("kd", "fmd") if c in df]
    if not columns:
        return None
    on = (df[columns].fillna(0) > 0).any(axis=1)
    logged = df[columns].notna().any(axis=1)
    if not on.any() or on[logged].iloc[0]:
        return None
    return float(df.loc[on.idxmax(), "iteration"])


def plot_training_curves(curves_csv: str | Path, out_png: str | Path) -> None:
    """Loss terms (log scale) and evaluation accuracy against iteration, side by side."""
    import pandas as pd

    plt = pyplot()
    df = pd.read_csv(curves_csv)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for column in ("loss", "rec", "kd", "fmd", "ce", "grad_norm"):
        if column in df and df[column].notna().any() and (df[column].fillna(0) > 0).any():
            series = df[["iteration", column]].dropna()
            ax_loss.plot(series["iteration"], series[column], label=column,
                         linestyle="--" if column == "grad_norm" else "-")  # a spike warns of divergence
    start = distillation_start(df)
    if start is not None:
        for ax in (ax_loss, ax_acc):
            ax.axvline(start, color="grey", linestyle=":", linewidth=1, label="distillation starts")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("losses and gradient norm")
    ax_loss.legend(fontsize=8)
    for column in ("eval_test_top1", "eval_val_top1", "val_top1"):
        if column in df and df[column].notna().any():
            series = df[["iteration", column]].dropna()
            ax_acc.plot(series["iteration"], series[column], marker="o", label=column.replace("eval_", ""))
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel("top-1 (%)")
    ax_acc.set_title("accuracy")
    if ax_acc.lines:
        ax_acc.legend(fontsize=8)
    save_figure(fig, out_png)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Lay out, write atomically as PNG, and free the figure (a long stage draws many)."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)

"""Table cells as text: the number formats every Markdown table of the project shares.

Lives below the stages (importance and compress write Markdown tables) and below `nern.tables` (which
aggregates runs into the paper's tables), so neither has to import the other.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

MISSING_MD = "–"


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_cell(column: str, value: Any) -> str:
    """Accuracies and agreements to 2 decimals, KL to 4, ratios to 3, RMSE to 4 significant digits, counts as integers."""
    if is_missing(value):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "Δ" in column:
            return f"{value:+.2f}"
        if "top-1" in column or column.startswith("agreement"):
            return f"{value:.2f}"
        if column.startswith("KL"):
            return f"{value:.4f}"
        if re.search(r"\bratio\b", column):  # not "iterations", which holds the letters too
            return f"{value:.3f}"
        if "RMSE" in column:
            return f"{value:.4g}"
        if column == "smoothness" or "." in column:
            return f"{value:g}"
        if float(value).is_integer():
            return f"{int(value):,}" if column == "predictor params" else str(int(value))
        return f"{value:g}"
    return str(value)


def formatted(table: pd.DataFrame) -> list[list[str]]:
    return [[format_cell(col, value) for col, value in zip(table.columns, row)]
            for row in table.itertuples(index=False, name=None)]


def is_numeric(table: pd.DataFrame, column: str) -> bool:
    values = [v for v in table[column] if not is_missing(v)]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def to_markdown(table: pd.DataFrame) -> str:
    cells = [[c or MISSING_MD for c in row] for row in formatted(table)]
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---:" if is_numeric(table, c) else "---" for c in table.columns) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join([header, rule, *body]) + "\n"

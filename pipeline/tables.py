"""Markdown tables shared by the reports (torch-free, so the report's environment stays light)."""

from __future__ import annotations

import math

import pandas as pd


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub table (pandas' to_markdown needs tabulate, which the project does not install);
    scores in percent with one decimal, missing values as '–'."""
    score_columns = {"precision", "recall", "f1", "iou"}

    def cell(column: str, value) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{100 * value:.1f}" if column in score_columns else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |")
    return "\n".join(lines) + "\n"

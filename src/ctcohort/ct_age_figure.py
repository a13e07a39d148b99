"""The CT-age figure: out-of-fold predicted against true age, and the bias-corrected age gaps per structure group.

Drawn in the journal style of ``ctcohort.figures`` (print size, no text below 7 pt, same bytes each time).
"""

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402 - after ctcohort.figures, which selects the Agg backend
import numpy as np
import pandas as pd

from ctcohort.ct_age import ALL
from ctcohort.figures import GROUP_COLOURS, PAGE_WIDTH_IN, journal_style, save_figure, say

TRAINED_COLOUR, OTHER_COLOUR = "#4d4d4d", "#E69F00"


def gap_columns(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(feature set, its corrected-gap column): all, then each group the table has."""
    groups = [
        c[: -len("_age_gap_corrected")]
        for c in table.columns
        if c.endswith("_age_gap_corrected") and c != "age_gap_corrected"
    ]
    return [(ALL, "age_gap_corrected"), *((g, f"{g}_age_gap_corrected") for g in groups)]


def _scatter(ax, table: pd.DataFrame, summary: pd.DataFrame) -> None:
    scored = table[np.isfinite(table["age"]) & np.isfinite(table["predicted_age"])]
    if scored.empty:
        note = summary["note"].iloc[0] if len(summary) else ""
        say(ax, f"no CT age{': ' + note.replace('_', ' ') if note else ''}")
        return
    trained = scored["trained"].astype(str).str.lower() == "true"
    for keep, colour, label in (
        (trained, TRAINED_COLOUR, "one scan per patient"),
        (~trained, OTHER_COLOUR, "other scans"),
    ):
        if keep.any():
            ax.scatter(
                scored.loc[keep, "age"],
                scored.loc[keep, "predicted_age"],
                s=6,
                color=colour,
                alpha=0.6,
                linewidths=0,
                label=f"{label} (n={int(keep.sum())})",
            )
    low, high = (
        np.nanmin(scored[["age", "predicted_age"]].to_numpy()),
        np.nanmax(scored[["age", "predicted_age"]].to_numpy()),
    )
    ax.plot([low, high], [low, high], color="black", linewidth=0.6, linestyle="--")
    row = summary.set_index("features").loc[ALL] if ALL in set(summary["features"]) else None
    if row is not None and np.isfinite(row["mae"]):
        ax.set_title(f"out of fold: MAE {row['mae']:.1f} years, R\u00b2 {row['r2']:.2f} ({row['model']})")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("predicted age (years)")
    ax.legend(frameon=False, loc="upper left")


def _gaps(ax, table: pd.DataFrame) -> None:
    trained = table["trained"].astype(str).str.lower() == "true"
    columns = [(name, column) for name, column in gap_columns(table) if np.isfinite(table.loc[trained, column]).any()]
    if not columns:
        say(ax, "no corrected age gaps")
        return
    values = [table.loc[trained, column].dropna().to_numpy(dtype=float) for _, column in columns]
    boxes = ax.boxplot(values, whis=1.5, widths=0.6, patch_artist=True, flierprops={"markersize": 2})
    for patch, (name, _) in zip(boxes["boxes"], columns):
        patch.set_facecolor(GROUP_COLOURS.get(name, "#ffffff"))
    ax.axhline(0, color="black", linewidth=0.6, linestyle="--")
    ax.set_xticks(range(1, len(columns) + 1), [f"{name}\nn={len(v)}" for (name, _), v in zip(columns, values)])
    ax.set_ylabel("corrected age gap (years)")
    ax.set_title("bias-corrected gap by structure group")


@journal_style
def plot_ct_age(table: pd.DataFrame, summary: pd.DataFrame, outputs: Sequence[str | Path]) -> None:
    """Left: predicted (uncorrected) against true age, every prediction out of fold; right: the corrected gaps of
    the training scans (one per patient) of the whole-body model and of each group's model."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, PAGE_WIDTH_IN * 0.42))
    _scatter(left, table, summary)
    _gaps(right, table)
    fig.tight_layout()
    save_figure(fig, outputs)

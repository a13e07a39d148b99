"""The acquisition mix by age: per acquisition column, the share of each of its values in each age decade
(``ctcohort.acquisition.decade_shares``), as stacked bars. Drawn in the journal style of ``ctcohort.figures``."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402 - after ctcohort.figures, which selects the Agg backend
import numpy as np
import pandas as pd

from ctcohort.figures import PAGE_WIDTH_IN, journal_style, pretty, save_figure, say

PANEL_HEIGHT_IN = 1.9


def _stacked_shares(ax, shares: pd.DataFrame) -> None:
    table = shares.pivot_table(index="decade", columns="value", values="share", fill_value=0.0).sort_index()
    colours = plt.get_cmap("tab10")
    bottom = np.zeros(len(table))
    for i, value in enumerate(table.columns):
        ax.bar(table.index, table[value], width=8, bottom=bottom, color=colours(i % 10), label=str(value))
        bottom += table[value].to_numpy()
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of scans")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


@journal_style
def plot_acquisition_mix(shares: pd.DataFrame, outputs: Sequence[str | Path]) -> None:
    """One panel per acquisition column of ``shares`` (acquisition_by_decade.tsv): its values' shares per age
    decade; a single panel saying so where the table is empty."""
    variables = list(pd.unique(shares["variable"])) if len(shares) else []
    fig, axes = plt.subplots(
        max(1, len(variables)), 1, figsize=(PAGE_WIDTH_IN / 2, PANEL_HEIGHT_IN * max(1, len(variables))), squeeze=False
    )
    if not variables:
        say(axes[0, 0], "no acquisition column in the sheet")
    for ax, variable in zip(axes[:, 0], variables):
        _stacked_shares(ax, shares[shares["variable"] == variable])
        ax.set_title(pretty(variable))
        ax.set_xlabel("age decade (years)")
    save_figure(fig, outputs)

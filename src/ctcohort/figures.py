"""Paper-style figures: measures over age quartiles, and rs with CI per structure."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ctcohort.structures import GROUPS  # noqa: E402

GROUP_COLOURS = {"organ": "#c0504d", "bone": "#8c8c8c", "muscle": "#4f81bd", "vessel": "#9bbb59"}
MEASURE_LABELS = {"volume_ml": "volume (ml)", "hu_mean": "mean attenuation (HU)",
                  "hu_mean_eroded": "interior mean attenuation (HU)", "hu_median": "median attenuation (HU)"}


def age_group_labels(edges: Sequence[float]) -> list[str]:
    """Labels of the age groups cut at ``edges``: '<41', '41-59', '59-78', '>=78' for the paper's."""
    edges = [float(e) for e in edges]
    fmt = "{:g}".format
    inner = [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
    return [f"<{fmt(edges[0])}", *inner, f">={fmt(edges[-1])}"]


def age_groups(age: pd.Series, edges: Sequence[float]) -> pd.Categorical:
    """Age groups [-inf, e0), [e0, e1), ..., [e_last, inf)."""
    bins = [-np.inf, *edges, np.inf]
    return pd.cut(age, bins=bins, right=False, labels=age_group_labels(edges))


# Same figure, same bytes: matplotlib stamps an SVG with the time it was written and names its clip paths
# and glyphs with random ids unless given a salt. (A PNG carries only the matplotlib version.)
REPRODUCIBLE_SVG = {"svg.hashsalt": "ctcohort"}
SVG_METADATA = {"Date": None}


def save_figure(fig, outputs: Sequence[str | Path]) -> None:
    """Write ``fig`` to each of ``outputs`` (the format from the suffix) and close it; the bytes depend on
    the figure only, never on when or in which run it was saved."""
    with matplotlib.rc_context(REPRODUCIBLE_SVG):
        for path in outputs:
            suffix = Path(path).suffix
            fig.savefig(path, dpi=150 if suffix == ".png" else None, bbox_inches="tight",
                        metadata=SVG_METADATA if suffix == ".svg" else None)
    plt.close(fig)


def plot_age_boxplots(
    measurements: pd.DataFrame,
    panels: Sequence[dict],
    edges: Sequence[float],
    outputs: Sequence[str | Path],
    correlations: pd.DataFrame | None = None,
) -> None:
    """Box plots (whiskers at 1.5 IQR) of each panel's structure/measure over the age groups."""
    ncols = min(3, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    labels = age_group_labels(edges)
    for ax, panel in zip(axes.flat, panels):
        structure, measure = panel["structure"], panel["measure"]
        rows = measurements[measurements["structure"] == structure]
        groups = age_groups(rows["age"], edges)
        data = [rows.loc[(groups == g) & rows[measure].notna(), measure].to_numpy() for g in labels]
        ax.boxplot(data, whis=1.5, widths=0.6, medianprops={"color": "black"})
        ax.set_xticks(range(1, len(labels) + 1), [f"{g}\n(n={len(d)})" for g, d in zip(labels, data)])
        ax.set_xlabel("age (years)")
        ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
        title = structure.replace("_", " ")
        if correlations is not None:
            hit = correlations[(correlations["structure"] == structure) & (correlations["measure"] == measure)]
            if len(hit) and np.isfinite(hit["rs"].iloc[0]):
                title += f"\nrs = {hit['rs'].iloc[0]:+.2f}, P = {hit['p'].iloc[0]:.1e}"
        ax.set_title(title, fontsize=10)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    save_figure(fig, outputs)


def plot_correlation_overview(
    correlations: pd.DataFrame, measures: Sequence[str], outputs: Sequence[str | Path]
) -> None:
    """rs with 95% CI per structure, grouped organ/bone/muscle/vessel, one panel per measure.

    Filled markers are significant under the configured correction.
    """
    order = {g: i for i, g in enumerate(GROUPS)}
    tested = correlations[correlations["measure"].isin(measures) & correlations["rs"].notna()]
    structures = (
        tested.drop_duplicates("structure")
        .assign(_group=lambda t: t["group"].map(order).fillna(len(order)))
        .sort_values(["_group", "structure"])["structure"].tolist()
    )
    height = 0.22 * len(structures) + 1.2
    fig, axes = plt.subplots(1, len(measures), figsize=(4.5 * len(measures), height), sharey=True,
                             squeeze=False)
    y_of = {s: i for i, s in enumerate(reversed(structures))}
    for ax, measure in zip(axes.flat, measures):
        table = correlations[correlations["measure"] == measure]
        for _, row in table.iterrows():
            if not np.isfinite(row["rs"]):
                continue
            y, colour = y_of[row["structure"]], GROUP_COLOURS.get(row["group"], "black")
            ax.plot([row["ci_low"], row["ci_high"]], [y, y], color=colour, lw=1.2)
            ax.plot(row["rs"], y, "o", color=colour, mfc=colour if row["significant"] else "white", ms=5)
        ax.axvline(0.0, color="black", lw=0.6)
        ax.set_xlim(-1, 1)
        ax.set_xlabel(f"Spearman rs with age: {MEASURE_LABELS.get(measure, measure)}")
        ax.grid(axis="x", alpha=0.3)
    axes.flat[0].set_yticks(list(y_of.values()), [s.replace("_", " ") for s in y_of])
    handles = [plt.Line2D([], [], marker="o", color=c, ls="", label=g) for g, c in GROUP_COLOURS.items()]
    axes.flat[-1].legend(handles=handles, loc="lower right", fontsize=8, title="filled: significant",
                         title_fontsize=8)
    fig.tight_layout()
    save_figure(fig, outputs)

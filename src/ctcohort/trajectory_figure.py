"""Trajectories of patients with repeated scans: each patient's measure over age, one line per patient.

Drawn in the journal style of ``ctcohort.figures`` (print size, no text below 7 pt, same bytes each time).
"""

from collections.abc import Sequence
from pathlib import Path

import matplotlib.collections  # noqa: E402 - after ctcohort.figures, which selects the Agg backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd

from ctcohort.figures import (
    MEASURE_LABELS,
    SEX_COLOURS,
    SEX_NAMES,
    UNKNOWN_SEX_COLOUR,
    journal_style,
    legend_below_age_axis,
    pretty,
    save_figure,
    say,
    sex_of,
)
from ctcohort.patients import patient_of

LINE_WIDTH = 0.5
LINE_ALPHA = 0.35


def patient_lines(rows: pd.DataFrame, measure: str) -> dict:
    """{sex key: [array of (age, value) points of one patient, ...]} of the patients with 2+ scans among
    ``rows`` that have a finite age and ``measure``; each patient's points in age order, patients in id order,
    keyed by the sex of the patient's first scan ("M", "F" or None)."""
    frame = pd.DataFrame(
        {
            "patient": patient_of(rows).to_numpy(),
            "age": pd.to_numeric(rows["age"], errors="coerce").to_numpy(dtype=float),
            "value": pd.to_numeric(rows[measure], errors="coerce").to_numpy(dtype=float),
            "sex": sex_of(rows).to_numpy(),
        }
    )
    frame = frame[np.isfinite(frame["age"]) & np.isfinite(frame["value"])]
    frame = frame[frame.groupby("patient")["age"].transform("size") >= 2]
    if frame.empty:
        return {}
    frame = frame.sort_values(["patient", "age"], kind="stable")
    patient = frame["patient"].to_numpy()
    starts = np.flatnonzero(np.r_[True, patient[1:] != patient[:-1]])
    lines: dict = {}
    points = np.split(frame[["age", "value"]].to_numpy(dtype=float), starts[1:])
    for sex, line in zip(frame["sex"].to_numpy()[starts], points):
        lines.setdefault(sex if sex in ("M", "F") else None, []).append(line)
    return lines


def draw_panel(ax, measurements: pd.DataFrame, structure: str, measure: str) -> None:
    """One panel: the lines of ``patient_lines``, coloured by sex, n patients per sex in the legend; a
    panel without such patients says why."""
    label = MEASURE_LABELS.get(measure, measure)
    ax.set_title(f"{pretty(structure)}\n{label}")
    ax.set_xlabel("age (years)")
    ax.set_ylabel(label)
    if measure not in measurements.columns:
        say(ax, f"no {measure} measured")
        return
    lines = patient_lines(measurements[measurements["structure"] == structure], measure)
    if not lines:
        say(ax, "no patient with\n2 or more scans")
        return
    for key in ("M", "F", None):
        if key not in lines:
            continue
        colour = SEX_COLOURS.get(key, UNKNOWN_SEX_COLOUR)
        ax.add_collection(
            matplotlib.collections.LineCollection(
                lines[key], colors=colour, linewidths=LINE_WIDTH, alpha=LINE_ALPHA, zorder=2
            )
        )
        ax.plot([], [], color=colour, lw=1.2, label=f"{SEX_NAMES[key]} (n={len(lines[key])} patients)")
    ax.autoscale_view()
    # below the age axis title, as in the scatter plots: inside, it would hide lines
    legend_below_age_axis(ax, ncol=1, handlelength=1.2)


@journal_style
def plot_trajectories(
    measurements: pd.DataFrame, panels: Sequence[dict], png_path: str | Path, svg_path: str | Path
) -> None:
    """One panel per {structure, measure} of ``panels``: one thin, light line per patient with two or more
    scans (the measure over age at each scan; ``ctcohort.patients.patient_of``: without a patient column
    every scan is its own patient and every panel says it has none), coloured by sex."""
    panels = list(panels)
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, int(np.ceil(len(panels) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        draw_panel(ax, measurements, panel["structure"], panel["measure"])
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        say(axes.flat[0], "no panel configured")
        axes.flat[0].set_visible(True)
    fig.tight_layout(h_pad=1.0, w_pad=0.8)
    save_figure(fig, [png_path, svg_path])

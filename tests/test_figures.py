"""What the figures show, for small hand-made tables: boxes, n labels, medians, rs with CI, Dice per structure.

Expected values come from the input tables with plain pandas/numpy, never from the plotting code. Each
plot function is run for real (PNG and SVG written); the figure it saves is captured on the way and its
matplotlib artists are read: tick labels, titles, lines and markers. ``svg_text`` reads what an SVG
file shows, for checks on files that a workflow wrote.
"""

import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest

from ctcohort import evaluate, figures

GROUP_ORDER = ["organ", "bone", "muscle", "vessel"]  # the paper's grouping, top to bottom


def svg_text(path: str | Path) -> str:
    """Every text a matplotlib SVG shows, one per line.

    Text drawn as glyph paths (matplotlib's default svg.fonttype 'path') is preceded by an XML comment
    holding the string; text kept as text (svg.fonttype 'none') is a <text> element. Both are read.
    Comments are XML-escaped by matplotlib (unescaped here), with '--' written as '- -'.
    """
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    root = ET.parse(path, parser).getroot()
    lines = []
    for element in root.iter():
        if element.tag is ET.Comment:
            lines.append(html.unescape((element.text or "").strip()))
        elif isinstance(element.tag, str) and element.tag.rsplit("}", 1)[-1] == "text":
            lines.append("".join(element.itertext()).strip())
    return "\n".join(lines)


@pytest.fixture
def saved(monkeypatch):
    """The figures that plot functions save, in order; saving itself still happens."""
    figs = []
    real = figures.save_figure

    def capture(fig, outputs):
        figs.append(fig)
        real(fig, outputs)

    monkeypatch.setattr(figures, "save_figure", capture)
    monkeypatch.setattr(evaluate, "save_figure", capture)
    return figs


def outputs_in(folder, name):
    return [folder / f"{name}.png", folder / f"{name}.svg"]


def tick_texts(ax, axis="x"):
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks]


def y_of_ticks(ax):
    return dict(zip(tick_texts(ax, "y"), ax.get_yticks()))


def markers(ax):
    """(x, y, line) of every single-point marker line."""
    return [(line.get_xdata()[0], line.get_ydata()[0], line) for line in ax.lines
            if len(line.get_xdata()) == 1 and line.get_marker() not in ("", "None", None)]


def segments(ax):
    """(x0, x1, y) of every horizontal two-point line without marker (CI bars)."""
    out = []
    for line in ax.lines:
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if len(x) == 2 and y[0] == y[1] and line.get_marker() in ("", "None", None):
            out.append((x[0], x[1], y[0]))
    return out


def test_svg_text_reads_text_drawn_as_paths_and_as_text(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    for fonttype in ("path", "none"):
        with matplotlib.rc_context({"svg.fonttype": fonttype}):
            fig, ax = plt.subplots()
            ax.set_title("liver & <kidney>")
            ax.set_xticks([1, 2], ["<41\n(n=7)", "other"])
            fig.savefig(tmp_path / f"{fonttype}.svg")
            plt.close(fig)
        text = svg_text(tmp_path / f"{fonttype}.svg").splitlines()
        assert "liver & <kidney>" in text and "<41" in text and "(n=7)" in text, (fonttype, text)
        assert "spleen" not in text


# ---------------------------------------------------------------------------------------------- box plots

AGES = [22, 35, 39.9, 40, 41, 47, 58, 59.9, 60, 66, 71, 83, 90]
EDGES = (40, 60)
GROUP_OF_AGE = [("<40", lambda a: a < 40), ("40-60", lambda a: (a >= 40) & (a < 60)), (">=60", lambda a: a >= 60)]


@pytest.fixture
def measurements():
    rng = np.random.default_rng(3)
    rows = []
    for i, age in enumerate(AGES):
        for structure in ("liver", "aorta", "spleen"):
            rows.append({"subject": f"s{i}", "age": age, "structure": structure,
                         "volume_ml": rng.normal(1500, 200) if structure == "liver" else rng.normal(80, 10),
                         "hu_mean": rng.normal(50, 8)})
    table = pd.DataFrame(rows)
    # gaps: a liver volume excluded (NaN) in two scans; aorta HU absent under 40 (an empty age group)
    table.loc[(table["structure"] == "liver") & table["subject"].isin(["s4", "s10"]), "volume_ml"] = np.nan
    table.loc[(table["structure"] == "aorta") & (table["age"] < 40), "hu_mean"] = np.nan
    return table


PANELS = [{"structure": "liver", "measure": "volume_ml"}, {"structure": "aorta", "measure": "hu_mean"},
          {"structure": "aorta", "measure": "volume_ml"}, {"structure": "liver", "measure": "hu_mean"}]


def medians_and_boxes(ax):
    """Per box position: the median line's y and the box's (bottom, top), read from the drawn lines."""
    medians, boxes = {}, {}
    for line in ax.lines:
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if len(x) == 5:  # box outline
            boxes[round((x.min() + x.max()) / 2, 6)] = (y.min(), y.max())  # NaN for an empty group
        elif len(x) == 2 and y[0] == y[1] and np.isclose(x[1] - x[0], 0.6):  # median: as wide as the box
            medians[round(x.mean(), 6)] = y[0]
    return medians, boxes


def test_age_boxplots_show_one_box_per_age_group_with_counts_and_medians(tmp_path, saved, measurements):
    correlations = pd.DataFrame({"structure": ["liver", "aorta"], "measure": ["volume_ml", "hu_mean"],
                                 "rs": [-0.4321, 0.1789], "p": [3.2e-5, 0.41]})
    paths = outputs_in(tmp_path, "boxplots")
    figures.plot_age_boxplots(measurements, PANELS, EDGES, paths, correlations=correlations)
    (fig,) = saved
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(PANELS)
    text = svg_text(paths[1])
    for ax, panel in zip(axes, PANELS):
        rows = measurements[(measurements["structure"] == panel["structure"]) & measurements[panel["measure"]].notna()]
        values_by_group = [rows.loc[in_group(rows["age"]), panel["measure"]].to_numpy() for _, in_group in GROUP_OF_AGE]
        counts = [len(v) for v in values_by_group]
        assert sum(counts) == len(rows)
        want_ticks = [f"{name}\n(n={n})" for (name, _), n in zip(GROUP_OF_AGE, counts)]
        assert tick_texts(ax) == want_ticks, panel
        for (name, _), n in zip(GROUP_OF_AGE, counts):
            assert f"(n={n})" in text and name in text
        medians, boxes = medians_and_boxes(ax)
        assert sorted(boxes) == [1, 2, 3], "one box per age group"
        for position, values in enumerate(values_by_group, start=1):
            if len(values):
                assert medians[position] == pytest.approx(np.median(values), rel=1e-12)
                q1, q3 = pd.Series(values).quantile([0.25, 0.75])
                assert boxes[position] == pytest.approx((q1, q3), rel=1e-12)
            else:  # an empty group draws no box
                assert not np.isfinite(medians.get(position, np.nan))
        assert panel["structure"].replace("_", " ") in ax.get_title()
        hit = correlations[(correlations["structure"] == panel["structure"])
                           & (correlations["measure"] == panel["measure"])]
        shown = re.search(r"rs = ([+-]\d\.\d+), P = (\S+)", ax.get_title())
        if len(hit):
            assert shown, ax.get_title()
            assert float(shown.group(1)) == pytest.approx(hit["rs"].iloc[0], abs=0.005)
            assert float(shown.group(2)) == pytest.approx(hit["p"].iloc[0], rel=0.05)
        else:
            assert shown is None, ax.get_title()
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_age_boxplots_without_correlations_and_with_other_edges(tmp_path, saved, measurements):
    figures.plot_age_boxplots(measurements, PANELS[:1], (30, 50, 70), outputs_in(tmp_path, "b"))
    (ax,) = [ax for ax in saved[0].axes if ax.get_visible()]
    ages = measurements.loc[(measurements["structure"] == "liver") & measurements["volume_ml"].notna(), "age"]
    counts = [(ages < 30).sum(), ((ages >= 30) & (ages < 50)).sum(), ((ages >= 50) & (ages < 70)).sum(),
              (ages >= 70).sum()]
    assert tick_texts(ax) == [f"{g}\n(n={n})" for g, n in zip(["<30", "30-50", "50-70", ">=70"], counts)]
    assert "rs =" not in ax.get_title()


# ---------------------------------------------------------------------------------------- rs overview

@pytest.fixture
def correlations():
    rows = [
        # structure, group, measure, rs, ci_low, ci_high, significant
        ("liver", "organ", "volume_ml", -0.42, -0.55, -0.27, True),
        ("liver", "organ", "hu_mean", -0.10, -0.25, 0.06, False),
        ("kidney_right", "organ", "volume_ml", -0.31, -0.45, -0.15, True),
        ("kidney_right", "organ", "hu_mean", np.nan, np.nan, np.nan, False),  # not tested for this measure
        ("femur_left", "bone", "volume_ml", 0.05, -0.12, 0.21, False),
        ("femur_left", "bone", "hu_mean", -0.61, -0.70, -0.50, True),
        ("iliopsoas_left", "muscle", "volume_ml", -0.22, -0.37, -0.06, False),
        ("iliopsoas_left", "muscle", "hu_mean", -0.35, -0.48, -0.20, True),
        ("aorta", "vessel", "volume_ml", 0.48, 0.35, 0.60, True),
        ("aorta", "vessel", "hu_mean", 0.12, -0.04, 0.28, False),
        ("spleen", "organ", "volume_ml", np.nan, np.nan, np.nan, False),  # tested nowhere
        ("spleen", "organ", "hu_mean", np.nan, np.nan, np.nan, False),
        ("heart", "organ", "hu_median", 0.2, 0.1, 0.3, True),  # a measure that is not plotted
    ]
    return pd.DataFrame(rows, columns=["structure", "group", "measure", "rs", "ci_low", "ci_high", "significant"])


def test_correlation_overview_shows_every_tested_structure_with_its_rs_and_ci(tmp_path, saved, correlations):
    measures = ["volume_ml", "hu_mean"]
    paths = outputs_in(tmp_path, "overview")
    figures.plot_correlation_overview(correlations, measures, paths)
    (fig,) = saved
    axes = fig.axes
    assert len(axes) == len(measures)
    plotted = correlations[correlations["measure"].isin(measures) & correlations["rs"].notna()]
    want = (plotted.drop_duplicates("structure")
            .assign(order=lambda t: t["group"].map(GROUP_ORDER.index))
            .sort_values(["order", "structure"])["structure"].str.replace("_", " ").tolist())
    assert want == ["kidney right", "liver", "femur left", "iliopsoas left", "aorta"]
    y_of = y_of_ticks(axes[0])
    assert sorted(y_of, key=y_of.get, reverse=True) == want, "grouped organ/bone/muscle/vessel, top to bottom"
    text = svg_text(paths[1])
    for name in want:
        assert name in text
    assert "spleen" not in text and "heart" not in text
    for ax, measure in zip(axes, measures):
        rows = plotted[plotted["measure"] == measure]
        points = markers(ax)
        bars = segments(ax)
        assert len(points) == len(rows)
        for row in rows.itertuples():
            y = y_of[row.structure.replace("_", " ")]
            (x, _, line), = [(x, yy, line) for x, yy, line in points if yy == y]
            assert x == pytest.approx(row.rs)
            assert [(x0, x1) for x0, x1, yy in bars if yy == y] == [pytest.approx((row.ci_low, row.ci_high))]
            face = mcolors.to_rgba(line.get_markerfacecolor())
            assert (face != mcolors.to_rgba("white")) == row.significant, (measure, row.structure)
        assert {"volume_ml": "volume", "hu_mean": "mean attenuation"}[measure] in ax.get_xlabel()


# ------------------------------------------------------------------------------------------------- Dice

def summary_table(rows):
    columns = ["structure", "group", "n", "dice_mean", "dice_ci_low", "dice_ci_high"]
    table = pd.DataFrame(rows, columns=columns)
    return table.assign(nsd_mean=table["dice_mean"], nsd_ci_low=table["dice_ci_low"],
                        nsd_ci_high=table["dice_ci_high"])


def test_plot_dice_shows_every_evaluable_structure_with_mean_and_ci(tmp_path, saved):
    summary = summary_table([
        ("liver", "organ", 30, 0.95, 0.93, 0.97),
        ("aorta", "vessel", 28, 0.88, 0.80, 0.92),
        ("femur_left", "bone", 1, 0.90, np.nan, np.nan),  # one scan: no CI
        ("spleen", "organ", 0, np.nan, np.nan, np.nan),  # not evaluable
        ("adrenal_gland_left", "organ", 12, 0.71, 0.62, 0.78),
        ("mystery", "other", 5, 0.5, 0.3, 0.6),  # a group outside the four: shown last
    ])
    paths = outputs_in(tmp_path, "dice")
    evaluate.plot_dice(summary, paths)
    (fig,) = saved
    (ax,) = fig.axes
    evaluable = summary[summary["dice_mean"].notna()]
    y_of = y_of_ticks(ax)
    assert sorted(y_of, key=y_of.get, reverse=True) == [
        "adrenal gland left", "liver", "femur left", "aorta", "mystery"]
    points, bars = markers(ax), segments(ax)
    legend_free = [(x, y) for x, y, line in points]
    assert len(legend_free) == len(evaluable)
    for row in evaluable.itertuples():
        y = y_of[row.structure.replace("_", " ")]
        assert [x for x, yy in legend_free if yy == y] == [pytest.approx(row.dice_mean)]
        ci = [(x0, x1) for x0, x1, yy in bars if yy == y]
        assert ci == ([] if np.isnan(row.dice_ci_low) else [pytest.approx((row.dice_ci_low, row.dice_ci_high))])
    text = svg_text(paths[1])
    assert "spleen" not in text and "no structure evaluable" not in text
    for name in y_of:
        assert name in text


def test_plot_dice_says_when_no_structure_is_evaluable(tmp_path, saved):
    for summary in (summary_table([]), summary_table([("spleen", "organ", 0, np.nan, np.nan, np.nan)])):
        paths = outputs_in(tmp_path, "empty")
        evaluate.plot_dice(summary, paths)
        ax = saved[-1].axes[0]
        assert tick_texts(ax, "y") == [] and markers(ax) == []
        assert "no structure evaluable" in svg_text(paths[1])
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ same bytes

def test_every_figure_is_the_same_bytes_each_time_it_is_drawn(tmp_path, measurements, correlations):
    """A rerun (after a crash, or on another day) redraws a figure from the same tables: the files must
    not differ, so that a rerun changes no output and two runs can be compared file by file."""
    summary = summary_table([("liver", "organ", 30, 0.95, 0.93, 0.97), ("aorta", "vessel", 28, 0.88, 0.80, 0.92)])
    draw = {
        "boxplots": lambda paths: figures.plot_age_boxplots(measurements, PANELS, EDGES, paths),
        "overview": lambda paths: figures.plot_correlation_overview(correlations, ["volume_ml", "hu_mean"], paths),
        "dice": lambda paths: evaluate.plot_dice(summary, paths),
    }
    for name, plot in draw.items():
        drawn = []
        for run in ("first", "second"):
            (tmp_path / run).mkdir(exist_ok=True)
            paths = outputs_in(tmp_path / run, name)
            plot(paths)
            drawn.append([path.read_bytes() for path in paths])
        assert drawn[0] == drawn[1], name
        svg = drawn[0][1].decode()
        assert "<dc:date>" not in svg, name
        ids = re.findall(r'\bid="([^"]+)"', svg)  # salted, not random: still one element each
        assert ids and len(ids) == len(set(ids)), name

"""What the figures show, for small hand-made tables: boxes, n labels, medians, rs with CI (forest plot and heat
map), scans with LOWESS curves, normative charts with adjusted scans, Dice per structure.

Expected values come from the input tables with plain pandas/numpy, never from the plotting code. Each
plot function is run for real (PNG and SVG written); the figure it saves is captured on the way and its
matplotlib artists are read: tick labels, titles, lines and markers. ``svg_text`` reads what an SVG
file shows, for checks on files that a workflow wrote.
"""

import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import matplotlib.colors as mcolors
import matplotlib.text as mtext
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from statsmodels.nonparametric.smoothers_lowess import lowess

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
    return [
        (line.get_xdata()[0], line.get_ydata()[0], line)
        for line in ax.lines
        if len(line.get_xdata()) == 1 and line.get_marker() not in ("", "None", None)
    ]


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
            rows.append(
                {
                    "subject": f"s{i}",
                    "age": age,
                    "structure": structure,
                    "volume_ml": rng.normal(1500, 200) if structure == "liver" else rng.normal(80, 10),
                    "hu_mean": rng.normal(50, 8),
                }
            )
    table = pd.DataFrame(rows)
    # gaps: a liver volume excluded (NaN) in two scans; aorta HU absent under 40 (an empty age group)
    table.loc[(table["structure"] == "liver") & table["subject"].isin(["s4", "s10"]), "volume_ml"] = np.nan
    table.loc[(table["structure"] == "aorta") & (table["age"] < 40), "hu_mean"] = np.nan
    return table


PANELS = [
    {"structure": "liver", "measure": "volume_ml"},
    {"structure": "aorta", "measure": "hu_mean"},
    {"structure": "aorta", "measure": "volume_ml"},
    {"structure": "liver", "measure": "hu_mean"},
]


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
    correlations = pd.DataFrame(
        {
            "structure": ["liver", "aorta"],
            "measure": ["volume_ml", "hu_mean"],
            "rs": [-0.4321, 0.1789],
            "p": [3.2e-5, 0.41],
        }
    )
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
        hit = correlations[
            (correlations["structure"] == panel["structure"]) & (correlations["measure"] == panel["measure"])
        ]
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
    counts = [
        (ages < 30).sum(),
        ((ages >= 30) & (ages < 50)).sum(),
        ((ages >= 50) & (ages < 70)).sum(),
        (ages >= 70).sum(),
    ]
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


def visible_texts(fig):
    """The texts a drawn figure shows (tick labels only where their tick lies within the axis' view)."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = high - low
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not low - 1e-9 * span <= tick.get_loc() <= high + 1e-9 * span:
                    hidden.update((id(tick.label1), id(tick.label2)))
    return [
        t
        for t in fig.findobj(mtext.Text)
        if t.get_visible() and t.get_text().strip() and id(t) not in hidden and (t.axes is None or t.axes.get_visible())
    ]


def assert_legible(fig, min_pt=7.0):
    """No text under ``min_pt`` at the figure's (print) size, and no two texts overlapping."""
    canvas = FigureCanvasAgg(fig)  # a saved figure is closed: draw it again to measure its texts
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = visible_texts(fig)
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < min_pt]
    assert not small, small
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    clashes = [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if box_a.overlaps(box_b)
        and min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0) > 1
        and min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0) > 1
    ]
    assert not clashes, clashes[:5]


def top_to_bottom(ax):
    """The y tick labels in the order they appear, top first."""
    pairs = [(t.get_text(), ax.transData.transform((0, y))[1]) for t, y in zip(ax.get_yticklabels(), ax.get_yticks())]
    return [name for name, _ in sorted(pairs, key=lambda p: -p[1])]


# ------------------------------------------------------------------------------------------- age edges


def test_cohort_age_edges_takes_given_edges_or_the_cohorts_quartiles():
    assert figures.cohort_age_edges([20, 30], [41, 59, 78]) == [41.0, 59.0, 78.0]
    assert all(type(e) is float for e in figures.cohort_age_edges([20], (41, 59.5)))
    for bad in ([41, 41, 78], [59, 41]):
        with pytest.raises(ValueError, match="strictly increasing"):
            figures.cohort_age_edges([20, 30], bad)
    ages = pd.Series(AGES + [np.nan])
    want = ages.dropna().quantile([0.25, 0.5, 0.75]).tolist()  # pandas' linear = numpy's default
    assert figures.cohort_age_edges(ages, "quartiles") == pytest.approx(want, rel=1e-12)
    assert figures.cohort_age_edges(np.array(AGES), "quartiles") == pytest.approx(want, rel=1e-12)
    for few in ([50, 50, 50, 50, 60], [70]):
        with pytest.raises(ValueError, match="not strictly increasing.*distinct"):
            figures.cohort_age_edges(few, "quartiles")
    with pytest.raises(ValueError, match="no scan has an age"):
        figures.cohort_age_edges([np.nan], "quartiles")
    with pytest.raises(ValueError, match="quartiles"):
        figures.cohort_age_edges(AGES, "tertiles")


def test_age_boxplots_take_an_age_axis_title(tmp_path, saved, measurements):
    figures.plot_age_boxplots(
        measurements, PANELS[:1], EDGES, outputs_in(tmp_path, "b"), age_label="age quartile (years)"
    )
    assert saved[0].axes[0].get_xlabel() == "age quartile (years)"


# ---------------------------------------------------------------------------------------------- forest plot


@pytest.fixture
def correlations_with_other(correlations):
    extra = pd.DataFrame(
        [("mystery", "", "volume_ml", 0.3, 0.1, 0.5, True), ("brain", "organ", "hu_mean", -0.05, -0.2, 0.1, False)],
        columns=correlations.columns,
    )
    return pd.concat([correlations, extra], ignore_index=True)


def group_of_structure(rows: pd.DataFrame) -> pd.Series:
    """Each structure's group, "other" where it has none."""
    return rows.drop_duplicates("structure").set_index("structure")["group"].replace("", "other")


def labels_in_group_order(group: pd.Series) -> list[str]:
    """The structures as the figures label them, top to bottom: by group in GROUP_ORDER (other last), then by
    name."""
    return (
        group.reset_index()
        .assign(order=lambda t: t["group"].map((GROUP_ORDER + ["other"]).index))
        .sort_values(["order", "structure"])["structure"]
        .str.replace("_", " ")
        .tolist()
    )


def test_forest_plot_groups_structures_under_headings_with_rs_and_ci(tmp_path, saved, correlations_with_other):
    table = correlations_with_other
    measures = ["volume_ml", "hu_mean"]
    paths = outputs_in(tmp_path, "forest")
    figures.plot_forest(table, measures, paths)
    (fig,) = saved
    axes = fig.axes
    assert len(axes) == len(measures)
    plotted = table[table["measure"].isin(measures) & table["rs"].notna()]
    group = group_of_structure(plotted)
    want = labels_in_group_order(group)
    assert want == ["brain", "kidney right", "liver", "femur left", "iliopsoas left", "aorta", "mystery"]
    assert top_to_bottom(axes[0]) == want
    y_of = y_of_ticks(axes[0])
    headings = {t.get_text(): t.get_position()[1] for t in axes[0].texts}
    assert list(headings) == GROUP_ORDER + ["other"]
    above = np.inf
    for name in GROUP_ORDER + ["other"]:  # each heading lies above its own structures, below the group before
        members = [y_of[s.replace("_", " ")] for s in group.index[group == name]]
        assert max(members) < headings[name] < above, name
        above = min(members)
    text = svg_text(paths[1])
    for name in [*want, *headings, "significant", "not significant"]:
        assert name in text
    assert "spleen" not in text and "heart" not in text
    for ax, measure in zip(axes, measures):
        rows = plotted[plotted["measure"] == measure]
        points, bars = markers(ax), segments(ax)
        assert len(points) == len(rows) == len(bars)
        for row in rows.itertuples():
            y = y_of[row.structure.replace("_", " ")]
            ((x, _, line),) = [(x, yy, line) for x, yy, line in points if yy == y]
            assert x == pytest.approx(row.rs)
            assert [(x0, x1) for x0, x1, yy in bars if yy == y] == [pytest.approx((row.ci_low, row.ci_high))]
            face = mcolors.to_rgba(line.get_markerfacecolor())
            assert (face != mcolors.to_rgba("white")) == row.significant
        assert ax.get_xlim() == (-1, 1)
    assert_legible(fig)


def many_structures(n=120, measures=("volume_ml", "hu_mean", "hu_mean_eroded")):
    rng = np.random.default_rng(7)
    groups = GROUP_ORDER + ["other"]
    rows = []
    for i in range(n):
        for measure in measures:
            rs = rng.uniform(-0.9, 0.9) if rng.random() > 0.1 else np.nan
            rows.append(
                {
                    "structure": f"structure_with_a_long_name_{i:03d}",
                    "group": groups[i % 5] if i % 5 < 4 else "",
                    "measure": measure,
                    "rs": rs,
                    "ci_low": rs - 0.1,
                    "ci_high": rs + 0.1,
                    "significant": bool(np.isfinite(rs) and abs(rs) > 0.3),
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("plot", ["plot_forest", "plot_rs_heatmap"])
def test_figures_of_every_structure_stay_legible_with_over_a_hundred_structures(tmp_path, saved, plot):
    table = many_structures()
    getattr(figures, plot)(table, ["volume_ml", "hu_mean", "hu_mean_eroded"], outputs_in(tmp_path, plot))
    (fig,) = saved
    assert len(fig.axes[0].get_yticklabels()) == table["structure"].nunique()
    assert fig.get_size_inches()[0] <= 7.2 + 1e-9  # a page width at most
    assert_legible(fig)


# ------------------------------------------------------------------------------------------------- heat map


def mesh_cells(ax):
    """{(row label, column label): RGBA} of the heat map's cells, read from its QuadMesh."""
    (mesh,) = [c for c in ax.collections if isinstance(c, matplotlib.collections.QuadMesh)]
    coords = mesh.get_coordinates()  # (rows + 1, columns + 1, 2)
    colours = mesh.get_facecolors().reshape(coords.shape[0] - 1, coords.shape[1] - 1, 4)
    y_of = {round(y, 6): t for t, y in y_of_ticks(ax).items()}
    x_of = {round(x, 6): t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks())}
    cells = {}
    for i in range(coords.shape[0] - 1):
        for j in range(coords.shape[1] - 1):
            cx, cy = coords[i : i + 2, j : j + 2].reshape(-1, 2).mean(axis=0)
            cells[(y_of[round(cy, 6)], x_of[round(cx, 6)])] = colours[i, j]
    return mesh, cells


def test_rs_heatmap_colours_each_cell_by_rs_and_marks_significant_and_untested_cells(
    tmp_path, saved, correlations_with_other
):
    table = correlations_with_other
    measures = ["volume_ml", "hu_mean"]
    short = {"volume_ml": "volume", "hu_mean": "mean HU"}
    paths = outputs_in(tmp_path, "heatmap")
    figures.plot_rs_heatmap(table, measures, paths)
    (fig,) = saved
    ax = fig.axes[0]
    shown = table[table["measure"].isin(measures)]
    group = group_of_structure(shown)
    want = labels_in_group_order(group)
    # every structure with a row, the untested spleen too (all grey); heart has no row for these measures
    assert (
        top_to_bottom(ax)
        == want
        == ["brain", "kidney right", "liver", "spleen", "femur left", "iliopsoas left", "aorta", "mystery"]
    )
    assert tick_texts(ax) == [short[m] for m in measures]
    mesh, cells = mesh_cells(ax)
    assert mesh.get_clim() == (-1, 1)
    diverging = matplotlib.colormaps["RdBu_r"]
    white = np.asarray(diverging(0.5))
    expected_sig = set()
    for structure in group.index:
        for measure in measures:
            hit = shown[(shown["structure"] == structure) & (shown["measure"] == measure)]
            colour = cells[(structure.replace("_", " "), short[measure])]
            if len(hit) and np.isfinite(hit["rs"].iloc[0]):
                rs = hit["rs"].iloc[0]
                assert colour == pytest.approx(diverging((rs + 1) / 2)), (structure, measure)
                if hit["significant"].iloc[0]:
                    expected_sig.add((structure.replace("_", " "), short[measure]))
            else:  # untested (NaN) or no row at all (brain volume): grey, unlike any rs (0 is near white)
                assert np.ptp(colour[:3]) < 0.02 and colour[3] == 1, (structure, measure, colour)
                assert np.abs(colour[:3] - white[:3]).max() > 0.05
    dots = [line for line in ax.lines if line.get_marker() not in ("", "None", None)]
    (dots,) = dots
    y_name = {round(y, 6): t for t, y in y_of_ticks(ax).items()}
    x_name = dict(zip(np.round(ax.get_xticks(), 6), tick_texts(ax)))
    marked = {(y_name[round(y, 6)], x_name[round(x, 6)]) for x, y in zip(dots.get_xdata(), dots.get_ydata())}
    assert marked == expected_sig
    assert len(fig.axes) == 2, "the heat map and its colour bar"
    text = svg_text(paths[1])
    for name in [*want, "Spearman rs with age", "significant", "not tested", "organ", "other"]:
        assert name in text
    assert_legible(fig)


# ------------------------------------------------------------------------------------ scatter with LOWESS


@pytest.fixture
def scans_with_sex():
    rng = np.random.default_rng(11)
    rows = []
    sexes = ["M"] * 12 + ["F"] * 9 + [np.nan] * 3
    for i, sex in enumerate(sexes):
        age = float(rng.integers(20, 90))
        for structure in ("liver", "aorta"):
            rows.append(
                {
                    "subject": f"s{i}",
                    "age": age,
                    "sex": sex,
                    "contrast": i % 2,
                    "structure": structure,
                    "volume_ml": 1500 - 4 * age + rng.normal(0, 60) if structure == "liver" else rng.normal(80, 9),
                    "hu_mean": rng.normal(50, 8) + 0.2 * age,
                }
            )
    table = pd.DataFrame(rows)
    table.loc[(table["structure"] == "liver") & table["subject"].isin(["s0", "s13"]), "volume_ml"] = np.nan
    # aorta HU: only 4 women with a value, too few for a curve
    women = table["sex"].eq("F") & table["structure"].eq("aorta")
    table.loc[women & ~table["subject"].isin(["s12", "s13", "s14", "s15"]), "hu_mean"] = np.nan
    table.loc[table["subject"].eq("s20"), "contrast"] = np.nan
    return table


SCATTER_PANELS = [{"structure": "liver", "measure": "volume_ml"}, {"structure": "aorta", "measure": "hu_mean"}]


@pytest.mark.parametrize("frac", [2 / 3, 0.4])
def test_scatter_lowess_shows_scans_by_sex_with_one_curve_per_sex(tmp_path, saved, scans_with_sex, frac):
    paths = outputs_in(tmp_path, "scatter")
    kwargs = {} if frac == 2 / 3 else {"frac": frac}
    figures.plot_scatter_lowess(scans_with_sex, SCATTER_PANELS, paths, **kwargs)
    (fig,) = saved
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(SCATTER_PANELS)
    text = svg_text(paths[1])
    for ax, panel in zip(axes, SCATTER_PANELS):
        structure, measure = panel["structure"], panel["measure"]
        rows = scans_with_sex[(scans_with_sex["structure"] == structure) & scans_with_sex[measure].notna()]
        by_sex = {"M": rows[rows["sex"] == "M"], "F": rows[rows["sex"] == "F"], "unknown": rows[rows["sex"].isna()]}
        assert sum(len(r) for r in by_sex.values()) == len(rows)
        labels = {"M": "M (n={})", "F": "F (n={})", "unknown": "sex unknown (n={})"}
        points = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}
        assert set(points) == {labels[k].format(len(r)) for k, r in by_sex.items() if len(r)}
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        for key, chosen in by_sex.items():
            label = labels[key].format(len(chosen))
            assert label in legend and label in text
            got = points[label]
            assert len(got) == len(chosen)
            want = chosen[["age", measure]].to_numpy(float)
            assert np.array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])
        curves = {line.get_label(): line for line in ax.lines}
        for sex in ("M", "F"):
            chosen = by_sex[sex]
            if len(chosen) < 5:
                assert f"_LOWESS {sex}" not in curves
                continue
            fit = lowess(chosen[measure].to_numpy(float), chosen["age"].to_numpy(float), frac=frac, it=3)
            line = curves[f"_LOWESS {sex}"]
            np.testing.assert_allclose(line.get_xdata(), fit[:, 0], rtol=1e-12)
            np.testing.assert_allclose(line.get_ydata(), fit[:, 1], rtol=1e-12)
            colour = mcolors.to_rgba(line.get_color())
            (points_of_sex,) = [c for c in ax.collections if c.get_label().startswith(f"{sex} (")]
            assert mcolors.to_rgb(points_of_sex.get_facecolor()[0]) == pytest.approx(colour[:3])
        assert set(curves) <= {"_LOWESS M", "_LOWESS F"}
        title = ax.get_title()
        assert structure in title and {"volume_ml": "volume", "hu_mean": "mean attenuation"}[measure] in title
    assert "_LOWESS F" not in {line.get_label() for line in axes[1].lines}, "4 women: no curve"
    assert_legible(fig)


def test_scatter_lowess_without_a_sex_column_draws_one_curve_over_all_scans(tmp_path, saved, measurements):
    figures.plot_scatter_lowess(measurements, PANELS[:1], outputs_in(tmp_path, "s"))
    (ax,) = [ax for ax in saved[0].axes if ax.get_visible()]
    rows = measurements[(measurements["structure"] == "liver") & measurements["volume_ml"].notna()]
    (points,) = ax.collections
    assert points.get_label() == f"sex unknown (n={len(rows)})"
    (line,) = ax.lines
    fit = lowess(rows["volume_ml"].to_numpy(float), rows["age"].to_numpy(float), frac=2 / 3, it=3)
    np.testing.assert_allclose(line.get_ydata(), fit[:, 1], rtol=1e-12)


# ------------------------------------------------------------------------------------------ normative charts

CHART_AGES = np.arange(20.0, 91.0, 10.0)
PERCENTILES = [5, 25, 50, 75, 95]


def chart_rows(structure, measure, sex, n, base, slope, reference, note=""):
    if note:
        return pd.DataFrame(
            [
                {
                    "structure": structure,
                    "group": "organ",
                    "measure": measure,
                    "sex": sex,
                    "n": n,
                    "age": np.nan,
                    **{f"p{p}": np.nan for p in PERCENTILES},
                    "contrast": np.nan,
                    "note": note,
                }
            ]
        )
    table = pd.DataFrame(
        {"structure": structure, "group": "organ", "measure": measure, "sex": sex, "n": n, "age": CHART_AGES}
    )
    for p in PERCENTILES:
        table[f"p{p}"] = base + slope * CHART_AGES + (p - 50) * 2.0
    return table.assign(contrast=reference, note=note)


@pytest.fixture
def charts():
    return pd.concat(
        [
            chart_rows("liver", "volume_ml", "M", 12, 1600, -4, 0.0),
            chart_rows("liver", "volume_ml", "F", 9, 1400, -3, 1.0),  # drawn at contrast = 1
            chart_rows("aorta", "hu_mean", "M", 12, 40, 0.3, 0.0),
            chart_rows("aorta", "hu_mean", "F", 4, 0, 0, 0, note="too_few_scans"),
            chart_rows("aorta", "hu_mean", "all", 16, 45, 0.2, 0.0),
        ],
        ignore_index=True,
    )


@pytest.fixture
def coefficients():
    rows = []
    for structure, measure, sex, p50 in [
        ("liver", "volume_ml", "M", 30.0),
        ("liver", "volume_ml", "F", -20.0),
        ("aorta", "hu_mean", "M", 150.0),
        ("aorta", "hu_mean", "all", 140.0),
    ]:
        rows.append(
            {
                "structure": structure,
                "measure": measure,
                "sex": sex,
                "covariate": "contrast",
                **{f"p{p}": p50 + (p - 50) for p in PERCENTILES},
            }
        )
    return pd.DataFrame(rows)


def test_normative_charts_show_the_curves_and_the_scans_adjusted_to_the_reference(
    tmp_path, saved, charts, coefficients, scans_with_sex
):
    paths = outputs_in(tmp_path, "charts")
    figures.plot_normative_charts(charts, coefficients, scans_with_sex, SCATTER_PANELS, paths)
    (fig,) = saved
    sexes = ["M", "F", "all"]
    axes = np.array(fig.axes).reshape(len(SCATTER_PANELS), len(sexes))
    text = svg_text(paths[1])
    for panel, row_axes in zip(SCATTER_PANELS, axes):
        structure, measure = panel["structure"], panel["measure"]
        for ax, sex in zip(row_axes, sexes):
            chart = charts[(charts["structure"] == structure) & (charts["measure"] == measure) & (charts["sex"] == sex)]
            title = ax.get_title()
            assert structure in title and sex in title, title
            if chart.empty:
                assert len(ax.lines) == len(ax.collections) == 0
                assert "no chart" in [t.get_text() for t in ax.texts]
                continue
            note = chart["note"].iloc[0]
            if note:
                assert len(ax.lines) == len(ax.collections) == 0
                assert f"not fitted: {note}" in [t.get_text() for t in ax.texts]
                assert f"not fitted: {note}" in text
                continue
            assert f"n = {chart['n'].iloc[0]}" in title
            reference = chart["contrast"].iloc[0]
            assert f"contrast = {reference:g}" in title
            curves = {line.get_label(): line for line in ax.lines}
            assert set(curves) == {f"p{p}" for p in PERCENTILES}
            for p in PERCENTILES:
                line = curves[f"p{p}"]
                np.testing.assert_array_equal(line.get_xdata(), chart["age"].to_numpy())
                np.testing.assert_array_equal(line.get_ydata(), chart[f"p{p}"].to_numpy())
                if p != 50:
                    assert line.get_linewidth() < curves["p50"].get_linewidth() and line.get_linestyle() != "-"
            assert curves["p50"].get_linestyle() == "-"
            scans = scans_with_sex[
                (scans_with_sex["structure"] == structure)
                & scans_with_sex[measure].notna()
                & scans_with_sex["contrast"].notna()
            ]
            if sex != "all":
                scans = scans[scans["sex"] == sex]
            coef = coefficients.loc[
                (coefficients["structure"] == structure)
                & (coefficients["measure"] == measure)
                & (coefficients["sex"] == sex)
                & (coefficients["covariate"] == "contrast"),
                "p50",
            ].iloc[0]
            want = np.column_stack([scans["age"], scans[measure] - coef * (scans["contrast"] - reference)])
            (points,) = ax.collections
            got = np.asarray(points.get_offsets())
            assert len(got) == len(want) > 0
            np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], rtol=1e-12)
    for label in ("p50", "p25, p75", "p5, p95", "scans"):
        assert label in text
    assert_legible(fig)


def test_normative_charts_draw_the_bootstrap_bands_where_the_charts_have_them(
    tmp_path, saved, charts, coefficients, scans_with_sex
):
    banded = charts.copy()
    for p in PERCENTILES:
        banded[f"p{p}_low"], banded[f"p{p}_high"] = banded[f"p{p}"] - 1.0, banded[f"p{p}"] + 1.0
    figures.plot_normative_charts(
        banded, coefficients, scans_with_sex, SCATTER_PANELS[:1], outputs_in(tmp_path, "charts")
    )
    (fig,) = saved
    drawn = [ax for ax in fig.axes if ax.lines]
    assert drawn
    for ax in drawn:
        bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
        assert len(bands) == len(PERCENTILES)
        for band, line in zip(bands, ax.lines):
            heights = band.get_paths()[0].vertices[:, 1]
            assert heights.min() == pytest.approx(line.get_ydata().min() - 1.0)


def test_normative_charts_hold_at_a_constant_covariate_only_where_it_has_no_coefficient(
    tmp_path, saved, charts, coefficients, scans_with_sex
):
    """A covariate constant over a chart's scans is not in its model (no coefficient): the chart holds at
    that value only, so only scans with that value are shown, unadjusted."""
    paths = outputs_in(tmp_path, "c")
    figures.plot_normative_charts(
        charts, coefficients[coefficients["sex"] != "F"], scans_with_sex, SCATTER_PANELS[:1], paths
    )
    (fig,) = saved
    ax = fig.axes[1]  # liver volume, F: drawn at contrast = 1
    assert "contrast = 1" in ax.get_title()
    scans = scans_with_sex[
        (scans_with_sex["structure"] == "liver")
        & (scans_with_sex["sex"] == "F")
        & scans_with_sex["volume_ml"].notna()
        & (scans_with_sex["contrast"] == 1)
    ]
    (points,) = ax.collections
    got = np.asarray(points.get_offsets())
    want = scans[["age", "volume_ml"]].to_numpy(float)
    assert len(got) == len(want) > 0
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])


def test_normative_charts_need_the_covariates_they_are_drawn_at(tmp_path, charts, coefficients, scans_with_sex):
    with pytest.raises(ValueError, match="contrast"):
        figures.plot_normative_charts(
            charts, coefficients, scans_with_sex.drop(columns="contrast"), SCATTER_PANELS[:1], outputs_in(tmp_path, "c")
        )


# ------------------------------------------------------------------------------------------------- Dice


def summary_table(rows):
    columns = ["structure", "group", "n", "dice_mean", "dice_ci_low", "dice_ci_high"]
    table = pd.DataFrame(rows, columns=columns)
    return table.assign(nsd_mean=table["dice_mean"], nsd_ci_low=table["dice_ci_low"], nsd_ci_high=table["dice_ci_high"])


def test_normative_calibration_worms_show_each_charts_out_of_fold_z_against_normal_quantiles(tmp_path, saved):
    from scipy import stats

    rng = np.random.default_rng(3)
    good, wide = rng.standard_normal(400), 1.5 * rng.standard_normal(300)
    calibration = pd.DataFrame(
        {
            "structure": ["liver", "liver", "spleen"],
            "measure": "volume_ml",
            "sex": ["M", "F", "M"],
            "n": [400, 300, 9],
            "note": ["", "calibration_failed", "too_few_scans"],
        }
    )
    scores = pd.concat(
        [
            pd.DataFrame({"structure": "liver", "measure": "volume_ml", "sex": "M", "z": good, "fit": "out_of_fold"}),
            pd.DataFrame({"structure": "liver", "measure": "volume_ml", "sex": "F", "z": wide, "fit": "out_of_fold"}),
            # placed on the full chart: not the calibration's
            pd.DataFrame({"structure": "liver", "measure": "volume_ml", "sex": "M", "z": [7.0], "fit": "full_chart"}),
        ]
    )
    figures.plot_normative_calibration(calibration, scores, outputs_in(tmp_path, "calibration"))
    (fig,) = saved
    first, second, third = fig.axes[:3]
    for ax, z in ((first, good), (second, wide)):
        x, y = next(line for line in ax.lines if line.get_marker() == "o").get_data()
        expected = stats.norm.ppf((np.arange(1, len(z) + 1) - 0.5) / len(z))
        np.testing.assert_allclose(x, expected)
        np.testing.assert_allclose(y, np.clip(np.sort(z) - expected, -figures.WORM_LIMIT, figures.WORM_LIMIT))
    assert "refused: calibration failed" in second.get_title()
    assert not third.lines and "refused: too few scans" in third.get_title()
    # the band holds a standard normal sample's median deviation 95% of the time (by simulation)
    band = figures.calibration_worms(calibration, scores)[0][1]["band_high"].to_numpy()[199]
    medians = np.sort(rng.standard_normal((4000, 400)), axis=1)[:, 199] - stats.norm.ppf(199.5 / 400)
    assert np.mean(np.abs(medians) <= band) == pytest.approx(0.95, abs=0.015)
    assert (tmp_path / "calibration.png").stat().st_size > 1000


def test_plot_dice_shows_every_evaluable_structure_with_mean_and_ci(tmp_path, saved):
    summary = summary_table(
        [
            ("liver", "organ", 30, 0.95, 0.93, 0.97),
            ("aorta", "vessel", 28, 0.88, 0.80, 0.92),
            ("femur_left", "bone", 1, 0.90, np.nan, np.nan),  # one scan: no CI
            ("spleen", "organ", 0, np.nan, np.nan, np.nan),  # not evaluable
            ("adrenal_gland_left", "organ", 12, 0.71, 0.62, 0.78),
            ("mystery", "other", 5, 0.5, 0.3, 0.6),  # a group outside the four: shown last
        ]
    )
    paths = outputs_in(tmp_path, "dice")
    evaluate.plot_dice(summary, paths)
    (fig,) = saved
    (ax,) = fig.axes
    evaluable = summary[summary["dice_mean"].notna()]
    y_of = y_of_ticks(ax)
    assert sorted(y_of, key=y_of.get, reverse=True) == ["adrenal gland left", "liver", "femur left", "aorta", "mystery"]
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


def test_every_figure_is_the_same_bytes_each_time_it_is_drawn(
    tmp_path, measurements, correlations, scans_with_sex, charts, coefficients
):
    """A rerun (after a crash, or on another day) redraws a figure from the same tables: the files must
    not differ, so that a rerun changes no output and two runs can be compared file by file."""
    summary = summary_table([("liver", "organ", 30, 0.95, 0.93, 0.97), ("aorta", "vessel", 28, 0.88, 0.80, 0.92)])
    draw = {
        "boxplots": lambda paths: figures.plot_age_boxplots(measurements, PANELS, EDGES, paths),
        "dice": lambda paths: evaluate.plot_dice(summary, paths),
        "forest": lambda paths: figures.plot_forest(correlations, ["volume_ml", "hu_mean"], paths),
        "heatmap": lambda paths: figures.plot_rs_heatmap(correlations, ["volume_ml", "hu_mean"], paths),
        "scatter": lambda paths: figures.plot_scatter_lowess(scans_with_sex, SCATTER_PANELS, paths),
        "charts": lambda paths: figures.plot_normative_charts(
            charts, coefficients, scans_with_sex, SCATTER_PANELS, paths
        ),
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

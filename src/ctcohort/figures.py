"""Paper-style figures: measures over age groups, rs with CI per structure (forest plot and heat map),
measures over age with LOWESS trends, and normative percentile charts with the cohort's scans."""

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; no display on a cluster node
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.transforms  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ctcohort.stats import primary_view  # noqa: E402
from ctcohort.structures import GROUPS  # noqa: E402

GROUP_COLOURS = {"organ": "#c0504d", "bone": "#8c8c8c", "muscle": "#4f81bd", "vessel": "#9bbb59"}
MEASURE_LABELS = {
    "volume_ml": "volume (ml)",
    "hu_mean": "mean attenuation (HU)",
    "hu_mean_eroded": "interior mean attenuation (HU)",
    "hu_median": "median attenuation (HU)",
}


def age_group_labels(edges: Sequence[float]) -> list[str]:
    """Labels of the age groups cut at ``edges``: '<41', '41-59', '59-78', '>=78' for the paper's."""
    edges = [float(e) for e in edges]
    fmt = "{:g}".format
    inner = [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
    return [f"<{fmt(edges[0])}", *inner, f">={fmt(edges[-1])}"]


def cohort_age_edges(age: Sequence[float] | pd.Series, spec: Sequence[float] | str) -> list[float]:
    """The edges that cut ``age`` into age groups (see ``age_groups``).

    ``spec`` is either the edges themselves (strictly increasing numbers, e.g. the paper's 41, 59, 78) or
    "quartiles": the 25th, 50th and 75th percentiles of ``age`` (numpy's default linear method), i.e. the
    cohort's own age quartiles. ``age`` holds one age per scan (not one per scan and structure); missing ages
    are left out. A ValueError says why no edges can be had.
    """
    if isinstance(spec, str):
        if spec.strip().lower() != "quartiles":
            raise ValueError(f"age edges: {spec!r} is neither a list of edges nor 'quartiles'")
        ages = pd.to_numeric(pd.Series(np.asarray(age, dtype=object)), errors="coerce").dropna().to_numpy(float)
        if len(ages) == 0:
            raise ValueError("age quartiles: no scan has an age")
        edges = [float(q) for q in np.percentile(ages, [25, 50, 75])]
        if not all(a < b for a, b in zip(edges[:-1], edges[1:])):
            raise ValueError(
                f"age quartiles {edges} are not strictly increasing: too few distinct ages "
                f"({len(np.unique(ages))} distinct among {len(ages)} scans) to cut the cohort into four groups; "
                f"give the edges instead"
            )
        return edges
    try:
        edges = [float(e) for e in spec]
    except (TypeError, ValueError) as err:
        raise ValueError(f"age edges {spec!r}: not a list of numbers ({err})") from err
    if not edges or not all(np.isfinite(edges)):
        raise ValueError(f"age edges {list(spec)!r}: need at least one finite edge")
    if not all(a < b for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"age edges {edges} are not strictly increasing")
    return edges


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
            fig.savefig(
                path,
                dpi=150 if suffix == ".png" else None,
                bbox_inches="tight",
                metadata=SVG_METADATA if suffix == ".svg" else None,
            )
    plt.close(fig)


def plot_age_boxplots(
    measurements: pd.DataFrame,
    panels: Sequence[dict],
    edges: Sequence[float],
    outputs: Sequence[str | Path],
    correlations: pd.DataFrame | None = None,
    age_label: str = "age (years)",
) -> None:
    """Box plots (whiskers at 1.5 IQR) of each panel's structure/measure over the age groups.

    ``age_label`` titles the age axis, e.g. "age quartile (years)" for edges from ``cohort_age_edges``.
    """
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
        ax.set_xlabel(age_label)
        ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
        title = structure.replace("_", " ")
        if correlations is not None:
            hit = primary_view(correlations)
            hit = hit[(correlations["structure"] == structure) & (correlations["measure"] == measure)]
            if len(hit) and np.isfinite(hit["rs"].iloc[0]):
                title += f"\nrs = {hit['rs'].iloc[0]:+.2f}, P = {hit['p'].iloc[0]:.1e}"
        ax.set_title(title, fontsize=10)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    save_figure(fig, outputs)


# ------------------------------------------------------------------------------------------- journal style
# The newer figures are drawn at their print size (a journal column is about 3.5 in, a page width about
# 7.2 in), so that no text is smaller than 7 pt when printed.

JOURNAL_STYLE = {
    "font.size": 7,
    "axes.titlesize": 7.5,
    "axes.labelsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.0,
}
COLUMN_WIDTH_IN, PAGE_WIDTH_IN = 3.5, 7.2

SEX_COLOURS = {"M": "#0072B2", "F": "#D55E00"}  # colour-blind safe (Okabe-Ito blue and vermilion)
UNKNOWN_SEX_COLOUR = "#9a9a9a"
NAN_GREY = "#d9d9d9"
MEASURE_SHORT = {
    "volume_ml": "volume",
    "hu_mean": "mean HU",
    "hu_mean_eroded": "interior mean HU",
    "hu_median": "median HU",
}


def journal_style(plot):
    """Draw (and save) the figure of ``plot`` under JOURNAL_STYLE."""

    @functools.wraps(plot)
    def styled(*args, **kwargs):
        with plt.rc_context(JOURNAL_STYLE):
            return plot(*args, **kwargs)

    return styled


def pretty(name: str) -> str:
    return str(name).replace("_", " ")


def group_name(group) -> str:
    """A structure's group as shown: its name, or "other" where it has none."""
    return group.strip() if isinstance(group, str) and group.strip() else "other"


def ordered_structures(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(structure, group) of each structure in ``table``, in the figures' order: organ, bone, muscle,
    vessel, then any other group (by name, "other" for none), each by structure name."""
    if table.empty:
        return []
    first = table.drop_duplicates("structure")
    groups = first["group"] if "group" in first else pd.Series("", index=first.index)
    pairs = [(str(s), group_name(g)) for s, g in zip(first["structure"], groups)]
    rank = {g: i for i, g in enumerate(GROUPS)}
    return sorted(pairs, key=lambda sg: (rank.get(sg[1], len(rank)), sg[1] if sg[1] not in rank else "", sg[0]))


def say(ax, message: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def legend_below_age_axis(ax, **style) -> None:
    """The legend centred under the age axis's title, where it hides no point or line of the panel."""
    below = ax.transAxes + matplotlib.transforms.ScaledTranslation(0, -27 / 72, ax.figure.dpi_scale_trans)
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, frameon=False, borderaxespad=0.0, **style
    )


# ---------------------------------------------------------------------------------------------- forest plot


@journal_style
def plot_forest(correlations: pd.DataFrame, measures: Sequence[str], outputs: Sequence[str | Path]) -> None:
    """Forest plot: Spearman rs with its 95% CI per structure, one panel per measure.

    Structures tested for at least one of ``measures`` (rs not NaN) are listed top to bottom under group
    headings (organ, bone, muscle, vessel, then any other group), the groups on alternating bands; a filled
    marker is significant (column ``significant``), an open one not. rs and CI are the primary analysis's
    (``stats.primary_view``: adjusted where the table says so).
    """
    measures = list(measures)
    correlations = primary_view(correlations)
    tested = correlations[correlations["measure"].isin(measures) & correlations["rs"].notna()]
    order = ordered_structures(tested)
    rows: list[tuple[str, str]] = []  # ("heading", group) or ("structure", name), top to bottom
    for group in dict.fromkeys(g for _, g in order):
        rows.append(("heading", group))
        rows.extend(("structure", s) for s, g in order if g == group)
    y_of_row = [len(rows) - 1 - i for i in range(len(rows))]
    y_of = {name: y for (kind, name), y in zip(rows, y_of_row) if kind == "structure"}
    width = min(PAGE_WIDTH_IN, 1.6 + 1.9 * len(measures))
    height = 0.125 * max(len(rows), 4) + 1.0
    fig, axes = plt.subplots(1, len(measures), figsize=(width, height), sharey=True, squeeze=False)
    # group bands and headings
    blocks = []  # (group, y_top, y_bottom)
    for i, (kind, name) in enumerate(rows):
        if kind == "heading":
            blocks.append([name, y_of_row[i], y_of_row[i]])
        else:
            blocks[-1][2] = y_of_row[i]
    for ax, measure in zip(axes.flat, measures):
        _forest_panel(
            ax,
            correlations[(correlations["measure"] == measure) & correlations["rs"].notna()],
            measure,
            blocks,
            y_of,
            len(rows),
        )
    first = axes.flat[0]
    for group, top, _ in blocks:
        first.text(
            -0.97,
            top,
            group,
            ha="left",
            va="center",
            fontsize=7.5,
            fontweight="bold",
            color=GROUP_COLOURS.get(group, "black"),
            zorder=4,
        )
    first.set_yticks(list(y_of.values()), [pretty(s) for s in y_of])
    if not order:
        first.text(0.0, 0.5 * (len(rows) - 1), "no structure tested", ha="center", va="center")
    handles = [
        plt.Line2D([], [], marker="o", color="black", mfc=face, ls="", ms=3.2, label=label)
        for face, label in (("black", "significant"), ("white", "not significant"))
    ]
    fig.tight_layout(w_pad=0.8)
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=2,
        frameon=False,
        bbox_transform=fig.transFigure,
    )
    save_figure(fig, outputs)


def _forest_panel(ax, table: pd.DataFrame, measure: str, blocks: list, y_of: dict, n_rows: int) -> None:
    """One measure's panel of the forest plot: the group bands, each tested structure's CI and rs."""
    for k, (_, top, bottom) in enumerate(blocks):
        if k % 2 == 0:
            ax.axhspan(bottom - 0.5, top + 0.5, color="#efefef", lw=0, zorder=0)
    for row in table.itertuples(index=False):
        y, colour = y_of[row.structure], GROUP_COLOURS.get(group_name(row.group), "black")
        ax.plot([row.ci_low, row.ci_high], [y, y], color=colour, lw=0.9, solid_capstyle="butt", zorder=2)
        ax.plot(
            row.rs,
            y,
            "o",
            color=colour,
            mfc=colour if bool(row.significant) else "white",
            ms=3.2,
            mew=0.8,
            zorder=3,
        )
    ax.axvline(0.0, color="black", lw=0.5, zorder=1)
    ax.set_xlim(-1, 1)
    ax.set_ylim(-0.6, max(n_rows, 1) - 0.4)
    ax.set_xticks([-1, -0.5, 0, 0.5, 1], ["\u22121", "\u22120.5", "0", "0.5", "1"])
    ax.set_xlabel(f"{MEASURE_LABELS.get(measure, measure)}\nSpearman rs with age")
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    ax.tick_params(axis="y", length=0)


# ------------------------------------------------------------------------------------------------- heat map


@journal_style
def plot_rs_heatmap(correlations: pd.DataFrame, measures: Sequence[str], outputs: Sequence[str | Path]) -> None:
    """Heat map of Spearman rs with age: structures (rows, grouped and ordered as in ``plot_forest``) by
    ``measures`` (columns), coloured on RdBu_r fixed at -1..1; a dot marks a significant cell, grey an
    untested one (rs NaN, or no row). Every structure with a row for one of ``measures`` is shown. rs is the
    primary analysis's (``stats.primary_view``)."""
    measures = list(measures)
    table = primary_view(correlations)
    table = table[correlations["measure"].isin(measures)].drop_duplicates(["structure", "measure"])
    order = ordered_structures(table)
    names = [s for s, _ in order]
    rs = table.pivot(index="structure", columns="measure", values="rs").reindex(index=names, columns=measures)
    significant = (
        table.assign(significant=table["significant"].astype(bool))
        .pivot(index="structure", columns="measure", values="significant")
        .reindex(index=names, columns=measures)
        .fillna(False)
        .astype(bool)
    )
    values = rs.to_numpy(float)
    nrows, ncols = values.shape
    map_height = 0.12 * max(nrows, 3)
    width = min(PAGE_WIDTH_IN, 2.6 + 0.42 * ncols)
    top, gap, bar_height, bottom = 0.8, 0.25, 0.09, 0.65  # inches: measure names, colour bar, its label
    height = top + map_height + gap + bar_height + bottom
    fig, (ax, cax) = plt.subplots(
        2,
        1,
        figsize=(width, height),
        gridspec_kw={"height_ratios": [map_height, bar_height], "hspace": gap / ((map_height + bar_height) / 2)},
    )
    fig.subplots_adjust(left=1.75 / width, right=1 - 0.75 / width, top=1 - top / height, bottom=bottom / height)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad=NAN_GREY)
    mesh = ax.pcolormesh(
        np.arange(ncols + 1),
        np.arange(nrows + 1),
        np.ma.masked_invalid(values),
        cmap=cmap,
        vmin=-1,
        vmax=1,
        edgecolors="white",
        linewidth=0.3,
    )
    ys, xs = np.nonzero(significant.to_numpy() & np.isfinite(values))
    ax.plot(xs + 0.5, ys + 0.5, ls="", marker="o", ms=2.0, mfc="black", mec="white", mew=0.3)
    ax.set_xlim(0, max(ncols, 1))
    ax.set_ylim(max(nrows, 1), 0)  # first structure on top
    ax.set_yticks(np.arange(nrows) + 0.5, [pretty(s) for s in names])
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(ncols) + 0.5, [MEASURE_SHORT.get(m, m) for m in measures], rotation=45, ha="left")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _heatmap_group_marks(ax, order)
    if not names:
        ax.text(0.5, 0.5, "no structure", ha="center", va="center", transform=ax.transAxes)
    bar = fig.colorbar(mesh, cax=cax, orientation="horizontal")
    bar.set_ticks([-1, -0.5, 0, 0.5, 1], labels=["\u22121", "\u22120.5", "0", "0.5", "1"])
    bar.set_label("Spearman rs with age")
    bar.outline.set_linewidth(0.5)
    handles = [
        plt.Line2D([], [], ls="", marker="o", ms=3, mfc="black", mec="white", mew=0.3, label="significant"),
        matplotlib.patches.Patch(color=NAN_GREY, label="not tested"),
    ]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.32 / height), ncol=2, frameon=False)
    save_figure(fig, outputs)


def _heatmap_group_marks(ax, order: list[tuple[str, str]]) -> None:
    """Lines between the heat map's groups of structures, and each group's bar and name on the right."""
    start = 0
    for group in dict.fromkeys(g for _, g in order):
        size = sum(1 for _, g in order if g == group)
        if start:
            ax.axhline(start, color="black", lw=0.8)
        ax.plot(
            [1.03, 1.03],
            [start + 0.15, start + size - 0.15],
            color=GROUP_COLOURS.get(group, "black"),
            lw=1.5,
            transform=ax.get_yaxis_transform(),
            clip_on=False,
            solid_capstyle="butt",
        )
        ax.text(
            1.07,
            start + size / 2,
            group,
            transform=ax.get_yaxis_transform(),
            ha="left",
            va="center",
            color=GROUP_COLOURS.get(group, "black"),
            fontweight="bold",
        )
        start += size


# ------------------------------------------------------------------------------------ scatter with LOWESS


def sex_of(rows: pd.DataFrame) -> pd.Series:
    """Each row's sex, "M", "F" or None (missing, other, or no sex column)."""
    if "sex" not in rows:
        return pd.Series([None] * len(rows), index=rows.index, dtype=object)
    sex = rows["sex"].astype(object)
    return sex.where(sex.isin(["M", "F"]), None)


SEX_NAMES = {"M": "M", "F": "F", None: "sex unknown", "all": "all"}


@journal_style
def plot_scatter_lowess(
    measurements: pd.DataFrame,
    panels: Sequence[dict],
    outputs: Sequence[str | Path],
    frac: float = 2 / 3,
    it: int = 3,
    min_points: int = 5,
) -> None:
    """Each panel's structure/measure over age: one point per scan coloured by sex (M, F; grey where the
    sex is unknown) and, for each sex with at least ``min_points`` scans, a LOWESS curve
    (``statsmodels`` lowess with ``frac`` and ``it``). Where no scan has a known sex, one curve over all
    scans is drawn instead. The legend gives n per sex."""
    from statsmodels.nonparametric.smoothers_lowess import lowess

    panels = list(panels)
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, int(np.ceil(len(panels) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.45 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        structure, measure = panel["structure"], panel["measure"]
        ax.set_title(f"{pretty(structure)}\n{MEASURE_LABELS.get(measure, measure)}")
        ax.set_xlabel("age (years)")
        ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
        if measure not in measurements:
            say(ax, f"no {measure} measured")
            continue
        rows = measurements[
            (measurements["structure"] == structure) & measurements[measure].notna() & measurements["age"].notna()
        ]
        if rows.empty:
            say(ax, "no scan with a value")
            continue
        sex = sex_of(rows)
        known = sex.notna().any()
        for key in ("M", "F", None):
            chosen = rows[sex.isna()] if key is None else rows[sex == key]
            if chosen.empty:
                continue
            colour = SEX_COLOURS.get(key, UNKNOWN_SEX_COLOUR)
            ax.scatter(
                chosen["age"],
                chosen[measure],
                s=5,
                color=colour,
                alpha=0.55,
                linewidths=0,
                label=f"{SEX_NAMES[key]} (n={len(chosen)})",
                zorder=2,
            )
        curves = [("M", rows[sex == "M"]), ("F", rows[sex == "F"])] if known else [("all", rows)]
        for key, chosen in curves:
            if len(chosen) < min_points:
                continue
            fit = lowess(chosen[measure].to_numpy(float), chosen["age"].to_numpy(float), frac=frac, it=it)
            ax.plot(fit[:, 0], fit[:, 1], color=SEX_COLOURS.get(key, "black"), lw=1.6, label=f"_LOWESS {key}", zorder=3)
        legend_below_age_axis(ax, ncol=2, markerscale=1.8, handletextpad=0.1, columnspacing=0.8)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout(h_pad=1.0, w_pad=0.8)
    save_figure(fig, outputs)


# ------------------------------------------------------------------------------------------ normative charts

CHART_SEXES = ("M", "F", "all")


def percentile_styles(percentiles: Sequence[float]) -> dict[float, dict]:
    """Line style of each percentile: the median solid and thick, the others thinner, dashed then dotted
    the further they lie from it (symmetric pairs alike)."""
    distances = sorted({abs(p - 50) for p in percentiles})
    dashes = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    styles = {}
    for p in percentiles:
        rank = distances.index(abs(p - 50))
        if p == 50:
            styles[p] = {"color": "black", "lw": 1.6, "ls": "-"}
        else:
            styles[p] = {"color": "#333333", "lw": 0.9, "ls": dashes[(rank - (0 in distances)) % len(dashes)]}
    return styles


def text_of_note(note) -> str:
    return "" if note is None or (isinstance(note, float) and np.isnan(note)) else str(note).strip()


def adjusted_values(
    scans: pd.DataFrame, measure: str, chart: pd.DataFrame, coefficients: pd.DataFrame, sex: str
) -> tuple[pd.Series, dict[str, float]]:
    """The scans' ``measure`` adjusted to the chart's reference covariate values with the median's
    coefficients: value - coef_p50 * (covariate - reference), summed over the covariates of the chart's
    model (those with a row in ``coefficients``); on a Box-Cox chart (method lms, family bccg or bct, where the
    covariate moves log mu: p50 empty, eta_mu given) value * exp(-eta_mu * (covariate - reference)). A covariate with
    a reference value but no coefficient was
    constant over the chart's scans (the chart holds for that value only): only scans with that value are
    kept, unadjusted. A covariate whose reference is NaN (not in the table) is ignored. Scans without a
    value of a covariate used are left out. Returns the values (indexed like ``scans``) and the references.
    """
    from ctcohort.normative import chart_layout

    structure = chart["structure"].iloc[0]
    values = scans[measure].astype(float)
    keep = pd.Series(True, index=scans.index)
    references = {}
    for covariate in chart_layout(chart)[1]:
        reference = pd.to_numeric(chart[covariate], errors="coerce").dropna()
        if reference.empty:
            continue  # the chart is not drawn at a value of this covariate
        references[covariate] = float(reference.iloc[0])
        if covariate not in scans:
            raise ValueError(f"normative chart {structure} {measure}: the scans have no {covariate!r} column")
        x = pd.to_numeric(scans[covariate], errors="coerce")
        hit = coefficients[
            (coefficients["structure"] == structure)
            & (coefficients["measure"] == measure)
            & (coefficients["sex"].astype(str) == sex)
            & (coefficients["covariate"] == covariate)
        ]
        coefficient = pd.to_numeric(hit["p50"], errors="coerce").dropna()
        log_shift = pd.to_numeric(hit["eta_mu"], errors="coerce").dropna() if "eta_mu" in hit else coefficient.iloc[:0]
        if coefficient.empty and not log_shift.empty:  # a Box-Cox (lms) chart: the covariate scales the median
            keep &= x.notna()
            values = values * np.exp(-float(log_shift.iloc[0]) * (x - references[covariate]))
            continue
        if coefficient.empty:  # not in the chart's model: the chart holds at the reference value only
            keep &= x == references[covariate]
            continue
        keep &= x.notna()
        values = values - float(coefficient.iloc[0]) * (x - references[covariate])
    return values[keep], references


@journal_style
def plot_normative_charts(
    charts: pd.DataFrame,
    coefficients: pd.DataFrame,
    measurements: pd.DataFrame,
    panels: Sequence[dict],
    outputs: Sequence[str | Path],
) -> None:
    """Normative charts with the cohort's scans: one row per panel (structure/measure), one column per sex
    that the charts hold (M, F, all). Each plot shows the percentile curves (the median solid and thick), their
    bootstrap bands where the charts have them (method lms: p5_low, p5_high, ...), and
    the scans of that sex (all scans for "all") as points, adjusted to the chart's reference covariate
    values with the median's coefficients (see ``adjusted_values``). A chart that was not fitted says why.
    """
    panels = list(panels)
    keys = pd.Series(False, index=charts.index)
    for panel in panels:
        keys |= (charts["structure"] == panel["structure"]) & (charts["measure"] == panel["measure"])
    present = set(charts.loc[keys, "sex"].astype(str))
    sexes = [s for s in CHART_SEXES if s in present] or ["all"]
    from ctcohort.normative import chart_layout, percentile_column

    percentiles = [(percentile_column(p), p) for p in chart_layout(charts)[0]]
    styles = percentile_styles([p for _, p in percentiles])
    nrows, ncols = max(1, len(panels)), len(sexes)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(min(PAGE_WIDTH_IN, 2.4 * ncols) if ncols > 1 else 3.0, 2.35 * nrows), squeeze=False
    )
    for panel, row_axes in zip(panels, axes):
        structure, measure = panel["structure"], panel["measure"]
        for ax, sex in zip(row_axes, sexes):
            chart = charts[
                (charts["structure"] == structure) & (charts["measure"] == measure) & (charts["sex"].astype(str) == sex)
            ]
            head = f"{pretty(structure)}: {MEASURE_SHORT.get(measure, measure)}, {SEX_NAMES.get(sex, sex)}"
            if chart.empty:
                ax.set_title(head)
                say(ax, "no chart")
                continue
            notes = [text_of_note(n) for n in chart["note"]] if "note" in chart else [""] * len(chart)
            fitted = chart[chart["age"].notna().to_numpy() & np.array([not n for n in notes], bool)].sort_values("age")
            n = pd.to_numeric(chart["n"], errors="coerce").iloc[0] if "n" in chart else np.nan
            n_text = f"n = {int(n)}" if np.isfinite(n) else "n = ?"
            if fitted.empty:
                ax.set_title(f"{head}\n{n_text}")
                say(ax, "not fitted: " + (next((n for n in notes if n), "") or "no fitted ages"))
                continue
            scans = measurements[(measurements["structure"] == structure) & measurements["age"].notna()]
            scans = scans[scans[measure].notna()] if measure in scans else scans.iloc[:0].assign(**{measure: []})
            if sex != "all":
                scans = scans[sex_of(scans) == sex]
            values, references = adjusted_values(scans, measure, fitted, coefficients, sex)
            _draw_chart(ax, scans.loc[values.index, "age"], values, fitted, percentiles, styles, sex)
            at = ", ".join(f"{c} = {v:g}" for c, v in references.items())
            ax.set_title(f"{head}\n{n_text}" + (f"; at {at}" if at else ""))
            ax.set_xlabel("age (years)")
            ax.set_ylabel(("adjusted " if references else "") + MEASURE_LABELS.get(measure, measure))
    handles = [plt.Line2D([], [], ls="", marker="o", ms=3, color="#777777", label="scans")]
    seen = {}
    for _, p in percentiles:
        seen.setdefault(abs(p - 50), []).append(p)
    for _, ps in sorted(seen.items()):
        handles.append(plt.Line2D([], [], label=", ".join(f"p{p:g}" for p in ps), **styles[ps[0]]))
    fig.tight_layout(h_pad=1.2, w_pad=0.8)
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), frameon=False)
    save_figure(fig, outputs)


def _draw_chart(
    ax, ages: pd.Series, values: pd.Series, fitted: pd.DataFrame, percentiles: list, styles: dict, sex: str
) -> None:
    """One chart's scans as points, its percentile curves and, where it has them, their bootstrap bands."""
    ax.scatter(
        ages,
        values,
        s=4,
        color=SEX_COLOURS.get(sex, "#555555"),
        alpha=0.45,
        linewidths=0,
        label="scans",
        zorder=1,
    )
    for column, p in percentiles:
        ax.plot(fitted["age"], fitted[column], label=column, zorder=3, **styles[p])
        if {f"{column}_low", f"{column}_high"} <= set(fitted.columns):  # method lms: bootstrap band
            ax.fill_between(
                fitted["age"],
                fitted[f"{column}_low"],
                fitted[f"{column}_high"],
                color="#999999",
                alpha=0.18,
                linewidth=0,
                zorder=2,
            )


# ------------------------------------------------------------------------------- normative calibration

WORM_LIMIT = 1.0  # deviations beyond are drawn at the panel's edge (a clipped z of 8 would flatten the rest)


def calibration_worms(calibration: pd.DataFrame, scores: pd.DataFrame) -> list[tuple[dict, pd.DataFrame | None, str]]:
    """Per chart of ``calibration`` (normative_calibration.tsv, in its order): (its row, the worm table of its
    reference scans' out-of-fold z from ``scores`` (centile_scores.tsv, fit "out_of_fold"), its note). A chart
    without out-of-fold z (too few scans, method quantile) has the table None."""
    from ctcohort.centiles import worm_table

    held = scores[scores["fit"].astype(str) == "out_of_fold"]
    z_by_chart = {
        key: pd.to_numeric(rows["z"], errors="coerce").to_numpy(float)
        for key, rows in held.groupby(
            [held["structure"].astype(str), held["measure"].astype(str), held["sex"].astype(str)]
        )
    }
    worms = []
    for row in calibration.to_dict("records"):
        z = z_by_chart.get((str(row["structure"]), str(row["measure"]), str(row["sex"])), np.empty(0))
        z = z[np.isfinite(z)]
        worms.append((row, worm_table(z) if len(z) else None, text_of_note(row.get("note"))))
    return worms


def _draw_worm(ax, table: pd.DataFrame) -> None:
    deviation = table["deviation"].clip(-WORM_LIMIT, WORM_LIMIT)
    ax.fill_between(
        table["expected"],
        table["band_low"].clip(-WORM_LIMIT),
        table["band_high"].clip(None, WORM_LIMIT),
        color="#dddddd",
        linewidth=0,
        zorder=1,
    )
    ax.axhline(0, color="#777777", lw=0.5, zorder=2)
    ax.plot(table["expected"], deviation, ls="", marker="o", ms=1.2, mew=0, color="black", zorder=3)
    ax.set_ylim(-WORM_LIMIT * 1.05, WORM_LIMIT * 1.05)
    beyond = float((np.abs(table["z"]) > 1.96).mean())
    mean = round(float(table["z"].mean()), 2) + 0.0  # + 0.0: no "-0.00"
    # at the top centre, where the band is narrowest and the worm of a calibrated chart stays low
    ax.text(
        0.5,
        0.97,
        f"n {len(table):,}; mean {mean:.2f}, SD {table['z'].std(ddof=1):.2f}\n{100 * beyond:.1f}% beyond |z| 1.96",
        transform=ax.transAxes,
        fontsize=5.5,
        ha="center",
        va="top",
    )


def draw_normative_calibration(calibration: pd.DataFrame, scores: pd.DataFrame):
    """The figure of ``plot_normative_calibration``, not saved."""
    worms = calibration_worms(calibration, scores)
    ncols = 2 if len(worms) > 1 else 1
    nrows = max(1, -(-len(worms) // ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(COLUMN_WIDTH_IN, 1.35 * nrows + 0.35), sharex=True, sharey=True, squeeze=False
    )
    reach = max([3.0, *(np.abs(t["expected"]).max() + 0.2 for _, t, _ in worms if t is not None)])
    for ax in axes.flat[len(worms) :]:
        ax.set_visible(False)
    if not worms:
        axes[0, 0].set_visible(True)
        say(axes[0, 0], "no normative charts")
    for ax, (row, table, note) in zip(axes.flat, worms):
        ax.set_title(
            f"{pretty(row['structure'])}: {MEASURE_SHORT.get(row['measure'], row['measure'])}, "
            f"{SEX_NAMES.get(row['sex'], row['sex'])}" + (f"\nrefused: {pretty(note)}" if note else ""),
            fontsize=6.5,
        )
        if table is None:
            # not ``say``: taking this panel's ticks away would take those of every (shared) panel
            ax.text(0.5, 0.5, "no out-of-fold z", ha="center", va="center", transform=ax.transAxes)
            ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)
            continue
        _draw_worm(ax, table)
        ax.set_xlim(-reach, reach)
    for column in axes.T:  # the quantiles under the lowest worm of each column (an empty panel may be below)
        drawn = [ax for ax in column if ax.lines]
        if drawn:
            drawn[-1].tick_params(labelbottom=True)
    fig.supxlabel("normal quantile", fontsize=7)
    fig.supylabel("z − normal quantile", fontsize=7)
    fig.tight_layout(h_pad=0.5, w_pad=0.5)
    return fig


@journal_style
def plot_normative_calibration(calibration: pd.DataFrame, scores: pd.DataFrame, outputs: Sequence[str | Path]) -> None:
    """Worm plots (van Buuren & Fredriks 2001) of each normative chart's reference scans' out-of-fold z, one
    small panel per chart: each sorted z less its normal quantile, against that quantile, in the grey
    pointwise 95% band of a standard normal z; a calibrated chart's worm stays flat at 0 inside the band.
    Deviations beyond +-WORM_LIMIT are drawn at the edge. A refused chart says why (its worm is drawn where it
    has out-of-fold z: calibration_failed, undefined_centiles)."""
    save_figure(draw_normative_calibration(calibration, scores), outputs)

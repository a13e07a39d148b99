"""The Methods paragraph of a study (``results/methods.md`` and ``results/methods.html``), written from the
configuration and from what the run counted: scans in, failed (by stage), measured, analysed; structure
measurements excluded per reason; tests made, corrections, alpha, covariates; software and model versions.

Every number in it is read from the run's tables (``exclusion_counts.tsv``, ``age_correlations.tsv``,
``software_versions.tsv``) or the configuration, never typed in, so the paragraph stays true when the
cohort or the settings change. Nothing in it comes from a scan's header.
"""

import hashlib
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ctcohort import rank_null

# the packages a reader needs to redo the numbers, in the order they are named
CITED_SOFTWARE = ("ctcohort", "snakemake", "nnunetv2", "torch", "nibabel", "numpy", "scipy", "statsmodels",
                  "pandas", "matplotlib", "dcm2niix")
REASON_WORDS = {
    "absent": "absent",
    "too_small": "smaller than {min_voxels} voxels",
    "cut_off": "cut off by the field of view (volume excluded, attenuation kept)",
    "hu_nonfinite": "holding non-finite CT values",
    "implausible_hu": "with a median attenuation outside {hu_low} to {hu_high} HU",
    "implausible_volume": "with a volume outside the plausible range",
    "member_missing": "combined structures with a member missing",
}
MEASURE_WORDS = {"volume_ml": "volume", "hu_mean": "mean attenuation", "hu_mean_eroded": "interior mean attenuation",
                 "hu_median": "median attenuation", "hu_std": "standard deviation of attenuation",
                 "n_voxels": "voxel count"}
STAGE_WORDS = {"import_ct": "DICOM import", "segment": "segmentation", "measure": "measurement"}
# how rank-correlation P values are computed (ctcohort.rank_null)
P_VALUE_WORDS = (f"Two-sided P values were exact (every pairing) up to {rank_null.ENUMERATION_MAX_N} patients "
                 f"and, without ties, up to {rank_null.TABLE_MAX_N}; from a seeded permutation test "
                 f"({rank_null.PERMUTATION_RESAMPLES:,} random pairings) up to {rank_null.PERMUTATION_MAX_N} "
                 f"patients; from the t approximation above, never below 2/n!.")
CORRECTION_WORDS = {"bonferroni": "Bonferroni", "fdr_bh": "Benjamini-Hochberg false discovery rate"}


def _count(counts: pd.DataFrame, level: str, kind: str) -> int:
    hit = counts[(counts["level"] == level) & (counts["kind"] == kind)]
    return int(hit["count"].iloc[0]) if len(hit) else 0


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + f" and {items[-1]}"


def _ordinal(p: float) -> str:
    return f"{p:g}" + ("th" if 10 <= p % 100 <= 20 or p % 1 else {1: "st", 2: "nd", 3: "rd"}.get(int(p) % 10, "th"))


def _count_of(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _scans(n: int) -> str:
    return _count_of(n, "scan")


def model_description(bundled: bool, model_files: Sequence[str | Path]) -> str:
    """The segmentation model in words: the bundled demo model, or the model folders' names with the
    first 12 hex digits of each checkpoint's SHA-256 (which weights, exactly, without the folder's path)."""
    checkpoints = [Path(p) for p in model_files if str(p).endswith(".pth")]

    def dataset(path: Path) -> str:  # DatasetXXX_Name/<trainer>__<plans>__<configuration>/fold_N/<checkpoint>
        return next((q.name for q in path.parents if q.name.startswith("Dataset")), "")

    digests = []
    for path in checkpoints:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digests.append(f"{' '.join(filter(None, (dataset(path), path.parent.name)))} SHA-256 {sha.hexdigest()[:12]}")
    if bundled:
        name = "the bundled demo model of ctcohort (trained on phantom scans only)"
    else:
        folders = sorted({dataset(p) for p in checkpoints} - {""})
        name = f"the nnU-Net model{'s' if len(folders) > 1 else ''} {_listing(folders)}" if folders else "the model"
    return f"{name} ({'; '.join(digests)})" if digests else name


RULE_WORDS = {"first": "the earliest", "last": "the latest", "random": "one chosen at random (seeded)"}


def methods_paragraphs(
    config: Mapping, counts: pd.DataFrame, correlations: pd.DataFrame, versions: pd.DataFrame,
    model: str = "", selection: pd.DataFrame | None = None,
) -> list[str]:
    """The Methods text as paragraphs (see the module docstring). ``config``: the workflow's configuration
    sections (structures, measure, qc, statistics, normative, segmentation without its model path),
    ``demo`` (true for the phantom demo) and ``patient_column`` (whether the sheet names patients);
    ``counts``: ``aggregate.exclusion_counts``' table; ``correlations``: ``stats.age_correlations``' table;
    ``versions``: ``provenance.software_versions``' table; ``model``: ``model_description``'s words;
    ``selection``: ``patients.scan_selection``'s table (None: every measured scan its own patient)."""
    version = dict(zip(versions["software"], versions["version"]))
    return [
        _cohort_paragraph(config, counts, version, model, selection),
        _measures_paragraph(config, counts),
        _statistics_paragraph(config, correlations),
        _software_paragraph(version),
    ]


def _patients_sentence(config: Mapping, measured: int, selection: pd.DataFrame | None) -> tuple[str, int]:
    """(the sentence on patients, the patients with an age, who enter the age analyses)."""
    from ctcohort.patients import patient_counts

    if selection is None or selection.empty:
        return "", 0
    n = patient_counts(selection)
    if not config.get("patient_column"):
        return (f"The cohort sheet named no patients, so each scan was taken as a patient of its own "
                f"({_count_of(n['patients'], 'patient')})."), n["patients_with_age"]
    rule = RULE_WORDS.get(config["statistics"]["scan_per_patient"], config["statistics"]["scan_per_patient"])
    repeats = (f", {n['patients_with_repeats']:,} of them with repeated scans" if n["patients_with_repeats"]
               else ", none with repeated scans")
    return (f"The {_scans(measured)} came from {_count_of(n['patients'], 'patient')}{repeats}; every "
            f"cross-sectional analysis used one scan per patient, {rule} of the patient's measured scans with "
            f"an age."), n["patients_with_age"]


def _cohort_paragraph(config, counts, version, model, selection) -> str:
    segmentation = config["segmentation"]
    n_in = _count(counts, "scans", "in the sheet")
    measured = _count(counts, "scans", "measured")
    no_age = _count(counts, "scans", "measured, no age")
    failed = counts[(counts["level"] == "scans") & counts["kind"].str.startswith("failed: ")]
    failed_words = [f"{int(row['count'])} in {STAGE_WORDS.get(stage, stage)}" for _, row in failed.iterrows()
                    if row["count"] and (stage := row["kind"][len("failed: "):])]
    cohort = (f"The demo cohort of {_scans(n_in)} was synthetic (a phantom with planted age effects)."
              if config.get("demo") else f"The cohort comprised {_scans(n_in)}.")
    if segmentation["method"] == "nnunet":
        nnunet = version.get("nnunetv2", "not installed")
        seg = (f"Each scan was segmented into the anatomical structures of the TotalSegmentator model "
               f"(structure table {config['structures']}) by nnU-Net v2 (nnunetv2 {nnunet}) with {model or 'the model'}, "
               f"fold{'s' if len(segmentation['folds']) > 1 else ''} {_listing([str(f) for f in segmentation['folds']])}, "
               f"sliding-window step {segmentation['tile_step']} of the patch size, "
               f"{'with' if segmentation['mirroring'] else 'without'} test-time mirroring.")
    else:
        seg = (f"Segmentations were supplied with the cohort (structure table {config['structures']}) and "
               f"measured as given.")
    dropped = _count(counts, "scans", "dropped: duplicate")
    failed_n = n_in - dropped - measured
    fate = (f"{_scans(failed_n)} could not be processed ({_listing(failed_words)}) and "
            f"{'was' if failed_n == 1 else 'were'} excluded" if failed_n else "Every scan was processed")
    if dropped:
        cohort += (f" {_count_of(dropped, 'row')} of the sheet repeated another scan (the same file or identical "
                   f"content) and {'was' if dropped == 1 else 'were'} dropped.")
    patients, with_age = _patients_sentence(config, measured, selection)
    if patients:
        fate += f"; {_scans(measured)} were measured. {patients} {_count_of(with_age, 'patient')} entered the age analyses."
    else:
        fate += (f"; {_scans(measured)} were measured, of which {_scans(measured - no_age)} with a recorded age "
                 f"entered the age analyses.")
    return " ".join([cohort, seg, fate])


def _measures_paragraph(config, counts) -> str:
    measure_cfg, qc_cfg = config["measure"], config.get("qc", {})
    hu_window = qc_cfg.get("hu_window") or [None, None]
    words = {"min_voxels": measure_cfg["min_voxels"], "hu_low": hu_window[0], "hu_high": hu_window[1]}
    structures = counts[counts["level"] == "structures"]
    total = int(structures["count"].sum())
    excluded = [f"{int(row['count']):,} {REASON_WORDS.get(row['kind'], row['kind']).format(**words)}"
                for _, row in structures.iterrows() if row["kind"] != "measured" and row["count"]]
    checks = [f"structures smaller than {measure_cfg['min_voxels']} voxels or absent were excluded"]
    if measure_cfg["border_margin"]:
        checks.append(f"a structure reaching within {measure_cfg['border_margin']} voxels of the image border "
                      f"was considered cut off by the field of view and excluded from volume analyses")
    if qc_cfg.get("plausible_volumes"):
        checks.append(f"volumes outside a plausible range (table {qc_cfg['plausible_volumes']}) were excluded")
    if qc_cfg.get("hu_window"):
        checks.append(f"attenuation values were excluded where the structure's median lay outside "
                      f"{hu_window[0]} to {hu_window[1]} HU")
    measures = (f"For every structure, volume was computed as the number of voxels times the voxel volume and "
                f"attenuation as the mean CT number (HU) over the structure's voxels, and over its interior after "
                f"a one-voxel erosion. Excluded values were left missing, never set to zero: "
                f"{'; '.join(checks)}. Of {total:,} structure measurements, "
                f"{_listing(excluded) if excluded else 'none'} {'were excluded' if excluded else 'was excluded'}.")
    combined = config["statistics"].get("combined") or {}
    if combined:
        measures += (f" Combined structures were also analysed ({_listing(sorted(combined))}): summed "
                     f"volume and voxel-weighted mean attenuation, defined only where every member was measured.")
    return measures


def _statistics_paragraph(config, correlations) -> str:
    stats_cfg = config["statistics"]
    tested = correlations[correlations["note"].astype(object).fillna("").astype(str) == ""]
    significant = tested["significant"].astype(str).str.lower() == "true"
    correction = CORRECTION_WORDS.get(stats_cfg["correction"], stats_cfg["correction"])
    covariates = list(stats_cfg.get("partial_covariates") or [])
    statistics = (
        f"Spearman's rank correlation coefficient (rs) between age and each measure "
        f"({_listing([MEASURE_WORDS.get(m, m) for m in stats_cfg['measures']])}) was computed per structure with 95% confidence intervals from "
        f"Fisher's z with the Bonett-Wright standard error; structure-measure pairs with fewer than "
        f"{stats_cfg['min_n']} patients were not tested. {P_VALUE_WORDS} "
        f"Of {len(correlations):,} pairs, {len(tested):,} were tested; "
        f"P values were corrected for these {len(tested):,} tests ({correction}), and a correlation was called "
        f"significant at a corrected P below {stats_cfg['alpha']:g}: {int(significant.sum())} were "
        f"({int((significant & (tested['rs'] > 0)).sum())} positive, {int((significant & (tested['rs'] < 0)).sum())} "
        f"negative)."
    )
    if covariates:
        statistics += (
            f" Partial Spearman correlations were adjusted for {_listing(covariates)} (categorical covariates as "
            f"indicator variables). Correlations were also computed separately in men and women, and their "
            f"difference tested on Fisher's z with the Bonett-Wright variances. Change per decade of age was estimated by ordinary least squares "
            f"with {_listing(covariates)} as covariates and HC3 heteroscedasticity-consistent standard errors; "
            f"non-linearity was tested by an F test of a natural cubic spline in age "
            f"({stats_cfg['spline_df']} degrees of freedom, knots at quantiles of the distinct ages) against the "
            f"linear model."
        )
    normative = config.get("normative") or {}
    if normative.get("panels"):
        percentiles = _listing([_ordinal(p) for p in normative["percentiles"]])
        adjusted = list(normative.get("covariates") or [])
        statistics += (
            f" Age-specific reference percentiles (the {percentiles}){' by sex' if normative.get('by_sex') else ''} "
            f"were estimated by linear quantile regression on a natural cubic spline in age "
            f"({normative['spline_df']} degrees of freedom)"
            f"{' adjusted for ' + _listing(adjusted) if adjusted else ''}, made non-crossing by monotone "
            f"rearrangement; charts were fitted only with at least {normative['min_n']} patients."
        )
    return statistics


def _software_paragraph(version: Mapping) -> str:
    cited = [f"{name} {version[name]}" for name in CITED_SOFTWARE
             if version.get(name) not in (None, "not installed")]
    python = version.get("python")
    return (f"Analyses were run with the ctcohort Snakemake workflow{f' on Python {python}' if python else ''} "
            f"({_listing(cited)}).")


def write_methods(paragraphs: Sequence[str], markdown_path: str | Path, html_path: str | Path) -> None:
    """The paragraphs as Markdown and as a small HTML page (which the report shows inline)."""
    Path(markdown_path).write_text("# Methods\n\n" + "\n\n".join(paragraphs) + "\n")
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    Path(html_path).write_text(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Methods</title></head>\n"
        f"<body style=\"font-family: serif; max-width: 45em\">\n<h1>Methods</h1>\n{body}\n</body></html>\n"
    )

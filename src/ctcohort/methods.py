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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ctcohort import rank_null
from ctcohort.contrast_phase import (
    ESTIMATED,
    NO_SOURCE,
    NOT_AVAILABLE,
    SHEET,
    SHEET_ELSE_ESTIMATED,
    contrast_counts,
)
from ctcohort.stats import StatisticsSettings

# the packages a reader needs to redo the numbers, in the order they are named
CITED_SOFTWARE = (
    "ctcohort",
    "snakemake",
    "nnunetv2",
    "torch",
    "nibabel",
    "numpy",
    "scipy",
    "statsmodels",
    "scikit-learn",
    "pandas",
    "matplotlib",
    "dcm2niix",
)
REASON_WORDS = {
    "absent": "absent",
    "too_small": "smaller than {min_voxels} voxels",
    "cut_off": "cut off by the field of view (volume excluded, attenuation kept)",
    "hu_nonfinite": "holding non-finite CT values",
    "implausible_hu": "with a median attenuation outside {hu_low} to {hu_high} HU",
    "implausible_volume": "with a volume outside the plausible range",
    "member_missing": "combined structures with a member missing",
    "reviewer_excluded": "excluded by a reviewer",
}
MEASURE_WORDS = {
    "volume_ml": "volume",
    "hu_mean": "mean attenuation",
    "hu_mean_eroded": "interior mean attenuation",
    "hu_median": "median attenuation",
    "hu_std": "standard deviation of attenuation",
    "n_voxels": "voxel count",
}
RESAMPLING_WORDS = {
    "trilinear": "the CT resampled trilinearly to the model's spacing and the logits back onto the CT's grid",
    "totalsegmentator": (
        "with TotalSegmentator 2.18.0's pre- and postprocessing (the CT resampled to the model's "
        "spacing with linear interpolation, the labels back with nearest neighbour; for its total "
        "tasks its sliding-window step of 0.8)"
    ),
}
STAGE_WORDS = {"import_ct": "DICOM import", "segment": "segmentation", "measure": "measurement"}
# how rank-correlation P values are computed (ctcohort.rank_null)
P_VALUE_WORDS = (
    f"Two-sided P values were exact (every pairing) up to {rank_null.ENUMERATION_MAX_N} patients "
    f"and, without ties, up to {rank_null.TABLE_MAX_N}; from a seeded permutation test "
    f"({rank_null.PERMUTATION_RESAMPLES:,} random pairings) up to {rank_null.PERMUTATION_MAX_N} "
    f"patients; from the t approximation above, never below 2/n!."
)
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


@dataclass(frozen=True)
class RunTables:
    """The run's tables that the Methods text counts from."""

    counts: pd.DataFrame  # aggregate.exclusion_counts' table
    correlations: pd.DataFrame  # stats.age_correlations' table
    versions: pd.DataFrame  # provenance.software_versions' table
    selection: pd.DataFrame | None = None  # patients.scan_selection's table (None: every scan its own patient)
    regression: pd.DataFrame | None = None  # its rows say which covariates it used
    longitudinal: pd.DataFrame | None = None  # its rows say which covariates it used
    calibration: pd.DataFrame | None = None  # the normative charts' (one row per chart: n, note, calibration)
    ct_age: pd.DataFrame | None = None  # ct_age.ct_age's summary table (None: no CT age)
    phases: pd.DataFrame | None = None  # contrast_phase.contrast_phase_table's (None: not estimated)
    contrast: pd.DataFrame | None = None  # per scan contrast_source and contrast_disagrees (None: no estimate)
    acquisition: pd.DataFrame | None = None  # acquisition.association_table's table
    sensitivity: pd.DataFrame | None = None  # acquisition.sensitivity_table's table


def methods_paragraphs(config: Mapping, tables: RunTables, model: str = "") -> list[str]:
    """The Methods text as paragraphs (see the module docstring). ``config``: the workflow's configuration
    sections (structures, measure, qc, statistics, normative, segmentation without its model path),
    ``demo`` (true for the phantom demo) and ``patient_column`` (whether the sheet names patients);
    ``model``: ``model_description``'s words."""
    version = dict(zip(tables.versions["software"], tables.versions["version"]))
    return [
        _cohort_paragraph(config, tables.counts, version, model, tables.selection),
        _measures_paragraph(config, tables.counts),
        _statistics_paragraph(config, tables.correlations, tables.regression, tables.longitudinal, tables.calibration),
        *filter(None, [_acquisition_sentence(tables.acquisition, tables.sensitivity)]),
        *filter(None, [_ct_age_sentence(config.get("ct_age") or {}, tables.ct_age)]),
        *filter(None, [_contrast_paragraph(config, tables, version)]),
        _software_paragraph(version),
    ]


def _patients_sentence(config: Mapping, measured: int, selection: pd.DataFrame | None) -> tuple[str, int]:
    """(the sentence on patients, the patients with an age, who enter the age analyses)."""
    from ctcohort.patients import patient_counts

    if selection is None or selection.empty:
        return "", 0
    n = patient_counts(selection)
    if not config.get("patient_column"):
        return (
            f"The cohort sheet named no patients, so each scan was taken as a patient of its own "
            f"({_count_of(n['patients'], 'patient')})."
        ), n["patients_with_age"]
    rule = RULE_WORDS.get(config["statistics"]["scan_per_patient"], config["statistics"]["scan_per_patient"])
    repeats = (
        f", {n['patients_with_repeats']:,} of them with repeated scans"
        if n["patients_with_repeats"]
        else ", none with repeated scans"
    )
    return (
        f"The {_scans(measured)} came from {_count_of(n['patients'], 'patient')}{repeats}; every "
        f"cross-sectional analysis used one scan per patient, {rule} of the patient's measured scans with "
        f"an age."
    ), n["patients_with_age"]


def _models_words(names: Sequence[str]) -> str:
    if len(names) < 2:
        return ""
    return (
        f" Each scan was segmented by each of {len(names)} models ({_listing(list(names))}); a structure that an "
        "earlier of these models also segments is named model:structure."
    )


def _cohort_paragraph(config, counts, version, model, selection) -> str:
    segmentation = config["segmentation"]
    n_in = _count(counts, "scans", "in the sheet")
    measured = _count(counts, "scans", "measured")
    no_age = _count(counts, "scans", "measured, no age")
    failed = counts[(counts["level"] == "scans") & counts["kind"].str.startswith("failed: ")]
    failed_words = [
        f"{int(row['count'])} in {STAGE_WORDS.get(stage, stage)}"
        for _, row in failed.iterrows()
        if row["count"] and (stage := row["kind"][len("failed: ") :])
    ]
    cohort = (
        f"The demo cohort of {_scans(n_in)} was synthetic (a phantom with planted age effects)."
        if config.get("demo")
        else f"The cohort comprised {_scans(n_in)}."
    )
    if segmentation["method"] == "nnunet":
        nnunet = version.get("nnunetv2", "not installed")
        seg = (
            f"Each scan was segmented into the anatomical structures of the TotalSegmentator model "
            f"(structure table {config['structures']}) by nnU-Net v2 (nnunetv2 {nnunet}) with {model or 'the model'}, "
            f"fold{'s' if len(segmentation['folds']) > 1 else ''} {_listing([str(f) for f in segmentation['folds']])}, "
            f"sliding-window step {segmentation['tile_step']} of the patch size, "
            f"{'with' if segmentation['mirroring'] else 'without'} test-time mirroring, "
            + RESAMPLING_WORDS[segmentation["resampling"]]
            + "."
            + _models_words(config.get("models") or [])
        )
    else:
        seg = (
            f"Segmentations were supplied with the cohort (structure table {config['structures']}) and "
            f"measured as given."
        )
    dropped = _count(counts, "scans", "dropped: duplicate")
    failed_n = n_in - dropped - measured
    fate = (
        f"{_scans(failed_n)} could not be processed ({_listing(failed_words)}) and "
        f"{'was' if failed_n == 1 else 'were'} excluded"
        if failed_n
        else "Every scan was processed"
    )
    if dropped:
        cohort += (
            f" {_count_of(dropped, 'row')} of the sheet repeated another scan (the same file or identical "
            f"content) and {'was' if dropped == 1 else 'were'} dropped."
        )
    patients, with_age = _patients_sentence(config, measured, selection)
    if patients:
        fate += (
            f"; {_scans(measured)} were measured. {patients} {_count_of(with_age, 'patient')} entered the age analyses."
        )
    else:
        fate += (
            f"; {_scans(measured)} were measured, of which {_scans(measured - no_age)} with a recorded age "
            f"entered the age analyses."
        )
    return " ".join([cohort, seg, fate])


def _measures_paragraph(config, counts) -> str:
    measure_cfg, qc_cfg = config["measure"], config.get("qc", {})
    hu_window = qc_cfg.get("hu_window") or [None, None]
    words = {"min_voxels": measure_cfg["min_voxels"], "hu_low": hu_window[0], "hu_high": hu_window[1]}
    structures = counts[counts["level"] == "structures"]
    total = int(structures["count"].sum())
    excluded = [
        f"{int(row['count']):,} {REASON_WORDS.get(row['kind'], row['kind']).format(**words)}"
        for _, row in structures.iterrows()
        if row["kind"] != "measured" and row["count"]
    ]
    checks = [f"structures smaller than {measure_cfg['min_voxels']} voxels or absent were excluded"]
    if measure_cfg["border_margin"]:
        checks.append(
            f"a structure reaching within {measure_cfg['border_margin']} voxels of the image border "
            f"was considered cut off by the field of view and excluded from volume analyses"
        )
    if qc_cfg.get("plausible_volumes"):
        checks.append(f"volumes outside a plausible range (table {qc_cfg['plausible_volumes']}) were excluded")
    if qc_cfg.get("hu_window"):
        checks.append(
            f"attenuation values were excluded where the structure's median lay outside "
            f"{hu_window[0]} to {hu_window[1]} HU"
        )
    measures = (
        f"For every structure, volume was computed as the number of voxels times the voxel volume and "
        f"attenuation as the mean CT number (HU) over the structure's voxels, and over its interior after "
        f"a one-voxel erosion. Excluded values were left missing, never set to zero: "
        f"{'; '.join(checks)}. Of {total:,} structure measurements, "
        f"{_listing(excluded) if excluded else 'none'} {'were excluded' if excluded else 'was excluded'}."
    )
    reviewed = _count(counts, "scans", "measured, reviewer_excluded")
    by_reviewer = _count(counts, "structures", "reviewer_excluded")
    if by_reviewer:
        measures += (
            " After looking at each scan's preview on a review page that ranked the scans by automated "
            "sanity checks (left and right structures on the wrong side, vertebrae out of order, one-piece "
            f"structures in several pieces, robust volume outliers for age and sex), a reviewer excluded "
            f"{_scans(reviewed)} as a whole; {by_reviewer:,} structure measurements in all were excluded "
            f"by review."
        )
    combined = config["statistics"].get("combined") or {}
    if combined:
        measures += (
            f" Combined structures were also analysed ({_listing(sorted(combined))}): summed "
            f"volume and voxel-weighted mean attenuation, defined only where every member was measured."
        )
    return measures


def _used(table: pd.DataFrame | None, column: str = "covariates") -> list[str]:
    """The covariates a table's rows actually used (its ``covariates`` column), in first-seen order."""
    if table is None or column not in table.columns:
        return []
    names = table[column].astype(object).fillna("").astype(str)
    return list(dict.fromkeys(name for cell in names for name in cell.split(",") if name))


def _statistics_paragraph(config, correlations, regression=None, longitudinal=None, calibration=None) -> str:
    stats_cfg = config["statistics"]
    sentences = [
        f"Spearman's rank correlation coefficient (rs) between age and each measure "
        f"({_listing([MEASURE_WORDS.get(m, m) for m in stats_cfg['measures']])}) was computed per structure, one "
        f"scan per patient, with 95% confidence intervals from Fisher's z with the Bonett-Wright standard error; "
        f"structure-measure pairs with fewer than {stats_cfg['min_n']} patients were not tested. {P_VALUE_WORDS}",
        _primary_sentence(stats_cfg, correlations),
        _family_sentence(stats_cfg, correlations),
        _models_sentence(stats_cfg, regression),
        _longitudinal_sentence(config, longitudinal),
        _normative_sentence(config.get("normative") or {}, calibration),
    ]
    return " ".join(sentence for sentence in sentences if sentence)


def _primary_sentence(stats_cfg, correlations) -> str:
    """Which analysis is primary, adjusted for the covariates the table says it used."""
    from ctcohort.stats import primary_view

    configured = list(StatisticsSettings.from_config(stats_cfg).adjusted_for)
    used = _used(correlations)
    missing = [c for c in configured if c not in used]
    adjusted = primary_view(correlations).get("primary", pd.Series(dtype=str)).eq("adjusted").any()
    absent = f" ({_listing(missing)} configured but not available)" if missing and configured else ""
    if adjusted:
        return (
            f"The primary analysis was the partial Spearman correlation adjusted for {_listing(used)}{absent} "
            f"(ranks of age and of the measure regressed on the ranks of the covariates, categorical ones as "
            f"indicator variables; scans with a missing covariate left out), with the unadjusted rs reported "
            f"beside it."
        )
    if used:
        return (
            f"The primary analysis was the unadjusted correlation; partial Spearman correlations adjusted for "
            f"{_listing(used)} are reported beside it."
        )
    return f"The primary analysis was the unadjusted correlation{absent}; no covariate was adjusted for."


def _family_sentence(stats_cfg, correlations) -> str:
    """Tests, correction families, and how alpha is applied (to the corrected P)."""
    from ctcohort.stats import COMBINED, primary_view

    view = primary_view(correlations)
    tested = view[view["note"].astype(object).fillna("").astype(str) == ""]
    family = tested["family"] if "family" in tested.columns else pd.Series("structures", tested.index)
    n_structures, n_combined = int((family != COMBINED).sum()), int((family == COMBINED).sum())
    significant = tested["significant"].astype(str).str.lower() == "true"
    correction = CORRECTION_WORDS.get(stats_cfg["correction"], stats_cfg["correction"])
    alpha = stats_cfg["alpha"]
    families = (
        f"{n_structures:,} of the segmentation's structures and {n_combined:,} of combined structures, "
        f"each set its own correction family (a combined structure repeats its members)"
        if n_combined
        else f"{n_structures:,}, one correction family"
    )
    raw = (
        f" (for Bonferroni: a raw P below {alpha / max(n_structures, 1):.3g} among the structures)"
        if stats_cfg["correction"] == "bonferroni" and n_structures
        else ""
    )
    return (
        f"Of {len(correlations):,} structure-measure pairs, {len(tested):,} were tested in the primary analysis: "
        f"{families}. P values were corrected within each family ({correction}), and a correlation was called "
        f"significant where its corrected P was below {alpha:g}{raw}, which holds the "
        f"{'family-wise error' if stats_cfg['correction'] == 'bonferroni' else 'false discovery rate'} at "
        f"{alpha:g}: {int(significant.sum())} were "
        f"({int((significant & (tested['rs'] > 0)).sum())} positive, "
        f"{int((significant & (tested['rs'] < 0)).sum())} negative). Measures that nearly repeat each other "
        f"(mean attenuation over the whole structure and over its interior) share a family, which makes the "
        f"correction conservative."
    )


def _models_sentence(stats_cfg, regression) -> str:
    used = _used(regression)
    return (
        f"Correlations were also computed separately in men and women (P per sex uncorrected), and their "
        f"difference tested on Fisher's z with the Bonett-Wright variances (corrected over the structures "
        f"tested in both sexes). Change per decade of age was estimated by ordinary least squares"
        f"{' with ' + _listing(used) + ' as covariates' if used else ' without covariates'} and HC3 "
        f"heteroscedasticity-consistent standard errors (P from a Freedman-Lane permutation test up to "
        f"{rank_null.PERMUTATION_MAX_N} patients, from the normal reference above); non-linearity was tested by "
        f"an F test of a natural cubic spline in age ({stats_cfg['spline_df']} degrees of freedom, knots at "
        f"quantiles of the distinct ages) against the linear model, corrected as a family of its own."
    )


def _longitudinal_sentence(config, longitudinal) -> str:
    if longitudinal is None or longitudinal.empty:
        return ""
    settings = config.get("longitudinal") or {}
    tested = longitudinal[longitudinal["note"].astype(object).fillna("").astype(str) == ""]
    if tested.empty:
        return (
            f"Within-patient change was not estimated: no structure had two or more scans of at least "
            f"{settings.get('min_patients', 'the configured number of')} patients."
        )
    covariates = _listing(_used(longitudinal) or list(settings.get("covariates") or []))
    return (
        f"Within-patient change was estimated from every scan of the patients with repeated scans (up to "
        f"{int(tested['n_patients'].max()):,} patients and {int(tested['n_scans'].max()):,} scans per structure) "
        f"by a linear mixed model fitted by restricted maximum likelihood: the measure on years since the "
        f"patient's first scan and age at that scan{', ' + covariates if covariates else ''}, with a random "
        f"intercept per patient and a random slope on time where identifiable; the within-patient slope was "
        f"tested by its Wald P (corrected over the tested structures) and compared with the cross-sectional "
        f"slope of baseline age (P of the difference uncorrected)."
    )


CENTILE_FAMILY_NAMES = {
    "normal": "normal",
    "bccg": "Box-Cox Cole-Green (LMS)",
    "shash": "sinh-arcsinh (Jones and Pewsey)",
    "bct": "Box-Cox t",
}


def _centile_families(families: Sequence[str]) -> str:
    """'a normal distribution', or 'a normal, ... or Box-Cox t distribution'."""
    names = [CENTILE_FAMILY_NAMES[f] for f in families]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" or {names[-1]}"
    return f"a {listed} distribution"


def _normative_sentence(normative, calibration: pd.DataFrame | None = None) -> str:
    if not normative.get("panels"):
        return ""
    from ctcohort.centiles import CentileSettings

    percentiles = _listing([_ordinal(p) for p in normative["percentiles"]])
    adjusted = list(normative.get("covariates") or [])
    by_sex = " by sex" if normative.get("by_sex") else ""
    adjustment = f" adjusted for {_listing(adjusted)}" if adjusted else ""
    if normative.get("method") == "lms":
        lms = CentileSettings.from_config(normative)
        model = (
            f"Age-specific reference centiles (the {percentiles}){by_sex} were estimated from location-scale-"
            f"shape models{adjustment}: {_centile_families(lms.families)} whose location and "
            f"scale followed age on natural cubic splines (skewness and tails constant), the family and the "
            f"splines' degrees "
            f"of freedom chosen by GAIC({lms.gaic_penalty:g}), fitted by maximum likelihood. Each chart was "
            f"calibrated by {lms.folds}-fold cross-validation (the model chosen again in each fold) and refused "
            f"where the held-out scans' share beyond |z| 1.96, or their mean or SD of z, left its "
            f"{100 * lms.calibration_level:g}% interval; charts were not extrapolated in age, z was bounded "
            f"at {lms.z_limit:g}, and the curves' {100 * lms.bootstrap_level:g}% bands came from "
            f"{lms.bootstrap_resamples} bootstrap resamples.{_site_sentence(normative, calibration)}"
        )
    else:
        model = (
            f"Age-specific reference percentiles (the {percentiles}){by_sex} were estimated by linear quantile "
            f"regression on a natural cubic spline in age ({normative['spline_df']} degrees of freedom)"
            f"{adjustment}, solved exactly and made non-crossing by monotone rearrangement."
        )
    reference = f"the scans with {normative['reference']}" if normative.get("reference") else "every patient"
    sentence = (
        f"{model} Charts needed at least {normative['min_n']} patients. The reference was {reference}, less "
        f"the structures that the automated sanity checks flagged (unless a reviewer accepted them)."
    )
    if calibration is not None and len(calibration):
        drawn = calibration[calibration["note"].fillna("") == ""]
        sentence += f" {len(drawn)} of {len(calibration)} charts were drawn" + (
            f", from {int(drawn['n'].min()):,} to {int(drawn['n'].max()):,} patients each." if len(drawn) else "."
        )
    return sentence


def _site_sentence(normative: Mapping, calibration: pd.DataFrame | None) -> str:
    """The random site intercept of the lms charts, where normative.site names one."""
    site = normative.get("site")
    if not site:
        return ""
    sentence = (
        f" Each chart's location had a Gaussian random intercept for {site}, estimated jointly by penalised "
        f"maximum likelihood, its SD by the Laplace-approximate restricted likelihood (as mgcv's REML) and "
        f"counted in GAIC by its effective degrees of freedom; the charts show the population curves, and a "
        f"scan of a {site} outside the reference was placed on them with z widened by the {site} SD."
    )
    counts = calibration["sites"].dropna() if calibration is not None and "sites" in calibration else pd.Series([])
    if len(counts):
        sentence += f" The charts had {_listing(sorted({f'{int(c)}' for c in counts}, key=int))} {site} levels."
    return sentence


CT_AGE_MODEL_WORDS = {
    "ridge": "ridge regression",
    "elastic_net": "elastic-net regression",
    "gradient_boosting": "gradient-boosted trees",
}


def _acquisition_sentence(association: pd.DataFrame | None, sensitivity: pd.DataFrame | None) -> str:
    """Which acquisition variables were checked against age, which were associated (P < .05), and how many
    rows of the primary analysis changed their conclusion once adjusted for them; "" without any."""
    if association is None or association.empty:
        return ""
    associated = association.loc[association["p"] < 0.05, "variable"].tolist()
    sentence = (
        f"Acquisition variables ({_listing(association['variable'].tolist())}) were tested for an association "
        f"with age (Spearman's rs for numbers, the Kruskal-Wallis test for categories); "
        f"{_listing(associated) + ' changed' if associated else 'none changed'} with age at P < .05."
    )
    if sensitivity is not None and (sensitivity["covariates"] != "").any():
        used = _used(sensitivity)
        changed = int(sensitivity["conclusion_changed"].astype(str).str.lower().eq("true").sum())
        sentence += (
            f" Adjusted additionally for {_listing(used)}, {_count_of(changed, 'structure-measure pair')} "
            f"changed significance (or, significant both times, the sign of rs)."
        )
    return sentence


def _ct_age_sentence(settings: Mapping, summary: pd.DataFrame | None) -> str:
    """CT age: the nested cross-validation, the correction, and the whole-body model's error (ct_age_summary)."""
    if summary is None or summary.empty:
        return ""
    row = summary.iloc[0]
    candidates = _listing([CT_AGE_MODEL_WORDS.get(m, m) for m in settings.get("models", [])])
    measures = _listing([MEASURE_WORDS.get(m, m) for m in settings.get("measures", [])])
    covariates = _listing(settings.get("covariates") or [])
    design = (
        f"Age was predicted from every structure's {measures} (volumes as logarithms)"
        f"{' with ' + covariates if covariates else ''} by nested cross-validation: {int(row['folds'])} outer "
        f"folds by patient, each scan predicted by the model of the fold that held its patient out, trained on "
        f"one scan per patient; within each training fold {int(row['inner_folds'])} inner folds chose among "
        f"{candidates} (missing values imputed within the training fold) by mean absolute error. The age gap "
        f"was corrected for regression to the mean as (predicted - b0) / b1 - age (de Lange & Cole 2020), "
        f"with b0 and b1 from a regression of the inner out-of-fold predictions on age in the training fold."
    )
    if row["note"]:
        return (
            design + f" No model was fitted: fewer than {settings.get('min_scans')} patients with an age and "
            f"enough measurements."
        )
    groups = list(summary["features"].iloc[1:])
    return (
        design + f" In {_count_of(int(row['n_scans']), 'patient')} the out-of-fold mean absolute error was "
        f"{row['mae']:.1f} years and R\u00b2 {row['r2']:.2f} ({CT_AGE_MODEL_WORDS.get(row['model'], row['model'])} "
        f"chosen in most folds)"
        + (f"; separate models used the {_listing(groups)} structures only." if groups else ".")
    )


def _contrast_paragraph(config: Mapping, tables: RunTables, version: Mapping) -> str:
    sentences = [_phase_sentence(tables.phases, version), _contrast_sentence(config, tables.contrast)]
    return " ".join(sentence for sentence in sentences if sentence)


def _phase_sentence(phases: pd.DataFrame | None, version: Mapping) -> str:
    """How many scans have a contrast phase estimated from the image, and which phases."""
    if phases is None or phases.empty:
        return ""
    estimated = phases.loc[phases["phase"] != NOT_AVAILABLE, "phase"]
    counts = [f"{phase.replace('_', ' ')} {n}" for phase, n in estimated.value_counts().sort_index().items()]
    method = (
        "from the median attenuation of 16 structures and 4 head-neck vessels in its own measurement with "
        f"TotalSegmentator's phase classifier (totalsegmentator {version.get('totalsegmentator', 'not installed')})"
    )
    if counts:
        return f"The contrast phase was estimated {method} for {len(estimated):,} of {_scans(len(phases))}: " + (
            ", ".join(counts) + "."
        )
    # why not: the most common reason, e.g. a structure table without the classifier's structures
    reason = phases["note"].fillna("").astype(str).replace("", "no reason recorded").mode().iloc[0]
    return f"The contrast phase could be estimated {method} for no scan ({reason})."


CONTRAST_SOURCE_WORDS = {
    SHEET: "the cohort sheet",
    ESTIMATED: "the estimated phase (native 0, any other phase 1)",
    SHEET_ELSE_ESTIMATED: (
        "the cohort sheet where it had a value and the estimated phase (native 0, any other phase 1) where it was blank"
    ),
}


def _contrast_sentence(config: Mapping, record: pd.DataFrame | None) -> str:
    """Where the contrast covariate came from, how many values were estimated, how many scans were flagged."""
    if record is None or record.empty:
        return ""
    settings = StatisticsSettings.from_config(config["statistics"])
    n = contrast_counts(record)
    sources = [f"{n[SHEET]:,} from the sheet", f"{n[ESTIMATED]:,} estimated"]
    if n[NO_SOURCE]:
        sources.append(f"{n[NO_SOURCE]:,} without a value (left out of the adjusted analyses)")
    kept = "took the estimate" if settings.contrast == ESTIMATED else "kept the sheet's value"
    flagged = f"in {_scans(n['disagrees'])}, flagged for review, which {kept}" if n["disagrees"] else "in no scan"
    sentence = (
        f"The contrast covariate came from {CONTRAST_SOURCE_WORDS[settings.contrast]}: {_listing(sources)}. The "
        f"sheet's value contradicted an estimate of probability 1.0 (native with contrast, arterial or portal "
        f"venous without) {flagged}."
    )
    if settings.phase_covariate:
        sentence += (
            " The adjusted analyses used the estimated phase as a category (native, arterial early, arterial late, "
            "portal venous) in place of the contrast covariate."
        )
    return sentence


def _software_paragraph(version: Mapping) -> str:
    cited = [f"{name} {version[name]}" for name in CITED_SOFTWARE if version.get(name) not in (None, "not installed")]
    python = version.get("python")
    return (
        f"Analyses were run with the ctcohort Snakemake workflow{f' on Python {python}' if python else ''} "
        f"({_listing(cited)})."
    )


def write_methods(paragraphs: Sequence[str], markdown_path: str | Path, html_path: str | Path) -> None:
    """The paragraphs as Markdown and as a small HTML page (which the report shows inline)."""
    Path(markdown_path).write_text("# Methods\n\n" + "\n\n".join(paragraphs) + "\n")
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    Path(html_path).write_text(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Methods</title></head>\n'
        f'<body style="font-family: serif; max-width: 45em">\n<h1>Methods</h1>\n{body}\n</body></html>\n'
    )

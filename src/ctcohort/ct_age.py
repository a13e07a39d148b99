"""CT age: each scan's age predicted from its measurements, every prediction out of fold, and the age gap.

Features (``feature_matrix``)
    One row per scan: each of the segmentation's own structures x each of ``measures`` (combined structures,
    rows without a label, repeat their members and are left out), volumes as their logarithm (age changes
    them by a share, not by millilitres), plus the ``covariates`` (sex as an indicator, contrast as is). A
    structure that is absent, cut off or excluded is NaN; inside each training fold a linear model gets the
    fold's median and a missing indicator per feature (``SimpleImputer``, fitted on the training scans only),
    gradient boosting takes NaN natively. A scan with fewer than ``min_measured`` of the features finite (of
    those some scan of the cohort has) is not predicted (note ``too_few_measures``).

Nested cross-validation (``predict_out_of_fold``)
    Patients, not scans: folds hold whole patients (``GroupKFold`` over patients, shuffled by ``seed``), so no
    patient is in the training and the test fold at once. A model trains on the scans chosen for the
    cross-sectional analyses (one per patient, ``ctcohort.patients``) that have an age and enough measures;
    every scan in the outer test fold (the chosen one, the patient's other scans, a scan without an age) is
    predicted by that fold's model, which never saw the patient. Within the outer training fold an inner
    cross-validation (``inner_folds``, by patient again) predicts every training scan out of fold with each
    candidate, and the candidate with the least mean absolute error wins: ``ridge`` and ``elastic_net``
    (standardised features) and ``gradient_boosting`` (``HistGradientBoostingRegressor``, 100 trees), each
    over a small grid (``GRIDS``); the winner is refitted on the whole training fold.

Bias correction (de Lange & Cole 2020, NeuroImage Clin 26:102229)
    A predicted age regresses to the cohort's mean: the young are predicted too old, the old too young, and a
    raw gap mostly restates age. Within each outer training fold the chosen model's inner out-of-fold
    predictions are regressed on age (least squares, predicted = b0 + b1 age); the held-out scans' ages are
    corrected as (predicted - b0) / b1, and age_gap_corrected = corrected age - age. The line is fitted on
    training scans' out-of-fold predictions only (in-sample predictions would understate the shrinkage), so
    the correction does not see the held-out scan either. Smith et al. 2019's gap regression
    (gap - (a + b age)) gives b1 times this gap: the same ranking, in shrunk years.

Per structure group (organ, bone, muscle, vessel) the same folds, search and correction run on the group's
features plus the covariates: ``{group}_age`` and ``{group}_age_gap_corrected``.

Tables: ``ct_age.tsv`` (TABLE_COLUMNS: one row per scan) and ``ct_age_summary.tsv`` (SUMMARY_COLUMNS: one row
per feature set, ``all`` first; MAE and R^2 of the uncorrected predictions of the chosen scans with an age).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ctcohort.patients import patient_of
from ctcohort.structures import GROUPS

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

ALL = "all"
MODELS = ("ridge", "elastic_net", "gradient_boosting")
# each candidate's grid (the pipeline's `model__` parameters); small: the inner loop fits every point, and a
# boosted model costs seconds at 10,000 scans where a ridge costs milliseconds
GRIDS = {
    "ridge": {"alpha": [0.1, 1.0, 10.0, 100.0, 1000.0]},
    "elastic_net": {"alpha": [0.01, 0.1, 1.0], "l1_ratio": [0.2, 0.8]},
    "gradient_boosting": {"max_leaf_nodes": [15]},
}
CORRECTION = "de Lange & Cole 2020"
NO_AGE = "no_age"
TOO_FEW_MEASURES = "too_few_measures"
TOO_FEW_SCANS = "too_few_scans"
NO_FEATURES = "no_features"
SUMMARY_COLUMNS = [
    "features",
    "n_scans",
    "n_patients",
    "folds",
    "inner_folds",
    "model",
    "models_by_fold",
    "mae",
    "r2",
    "bias_intercept",
    "bias_slope",
    "correction",
    "note",
]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CtAgeSettings:
    """How CT age is modelled: config's ``ct_age`` section key for key (config/README.md). The field defaults
    are the only defaults (``ctcohort.config_defaults`` writes them into config/config.yaml)."""

    measures: tuple[str, ...] = ("volume_ml", "hu_mean")
    covariates: tuple[str, ...] = ("sex", "contrast")
    models: tuple[str, ...] = ("ridge", "gradient_boosting")
    groups: tuple[str, ...] = GROUPS
    folds: int = 5
    inner_folds: int = 3
    seed: int = 1
    min_scans: int = 30  # training scans (chosen, with an age) the whole cohort needs
    min_measured: float = 0.5  # share of a scan's features that must be finite for a prediction
    # BLAS and OpenMP threads of the fits: two OpenMP threads on two busy cores ran boosting 10x slower than one
    threads: int = 1

    def __post_init__(self):
        for name in ("measures", "covariates", "models", "groups"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [m for m in self.models if m not in MODELS]
        if not self.models or unknown:
            raise ValueError(f"ct_age.models: choose from {', '.join(MODELS)}, got {list(self.models)}")
        if self.folds < 2 or self.inner_folds < 2:
            raise ValueError(f"ct_age: folds and inner_folds must be at least 2, got {self.folds}, {self.inner_folds}")
        if self.min_scans < self.folds * self.inner_folds:
            raise ValueError(
                f"ct_age.min_scans must be at least folds x inner_folds "
                f"({self.folds * self.inner_folds}), got {self.min_scans}"
            )
        if not 0 < self.min_measured <= 1:
            raise ValueError(f"ct_age.min_measured must be within (0, 1], got {self.min_measured}")

    @classmethod
    def from_config(cls, section: Mapping) -> CtAgeSettings:
        """From config's ``ct_age`` section (missing keys take the defaults)."""
        names = {f.name for f in fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise ValueError(f"ct_age: unknown keys {sorted(unknown)}")
        return cls(**section)


def table_columns(groups: Sequence[str] = GROUPS) -> list[str]:
    per_group = [column for g in groups for column in (f"{g}_age", f"{g}_age_gap_corrected")]
    return [
        "subject",
        "patient",
        "age",
        "fold",
        "trained",
        "predicted_age",
        "predicted_age_corrected",
        "age_gap",
        "age_gap_corrected",
        *per_group,
        "note",
    ]


# ---------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------


def own_structures(measurements: pd.DataFrame) -> pd.DataFrame:
    """The rows of the segmentation's own structures (a combined structure's row has no label)."""
    if "label" not in measurements.columns:
        return measurements
    return measurements[pd.to_numeric(measurements["label"], errors="coerce").notna()]


def feature_matrix(measurements: pd.DataFrame, measures: Sequence[str], subjects: Sequence[str]) -> pd.DataFrame:
    """One row per subject (in ``subjects``' order), one column ``structure:measure`` per own structure and
    measure that some scan has (a structure no scan shows, e.g. outside every field of view, is no feature);
    volumes as their natural logarithm; NaN where not measured."""
    rows = own_structures(measurements)
    values = rows.set_index(["subject", "structure"])[list(measures)].apply(pd.to_numeric, errors="coerce")
    if "volume_ml" in values.columns:
        volume = values["volume_ml"].to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            values["volume_ml"] = np.where(volume > 0, np.log(volume), np.nan)
    wide = values.unstack("structure")
    wide.columns = [f"{structure}:{measure}" for measure, structure in wide.columns]
    wide = wide.reindex(index=list(subjects)).astype(float)
    return wide.loc[:, wide.notna().any()]


def structure_groups(measurements: pd.DataFrame) -> dict[str, str]:
    """structure -> group of the own structures ("" where the table has none)."""
    rows = own_structures(measurements)
    group = rows["group"] if "group" in rows.columns else pd.Series("", rows.index)
    return dict(zip(rows["structure"], group.astype(object).fillna("").astype(str)))


def group_columns(features: pd.DataFrame, groups_of: Mapping[str, str], group: str) -> list[str]:
    """The feature columns of one structure group (``ALL``: every column)."""
    if group == ALL:
        return list(features.columns)
    return [c for c in features.columns if groups_of.get(c.split(":", 1)[0]) == group]


def scan_table(measurements: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """One row per scan, in the selection's order: subject, patient, age, chosen, and the covariate columns."""
    first = measurements.drop_duplicates("subject").set_index("subject")
    scans = selection[["subject"]].astype(str).copy()
    scans["patient"] = (
        selection["patient"].astype(str).to_numpy() if "patient" in selection.columns else patient_of(scans).to_numpy()
    )
    scans["chosen"] = selection["chosen"].astype(str).str.lower().eq("true").to_numpy()
    scans = scans[scans["subject"].isin(first.index)].reset_index(drop=True)
    for column in first.columns:
        scans[column] = first.loc[scans["subject"], column].to_numpy()
    scans["age"] = pd.to_numeric(scans["age"], errors="coerce") if "age" in scans else np.nan
    return scans


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def _estimator(name: str, seed: int):
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import ElasticNet, Ridge

    if name == "ridge":
        return Ridge()
    if name == "elastic_net":
        return ElasticNet(max_iter=5000, random_state=seed)
    return HistGradientBoostingRegressor(max_iter=100, learning_rate=0.1, early_stopping=False, random_state=seed)


def candidate_grid(models: Sequence[str], seed: int) -> list[dict]:
    """The grid over ``pipeline()`` (sklearn's ParameterGrid form): linear models behind the fold's imputer and
    scaler, gradient
    boosting on the raw features (its own NaN handling)."""
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    grid = []
    for name in models:
        linear = name != "gradient_boosting"
        point = {
            "impute": [SimpleImputer(strategy="median", add_indicator=True)] if linear else ["passthrough"],
            "scale": [StandardScaler()] if linear else ["passthrough"],
            "model": [_estimator(name, seed)],
        }
        point.update({f"model__{key}": values for key, values in GRIDS[name].items()})
        grid.append(point)
    return grid


def pipeline() -> Pipeline:
    """Features that do not vary in the training fold (a structure never or always the same) dropped first:
    they carry nothing, and gradient boosting's binning fails on a column without two distinct values."""
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline

    return Pipeline(
        [("drop", VarianceThreshold()), ("impute", "passthrough"), ("scale", "passthrough"), ("model", Ridge())]
    )


def model_name(estimator: Pipeline) -> str:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import ElasticNet, Ridge

    model = estimator.named_steps["model"]
    return {Ridge: "ridge", ElasticNet: "elastic_net", HistGradientBoostingRegressor: "gradient_boosting"}[type(model)]


def model_words(estimator: Pipeline) -> str:
    """The chosen model with its grid values: ridge(alpha=10)."""
    name = model_name(estimator)
    params = estimator.named_steps["model"].get_params()
    return f"{name}({', '.join(f'{key}={params[key]:g}' for key in GRIDS[name])})"


def age_bias(age: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """(b0, b1) of the least-squares line predicted = b0 + b1 age."""
    slope, intercept = np.polynomial.polynomial.polyfit(age, predicted, 1)[::-1]
    return float(intercept), float(slope)


def corrected_age(predicted: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    """de Lange & Cole's corrected age (predicted - b0) / b1 (NaN where the slope is not positive)."""
    return (predicted - intercept) / slope if slope > 0 else np.full_like(predicted, np.nan)


@dataclass
class FoldModel:
    """One outer fold: who trained, the chosen model, and its bias line (inner out-of-fold predictions)."""

    fold: int
    trained: np.ndarray  # row positions of the training scans
    estimator: Pipeline
    inner_predicted: np.ndarray  # the chosen model's inner out-of-fold predictions of the training scans
    intercept: float
    slope: float


def inner_predictions(estimator: Pipeline, x: np.ndarray, age: np.ndarray, splits) -> np.ndarray:
    """Out-of-fold predictions of the training scans by ``estimator`` refitted on each inner split."""
    from sklearn.base import clone

    predicted = np.empty(len(age))
    for train, test in splits:
        predicted[test] = clone(estimator).fit(x[train], age[train]).predict(x[test])
    return predicted


def fit_fold(
    x: np.ndarray, age: np.ndarray, patient: np.ndarray, settings: CtAgeSettings, fold: int, trained: np.ndarray
) -> FoldModel:
    """Choose the candidate with the least inner out-of-fold mean absolute error on the training scans (inner
    folds by patient), refit it on them all, and fit its bias line on its inner predictions."""
    from sklearn.base import clone
    from sklearn.metrics import mean_absolute_error
    from sklearn.model_selection import GroupKFold, ParameterGrid

    x_train, age_train = x[trained], age[trained]
    inner = GroupKFold(settings.inner_folds, shuffle=True, random_state=settings.seed)
    splits = list(inner.split(x_train, age_train, groups=patient[trained]))
    best, best_error, best_predicted = None, np.inf, None
    for params in ParameterGrid(candidate_grid(settings.models, settings.seed)):
        candidate = pipeline().set_params(**clone(params, safe=False))
        predicted = inner_predictions(candidate, x_train, age_train, splits)
        error = mean_absolute_error(age_train, predicted)
        if error < best_error:
            best, best_error, best_predicted = candidate, error, predicted
    intercept, slope = age_bias(age_train, best_predicted)
    return FoldModel(fold, trained, clone(best).fit(x_train, age_train), best_predicted, intercept, slope)


def assign_folds(patient: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each scan's outer fold; a patient's scans share one."""
    from sklearn.model_selection import GroupKFold

    fold = np.empty(len(patient), dtype=int)
    splitter = GroupKFold(folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(patient)), groups=patient)):
        fold[test] = k
    return fold


@dataclass
class OutOfFold:
    """Predictions of one feature set: per scan, and the outer folds' models."""

    predicted: np.ndarray
    corrected: np.ndarray
    models: list[FoldModel] = field(default_factory=list)


def predict_out_of_fold(
    x: np.ndarray,
    age: np.ndarray,
    patient: np.ndarray,
    trainable: np.ndarray,
    predictable: np.ndarray,
    fold: np.ndarray,
    settings: CtAgeSettings,
) -> OutOfFold:
    """Every ``predictable`` scan predicted by the model of the fold that held its patient out, trained on the
    ``trainable`` scans of the other folds (module docstring)."""
    result = OutOfFold(np.full(len(age), np.nan), np.full(len(age), np.nan))
    for k in range(settings.folds):
        trained = np.flatnonzero(trainable & (fold != k))
        model = fit_fold(x, age, patient, settings, k, trained)
        held_out = np.flatnonzero(predictable & (fold == k))
        if len(held_out):
            result.predicted[held_out] = model.estimator.predict(x[held_out])
            result.corrected[held_out] = corrected_age(result.predicted[held_out], model.intercept, model.slope)
        result.models.append(model)
    return result


# ---------------------------------------------------------------------------------------------------------
# The study's tables
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CtAgeResult:
    table: pd.DataFrame  # TABLE_COLUMNS
    summary: pd.DataFrame  # SUMMARY_COLUMNS
    fits: dict[str, OutOfFold]  # feature set (ALL, groups) -> its predictions and fold models


def _design(features: pd.DataFrame, covariates: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the model's input matrix, the share of the structure features that is finite per scan)."""
    block = features[columns].to_numpy(dtype=float)
    measured = np.isfinite(block).mean(axis=1) if columns else np.zeros(len(features))
    return np.hstack([block, covariates.to_numpy(dtype=float)]), measured


def _summary_row(
    name: str,
    fit: OutOfFold | None,
    age: np.ndarray,
    trainable: np.ndarray,
    patient: np.ndarray,
    settings: CtAgeSettings,
    note: str,
) -> dict:
    from sklearn.metrics import mean_absolute_error, r2_score

    row = {
        "features": name,
        "n_scans": int(trainable.sum()),
        "n_patients": len(set(patient[trainable])),
        "folds": settings.folds,
        "inner_folds": settings.inner_folds,
        "model": "",
        "models_by_fold": "",
        "mae": np.nan,
        "r2": np.nan,
        "bias_intercept": np.nan,
        "bias_slope": np.nan,
        "correction": CORRECTION,
        "note": note,
    }
    if fit is None:
        return row
    scored = trainable & np.isfinite(fit.predicted)
    names = Counter(model_name(m.estimator) for m in fit.models)
    row.update(
        model=names.most_common(1)[0][0],
        models_by_fold="; ".join(model_words(m.estimator) for m in fit.models),
        mae=float(mean_absolute_error(age[scored], fit.predicted[scored])),
        r2=float(r2_score(age[scored], fit.predicted[scored])),
        bias_intercept=float(np.mean([m.intercept for m in fit.models])),
        bias_slope=float(np.mean([m.slope for m in fit.models])),
    )
    return row


@dataclass
class FeatureSet:
    """One feature set's inputs and what became of them."""

    name: str
    trainable: np.ndarray  # chosen scans with an age and enough measures
    predictable: np.ndarray  # scans with enough measures
    note: str  # "" or why nothing was fitted
    fit: OutOfFold | None


def _fit_feature_set(
    name: str,
    columns: list[str],
    features: pd.DataFrame,
    covariates: pd.DataFrame,
    scans: pd.DataFrame,
    fold: np.ndarray,
    settings: CtAgeSettings,
) -> FeatureSet:
    x, measured = _design(features, covariates, columns)
    age, patient = scans["age"].to_numpy(dtype=float), scans["patient"].to_numpy(dtype=str)
    predictable = measured >= settings.min_measured
    trainable = scans["chosen"].to_numpy(dtype=bool) & np.isfinite(age) & predictable
    note = NO_FEATURES if not columns else TOO_FEW_SCANS if trainable.sum() < settings.min_scans else ""
    fit = None if note else predict_out_of_fold(x, age, patient, trainable, predictable, fold, settings)
    return FeatureSet(name, trainable, predictable, note, fit)


def _scan_notes(cohort: FeatureSet, age: np.ndarray) -> np.ndarray:
    if cohort.note:
        return np.full(len(age), cohort.note, dtype=object)
    return np.where(~cohort.predictable, TOO_FEW_MEASURES, np.where(np.isfinite(age), "", NO_AGE))


def ct_age(
    measurements: pd.DataFrame, selection: pd.DataFrame, settings: CtAgeSettings = CtAgeSettings()
) -> CtAgeResult:
    """CT age of every scan of the cohort table (``measurements``: one row per scan x structure) with the scan
    selection (``patients.scan_selection``'s table): the per-scan table, the summary, the fits."""
    scans = scan_table(measurements, selection)
    features = feature_matrix(measurements, settings.measures, scans["subject"])
    from ctcohort.stats import encode_covariates, present_columns  # scipy: not at the workflow's start-up

    covariates = encode_covariates(scans, present_columns(scans, list(settings.covariates)))
    groups_of = structure_groups(measurements)
    age, patient = scans["age"].to_numpy(dtype=float), scans["patient"].to_numpy(dtype=str)
    enough_patients = len(set(patient)) >= settings.folds
    fold = assign_folds(patient, settings.folds, settings.seed) if enough_patients else np.full(len(scans), -1)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(settings.threads), warnings.catch_warnings():
        # the variance of a feature never measured in a training fold (dropped) warns at every fit
        for message in ("Degrees of freedom <= 0", "All-NaN slice encountered"):
            warnings.filterwarnings("ignore", message, RuntimeWarning)
        sets = [
            _fit_feature_set(
                name, group_columns(features, groups_of, name), features, covariates, scans, fold, settings
            )
            for name in (ALL, *settings.groups)
        ]
    cohort, table = sets[0], scans[["subject", "patient", "age"]].copy()
    table["fold"], table["trained"] = fold, cohort.trainable
    nan = np.full(len(scans), np.nan)
    table["predicted_age"] = cohort.fit.predicted if cohort.fit else nan
    table["predicted_age_corrected"] = cohort.fit.corrected if cohort.fit else nan
    table["age_gap"] = table["predicted_age"] - age
    table["age_gap_corrected"] = table["predicted_age_corrected"] - age
    for group in sets[1:]:
        table[f"{group.name}_age"] = group.fit.predicted if group.fit else nan
        table[f"{group.name}_age_gap_corrected"] = group.fit.corrected - age if group.fit else nan
    table["note"] = _scan_notes(cohort, age)
    summary = pd.DataFrame(
        [_summary_row(s.name, s.fit, age, s.trainable, patient, settings, s.note) for s in sets],
        columns=SUMMARY_COLUMNS,
    )
    return CtAgeResult(table[table_columns(settings.groups)], summary, {s.name: s.fit for s in sets if s.fit})

"""Structure: are synthetic records shaped like real ones?

Per-record validity shares (empty visits, undated visits, unknown sex) and the distance between the
distributions of codes per visit, visits per patient and inter-visit gaps. A generator can score R^2 0.99 on
code probabilities while 30% of its visits are empty; these metrics are what catches it. Every number is a
pure function of the corpora and is computed the same way for synthetic-vs-train and holdout-vs-train (the
noise ceiling). Definitions in docs/metrics.md (``fidelity.structure``); nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.evaluation.features import MetricResult, check_corpus

# log2 gap bins: gaps under one day share bin -1, then [2^k, 2^(k+1)) days is bin k, capped at GAP_BIN_CAP
# (2^12 days is about 11 years; longer gaps join that bin).
GAP_BIN_CAP = 12


@dataclass(frozen=True)
class RecordShape(MetricResult):
    """Validity shares of one corpus (each in [0, 1]; NaN when the denominator is 0).

    Attributes:
        empty_visit_share: visits holding no code / all visits.
        undated_visit_share: visits with an unknown day (NaN ``visit_days``) / all visits.
        unknown_sex_share: patients with sex -1 / all patients.
        n_patients, n_visits: the denominators.
    """

    metric = "structure.record_shape"
    empty_visit_share: float
    undated_visit_share: float
    unknown_sex_share: float
    n_patients: int
    n_visits: int


def record_shape(corpus: PatientCorpus) -> RecordShape:
    """The shares of empty visits, undated visits and records of unknown sex in one corpus.

    Example:
        >>> record_shape(synthetic).empty_visit_share  # doctest: +SKIP
        0.3
    """
    n_visits, n_patients = corpus.n_visits, corpus.n_patients
    return RecordShape(
        empty_visit_share=_share(int((corpus.codes_per_visit() == 0).sum()), n_visits),
        undated_visit_share=_share(int(np.isnan(np.asarray(corpus.visit_days, dtype=np.float64)).sum()), n_visits),
        unknown_sex_share=_share(int((np.asarray(corpus.sex) < 0).sum()), n_patients),
        n_patients=n_patients, n_visits=n_visits,
    )


def _share(count: int, total: int) -> float:
    return count / total if total else float("nan")


@dataclass(frozen=True)
class DistributionComparison:
    """Two samples of one per-patient or per-visit quantity, compared.

    Attributes:
        tv: total-variation distance of the two histograms, 0.5 * sum |p - q| over their bins (integer values
            for counts, log2 bins for gaps), in [0, 1].
        wasserstein: ``scipy.stats.wasserstein_distance`` (in the quantity's unit).
        ks: two-sample Kolmogorov-Smirnov statistic ``scipy.stats.ks_2samp(...).statistic``.
        mean_real, mean_synthetic: the sample means.
        n_real, n_synthetic: sample sizes. Everything but the sizes is NaN when either sample is empty.
    """

    tv: float
    wasserstein: float
    ks: float
    mean_real: float
    mean_synthetic: float
    n_real: int
    n_synthetic: int


@dataclass(frozen=True)
class StructureFidelity(MetricResult):
    """Record shape of real and synthetic corpora side by side, and the distance of their shape distributions.

    Attributes:
        empty_visit_share, undated_visit_share, unknown_sex_share: of the synthetic corpus (ideal: the real one).
        empty_visit_share_real, undated_visit_share_real, unknown_sex_share_real: of the real corpus.
        codes_per_visit_tv, visits_per_patient_tv, log2_gap_days_tv: total-variation distances (ideal 0).
        visits_per_patient, codes_per_visit, gap_days: the full comparisons (gap_days.tv is log2_gap_days_tv).
    """

    metric = "fidelity.structure"
    empty_visit_share: float
    empty_visit_share_real: float
    undated_visit_share: float
    undated_visit_share_real: float
    unknown_sex_share: float
    unknown_sex_share_real: float
    codes_per_visit_tv: float
    visits_per_patient_tv: float
    log2_gap_days_tv: float
    visits_per_patient: DistributionComparison
    codes_per_visit: DistributionComparison
    gap_days: DistributionComparison


def structure_fidelity(real: PatientCorpus, synthetic: PatientCorpus) -> StructureFidelity:
    """Validity shares of both corpora and TV / Wasserstein / KS of visits per patient, codes per visit and gaps.

    Gaps are ``visit_days[j] - visit_days[j-1]`` for consecutive visits of the same patient; gaps touching an
    undated visit are skipped (they are counted by ``undated_visit_share``). The gap TV runs over log2 bins
    (:func:`log2_gap_bins`). No vocabulary is involved.

    Example:
        >>> s = structure_fidelity(real.part("train"), synthetic)  # doctest: +SKIP
        >>> s.empty_visit_share, s.empty_visit_share_real, s.codes_per_visit_tv  # doctest: +SKIP
    """
    check_corpus("real", real)
    check_corpus("synthetic", synthetic)
    shape_r, shape_s = record_shape(real), record_shape(synthetic)
    gaps_r, gaps_s = visit_gaps(real), visit_gaps(synthetic)
    vpp = _compare(real.visits_per_patient(), synthetic.visits_per_patient())
    cpv = _compare(real.codes_per_visit(), synthetic.codes_per_visit())
    gap = _compare(gaps_r, gaps_s, tv_bins=log2_gap_bins)
    return StructureFidelity(
        empty_visit_share=shape_s.empty_visit_share, empty_visit_share_real=shape_r.empty_visit_share,
        undated_visit_share=shape_s.undated_visit_share, undated_visit_share_real=shape_r.undated_visit_share,
        unknown_sex_share=shape_s.unknown_sex_share, unknown_sex_share_real=shape_r.unknown_sex_share,
        codes_per_visit_tv=cpv.tv, visits_per_patient_tv=vpp.tv, log2_gap_days_tv=gap.tv,
        visits_per_patient=vpp, codes_per_visit=cpv, gap_days=gap,
    )


def visit_gaps(corpus: PatientCorpus) -> np.ndarray:
    """(gaps,) float64 days between consecutive dated visits of the same patient."""
    days = np.asarray(corpus.visit_days, dtype=np.float64)
    owner = corpus.visit_patient()
    gaps = (days[1:] - days[:-1])[owner[1:] == owner[:-1]]
    return gaps[np.isfinite(gaps)]


def log2_gap_bins(gaps: np.ndarray) -> np.ndarray:
    """int64 bin of each gap: -1 below one day, else floor(log2(days)) capped at GAP_BIN_CAP."""
    gaps = np.asarray(gaps, dtype=np.float64)
    out = np.full(len(gaps), -1, dtype=np.int64)
    long = gaps >= 1.0
    out[long] = np.minimum(np.floor(np.log2(gaps[long])), GAP_BIN_CAP).astype(np.int64)
    return out


def total_variation(real: np.ndarray, synthetic: np.ndarray) -> float:
    """0.5 * sum |p - q| of the histograms of two integer samples over the union of their values (NaN if empty).

    Example:
        >>> total_variation(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2]))
        0.25
    """
    real, synthetic = np.asarray(real, dtype=np.int64), np.asarray(synthetic, dtype=np.int64)
    if len(real) == 0 or len(synthetic) == 0:
        return float("nan")
    low = min(int(real.min()), int(synthetic.min()))
    size = max(int(real.max()), int(synthetic.max())) - low + 1
    p = np.bincount(real - low, minlength=size) / len(real)
    q = np.bincount(synthetic - low, minlength=size) / len(synthetic)
    return float(0.5 * np.abs(p - q).sum())


def _compare(real: np.ndarray, synthetic: np.ndarray, *, tv_bins=None) -> DistributionComparison:
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    nan = float("nan")
    if len(real) == 0 or len(synthetic) == 0:
        return DistributionComparison(nan, nan, nan, float(real.mean()) if len(real) else nan,
                                      float(synthetic.mean()) if len(synthetic) else nan, len(real), len(synthetic))
    binned = (tv_bins(real), tv_bins(synthetic)) if tv_bins is not None else (real, synthetic)
    return DistributionComparison(
        tv=total_variation(*binned),
        wasserstein=float(stats.wasserstein_distance(real, synthetic)),
        ks=float(stats.ks_2samp(real, synthetic).statistic),
        mean_real=float(real.mean()), mean_synthetic=float(synthetic.mean()),
        n_real=len(real), n_synthetic=len(synthetic),
    )

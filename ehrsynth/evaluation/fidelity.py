"""Fidelity: how closely synthetic corpora reproduce the statistics of real ones.

Three families, each a pure function of two corpora returning a frozen result (definitions in docs/metrics.md):

* HALO's R^2 of code, pair and consecutive-visit statistics (:func:`halo_fidelity`);
* EHRDiff's prevalence correlation and non-zero code count (:func:`prevalence_fidelity`), correlation matrix
  distance (:func:`correlation_matrix_distance`) and MMD (:func:`maximum_mean_discrepancy`);
* real-vs-synthetic detection (:func:`detection_auroc`); record structure lives in
  :mod:`ehrsynth.evaluation.structure` (re-exported here).

``real`` is the real data the generator learnt from (its training part) and ``synthetic`` the generated corpus;
their vocabularies may differ and are aligned on typed code strings first.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError
from ehrsynth.evaluation.features import (
    MetricResult,
    aligned_code_matrices,
    check_corpus,
    check_size,
    column_counts,
    pairwise_hamming,
    row_counts,
    sample_rows,
)
from ehrsynth.evaluation.structure import DistributionComparison, StructureFidelity, structure_fidelity  # noqa: F401

HALO_STATISTICS = ("visit_code", "record_code", "visit_pair", "record_pair", "consecutive")


# ---- HALO ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HaloFidelity(MetricResult):
    """R^2 (real = y_true) of HALO's five statistics over the union of their non-zero keys (missing = 0).

    Attributes:
        visit_code_r2: per code, the share of visits containing it.
        record_code_r2: per code, the share of patients having it.
        visit_pair_r2: per unordered pair a < b, the share of visits containing both.
        record_pair_r2: per unordered pair a < b, the share of patients having both.
        consecutive_r2: per ordered pair (a, b), P(b in visit j | a in visit j-1) over consecutive visit pairs.
        *_pearson: Pearson r over the same keys. R^2 is not scale-free (tiny real pair probabilities make it
            explode negative); r reads the agreement of the pattern.
        n_*: the number of keys each R^2 is taken over.
    """

    metric = "fidelity.halo_r2"
    visit_code_r2: float
    record_code_r2: float
    visit_pair_r2: float
    record_pair_r2: float
    consecutive_r2: float
    visit_code_pearson: float
    record_code_pearson: float
    visit_pair_pearson: float
    record_pair_pearson: float
    consecutive_pearson: float
    n_visit_code: int
    n_record_code: int
    n_visit_pair: int
    n_record_pair: int
    n_consecutive: int


def halo_statistics(real: PatientCorpus, synthetic: PatientCorpus) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HALO's statistics of both corpora, paired over the union of keys non-zero in either (missing = 0).

    Definitions (V = visits, P = patients, X_v / X_p the 0/1 visit x code / patient x code matrices):

    * ``visit_code``: colsum(X_v) / V.  ``record_code``: colsum(X_p) / P.
    * ``visit_pair``: (X_v^T X_v)[a, b] / V for a < b.  ``record_pair``: (X_p^T X_p)[a, b] / P for a < b.
    * ``consecutive``: over the T consecutive visit pairs (j-1, j) of the same patient, with A the rows of the
      earlier visits and B of the later ones, (A^T B)[a, b] / colsum(A)[a]: the share of visits containing a
      and followed by a visit, whose next visit contains b. Ordered pairs, a = b included.

    Returns:
        name -> (real values, synthetic values), aligned key by key; for scatter plots and :func:`halo_fidelity`.
    """
    check_corpus("real", real)
    check_corpus("synthetic", synthetic)
    aligned = aligned_code_matrices(real, synthetic)
    parts = [_halo_parts(aligned.visits[i], aligned.patients[i], corpus)
             for i, corpus in enumerate((real, synthetic))]
    return {name: _paired(parts[0][name], parts[1][name]) for name in HALO_STATISTICS}


def halo_fidelity(real: PatientCorpus, synthetic: PatientCorpus) -> HaloFidelity:
    """R^2 between real and synthetic HALO statistics (see :func:`halo_statistics` for the definitions).

    R^2 is ``sklearn.metrics.r2_score(real, synthetic)``: 1 is perfect, it may be negative, and it is NaN when
    fewer than two keys exist (e.g. no consecutive visits in either corpus).

    Example:
        >>> halo_fidelity(real.part("train"), synthetic).record_code_r2  # doctest: +SKIP
        0.97
    """
    pairs = halo_statistics(real, synthetic)
    return halo_fidelity_from_statistics(pairs)


def halo_fidelity_from_statistics(pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> HaloFidelity:
    """:func:`halo_fidelity` from already paired statistics (lets the report reuse one computation)."""
    r2 = {name: r_squared(*pairs[name]) for name in HALO_STATISTICS}
    r = {name: pearson(*pairs[name]) for name in HALO_STATISTICS}
    n = {name: len(pairs[name][0]) for name in HALO_STATISTICS}
    return HaloFidelity(
        visit_code_r2=r2["visit_code"], record_code_r2=r2["record_code"], visit_pair_r2=r2["visit_pair"],
        record_pair_r2=r2["record_pair"], consecutive_r2=r2["consecutive"],
        visit_code_pearson=r["visit_code"], record_code_pearson=r["record_code"],
        visit_pair_pearson=r["visit_pair"], record_pair_pearson=r["record_pair"],
        consecutive_pearson=r["consecutive"],
        n_visit_code=n["visit_code"], n_record_code=n["record_code"], n_visit_pair=n["visit_pair"],
        n_record_pair=n["record_pair"], n_consecutive=n["consecutive"],
    )


def _halo_parts(visits: sp.csr_matrix, patients: sp.csr_matrix, corpus: PatientCorpus) -> dict[str, sp.csr_matrix]:
    """The five statistics of one corpus as (1, C) or (C, C) sparse matrices."""
    n_visits, n_patients = max(1, visits.shape[0]), max(1, patients.shape[0])
    out = {
        "visit_code": sp.csr_matrix(column_counts(visits)[None, :] / n_visits),
        "record_code": sp.csr_matrix(column_counts(patients)[None, :] / n_patients),
        "visit_pair": sp.triu(visits.T @ visits, k=1, format="csr").astype(np.float64) / n_visits,
        "record_pair": sp.triu(patients.T @ patients, k=1, format="csr").astype(np.float64) / n_patients,
    }
    # consecutive visit pairs (j-1, j) of one patient: visit j-1 is not the patient's last visit
    has_next = np.ones(corpus.n_visits, dtype=bool)
    has_next[corpus.visit_offsets[1:][corpus.visits_per_patient() > 0] - 1] = False
    earlier = np.flatnonzero(has_next)
    before, after = visits[earlier], visits[earlier + 1]           # (T, C) each
    counts = (before.T @ after).tocsr().astype(np.float64)         # (C, C): a in j-1 and b in j
    with np.errstate(divide="ignore"):
        inverse = np.where(column_counts(before) > 0, 1.0 / column_counts(before), 0.0)
    out["consecutive"] = sp.diags(inverse) @ counts                 # row a divided by count(a in j-1)
    return out


def _paired(real: sp.spmatrix, synthetic: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Values of two same-shape sparse matrices over the union of their non-zero positions (missing = 0)."""
    n_columns = real.shape[1]
    keys, values = [], []
    for matrix in (real, synthetic):
        coo = sp.coo_matrix(matrix)
        nonzero = coo.data != 0
        keys.append(coo.row[nonzero].astype(np.int64) * n_columns + coo.col[nonzero])
        values.append(coo.data[nonzero].astype(np.float64))
    union = np.union1d(keys[0], keys[1])
    out = []
    for k, v in zip(keys, values):
        dense = np.zeros(len(union), dtype=np.float64)
        dense[np.searchsorted(union, k)] = v
        out.append(dense)
    return out[0], out[1]


def r_squared(real: np.ndarray, synthetic: np.ndarray) -> float:
    """sklearn's R^2 with ``real`` as y_true; NaN with fewer than 2 values."""
    return float(r2_score(real, synthetic)) if len(real) >= 2 else float("nan")


def pearson(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Pearson r of two paired arrays; NaN with fewer than 2 values or a constant side."""
    if len(real) < 2 or np.ptp(real) == 0 or np.ptp(synthetic) == 0:
        return float("nan")
    return float(stats.pearsonr(real, synthetic).statistic)


# ---- EHRDiff: prevalence, CMD, MMD ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PrevalenceFidelity(MetricResult):
    """Patient-level code prevalence agreement.

    Attributes:
        pearson, spearman: correlation of real and synthetic prevalence over codes non-zero in either corpus
            (NaN when either side is constant or fewer than 2 codes).
        nzc_synthetic: NZC, codes with non-zero synthetic prevalence.
        nzc_real: codes with non-zero real prevalence (for reference).
        nzc_shared: codes non-zero in both.
        n_codes: codes non-zero in either (the correlation's length).
    """

    metric = "fidelity.prevalence"
    pearson: float
    spearman: float
    nzc_synthetic: int
    nzc_real: int
    nzc_shared: int
    n_codes: int


def prevalence_fidelity(real: PatientCorpus, synthetic: PatientCorpus) -> PrevalenceFidelity:
    """Pearson and Spearman correlation of per-code patient prevalence, plus NZC (EHRDiff, Yuan et al. 2024).

    Prevalence of code c = share of patients having c at least once. The correlations run over the codes
    non-zero in either corpus (a code missing from one side counts 0 there).

    Example:
        >>> prevalence_fidelity(real, real).pearson  # doctest: +SKIP
        1.0
    """
    check_corpus("real", real)
    check_corpus("synthetic", synthetic)
    aligned = aligned_code_matrices(real, synthetic)
    p_real = column_counts(aligned.patients[0]) / real.n_patients
    p_syn = column_counts(aligned.patients[1]) / synthetic.n_patients
    keep = (p_real > 0) | (p_syn > 0)
    r = pearson(p_real[keep], p_syn[keep])
    spearman = float(stats.spearmanr(p_real[keep], p_syn[keep]).statistic) if np.isfinite(r) else float("nan")
    return PrevalenceFidelity(
        pearson=r, spearman=spearman, nzc_synthetic=int((p_syn > 0).sum()), nzc_real=int((p_real > 0).sum()),
        nzc_shared=int(((p_real > 0) & (p_syn > 0)).sum()), n_codes=int(keep.sum()),
    )


@dataclass(frozen=True)
class CorrelationMatrixDistance(MetricResult):
    """Distance between real and synthetic code-code Pearson correlation matrices on the top real codes.

    Attributes:
        cmd: Herdin et al. (2005) 1 - tr(R_r R_s) / (||R_r||_F ||R_s||_F), in [0, 1]; 0 = same matrices.
        mean_abs_difference: mean |R_r - R_s| over the k(k-1)/2 off-diagonal pairs.
        k: number of codes used (``top_k`` or fewer when the real corpus has fewer codes).
        top_k: the requested number.
    """

    metric = "fidelity.cmd"
    cmd: float
    mean_abs_difference: float
    k: int
    top_k: int


def correlation_matrix_distance(real: PatientCorpus, synthetic: PatientCorpus, *,
                                top_k: int = 100) -> CorrelationMatrixDistance:
    """Correlation matrix distance (Herdin et al. 2005) on the ``top_k`` most prevalent real codes.

    R_r and R_s are the Pearson correlation matrices of the patient-level 0/1 columns of those codes (ties in
    prevalence broken by code string). A column that is constant in one corpus has correlation 0 with every
    other column there (and 1 on the diagonal). CMD = 1 - tr(R_r R_s) / (||R_r||_F ||R_s||_F).

    Args:
        top_k: number of codes, default 100 (a sensible range is 50-500; the matrices are top_k x top_k).

    Raises:
        ConfigError: when ``top_k`` < 2.
    """
    check_size("top_k", top_k, minimum=2)
    check_corpus("real", real)
    check_corpus("synthetic", synthetic)
    aligned = aligned_code_matrices(real, synthetic)
    prevalence = column_counts(aligned.patients[0])
    order = np.argsort(-prevalence, kind="stable")  # union codes are sorted, so ties go by code string
    top = order[:top_k][prevalence[order[:top_k]] > 0]
    k = len(top)
    if k < 2:
        return CorrelationMatrixDistance(cmd=float("nan"), mean_abs_difference=float("nan"), k=k, top_k=top_k)
    r_real = _correlation(aligned.patients[0][:, top].toarray())
    r_syn = _correlation(aligned.patients[1][:, top].toarray())
    cmd = 1.0 - float(np.sum(r_real * r_syn)) / float(np.linalg.norm(r_real) * np.linalg.norm(r_syn))
    upper = np.triu_indices(k, 1)
    mad = float(np.abs(r_real - r_syn)[upper].mean())
    return CorrelationMatrixDistance(cmd=cmd, mean_abs_difference=mad, k=k, top_k=top_k)


def _correlation(x: np.ndarray) -> np.ndarray:
    """(k, k) Pearson correlation of the columns of x; constant columns correlate 0 with others, 1 with self."""
    x = x.astype(np.float64)
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / max(1, len(x))
    std = np.sqrt(np.diag(cov))
    scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
    corr = cov * scale[:, None] * scale[None, :]
    np.fill_diagonal(corr, 1.0)
    return corr


@dataclass(frozen=True)
class MaximumMeanDiscrepancy(MetricResult):
    """Unbiased MMD^2 with a Gaussian kernel on patient multi-hot vectors, median-heuristic bandwidth.

    Attributes:
        mmd2: the unbiased estimate (may be slightly negative; about 0 = same distribution).
        sigma2: the bandwidth sigma^2 (median pooled pairwise Hamming distance).
        n_real, n_synthetic: subsample sizes.
        n, seed: the requested subsample size and the seed.
    """

    metric = "fidelity.mmd"
    mmd2: float
    sigma2: float
    n_real: int
    n_synthetic: int
    n: int
    seed: int


def maximum_mean_discrepancy(real: PatientCorpus, synthetic: PatientCorpus, *, n: int = 1000,
                             seed: int = 0) -> MaximumMeanDiscrepancy:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) between patient multi-hot vectors.

    Kernel k(x, y) = exp(-H(x, y) / (2 sigma^2)), the Gaussian kernel on 0/1 vectors (their squared Euclidean
    distance is the Hamming distance H). sigma^2 = median of H over all pairs i < j of the pooled subsample
    (median heuristic), or 1 if that median is 0. ``min(n, patients)`` patients are drawn from each corpus
    without replacement with ``numpy.random.default_rng(seed)`` (real first, then synthetic).

    Raises:
        ConfigError: when ``n`` < 2 or a corpus has fewer than 2 patients.
    """
    check_size("n", n, minimum=2)
    check_corpus("real", real, minimum=2)
    check_corpus("synthetic", synthetic, minimum=2)
    rng = np.random.default_rng(seed)
    aligned = aligned_code_matrices(real, synthetic)
    x = aligned.patients[0][sample_rows(real.n_patients, n, rng)]
    y = aligned.patients[1][sample_rows(synthetic.n_patients, n, rng)]
    pooled = sp.vstack([x, y], format="csr")
    distance = pairwise_hamming(pooled, pooled).astype(np.float64)   # (n_x + n_y, n_x + n_y)
    median = float(np.median(distance[np.triu_indices(len(distance), 1)]))
    sigma2 = median if median > 0 else 1.0
    kernel = np.exp(-distance / (2.0 * sigma2))
    n_x, n_y = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = kernel[:n_x, :n_x], kernel[n_x:, n_x:], kernel[:n_x, n_x:]
    mmd2 = ((k_xx.sum() - np.trace(k_xx)) / (n_x * (n_x - 1))
            + (k_yy.sum() - np.trace(k_yy)) / (n_y * (n_y - 1))
            - 2.0 * k_xy.mean())
    return MaximumMeanDiscrepancy(mmd2=float(mmd2), sigma2=sigma2, n_real=n_x, n_synthetic=n_y, n=n, seed=seed)


# ---- detection -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionAUROC(MetricResult):
    """Cross-validated AUROC of a logistic regression telling real from synthetic patients (0.5 is ideal).

    Attributes:
        auroc: mean of the per-fold AUROCs.
        auroc_std: their standard deviation.
        n_per_class: patients drawn from each corpus.
        folds, seed, n: the parameters.
    """

    metric = "fidelity.detection"
    auroc: float
    auroc_std: float
    n_per_class: int
    folds: int
    n: int | None
    seed: int


def detection_auroc(real: PatientCorpus, synthetic: PatientCorpus, *, n: int | None = None, folds: int = 5,
                    seed: int = 0) -> DetectionAUROC:
    """Real-vs-synthetic detection: stratified k-fold AUROC of an L2 logistic regression (liblinear, C = 1).

    Features per patient: the 0/1 code vector over the union of codes plus log(1 + x) of the number of visits,
    of distinct codes and of code occurrences. m = min(n, real patients, synthetic patients) patients are drawn
    from each corpus (``default_rng(seed)``, real first); folds are ``StratifiedKFold(folds, shuffle=True,
    random_state=seed)``.

    Raises:
        ConfigError: when ``folds`` < 2 or m < ``folds``.
    """
    check_size("folds", folds, minimum=2)
    check_size("n", n, minimum=2)
    check_corpus("real", real)
    check_corpus("synthetic", synthetic)
    m = min(real.n_patients, synthetic.n_patients, n if n is not None else real.n_patients)
    if m < folds:
        raise ConfigError(f"detection needs at least folds={folds} patients per corpus, got {m}")
    rng = np.random.default_rng(seed)
    aligned = aligned_code_matrices(real, synthetic)
    blocks = []
    for corpus, matrix in zip((real, synthetic), aligned.patients):
        rows = sample_rows(corpus.n_patients, m, rng)
        blocks.append(sp.hstack([matrix[rows], sp.csr_matrix(_count_features(corpus, matrix)[rows])], format="csr"))
    x = sp.vstack(blocks, format="csr").astype(np.float64)
    y = np.repeat([0, 1], m)
    scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        model = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x[train], y[train])
        scores.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return DetectionAUROC(auroc=float(np.mean(scores)), auroc_std=float(np.std(scores)), n_per_class=m,
                          folds=folds, n=n, seed=seed)


def _count_features(corpus: PatientCorpus, patients: sp.csr_matrix) -> np.ndarray:
    """(P, 3) log1p of visits, distinct codes and code occurrences per patient."""
    offsets = np.asarray(corpus.code_offsets)
    occurrences = offsets[corpus.visit_offsets[1:]] - offsets[corpus.visit_offsets[:-1]]
    counts = np.column_stack([corpus.visits_per_patient(), row_counts(patients), occurrences])
    return np.log1p(counts.astype(np.float64))

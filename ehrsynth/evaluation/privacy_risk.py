"""Privacy risks beyond the distance attacks of :mod:`~ehrsynth.evaluation.privacy`: rare-code exposure,
length-normalised and reference-calibrated membership attacks, and the share of most exposed records.

Every result carries ``not_applicable``: None when the attack ran, else the one-line reason it could not (its
numbers are then None, never 0). Aggregates only; definitions in docs/metrics.md; nothing here prints or logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError
from ehrsynth.evaluation.features import (
    CHUNK_CELLS,
    MetricResult,
    _hamming_chunks,
    aligned_code_matrices,
    check_corpus,
    check_size,
    column_counts,
    row_counts,
    sample_rows,
)

NAN = float("nan")
EXPOSURE_QUANTILE = 0.99  # a training record is "exposed" when it outscores 99% of holdout records
MIN_EXPOSURE_HOLDOUT = 100  # below this many holdout scores a 99th percentile is the maximum, not a quantile


# ---- rare-code exposure --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RareCodeExposure(MetricResult):
    """Synthetic records carrying a code that fewer than ``k`` real training patients have.

    Attributes:
        n_records, share_records: synthetic records with at least one such code (0 is ideal).
        n_rare_codes: distinct such codes the synthetic data emits.
        n_records_unseen_code: synthetic records with a code no training patient has (not a training leak,
            but a sign of held-out codes in the vocabulary when the corpus was not built split-first).
        n_synthetic, k: the set size and threshold.
        not_applicable: why the metric could not run, else None.
    """

    metric = "privacy.rare_code_exposure"
    n_records: int | None
    share_records: float
    n_rare_codes: int | None
    n_records_unseen_code: int | None
    n_synthetic: int
    k: int
    not_applicable: str | None = None


def rare_code_exposure(train: PatientCorpus, synthetic: PatientCorpus, *, k: int = 11) -> RareCodeExposure:
    """Count synthetic records that carry a code seen in 1 to k-1 distinct training patients.

    A code that few patients have identifies them; emitting it tells a reader that someone with that code
    was in the training data. ``k`` defaults to the release profile's ``--min-patients`` (11), so a release
    corpus scores 0 by construction and a research corpus shows what the release filter would have removed.
    """
    check_size("k", k)
    check_corpus("train", train)
    check_corpus("synthetic", synthetic)
    if k == 1:
        return RareCodeExposure(None, NAN, None, None, synthetic.n_patients, k,
                                not_applicable="k = 1: no training code has fewer than one patient")
    aligned = aligned_code_matrices(train, synthetic)
    patients = column_counts(aligned.patients[0])  # (codes,) distinct training patients per code
    rare = (patients > 0) & (patients < k)
    unseen = patients == 0
    records = aligned.patients[1]
    with_rare = row_counts(records[:, np.flatnonzero(rare)]) > 0
    used = column_counts(records) > 0
    return RareCodeExposure(
        n_records=int(with_rare.sum()), share_records=float(with_rare.mean()),
        n_rare_codes=int((rare & used).sum()),
        n_records_unseen_code=int((row_counts(records[:, np.flatnonzero(unseen)]) > 0).sum()),
        n_synthetic=synthetic.n_patients, k=k,
    )


# ---- membership attacks on scores ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreMembership(MetricResult):
    """A membership attack that scores each record (higher = more likely a member); 0.5 = no leakage.

    Attributes:
        auroc: AUROC of the score as a member score, ties counted half.
        exposed_share: share of attacked members scoring above the 99th percentile of non-member scores
            (about 0.01 without leakage); None with fewer than 100 non-members.
        n_members, n_nonmembers: attacked records (equal).
        n_reference: holdout records used as reference (calibrated attacks), else 0.
        seed: the parameter.
        not_applicable: why the attack could not run, else None.
    """

    metric = "privacy.membership_score"
    auroc: float
    exposed_share: float
    n_members: int | None
    n_nonmembers: int | None
    n_reference: int
    seed: int
    not_applicable: str | None = None

    @classmethod
    def unavailable(cls, reason: str, *, seed: int = 0) -> ScoreMembership:
        """The result of an attack that cannot run: every number None, and the reason."""
        return cls(NAN, NAN, None, None, 0, seed, not_applicable=reason)


class PerCodeLikelihoodMembership(ScoreMembership):
    """Model log-likelihood divided by the record's code occurrences: record length no longer decides."""

    metric = "privacy.membership_likelihood_per_code"


class PerVisitLikelihoodMembership(ScoreMembership):
    """Model log-likelihood divided by the record's visits."""

    metric = "privacy.membership_likelihood_per_visit"


class CalibratedLikelihoodMembership(ScoreMembership):
    """Model log-likelihood minus that of a reference model fit on held-out records (likelihood ratio)."""

    metric = "privacy.membership_likelihood_calibrated"


class DensityRatioMembership(ScoreMembership):
    """DOMIAS: log density of the synthetic data minus log density of held-out reference data."""

    metric = "privacy.membership_domias"


def _score_attack(cls: type[ScoreMembership], members: np.ndarray, nonmembers: np.ndarray, *, n_reference: int = 0,
                  seed: int = 0) -> ScoreMembership:
    """AUROC and exposed share of member vs non-member scores (equal numbers, see callers)."""
    scores = np.concatenate([members, nonmembers])
    if not np.isfinite(scores).all():
        raise ConfigError(f"{cls.metric}: scores must be finite")
    member = np.repeat([True, False], [len(members), len(nonmembers)])
    exposed = (float(np.mean(members > np.quantile(nonmembers, EXPOSURE_QUANTILE)))
               if len(nonmembers) >= MIN_EXPOSURE_HOLDOUT else NAN)
    return cls(auroc=float(roc_auc_score(member, scores)), exposed_share=exposed, n_members=len(members),
               n_nonmembers=len(nonmembers), n_reference=n_reference, seed=seed)


def _sizes(corpus: PatientCorpus, unit: str) -> np.ndarray:
    per = corpus.visits_per_patient() if unit == "visit" else np.add.reduceat(
        np.append(corpus.codes_per_visit(), 0), np.asarray(corpus.visit_offsets[:-1])) * (corpus.visits_per_patient() > 0)
    return np.maximum(np.asarray(per, dtype=np.float64), 1.0)


def normalised_likelihood_membership(train: PatientCorpus, holdout: PatientCorpus, member_loglik: np.ndarray,
                                     nonmember_loglik: np.ndarray, *, unit: str = "code", n: int | None = None,
                                     seed: int = 0) -> ScoreMembership:
    """The likelihood attack with each record's log-likelihood divided by its code occurrences (``unit='code'``)
    or visits (``'visit'``): long records have low likelihood whatever their membership, which hides leakage.

    m = min(n, |train|, |holdout|) records of each side are attacked (``default_rng(seed)``, train first).

    Args:
        member_loglik, nonmember_loglik: (|train|,) and (|holdout|,) log-likelihoods under the model.
    """
    if unit not in ("code", "visit"):
        raise ConfigError(f"unit must be 'code' or 'visit', got {unit!r}")
    check_size("n", n)
    cls = PerCodeLikelihoodMembership if unit == "code" else PerVisitLikelihoodMembership
    for name, corpus, values in (("member_loglik", train, member_loglik), ("nonmember_loglik", holdout,
                                                                           nonmember_loglik)):
        if np.shape(values) != (corpus.n_patients,):
            raise ConfigError(f"{name} must have one value per patient ({corpus.n_patients}), "
                              f"got shape {np.shape(values)!r}")
    rng = np.random.default_rng(seed)
    m = min(train.n_patients, holdout.n_patients, n if n is not None else train.n_patients)
    rows = sample_rows(train.n_patients, m, rng), sample_rows(holdout.n_patients, m, rng)
    members = np.asarray(member_loglik, dtype=np.float64)[rows[0]] / _sizes(train, unit)[rows[0]]
    nonmembers = np.asarray(nonmember_loglik, dtype=np.float64)[rows[1]] / _sizes(holdout, unit)[rows[1]]
    return _score_attack(cls, members, nonmembers, seed=seed)


def _reference_split(train: PatientCorpus, holdout: PatientCorpus, n: int | None, seed: int):
    """Seeded (members, non-members, reference) rows: the holdout is halved so the reference never holds an
    attacked record (a record would otherwise sit at distance 0 from its own reference density)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(holdout.n_patients)
    reference, attackable = np.sort(order[: holdout.n_patients // 2]), np.sort(order[holdout.n_patients // 2:])
    m = min(train.n_patients, len(attackable), n if n is not None else train.n_patients)
    return sample_rows(train.n_patients, m, rng), attackable[sample_rows(len(attackable), m, rng)], reference


def calibrated_likelihood_membership(train: PatientCorpus, holdout: PatientCorpus, member_loglik: np.ndarray,
                                     nonmember_loglik: np.ndarray, *, n: int | None = None,
                                     seed: int = 0) -> ScoreMembership:
    """Likelihood-ratio attack: score = log p_model(x) - log p_ref(x), with p_ref a reference model fit on half
    of the holdout (the other half gives the attacked non-members).

    p_ref treats each code of the patient's code set as independent, with add-one smoothed prevalences: a
    weak model, but it removes what any model of the population explains (record length, common codes), so
    the score keeps what the trained model knows about its own training records.
    """
    check_size("n", n)
    if holdout.n_patients < 4:
        return CalibratedLikelihoodMembership.unavailable(
            f"the holdout has {holdout.n_patients} patients; a reference half and attacked half need 4", seed=seed)
    members, nonmembers, reference = _reference_split(train, holdout, n, seed)
    aligned = aligned_code_matrices(train, holdout)
    ref = aligned.patients[1][reference]
    p = (column_counts(ref) + 1.0) / (ref.shape[0] + 2.0)  # (codes,) smoothed prevalence
    log_absent = np.log1p(-p)

    def ref_loglik(matrix: sp.csr_matrix) -> np.ndarray:
        return matrix @ (np.log(p) - log_absent) + log_absent.sum()

    scores = [np.asarray(ll, dtype=np.float64)[rows] - ref_loglik(matrix[rows])
              for ll, rows, matrix in ((member_loglik, members, aligned.patients[0]),
                                       (nonmember_loglik, nonmembers, aligned.patients[1]))]
    return _score_attack(CalibratedLikelihoodMembership, *scores, n_reference=len(reference), seed=seed)


def domias_membership(train: PatientCorpus, holdout: PatientCorpus, synthetic: PatientCorpus, *,
                      n: int | None = None, bandwidth: float = 1.0, seed: int = 0) -> ScoreMembership:
    """DOMIAS (van Breugel et al. 2023): score = log p_syn(x) - log p_ref(x), any generator, no model needed.

    Both densities are Hamming-kernel estimates, p_S(x) = mean_s exp(-d(x, s) / bandwidth), over every
    synthetic record and over the reference half of the holdout (chunked: memory stays bounded). A generator that overfits puts synthetic
    mass around its training records beyond what the population (the reference) has there, which nearest-
    neighbour distance alone misses.
    """
    check_size("n", n)
    if bandwidth <= 0:
        raise ConfigError(f"bandwidth must be > 0, got {bandwidth!r}")
    check_corpus("synthetic", synthetic)
    if holdout.n_patients < 4:
        return DensityRatioMembership.unavailable(
            f"the holdout has {holdout.n_patients} patients; a reference half and attacked half need 4", seed=seed)
    members, nonmembers, reference = _reference_split(train, holdout, n, seed)
    aligned = aligned_code_matrices(train, holdout, synthetic)
    synth, ref = aligned.patients[2], aligned.patients[1][reference]

    def log_density(x: sp.csr_matrix, points: sp.csr_matrix) -> np.ndarray:
        """Kernel density at each row of x over every row of points, in row chunks of bounded memory."""
        out = np.empty(x.shape[0], dtype=np.float64)
        for start, stop, dist in _hamming_chunks(x, points, CHUNK_CELLS):  # (chunk, points)
            out[start:stop] = logsumexp(-dist.astype(np.float64) / bandwidth, axis=1)
        return out - np.log(points.shape[0])

    scores = [log_density(matrix[rows], synth) - log_density(matrix[rows], ref)
              for rows, matrix in ((members, aligned.patients[0]), (nonmembers, aligned.patients[1]))]
    return _score_attack(DensityRatioMembership, *scores, n_reference=len(reference), seed=seed)


# ---- the most exposed records, over every attack --------------------------------------------------------------
@dataclass(frozen=True)
class MostExposedRecords(MetricResult):
    """The largest share of training records that an attack scores above the 99th percentile of holdout scores.

    Attributes:
        max_exposed_share: the largest ``exposed_share`` over the attacks that ran (about 0.01 = no leakage).
        attack: the name of that attack (its key in the metrics).
        by_attack: ``{name: exposed_share}`` for each attack that could estimate it.
        expected_share: 1 - the quantile (0.01), the share a non-leaking generator gives.
        not_applicable: why no attack could estimate it, else None.
    """

    metric = "privacy.most_exposed"
    max_exposed_share: float
    attack: str | None
    by_attack: dict[str, float]
    expected_share: float
    not_applicable: str | None = None


def most_exposed_records(results: dict[str, ScoreMembership]) -> MostExposedRecords:
    """Summarise the exposed shares of named score attacks (aggregates only: never which records)."""
    shares = {name: r.exposed_share for name, r in results.items()
              if r.not_applicable is None and np.isfinite(r.exposed_share)}
    expected = round(1 - EXPOSURE_QUANTILE, 6)
    if not shares:
        return MostExposedRecords(NAN, None, {}, expected, not_applicable=(
            f"no attack had {MIN_EXPOSURE_HOLDOUT} or more holdout records to set a 99th percentile"))
    worst = max(shares, key=shares.get)
    return MostExposedRecords(shares[worst], worst, shares, expected)

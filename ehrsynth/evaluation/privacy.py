"""Privacy: does the synthetic data reveal who was in the training data, or what they had?

Every distance is the Hamming distance between patient code sets (0/1 vectors over the union of codes), and
every nearest neighbour comes from :func:`~ehrsynth.evaluation.features.nearest_hamming` (sparse, chunked).
``train`` is the real data the generator learnt from, ``holdout`` real data it never saw (e.g. the test part),
and ``synthetic`` the generated corpus. Definitions in docs/metrics.md; nothing here prints or logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError
from ehrsynth.evaluation.features import (
    MetricResult,
    aligned_code_matrices,
    check_corpus,
    check_size,
    column_counts,
    nearest_hamming,
    sample_rows,
)


NAN = float("nan")


def _check_three(train: PatientCorpus, holdout: PatientCorpus, synthetic: PatientCorpus, minimum: int = 1) -> None:
    check_corpus("train", train, minimum=minimum)
    check_corpus("holdout", holdout, minimum=minimum)
    check_corpus("synthetic", synthetic, minimum=minimum)


def _binary_scores(member: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of boolean predictions of membership (0 where undefined)."""
    tp = float(np.sum(predicted & member))
    fp = float(np.sum(predicted & ~member))
    fn = float(np.sum(~predicted & member))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float(np.mean(predicted == member)), "precision": precision, "recall": recall, "f1": f1}


# ---- (a) distance-based membership inference -----------------------------------------------------------------
@dataclass(frozen=True)
class DistanceMembership(MetricResult):
    """Distance-to-closest-synthetic-record membership attack (about 0.5 everywhere = no leakage).

    Attributes:
        accuracy, precision, recall, f1: of "member when distance < median distance".
        auroc: AUROC of the score -distance ("closer means member"), ties counted half.
        median_distance: the threshold.
        mean_distance_members, mean_distance_nonmembers: average nearest-synthetic distances.
        n_members, n_nonmembers: attacked patients of each kind (equal).
        n_synthetic: synthetic records searched.
        n, seed: the parameters.
        not_applicable: why the attack could not run (its numbers are then None), else None.
    """

    metric = "privacy.membership_distance"
    accuracy: float
    precision: float
    recall: float
    f1: float
    auroc: float
    median_distance: float
    mean_distance_members: float
    mean_distance_nonmembers: float
    n_members: int
    n_nonmembers: int
    n_synthetic: int
    n: int | None
    seed: int
    not_applicable: str | None = None


def distance_membership_inference(train: PatientCorpus, holdout: PatientCorpus, synthetic: PatientCorpus, *,
                                  n: int | None = None, seed: int = 0) -> DistanceMembership:
    """Membership inference by Hamming distance to the nearest synthetic record.

    m = min(n, train patients, holdout patients) members are drawn from ``train`` and m non-members from
    ``holdout`` (``default_rng(seed)``, train first). Each one's distance d to its nearest synthetic record is
    computed; the attack predicts "member" when d < median of all 2m distances. The AUROC of -d counts ties
    half, so it stays meaningful when most distances tie (short, repetitive records).

    Example:
        >>> distance_membership_inference(real.part("train"), real.part("test"), synthetic).auroc  # doctest: +SKIP
    """
    check_size("n", n)
    _check_three(train, holdout, synthetic)
    rng = np.random.default_rng(seed)
    m = min(train.n_patients, holdout.n_patients, n if n is not None else train.n_patients)
    aligned = aligned_code_matrices(train, holdout, synthetic)
    attacked = sp.vstack([aligned.patients[0][sample_rows(train.n_patients, m, rng)],
                          aligned.patients[1][sample_rows(holdout.n_patients, m, rng)]], format="csr")
    distance = nearest_hamming(attacked, aligned.patients[2]).distance.astype(np.float64)
    member = np.repeat([True, False], m)
    median = float(np.median(distance))
    scores = _binary_scores(member, distance < median)
    return DistanceMembership(
        **scores, auroc=float(roc_auc_score(member, -distance)), median_distance=median,
        mean_distance_members=float(distance[:m].mean()), mean_distance_nonmembers=float(distance[m:].mean()),
        n_members=m, n_nonmembers=m, n_synthetic=synthetic.n_patients, n=n, seed=seed,
    )


# ---- (b) likelihood-based membership inference ---------------------------------------------------------------
@dataclass(frozen=True)
class LikelihoodMembership(MetricResult):
    """Membership attack by model log-likelihood: higher likelihood means member (0.5 = no leakage).

    Attributes:
        auroc: AUROC of the log-likelihood as a member score (ties half).
        accuracy, precision, recall, f1: of "member when log-likelihood > median".
        median_loglik: the threshold.
        n_members, n_nonmembers: patients used (equal).
        seed: the parameter (used only when the two arrays differ in length).
        not_applicable: why the attack could not run (its numbers are then None), else None.
    """

    metric = "privacy.membership_likelihood"
    auroc: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    median_loglik: float
    n_members: int | None
    n_nonmembers: int | None
    seed: int
    not_applicable: str | None = None


def likelihood_membership_inference(member_loglik: np.ndarray, nonmember_loglik: np.ndarray, *,
                                    seed: int = 0) -> LikelihoodMembership:
    """Likelihood-based membership attack on per-patient log-likelihoods under the trained model.

    When the arrays differ in length, the longer is subsampled to the shorter's length without replacement
    (``default_rng(seed)``), so the two classes are equal and accuracy 0.5 means no leakage.

    Args:
        member_loglik: (m,) log-likelihoods of training patients.
        nonmember_loglik: (k,) log-likelihoods of held-out patients.

    Raises:
        ConfigError: when an array is empty, not one-dimensional, or holds a non-finite value.
    """
    arrays = []
    for name, values in (("member_loglik", member_loglik), ("nonmember_loglik", nonmember_loglik)):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or len(values) == 0:
            raise ConfigError(f"{name} must be a non-empty 1-D array, got shape {values.shape!r}")
        if not np.isfinite(values).all():
            bad = values[~np.isfinite(values)][0]
            raise ConfigError(f"{name} must be finite, got {bad!r}")
        arrays.append(values)
    rng = np.random.default_rng(seed)
    m = min(len(arrays[0]), len(arrays[1]))
    members = arrays[0][sample_rows(len(arrays[0]), m, rng)]
    nonmembers = arrays[1][sample_rows(len(arrays[1]), m, rng)]
    loglik = np.concatenate([members, nonmembers])
    member = np.repeat([True, False], m)
    median = float(np.median(loglik))
    return LikelihoodMembership(auroc=float(roc_auc_score(member, loglik)), **_binary_scores(member, loglik > median),
                                median_loglik=median, n_members=m, n_nonmembers=m, seed=seed)


# ---- (c) attribute inference ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttributeInference(MetricResult):
    """1-NN attribute inference of hidden codes from labels + the most common codes.

    Attributes:
        f1, precision, recall: micro-averaged over the hidden codes of the attacked patients, synthetic
            reference.
        baseline_f1, baseline_precision, baseline_recall: the same attack with real holdout data as reference.
        known_codes: number of codes the attacker knows (``top_k`` or fewer).
        labels_used: labels the attacker knows (those present in all three corpora).
        n_attacked: attacked training patients.
        top_k, n, seed: the parameters.
        not_applicable: why the attack could not run (its numbers are then None), else None.
    """

    metric = "privacy.attribute_inference"
    f1: float
    precision: float
    recall: float
    baseline_f1: float
    baseline_precision: float
    baseline_recall: float
    known_codes: int
    labels_used: tuple[str, ...]
    n_attacked: int
    top_k: int
    n: int | None
    seed: int
    not_applicable: str | None = None


def attribute_inference(train: PatientCorpus, holdout: PatientCorpus, synthetic: PatientCorpus, *,
                        top_k: int = 100, n: int | None = None, seed: int = 0) -> AttributeInference:
    """Attribute inference: guess a training patient's other codes from its labels and common codes.

    The attacker knows, for m = min(n, train patients) training patients (``default_rng(seed)``), their labels
    (those present in train, holdout and synthetic) and whether they have each of the ``top_k`` codes most
    prevalent in ``train`` (ties by code string). It takes the reference record nearest in Hamming distance
    over these known columns (lowest index among ties) and predicts that the patient has exactly the
    reference's hidden codes (all other codes). Scores are micro-averaged over (patient, hidden code) cells:
    precision = TP / predicted, recall = TP / true, F1 = 2 TP / (predicted + true). The reference is
    ``synthetic``; the baseline runs the same attack with ``holdout`` as reference, so f1 - baseline_f1 is what
    the synthetic data adds to population-level knowledge.
    """
    check_size("top_k", top_k)
    check_size("n", n)
    _check_three(train, holdout, synthetic)
    rng = np.random.default_rng(seed)
    aligned = aligned_code_matrices(train, holdout, synthetic)
    prevalence = column_counts(aligned.patients[0])
    order = np.argsort(-prevalence, kind="stable")  # union codes are sorted, so ties go by code string
    known = order[:top_k][prevalence[order[:top_k]] > 0]
    hidden = np.setdiff1d(np.arange(len(aligned.codes)), known)
    labels = tuple(name for name in train.label_names
                   if name in holdout.label_names and name in synthetic.label_names)
    attacked = sample_rows(train.n_patients, n if n is not None else train.n_patients, rng)
    if len(hidden) == 0 or len(known) + len(labels) == 0:
        reason = (f"nothing is hidden: all {len(aligned.codes)} codes are among the top {top_k} the attacker "
                  "knows" if len(hidden) == 0 else "the attacker knows no code and no label")
        return AttributeInference(f1=NAN, precision=NAN, recall=NAN, baseline_f1=NAN, baseline_precision=NAN,
                                  baseline_recall=NAN, known_codes=len(known), labels_used=labels,
                                  n_attacked=len(attacked), top_k=top_k, n=n, seed=seed, not_applicable=reason)

    def features(corpus: PatientCorpus, matrix: sp.csr_matrix, rows: np.ndarray | slice) -> sp.csr_matrix:
        label_columns = [corpus.label_names.index(name) for name in labels]
        label_values = np.asarray(corpus.labels)[rows][:, label_columns].astype(np.int32)
        return sp.hstack([matrix[rows][:, known], sp.csr_matrix(label_values)], format="csr")

    query = features(train, aligned.patients[0], attacked)
    truth = aligned.patients[0][attacked][:, hidden]
    results = []
    for corpus, matrix in ((synthetic, aligned.patients[2]), (holdout, aligned.patients[1])):
        nearest = nearest_hamming(query, features(corpus, matrix, slice(None))).index
        guess = matrix[nearest][:, hidden]
        tp = float(guess.multiply(truth).sum())
        predicted, true = float(guess.sum()), float(truth.sum())
        results.append((2 * tp / (predicted + true) if predicted + true else 0.0,
                        tp / predicted if predicted else 0.0, tp / true if true else 0.0))
    (f1, precision, recall), (b_f1, b_precision, b_recall) = results
    return AttributeInference(f1=f1, precision=precision, recall=recall, baseline_f1=b_f1,
                              baseline_precision=b_precision, baseline_recall=b_recall, known_codes=len(known),
                              labels_used=labels, n_attacked=len(attacked), top_k=top_k, n=n, seed=seed)


# ---- (d) nearest-neighbour adversarial accuracy --------------------------------------------------------------
@dataclass(frozen=True)
class NearestNeighbourAdversarialAccuracy(MetricResult):
    """NNAA (Yale et al. 2020): about 0.5 = synthetic and real are mutually indistinguishable by 1-NN.

    Attributes:
        aa_train: AA of the training sample against the synthetic sample.
        aa_test: AA of the holdout sample against the synthetic sample.
        nnaar: the privacy risk aa_test - aa_train (about 0 is good; large = the generator overfits train).
        n_per_set: records drawn from each of train, holdout and synthetic.
        n, seed: the parameters.
        not_applicable: why the attack could not run (its numbers are then None), else None.
    """

    metric = "privacy.nnaa"
    aa_train: float
    aa_test: float
    nnaar: float
    n_per_set: int
    n: int | None
    seed: int
    not_applicable: str | None = None


def nearest_neighbour_adversarial_accuracy(train: PatientCorpus, holdout: PatientCorpus, synthetic: PatientCorpus,
                                           *, n: int | None = None,
                                           seed: int = 0) -> NearestNeighbourAdversarialAccuracy:
    """AA = 0.5 P(d_TS > d_TT) + 0.5 P(d_ST > d_SS) (Yale et al. 2020), for T = train and T = holdout.

    m = min(n, |train|, |holdout|, |synthetic|) records are drawn from each set (``default_rng(seed)``; train,
    holdout, synthetic in that order). d_TS(i) is the Hamming distance of real record i to its nearest synthetic
    record, d_ST(j) of synthetic record j to its nearest real record, d_TT and d_SS the nearest distances within
    the same set leaving the record itself out. The inequalities are strict, as in the paper: with integer
    distances, ties count 0, so independent samples score somewhat below 0.5 on repetitive data -- compare
    aa_train with aa_test (NNAAR = AA_test - AA_train).

    Raises:
        ConfigError: when a set has fewer than 2 records.
    """
    check_size("n", n, minimum=2)
    _check_three(train, holdout, synthetic, minimum=2)
    rng = np.random.default_rng(seed)
    m = min(train.n_patients, holdout.n_patients, synthetic.n_patients,
            n if n is not None else train.n_patients)
    aligned = aligned_code_matrices(train, holdout, synthetic)
    t, e, s = (matrix[sample_rows(corpus.n_patients, m, rng)]
               for corpus, matrix in zip((train, holdout, synthetic), aligned.patients))
    d_ss = nearest_hamming(s, s, exclude_self=True).distance

    def adversarial_accuracy(real: sp.csr_matrix) -> float:
        cross = nearest_hamming(real, s)
        d_rr = nearest_hamming(real, real, exclude_self=True).distance
        return 0.5 * float(np.mean(cross.distance > d_rr)) + 0.5 * float(np.mean(cross.reverse_distance > d_ss))

    aa_train, aa_test = adversarial_accuracy(t), adversarial_accuracy(e)
    return NearestNeighbourAdversarialAccuracy(aa_train=aa_train, aa_test=aa_test, nnaar=aa_test - aa_train,
                                               n_per_set=m, n=n, seed=seed)


# ---- (e) distance to closest record --------------------------------------------------------------------------
@dataclass(frozen=True)
class DistanceToClosestRecord(MetricResult):
    """Share of synthetic records closer to train than to holdout (about 0.5 is ideal, 1 = copies of train).

    Attributes:
        share_closer_to_train: with ties counted half.
        share_ties: synthetic records equally close to both.
        median_dcr_train, median_dcr_holdout: median nearest distances of synthetic records to each set.
        n_reference: records drawn from each of train and holdout (equal, so 0.5 is the ideal).
        n_synthetic: synthetic records scored.
        n, seed: the parameters.
        not_applicable: why the attack could not run (its numbers are then None), else None.
    """

    metric = "privacy.dcr"
    share_closer_to_train: float
    share_ties: float
    median_dcr_train: float
    median_dcr_holdout: float
    n_reference: int
    n_synthetic: int
    n: int | None
    seed: int
    not_applicable: str | None = None


def distance_to_closest_record(train: PatientCorpus, holdout: PatientCorpus, synthetic: PatientCorpus, *,
                               n: int | None = None, seed: int = 0) -> DistanceToClosestRecord:
    """DCR share: for each synthetic record, is its nearest train record closer than its nearest holdout one?

    m = min(n, |train|, |holdout|) records are drawn from each of train and holdout (``default_rng(seed)``,
    train first) so both references are the same size; every synthetic record is scored. Share =
    mean(1[d_train < d_holdout] + 0.5 * 1[d_train == d_holdout]).
    """
    check_size("n", n)
    _check_three(train, holdout, synthetic)
    rng = np.random.default_rng(seed)
    m = min(train.n_patients, holdout.n_patients, n if n is not None else train.n_patients)
    aligned = aligned_code_matrices(train, holdout, synthetic)
    d_train = nearest_hamming(aligned.patients[2], aligned.patients[0][sample_rows(train.n_patients, m, rng)])
    d_holdout = nearest_hamming(aligned.patients[2], aligned.patients[1][sample_rows(holdout.n_patients, m, rng)])
    closer = d_train.distance < d_holdout.distance
    ties = d_train.distance == d_holdout.distance
    return DistanceToClosestRecord(
        share_closer_to_train=float(np.mean(closer + 0.5 * ties)), share_ties=float(np.mean(ties)),
        median_dcr_train=float(np.median(d_train.distance)), median_dcr_holdout=float(np.median(d_holdout.distance)),
        n_reference=m, n_synthetic=synthetic.n_patients, n=n, seed=seed,
    )


# ---- (f) exact copies ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExactCopies(MetricResult):
    """How often records equal (as code sets) some training record.

    Attributes:
        copy_rate: share of synthetic records identical to some training record.
        holdout_copy_rate: share of holdout records identical to some training record: the rate a fresh real
            patient reaches by chance, the baseline for copy_rate.
        n_synthetic, n_holdout, n_train: set sizes (no subsampling).
        not_applicable: why the attack could not run (its numbers are then None), else None.
    """

    metric = "privacy.exact_copies"
    copy_rate: float
    holdout_copy_rate: float
    n_synthetic: int
    n_holdout: int
    n_train: int
    not_applicable: str | None = None


def exact_copies(train: PatientCorpus, holdout: PatientCorpus, synthetic: PatientCorpus) -> ExactCopies:
    """Exact-copy rate of synthetic records against training records, beside the same rate for holdout records.

    A record is a copy when its patient-level code set equals that of some training record (Hamming distance 0
    to its nearest training record); visit structure and times are ignored.
    """
    _check_three(train, holdout, synthetic)
    aligned = aligned_code_matrices(train, holdout, synthetic)
    synthetic_distance = nearest_hamming(aligned.patients[2], aligned.patients[0]).distance
    holdout_distance = nearest_hamming(aligned.patients[1], aligned.patients[0]).distance
    return ExactCopies(copy_rate=float(np.mean(synthetic_distance == 0)),
                       holdout_copy_rate=float(np.mean(holdout_distance == 0)),
                       n_synthetic=synthetic.n_patients, n_holdout=holdout.n_patients, n_train=train.n_patients)

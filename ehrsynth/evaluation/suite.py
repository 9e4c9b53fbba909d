"""Run every metric twice: synthetic against real-train, and real-holdout against real-train (the noise ceiling).

The noise ceiling is what a perfect generator would score on this data: fresh real patients, never trained on,
of the same number as the synthetic ones. It is the yardstick each table shows beside the synthetic value:

* fidelity and structure: ``metric(train, reference)``, ``reference`` the holdout subsampled (seeded) to the
  synthetic size when larger;
* utility: TRTR, which :func:`~ehrsynth.evaluation.utility.downstream_utility` already computes beside TSTR
  (training on held-out patients instead would leave no unseen test data);
* privacy: the attack with half of the holdout playing the synthetic data and the other half the non-members.

A ceiling the holdout is too small for (e.g. a privacy split of a 3-patient holdout) is recorded as "not
applicable" with the reason. Definitions in docs/metrics.md ("Noise ceiling"); nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ehrsynth.data.build import PROFILE_MIN_PATIENTS
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError
from ehrsynth.evaluation import fidelity, privacy, privacy_risk, utility
from ehrsynth.evaluation.bootstrap import bootstrap_intervals
from ehrsynth.evaluation.clinical import clinical_validity
from ehrsynth.evaluation.features import check_size, sample_rows
from ehrsynth.evaluation.per_code import per_code_view
from ehrsynth.evaluation.structure import structure_fidelity
from ehrsynth.evaluation.verdict import verdict

# name in metrics.json -> metric(real train, other, seed); run for synthetic and for the reference
FIDELITY_METRICS: dict[str, Callable[[PatientCorpus, PatientCorpus, int], Any]] = {
    "structure": lambda real, other, seed: structure_fidelity(real, other),
    "halo": lambda real, other, seed: fidelity.halo_fidelity(real, other),
    "prevalence": lambda real, other, seed: fidelity.prevalence_fidelity(real, other),
    "cmd": lambda real, other, seed: fidelity.correlation_matrix_distance(real, other),
    "mmd": lambda real, other, seed: fidelity.maximum_mean_discrepancy(real, other, seed=seed),
    "detection": lambda real, other, seed: fidelity.detection_auroc(real, other, seed=seed),
}
# name -> metric(train, holdout, synthetic, n, seed)
PRIVACY_METRICS: dict[str, Callable[[PatientCorpus, PatientCorpus, PatientCorpus, int | None, int], Any]] = {
    "membership": lambda tr, ho, sy, n, seed: privacy.distance_membership_inference(tr, ho, sy, n=n, seed=seed),
    "attribute": lambda tr, ho, sy, n, seed: privacy.attribute_inference(tr, ho, sy, n=n, seed=seed),
    "nnaa": lambda tr, ho, sy, n, seed: privacy.nearest_neighbour_adversarial_accuracy(tr, ho, sy, n=n, seed=seed),
    "dcr": lambda tr, ho, sy, n, seed: privacy.distance_to_closest_record(tr, ho, sy, n=n, seed=seed),
    "exact_copies": lambda tr, ho, sy, n, seed: privacy.exact_copies(tr, ho, sy),
    "membership_domias": lambda tr, ho, sy, n, seed: privacy_risk.domias_membership(tr, ho, sy, n=n, seed=seed),
}
LIKELIHOOD_ATTACKS = (
    ("likelihood_membership_per_code", privacy_risk.PerCodeLikelihoodMembership),
    ("likelihood_membership_per_visit", privacy_risk.PerVisitLikelihoodMembership),
    ("likelihood_membership_calibrated", privacy_risk.CalibratedLikelihoodMembership),
)


def likelihood_attacks(train: PatientCorpus, test: PatientCorpus,
                       patient_log_likelihood: Callable[[PatientCorpus], np.ndarray] | None, *,
                       privacy_n: int | None, seed: int) -> dict[str, Any]:
    """The attacks on the model's own likelihood: raw, per code, per visit and reference-calibrated; each
    reports "not applicable" when there is no likelihood (EHRDiff, or no model given)."""
    if patient_log_likelihood is None:
        reason = "no model likelihood: the generator is not a likelihood model (EHRDiff) or no model was given"
        out: dict[str, Any] = {name: cls.unavailable(reason, seed=seed) for name, cls in LIKELIHOOD_ATTACKS}
        out["likelihood_membership"] = privacy.LikelihoodMembership(
            auroc=float("nan"), accuracy=float("nan"), precision=float("nan"), recall=float("nan"),
            f1=float("nan"), median_loglik=float("nan"), n_members=None, n_nonmembers=None, seed=seed,
            not_applicable=reason)
        return out
    member, nonmember = patient_log_likelihood(train), patient_log_likelihood(test)
    names = [name for name, _ in LIKELIHOOD_ATTACKS]
    return {
        "likelihood_membership": privacy.likelihood_membership_inference(member, nonmember, seed=seed),
        names[0]: privacy_risk.normalised_likelihood_membership(train, test, member, nonmember, unit="code",
                                                                n=privacy_n, seed=seed),
        names[1]: privacy_risk.normalised_likelihood_membership(train, test, member, nonmember, unit="visit",
                                                                n=privacy_n, seed=seed),
        names[2]: privacy_risk.calibrated_likelihood_membership(train, test, member, nonmember, n=privacy_n,
                                                                seed=seed),
    }


def reference_sample(holdout: PatientCorpus, n: int, *, seed: int = 0) -> PatientCorpus:
    """The holdout, subsampled without replacement to ``n`` patients (``default_rng(seed)``) when larger."""
    if holdout.n_patients <= n:
        return holdout
    return holdout.subset(sample_rows(holdout.n_patients, n, np.random.default_rng(seed)))


def privacy_reference_split(holdout: PatientCorpus, n_synthetic: int, *,
                            seed: int = 0) -> tuple[PatientCorpus, PatientCorpus]:
    """(stand-in synthetic, non-members): a seeded permutation of the holdout cut in two halves (the first half
    at most ``n_synthetic`` patients)."""
    order = np.random.default_rng(seed).permutation(holdout.n_patients)
    half = min(holdout.n_patients // 2, n_synthetic)
    return holdout.subset(np.sort(order[:half])), holdout.subset(np.sort(order[half:]))


def _or_reason(run: Callable[[], Any]) -> dict[str, Any]:
    """A ceiling result as a dict, or "not applicable" with the reason when the holdout is too small for it."""
    try:
        return run().as_dict()
    except ConfigError as error:
        return {"metric": "", "not_applicable": True, "reason": str(error)}


def evaluate(
    train: PatientCorpus,
    test: PatientCorpus,
    synthetic: PatientCorpus,
    *,
    patient_log_likelihood: Callable[[PatientCorpus], np.ndarray] | None = None,
    seed: int = 0,
    privacy_n: int | None = 2000,
    bootstrap: int = 200,
    descriptions: dict[str, str] | None = None,
    rare_k: int = PROFILE_MIN_PATIENTS["release"],
) -> dict[str, Any]:
    """Every metric of docs/metrics.md for ``synthetic``, its noise ceiling, intervals and the verdict.

    Args:
        train, test: real training and held-out corpora.
        synthetic: the corpus to judge (any vocabulary: metrics align codes by their typed strings).
        patient_log_likelihood: the model's per-patient log-likelihood, enabling the likelihood attack.
        seed: seed of every sampled metric, of the reference subsample and of the bootstrap.
        privacy_n: cap on patients per set for the distance-based privacy metrics (None: all).
        bootstrap: bootstrap replicates of the headline intervals (0: none).
        descriptions: typed code -> human description, for the per-code tables.
        rare_k: a code fewer than this many training patients have is rare (rare-code exposure).

    Returns:
        ``{name: result.as_dict()}`` for the synthetic data, plus ``"ceiling"`` (the same names for the
        reference), ``"intervals"``, ``"clinical"``, ``"per_code"``, ``"verdict"`` and ``"_meta"`` (sizes,
        seed, timings).

    Raises:
        ConfigError: for a negative ``bootstrap`` or bad sizes.
    """
    check_size("bootstrap", bootstrap, minimum=0)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - start, 3)
        return out

    reference = reference_sample(test, synthetic.n_patients, seed=seed)
    stand_in, nonmembers = privacy_reference_split(test, synthetic.n_patients, seed=seed)
    out: dict[str, Any] = {}
    ceiling: dict[str, Any] = {}
    for name, metric in FIDELITY_METRICS.items():
        out[name] = timed(name, lambda: metric(train, synthetic, seed)).as_dict()
        ceiling[name] = timed(f"{name}.ceiling", lambda: _or_reason(lambda: metric(train, reference, seed)))
    out["utility"] = timed("utility", lambda: utility.downstream_utility(train, test, synthetic, seed=seed)).as_dict()
    scored: dict[str, Any] = {}  # score attacks, for the most-exposed summary
    for name, metric in PRIVACY_METRICS.items():
        result = timed(name, lambda: metric(train, test, synthetic, privacy_n, seed))
        out[name] = result.as_dict()
        if isinstance(result, privacy_risk.ScoreMembership):
            scored[name] = result
        ceiling[name] = timed(f"{name}.ceiling", lambda: _or_reason(
            lambda: metric(train, nonmembers, stand_in, privacy_n, seed)))
    out["rare_code_exposure"] = timed("rare_code_exposure", lambda: privacy_risk.rare_code_exposure(
        train, synthetic, k=rare_k)).as_dict()
    ceiling["rare_code_exposure"] = _or_reason(lambda: privacy_risk.rare_code_exposure(train, reference, k=rare_k))
    for name, result in timed("likelihood_membership", lambda: likelihood_attacks(
            train, test, patient_log_likelihood, privacy_n=privacy_n, seed=seed)).items():
        out[name] = result.as_dict()
        if isinstance(result, privacy_risk.ScoreMembership):
            scored[name] = result
    out["most_exposed"] = privacy_risk.most_exposed_records(scored).as_dict()
    out["ceiling"] = ceiling
    out["intervals"] = {}
    if bootstrap:
        intervals = timed("intervals", lambda: bootstrap_intervals(train, synthetic, replicates=bootstrap,
                                                                   seed=seed))
        out["intervals"] = {key: vars(value) for key, value in intervals.items()}
    out["clinical"] = timed("clinical", lambda: clinical_validity(train, synthetic, reference)).as_dict()
    out["per_code"] = timed("per_code", lambda: per_code_view(train, synthetic, descriptions=descriptions))
    out["verdict"] = verdict(out)
    out["_meta"] = {"train_patients": train.n_patients, "test_patients": test.n_patients,
                    "synthetic_patients": synthetic.n_patients, "reference_patients": reference.n_patients,
                    "privacy_reference_patients": [stand_in.n_patients, nonmembers.n_patients],
                    "seed": seed, "privacy_n": privacy_n, "bootstrap": bootstrap, "seconds": timings}
    return out

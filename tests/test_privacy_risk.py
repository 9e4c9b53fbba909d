"""Rare-code exposure, normalised/calibrated likelihood attacks, DOMIAS and the most exposed records: exact values
on toys, and copies vs independent real data on OMOP GiBleed (the parts of test_eval_privacy)."""

from __future__ import annotations

import numpy as np
import pytest

from ehrsynth.errors import ConfigError
from ehrsynth.evaluation import privacy, privacy_risk
from ehrsynth.evaluation.features import aligned_code_matrices, column_counts
from test_eval_privacy import gibleed_parts, rebuilt, toy  # noqa: F401  (gibleed_parts is a fixture)


def test_rare_code_exposure_exact():
    # training patients per code: A 3, B 2, C 1, D 1; with k=3, B, C and D are rare
    train = toy([["A", "B"], ["A", "C"], ["A", "B"], ["D"]])
    synthetic = toy([["A"], ["A", "B"], ["C"], ["E"]], first_id=100)
    got = privacy_risk.rare_code_exposure(train, synthetic, k=3)
    assert (got.n_records, got.share_records, got.n_rare_codes, got.n_records_unseen_code) == (2, 0.5, 2, 1)
    assert got.not_applicable is None
    assert privacy_risk.rare_code_exposure(train, synthetic, k=2).n_records == 1  # only C and D are rare
    trivial = privacy_risk.rare_code_exposure(train, synthetic, k=1)
    assert trivial.n_records is None and "k = 1" in trivial.not_applicable
    assert trivial.as_dict()["share_records"] is None  # never 0 when it cannot run


def test_normalised_likelihood_exact():
    train = toy([["A"], ["A", "B", "C"]])  # 1 and 3 code occurrences
    holdout = toy([["B"], ["A", "B", "C", "D"]], first_id=100)  # 1 and 4
    member, nonmember = np.array([-1.0, -3.0]), np.array([-2.0, -8.0])
    raw = privacy.likelihood_membership_inference(member, nonmember)
    assert raw.auroc == 0.75  # long records look like non-members
    per_code = privacy_risk.normalised_likelihood_membership(train, holdout, member, nonmember, unit="code")
    assert per_code.auroc == 1.0 and per_code.metric == "privacy.membership_likelihood_per_code"
    per_visit = privacy_risk.normalised_likelihood_membership(train, holdout, member, nonmember, unit="visit")
    assert per_visit.auroc == 0.75  # one visit each: no change
    assert per_code.exposed_share is None or np.isnan(per_code.exposed_share)  # fewer than 100 non-members
    with pytest.raises(ConfigError, match="one value per patient"):
        privacy_risk.normalised_likelihood_membership(train, holdout, member[:1], nonmember)
    with pytest.raises(ConfigError, match="unit"):
        privacy_risk.normalised_likelihood_membership(train, holdout, member, nonmember, unit="patient")


def test_attacks_that_cannot_run_say_why(gibleed_parts):  # noqa: F811
    train, holdout, other = gibleed_parts
    # the attacker knows the top 100 codes: with fewer codes than that (GiBleed conditions: 80) none is hidden
    few = [toy([["A", "B"], ["A"], ["C"]], first_id=i) for i in (0, 100, 200)]
    attack = privacy.attribute_inference(*few)
    assert attack.not_applicable.startswith("nothing is hidden") and attack.as_dict()["f1"] is None
    tiny = toy([["A"], ["B"], ["C"]], first_id=100)
    assert "need 4" in privacy_risk.domias_membership(train, tiny, other).not_applicable
    assert "need 4" in privacy_risk.calibrated_likelihood_membership(
        train, tiny, np.zeros(train.n_patients), np.zeros(3)).not_applicable
    none = privacy_risk.most_exposed_records({"x": privacy_risk.DensityRatioMembership.unavailable("x")})
    assert none.not_applicable and none.as_dict()["max_exposed_share"] is None


def _bernoulli_loglik(corpus, fit_on) -> np.ndarray:
    """Per-patient log-likelihood under independent codes fit (add-one) on ``fit_on``: a population model."""
    aligned = aligned_code_matrices(corpus, fit_on)
    p = (column_counts(aligned.patients[1]) + 1) / (fit_on.n_patients + 2)
    return aligned.patients[0] @ (np.log(p) - np.log1p(-p)) + np.log1p(-p).sum()


def test_copies_are_exposed_and_independent_data_is_not(gibleed_parts):  # noqa: F811
    train, holdout, other = gibleed_parts
    copies = rebuilt(train)
    leaky = privacy_risk.domias_membership(train, holdout, copies, n=400, seed=0)
    private = privacy_risk.domias_membership(train, holdout, other, n=400, seed=0)
    assert leaky.auroc > 0.9 and 0.4 <= private.auroc <= 0.6
    assert (leaky.n_members, leaky.n_nonmembers, leaky.n_reference) == (400, 400, 423)
    assert leaky.exposed_share > 0.5 and private.exposed_share < 0.05
    # a population model (fit on data of neither side) leaks nothing once calibrated against the holdout
    population = other
    member, nonmember = _bernoulli_loglik(train, population), _bernoulli_loglik(holdout, population)
    calibrated = privacy_risk.calibrated_likelihood_membership(train, holdout, member, nonmember, seed=0)
    assert 0.4 <= calibrated.auroc <= 0.6
    # a memorising model: every training record gains 5 nats
    memorised = privacy_risk.calibrated_likelihood_membership(train, holdout, member + 5, nonmember, seed=0)
    assert memorised.auroc > 0.9
    summary = privacy_risk.most_exposed_records({"copies": leaky, "independent": private,
                                                 "population model": calibrated, "memorising model": memorised})
    assert (summary.attack, summary.max_exposed_share, summary.expected_share) == ("copies", 0.9925, 0.01)
    shares = summary.by_attack
    assert shares["memorising model"] > 0.9 and shares["independent"] < 0.03 and shares["population model"] < 0.03

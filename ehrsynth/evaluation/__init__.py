"""Evaluation of synthetic corpora: structure, fidelity, utility and privacy metrics.

:func:`evaluate` runs them all beside their noise ceiling, with bootstrap intervals and a verdict; the
report module writes the page. Every metric is a pure function of corpora (or arrays) returning a small frozen result with ``as_dict()``; the
``metric`` key of that dict names its definition in docs/metrics.md. Corpora may have different vocabularies:
each metric aligns them on the union of typed code strings first (:func:`aligned_code_matrices`).
"""

from ehrsynth.evaluation.bootstrap import bootstrap_intervals
from ehrsynth.evaluation.clinical import clinical_validity
from ehrsynth.evaluation.descriptions import code_descriptions
from ehrsynth.evaluation.features import AlignedCodes, MetricResult, align_vocabularies, aligned_code_matrices
from ehrsynth.evaluation.fidelity import (
    correlation_matrix_distance,
    detection_auroc,
    halo_fidelity,
    halo_statistics,
    maximum_mean_discrepancy,
    prevalence_fidelity,
)
from ehrsynth.evaluation.privacy import (
    attribute_inference,
    distance_membership_inference,
    distance_to_closest_record,
    exact_copies,
    likelihood_membership_inference,
    nearest_neighbour_adversarial_accuracy,
)
from ehrsynth.evaluation.structure import record_shape, structure_fidelity, total_variation
from ehrsynth.evaluation.per_code import per_code_view
from ehrsynth.evaluation.suite import evaluate
from ehrsynth.evaluation.utility import downstream_utility
from ehrsynth.evaluation.verdict import verdict

__all__ = [
    "AlignedCodes",
    "MetricResult",
    "align_vocabularies",
    "aligned_code_matrices",
    "attribute_inference",
    "bootstrap_intervals",
    "clinical_validity",
    "code_descriptions",
    "correlation_matrix_distance",
    "detection_auroc",
    "distance_membership_inference",
    "distance_to_closest_record",
    "downstream_utility",
    "evaluate",
    "exact_copies",
    "halo_fidelity",
    "halo_statistics",
    "likelihood_membership_inference",
    "maximum_mean_discrepancy",
    "nearest_neighbour_adversarial_accuracy",
    "per_code_view",
    "prevalence_fidelity",
    "record_shape",
    "structure_fidelity",
    "total_variation",
    "verdict",
]

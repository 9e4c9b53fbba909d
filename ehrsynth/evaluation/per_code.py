"""The per-code view: which codes and code pairs the generator gets most wrong, with their descriptions.

Aggregates only (shares over patients or visits), so it is safe to show. Descriptions come from the source's
dictionary tables (:mod:`ehrsynth.evaluation.descriptions`) when available. Definitions in docs/metrics.md
(``per_code``); nothing here prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.evaluation.features import aligned_code_matrices, check_corpus, check_size, column_counts


def per_code_view(real: PatientCorpus, synthetic: PatientCorpus, *, top: int = 20,
                  descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``top`` largest per-code prevalence gaps and the most over- and under-generated within-visit pairs.

    * ``prevalence_gaps``: codes by |synthetic - real| patient prevalence (share of patients with the code),
      ties by code string; each row ``{code, description, real, synthetic, gap}`` with gap = synthetic - real.
    * ``over_generated_pairs`` / ``under_generated_pairs``: unordered pairs a < b by synthetic - real (resp.
      real - synthetic) share of visits containing both; rows ``{code_a, code_b, description_a, description_b,
      real, synthetic, gap}``. Only pairs with a positive gap in that direction are listed.
    * ``one_sided``: codes and pairs present on one side only (the keys scatter plots draw at a floor).

    Raises:
        ConfigError: when ``top`` < 1.
    """
    check_size("top", top)
    check_corpus("real", real)
    check_corpus("synthetic", synthetic)
    descriptions = descriptions or {}
    aligned = aligned_code_matrices(real, synthetic)
    codes = aligned.codes

    def describe(i: int) -> str:
        return descriptions.get(codes[i], "")

    p_real = column_counts(aligned.patients[0]) / real.n_patients
    p_syn = column_counts(aligned.patients[1]) / synthetic.n_patients
    gap = p_syn - p_real
    order = np.lexsort((np.arange(len(gap)), -np.abs(gap)))[:top]
    prevalence = [{"code": codes[i], "description": describe(i), "real": float(p_real[i]),
                   "synthetic": float(p_syn[i]), "gap": float(gap[i])} for i in order if gap[i] != 0]

    pair_real = _pair_shares(aligned.visits[0])
    pair_syn = _pair_shares(aligned.visits[1])
    diff = (pair_syn - pair_real).tocoo()
    rows = []
    for sign in (1.0, -1.0):
        value = sign * diff.data
        pick = np.flatnonzero(value > 0)
        pick = pick[np.lexsort((diff.col[pick], diff.row[pick], -value[pick]))][:top]
        rows.append([{"code_a": codes[diff.row[k]], "code_b": codes[diff.col[k]],
                      "description_a": describe(diff.row[k]), "description_b": describe(diff.col[k]),
                      "real": float(pair_real[diff.row[k], diff.col[k]]),
                      "synthetic": float(pair_syn[diff.row[k], diff.col[k]]), "gap": float(diff.data[k])}
                     for k in pick])
    real_keys, syn_keys = _keys(pair_real), _keys(pair_syn)
    return {
        "metric": "per_code",
        "prevalence_gaps": prevalence,
        "over_generated_pairs": rows[0],
        "under_generated_pairs": rows[1],
        "one_sided": {
            "codes_real_only": int(((p_real > 0) & (p_syn == 0)).sum()),
            "codes_synthetic_only": int(((p_syn > 0) & (p_real == 0)).sum()),
            "pairs_real_only": len(np.setdiff1d(real_keys, syn_keys, assume_unique=True)),
            "pairs_synthetic_only": len(np.setdiff1d(syn_keys, real_keys, assume_unique=True)),
        },
        "top": top,
        "described": int(sum(1 for c in codes if c in descriptions)),
    }


def _pair_shares(visits: sp.csr_matrix) -> sp.csr_matrix:
    """(C, C) upper-triangular share of visits containing both codes a < b."""
    return sp.triu(visits.T @ visits, k=1, format="csr").astype(np.float64) / max(1, visits.shape[0])


def _keys(matrix: sp.csr_matrix) -> np.ndarray:
    """Sorted int64 keys row * columns + column of the non-zero cells."""
    rows, cols = matrix.nonzero()
    return np.unique(rows.astype(np.int64) * matrix.shape[1] + cols)

"""Exact log-likelihood of records under HALO, and per-code / per-visit perplexity.

The model's probability of a record is the product, over its scored rows (static row, visit rows, end row),
of each row's factors (:mod:`.encoding`): a visit row's first-step categorical {end, lowest code, no code}, the
Bernoulli conditionals of the codes after that first code (and of the static row's labels), and one softmax per
categorical group (sex, age bucket, gap bin) -- the distribution the sampler draws from. One teacher-forced pass
gives every factor. The functions take the network pieces and the layout, never the model class.

Codes are matched to the model by their typed string (``ICD9CM/4019``), so a corpus built separately (another
vocabulary order) scores correctly. A code the model never saw has no column: by default that is an error
naming the codes (``unknown="error"``); ``unknown="drop"`` removes them from the records before scoring and
counts them in the result. Histories longer than ``n_ctx - 3`` visits are scored on their last ``n_ctx - 3``
visits, as in training, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ehrsynth.data.corpus import PatientCorpus, ragged_indices
from ehrsynth.errors import ConfigError
from ehrsynth.models.halo.encoding import (
    FIRST_VISIT, STATIC, UNSCORED, VISIT, ColumnLayout, dense_rows, encode_records, target_row_kinds,
)
from ehrsynth.models.halo.network import HaloNetwork


@dataclass(frozen=True)
class LikelihoodResult:
    """Log-likelihoods in nats.

    Attributes:
        patient_log_likelihood: (P,) log p(record): static row + visit rows + end row.
        patient_static_log_likelihood: (P,) the static row's share.
        patient_visit_log_likelihood: (P,) the visit rows' share (end row excluded).
        visit_log_likelihood: (K,) log-likelihood of each scored visit row (codes and gap bin).
        visit_index: (K,) the corpus visit index of each scored visit.
        patient_visits: (P,) visits scored per patient.
        patient_codes: (P,) code occurrences scored per patient.
        per_code_perplexity: exp(-sum of visit-row log-likelihoods / code occurrences scored).
        per_visit_perplexity: exp(-sum of visit-row log-likelihoods / visits scored).
        unknown_code_occurrences: occurrences dropped because the model does not know the code.
        unknown_codes: the distinct dropped codes.
        truncated_patients: patients with more than n_ctx - 3 visits.
        truncated_visits: visits dropped from the front of those histories.
    """

    patient_log_likelihood: np.ndarray
    patient_static_log_likelihood: np.ndarray
    patient_visit_log_likelihood: np.ndarray
    visit_log_likelihood: np.ndarray
    visit_index: np.ndarray
    patient_visits: np.ndarray
    patient_codes: np.ndarray
    per_code_perplexity: float
    per_visit_perplexity: float
    unknown_code_occurrences: int
    unknown_codes: tuple[str, ...]
    truncated_patients: int
    truncated_visits: int


def factor_log_likelihood(logits: torch.Tensor, first_logits: torch.Tensor, targets: torch.Tensor,
                          kinds: torch.Tensor, layout: ColumnLayout) -> torch.Tensor:
    """(N,) exact log-likelihood of N target rows from the fine head's outputs (in the logits' dtype).

    Args:
        logits: (N, C) fine-head logits in column order.
        first_logits: (N, V + 2) first-step logits: end, the V codes, "no code".
        targets: (N, C) the rows (0/1).
        kinds: (N,) row kinds (STATIC, FIRST_VISIT, VISIT, UNSCORED; :func:`.encoding.row_kinds`).
        layout: the column layout.

    Returns:
        (N,) log p(row | history); 0 for UNSCORED rows, -inf for a row the layout makes impossible.
    """
    V = layout.n_codes
    codes = targets[:, :V] > 0
    is_end = targets[:, layout.end] > 0
    has_code = codes.any(1)
    first_code = codes.to(torch.uint8).argmax(1)  # the lowest code of the row (0 when none)
    visit = (kinds == FIRST_VISIT) | (kinds == VISIT)
    static = kinds == STATIC

    # first step of a visit row: one categorical over {end, code 0..V-1, no code}
    token = torch.where(is_end, 0, torch.where(has_code, 1 + first_code, V + 1))  # (N,)
    allowed = torch.ones_like(first_logits, dtype=torch.bool)
    allowed[:, 0] = (kinds == VISIT) | ((kinds == FIRST_VISIT) & layout.zero_visits)
    allowed[:, V + 1] = layout.empty_visits
    first = torch.log_softmax(first_logits.masked_fill(~allowed, float("-inf")), dim=-1)
    first = first.gather(1, token[:, None])[:, 0]  # (N,)
    total = torch.where(visit, first, 0.0)

    # Bernoulli chain: codes after the first code of a visit; labels of the static row
    columns = torch.arange(layout.n_columns, device=targets.device)
    chain = (visit & has_code & ~is_end)[:, None] & (columns[None, :] < V) & (columns[None, :] > first_code[:, None])
    chain |= static[:, None] & (columns[None, :] >= layout.label_start) & (columns[None, :] < layout.sex_start)
    per_column = torch.where(targets > 0, F.logsigmoid(logits), F.logsigmoid(-logits))
    total = total + torch.where(chain, per_column, 0.0).sum(-1)

    # categorical groups: sex and age bucket on the static row, the gap bin on visits after the first
    for a, b in layout.group_spans():
        rows = (kinds == VISIT) & ~is_end if a == layout.gap_start else static
        chosen = targets[:, a:b]
        group = (torch.log_softmax(logits[:, a:b], dim=-1) * chosen).sum(-1)
        group = torch.where(chosen.sum(-1) > 0, group, float("-inf"))  # a required group left empty
        total = total + torch.where(rows, group, 0.0)
    return torch.where(kinds == UNSCORED, 0.0, total)


def row_log_likelihood(network: HaloNetwork, layout: ColumnLayout, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) float64 log-likelihood of target rows 1..T-1 of a collated batch (0 for unscored rows)."""
    x = dense_rows(batch["ones"], batch["lengths"], layout.n_columns, n_rows=batch.get("n_rows"))  # (B, T, C)
    B, T, C = x.shape
    seen = network.seen_codes(x[:, :-1])  # codes of rows 0..t, for the coarse inputs and the fine head alike
    h = network.coarse(x[:, :-1], features=network.coarse_inputs(x[:, :-1], seen))
    logits, first = network.fine(h, x[:, 1:], None if network.fine.seen_chain is None else seen)
    kinds = target_row_kinds(batch["lengths"], T, network.n_ctx)  # (B, T-1)
    ll = factor_log_likelihood(logits.reshape(-1, C).double(), first.reshape(B * (T - 1), -1).double(),
                               x[:, 1:].reshape(-1, C), kinds.reshape(-1), layout)
    return ll.view(B, T - 1)


@torch.no_grad()
def log_likelihood(
    network: HaloNetwork,
    layout: ColumnLayout,
    corpus: PatientCorpus,
    *,
    code_map: np.ndarray | None = None,
    label_columns: np.ndarray | None = None,
    batch_size: int = 256,
    unknown: Literal["error", "drop"] = "error",
) -> LikelihoodResult:
    """Score every patient of ``corpus`` under ``network`` (``HaloModel.log_likelihood`` fills in the corpus
    matching for you).

    Args:
        network: the coarse and fine modules.
        layout: their column layout.
        corpus: the records to score.
        code_map: (corpus vocabulary,) model column of each corpus code id, -1 for an unknown code; None when
            the vocabularies are the same.
        label_columns: corpus label column of each model label; None = identity.
        batch_size: records per forward pass.
        unknown: what to do with codes the model does not know: ``"error"`` or ``"drop"`` (and count).

    Returns:
        A :class:`LikelihoodResult`.

    Raises:
        ConfigError: for unknown codes with ``unknown="error"``, or a bad argument.

    Example:
        >>> result = model.log_likelihood(corpus.part("test"))                  # doctest: +SKIP
        >>> result.per_code_perplexity, result.patient_log_likelihood[:3]        # doctest: +SKIP
    """
    if unknown not in ("error", "drop"):
        raise ConfigError(f"unknown must be 'error' or 'drop', got {unknown!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if code_map is not None and unknown == "error":
        used = np.unique(np.asarray(corpus.codes))
        missing = used[code_map[used] < 0]
        if len(missing):
            names = [corpus.vocab.codes[i] for i in missing[:10]]
            raise ConfigError(f"{len(missing)} code(s) of the corpus are not in the model vocabulary, e.g. "
                              f"{names!r}; pass unknown='drop' to drop and count them")
    device, n_ctx = network.device, network.n_ctx
    modes = (network.coarse.training, network.fine.training)
    network.coarse.eval()
    network.fine.eval()
    P = corpus.n_patients
    total, static, visits_ll = (np.zeros(P) for _ in range(3))
    n_visits, n_codes = np.zeros(P, dtype=np.int64), np.zeros(P, dtype=np.int64)
    per_visit, unknown_ids, truncated = [], [], np.zeros(P, dtype=np.int64)
    V, C = layout.n_codes, layout.n_columns
    try:
        for start in range(0, P, batch_size):
            patients = np.arange(start, min(start + batch_size, P))
            encoded = encode_records(corpus, patients, layout, max_visits=n_ctx - 3, code_map=code_map,
                                     label_columns=label_columns)
            batch = {"ones": torch.from_numpy(encoded.ones).to(device),
                     "lengths": torch.from_numpy(encoded.lengths).to(device)}
            ll = row_log_likelihood(network, layout, batch).cpu().numpy()  # (B, T-1): target row r at index r - 1
            T = ll.shape[1] + 1
            rows = np.arange(1, T)
            lengths = encoded.lengths
            is_visit = (rows[None, :] >= 2) & (rows[None, :] <= lengths[:, None] + 1)  # (B, T-1)
            total[patients] = ll.sum(1)
            static[patients] = ll[:, 0]
            visits_ll[patients] = np.where(is_visit, ll, 0.0).sum(1)
            per_visit.append(ll[is_visit])  # row-major: patient order, then visit order
            n_visits[patients] = lengths
            column = encoded.ones % C
            record = encoded.ones // (C * T)
            row = (encoded.ones // C) % T
            in_codes = (column < V) & (row >= 2)
            n_codes[patients] = np.bincount(record[in_codes], minlength=len(patients))
            unknown_ids.append(encoded.unknown_codes)
            truncated[patients] = encoded.truncated_visits
    finally:
        network.coarse.train(modes[0])
        network.fine.train(modes[1])
    vo = np.asarray(corpus.visit_offsets)
    visit_index = ragged_indices(vo[1:] - n_visits, vo[1:])
    visit_ll = np.concatenate(per_visit) if per_visit else np.zeros(0)
    dropped = np.concatenate(unknown_ids) if unknown_ids else np.zeros(0, dtype=np.int64)
    visit_sum = float(visits_ll.sum())
    return LikelihoodResult(
        patient_log_likelihood=total,
        patient_static_log_likelihood=static,
        patient_visit_log_likelihood=visits_ll,
        visit_log_likelihood=visit_ll,
        visit_index=visit_index,
        patient_visits=n_visits,
        patient_codes=n_codes,
        per_code_perplexity=float(np.exp(-visit_sum / n_codes.sum())) if n_codes.sum() else float("nan"),
        per_visit_perplexity=float(np.exp(-visit_sum / n_visits.sum())) if n_visits.sum() else float("nan"),
        unknown_code_occurrences=int(len(dropped)),
        unknown_codes=tuple(corpus.vocab.codes[i] for i in np.unique(dropped)),
        truncated_patients=int((truncated > 0).sum()),
        truncated_visits=int(truncated.sum()),
    )


def perplexity_report(result: Any, corpus: PatientCorpus) -> dict[str, Any]:
    """The JSON-able summary ``ehrsynth perplexity`` prints, the same keys for every likelihood family (plus
    ``truncated_codes`` where the family can cut codes, as the timeline model's token window does)."""
    report = {
        "per_code_perplexity": result.per_code_perplexity,
        "per_visit_perplexity": result.per_visit_perplexity,
        "mean_patient_log_likelihood": float(result.patient_log_likelihood.mean()) if corpus.n_patients
        else float("nan"),
        "patients": int(corpus.n_patients),
        "visits_scored": int(result.patient_visits.sum()),
        "codes_scored": int(result.patient_codes.sum()),
        "unknown_code_occurrences": result.unknown_code_occurrences,
        "truncated_patients": result.truncated_patients,
        "truncated_visits": result.truncated_visits,
    }
    if hasattr(result, "truncated_codes"):
        report["truncated_codes"] = result.truncated_codes
    return report

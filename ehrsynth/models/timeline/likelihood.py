"""Exact log-likelihood of records under the timeline transformer, and per-code / per-visit perplexity.

log p(record) is the sum of the grammar-masked log-softmax of every predicted token -- exactly what the
sampler draws from, so it equals the sum of the sampler's log-probabilities of a sampled record. The visit part
(what perplexity divides) is the tokens after the prompt but [EOS]: codes and gap tokens. How that compares with
HALO's visit rows is in docs/metrics.md. Codes are matched by typed string; unknown codes are an error or, with
``unknown="drop"``, dropped and counted; records over the window are scored on their last visits and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError


@dataclass(frozen=True)
class LikelihoodResult:
    """Log-likelihoods in nats (as HALO's :class:`~ehrsynth.models.halo.likelihood.LikelihoodResult`).

    Attributes:
        patient_log_likelihood: (P,) log p(record), every token.
        patient_static_log_likelihood: (P,) the prompt's share.
        patient_visit_log_likelihood: (P,) the codes' and gap tokens' share ([EOS] excluded).
        patient_visits, patient_codes: (P,) visits and code occurrences scored.
        per_code_perplexity, per_visit_perplexity: exp(-sum of visit shares / codes, resp. visits).
    """

    patient_log_likelihood: np.ndarray
    patient_static_log_likelihood: np.ndarray
    patient_visit_log_likelihood: np.ndarray
    patient_visits: np.ndarray
    patient_codes: np.ndarray
    per_code_perplexity: float
    per_visit_perplexity: float
    unknown_code_occurrences: int
    unknown_codes: tuple[str, ...]
    truncated_patients: int
    truncated_visits: int
    truncated_codes: int


@torch.no_grad()
def log_likelihood(model: Any, corpus: PatientCorpus, *, batch_size: int = 256,
                   unknown: Literal["error", "drop"] = "error") -> LikelihoodResult:
    """Exact log-likelihood of every patient of ``corpus`` under ``model`` (a TimelineModel), in eval mode.

    Raises:
        ConfigError: for unknown codes with ``unknown="error"``, a missing label or a bad argument.
    """
    from ehrsynth.models.halo.model import unknown_code_names
    from ehrsynth.models.timeline.model import scored_positions

    if unknown not in ("error", "drop"):
        raise ConfigError(f"unknown must be 'error' or 'drop', got {unknown!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    lay, device = model.layout, model.device
    P = corpus.n_patients
    total, static, visit = np.zeros(P), np.zeros(P), np.zeros(P)
    visits, codes = np.zeros(P, dtype=np.int64), np.zeros(P, dtype=np.int64)
    trunc_v, trunc_c, dropped = np.zeros(P, dtype=np.int64), np.zeros(P, dtype=np.int64), []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, P, batch_size):
            patients = np.arange(start, min(start + batch_size, P))
            enc = model.encode(corpus, patients)
            if len(enc.unknown_codes) and unknown == "error":
                raise ConfigError(f"{len(np.unique(enc.unknown_codes))} code(s) are not in the model vocabulary, "
                                  f"e.g. {unknown_code_names(corpus, enc.unknown_codes)!r}; pass unknown='drop' to "
                                  "drop and count them")
            dropped.append(enc.unknown_codes)
            B, T = enc.tokens.shape
            scored = scored_positions(enc.lengths, T, model.config.n_ctx)
            tokens = torch.from_numpy(enc.tokens).to(device)
            ll = model.token_log_probs(tokens, torch.from_numpy(scored).to(device)).double().cpu().numpy()
            record = scored // (T - 1)
            target = enc.tokens[:, 1:].reshape(-1)[scored]
            prompt = (target >= lay.label_start) & (target < lay.gap_start)
            body = (target < lay.n_codes) | ((target >= lay.gap_start) & (target < lay.start))
            total[patients] = np.bincount(record, ll, minlength=B)
            static[patients] = np.bincount(record, np.where(prompt, ll, 0.0), minlength=B)
            visit[patients] = np.bincount(record, np.where(body, ll, 0.0), minlength=B)
            codes[patients] = (enc.tokens < lay.n_codes).sum(1)
            visits[patients], trunc_v[patients], trunc_c[patients] = enc.visits, enc.truncated_visits, \
                enc.truncated_codes
    finally:
        model.train(was_training)
    gone = np.concatenate(dropped) if dropped else np.zeros(0, dtype=np.int64)
    body_ll = visit.sum()
    return LikelihoodResult(
        patient_log_likelihood=total, patient_static_log_likelihood=static, patient_visit_log_likelihood=visit,
        patient_visits=visits, patient_codes=codes,
        per_code_perplexity=float(np.exp(-body_ll / codes.sum())) if codes.sum() else float("nan"),
        per_visit_perplexity=float(np.exp(-body_ll / visits.sum())) if visits.sum() else float("nan"),
        unknown_code_occurrences=int(len(gone)), unknown_codes=tuple(corpus.vocab.codes[i] for i in np.unique(gone)),
        truncated_patients=int(((trunc_v + trunc_c) > 0).sum()), truncated_visits=int(trunc_v.sum()),
        truncated_codes=int(trunc_c.sum()))

"""HaloModel: HALO's network tied to the corpus (encoding, loss, generation, likelihood).

What differs from the reference code, and why:

* Rows: start, static (labels + sex + age bucket), visits (codes + gap bin), then a separate end row (the
  paper's layout; the reference code put the end token inside the last visit row and had no sex, age or time).
* The fine head decides a row's end token first (``HaloConfig.end_first``, see :mod:`.encoding`); the rest of
  the row in column order. ``end_first=False`` decides it last, as the reference's last column.
* Code order inside a visit is the vocabulary order (descending training count), not an unseeded shuffle.
* The loss is binary cross-entropy *with logits*, averaged over the scored rows only: padding neither costs
  compute (records are packed into one block-diagonal causal sequence, or padded to the batch's longest record,
  whichever is cheaper; never to n_ctx) nor dilutes the mean (the reference averaged over all n_ctx rows,
  padding included).
* Sampling advances each record on its own, keeps a KV cache, and never samples structural zeros; see
  :mod:`.sampling`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError
from ehrsynth.models.base import CorpusMeta, GenerativeModel
from ehrsynth.models.dates import date_chunks, date_generated
from ehrsynth.models.dates import fit as fit_dates
from ehrsynth.models.halo.config import HaloConfig
from ehrsynth.models.halo.encoding import ColumnLayout, bin_values, dense_rows, encode_records, input_rows
from ehrsynth.models.halo.likelihood import LikelihoodResult, log_likelihood
from ehrsynth.models.halo.network import CoarseTransformer, FineHead, packed_mask


class HaloModel(GenerativeModel):
    """HALO: coarse visit-level transformer ``self.coarse`` + fine code-level MADE head ``self.fine``.

    Example:
        >>> model = HaloModel.from_corpus(corpus.part("train"), HaloConfig.small())      # doctest: +SKIP
        >>> # train with ehrsynth.training.loop.train(model, ...), then
        >>> synthetic = model.generate(1_000, seed=0, conditions={"label:mortality": "1"})  # doctest: +SKIP
    """

    family = "halo"
    config_class = HaloConfig

    def __init__(self, config: HaloConfig, meta: CorpusMeta) -> None:
        super().__init__(config, meta)
        self.layout = ColumnLayout(
            n_codes=len(meta.codes),
            label_names=tuple(meta.label_names) if config.use_labels else (),
            sex=config.use_sex,
            age_edges=config.age_bucket_edges,
            gap_edges=config.gap_bin_edges,
            end_first=config.end_first,
        )
        C = self.layout.n_columns
        self.coarse = CoarseTransformer(C, config.n_embd, config.n_head, config.n_layer, config.n_ctx,
                                        dropout=config.dropout, eps=config.layer_norm_eps)
        self.fine = FineHead(config.n_embd, C, config.fine_hidden, order=torch.as_tensor(self.layout.order))
        self.gap_days = tuple(meta.extra.get("gap_bin_days", bin_values(config.gap_bin_edges)))
        self.age_years = tuple(meta.extra.get("age_bucket_years", bin_values(config.age_bucket_edges)))
        self._code_map: tuple[Any, np.ndarray | None] | None = None  # (corpus vocabulary, its column map)

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def from_corpus(cls, corpus: PatientCorpus | CorpusView, config: HaloConfig | None = None) -> HaloModel:
        """An untrained model for ``corpus``, the training patients (a corpus or a view of one): its vocabulary,
        labels and how many of its records the window truncates.

        ``meta.extra`` keeps the bin edges, the values generated bins decode to (``gap_bin_days``: bin
        midpoints, the open last bin its lower edge; ``age_bucket_years`` likewise), ``max_visits`` and how
        many patients/visits of ``corpus`` the n_ctx window truncates (a warning says so when it does).
        """
        config = config or HaloConfig()
        if not isinstance(config, HaloConfig):
            raise ConfigError(f"config must be a HaloConfig, got {type(config).__name__}")
        view = CorpusView.of(corpus)
        visits = view.visits_per_patient()
        over = np.maximum(visits - config.max_visits, 0)
        if over.any():
            warnings.warn(f"{int((over > 0).sum())} of {corpus.n_patients} patients have more than "
                          f"n_ctx - 3 = {config.max_visits} visits; their last {config.max_visits} visits are kept "
                          f"({int(over.sum())} earlier visits dropped)", stacklevel=2)
        meta = CorpusMeta.from_corpus(
            view,
            gap_bin_edges=list(config.gap_bin_edges),
            gap_bin_days=list(bin_values(config.gap_bin_edges)),
            age_bucket_edges=list(config.age_bucket_edges),
            age_bucket_years=list(bin_values(config.age_bucket_edges)),
            max_visits=config.max_visits,
            patients_truncated=int((over > 0).sum()),
            visits_truncated=int(over.sum()),
            dates=fit_dates(view, config.gap_bin_edges, config.age_bucket_edges).to_dict(),
        )
        return cls(config, meta)

    @classmethod
    def default_train_config(cls) -> dict[str, Any]:
        """The paper's training settings: Adam, lr 1e-4, batch 48, up to 50 epochs, best by validation loss."""
        return {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "batch_size": 48, "max_epochs": 50,
                "lr_schedule": "constant"}

    # ---- training ------------------------------------------------------------------------------------------
    def collate(self, corpus: PatientCorpus, patients: np.ndarray) -> dict[str, Any]:
        """``{"ones", "lengths", "input_rows", "n_rows"}``: ``ones`` (int64) are the flat positions of the ones of
        the (B, T, C) record rows, T = ``n_rows`` = longest record + 3 (a plain int: each batch is padded only to
        its longest record); ``lengths`` (B,) the visits kept per record; ``input_rows`` (N,) the flat positions
        in (B, T-1) of the rows that exist. Everything with a data-dependent size is decided here, on the host,
        so the training step never waits on the device.

        Raises:
            ConfigError: when ``corpus`` lacks one of the model's labels or has codes the model does not know.
        """
        encoded = encode_records(corpus, patients, self.layout, max_visits=self.config.max_visits,
                                 code_map=self.code_map(corpus), label_columns=self.label_columns(corpus))
        if len(encoded.unknown_codes):
            raise ConfigError(f"{len(np.unique(encoded.unknown_codes))} code(s) of the batch are not in the model "
                              f"vocabulary, e.g. {unknown_code_names(corpus, encoded.unknown_codes)!r}")
        return {"ones": torch.from_numpy(encoded.ones), "lengths": torch.from_numpy(encoded.lengths),
                **input_rows(encoded.lengths)}

    def logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits of every target row: ((B, T-1, C) logits of rows 1..T-1, (B, T, C) rows)."""
        x = dense_rows(batch["ones"], batch["lengths"], self.layout.n_columns, n_rows=batch.get("n_rows"))
        h = self.coarse(x[:, :-1])  # (B, T-1, d): h_t summarises rows <= t
        return self.fine(h, x[:, 1:]), x

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean binary cross-entropy (with logits) over all columns of the scored rows: the static row, the
        visit rows and the end row of each record. See :meth:`loss`."""
        return self.loss(batch)

    def loss(self, batch: dict[str, torch.Tensor], *, packed: bool | None = None) -> torch.Tensor:
        """The training loss, computed on only the rows that exist: padding rows cost nothing.

        ``packed=False`` runs the coarse module on the batch padded to its longest record. ``packed=True``
        concatenates the records' rows into one sequence with their own positions and a block-diagonal causal
        mask, so compute follows the number of rows, not batch x longest record (MIMIC-like data: about 3.3
        rows per record against a longest record of 10-20). Both give the same loss; None picks the cheaper
        by a cost model of the linear layers and attention.
        """
        if "input_rows" not in batch:  # a batch built by hand: derive the host-side sizes (reads the device)
            batch = {**batch, **input_rows(batch["lengths"].cpu().numpy(), device=batch["lengths"].device)}
        x = dense_rows(batch["ones"], batch["lengths"], self.layout.n_columns, n_rows=batch["n_rows"])  # (B, T, C)
        B, T, C = x.shape
        rows = batch["input_rows"]  # (N,) flat positions in (B, T-1); its length is known on the host
        record, positions = rows // (T - 1), rows % (T - 1)
        flat = x.view(B * T, C)
        inputs, targets = record * T + positions, record * T + positions + 1  # flat positions in (B, T)
        if packed is None:  # per row and layer: 12 d^2 for the linear layers, 2 d x (keys seen) for attention
            n, d = rows.shape[0], self.config.n_embd
            packed = n * (12 * d + 2 * n) < B * (T - 1) * (12 * d + 2 * (T - 1))
        if packed:
            h = self.coarse(flat.index_select(0, inputs)[None], positions=positions,
                            attn_mask=packed_mask(record, positions))[0]  # (N, d)
        else:
            h = self.coarse(x[:, :-1]).reshape(B * (T - 1), -1).index_select(0, rows)  # (N, d)
        targets = flat.index_select(0, targets)  # (N, C): the row after each input row
        return F.binary_cross_entropy_with_logits(self.fine(h, targets), targets)

    # ---- vocabulary and labels of another corpus ------------------------------------------------------------
    def code_map(self, corpus: PatientCorpus) -> np.ndarray | None:
        """Model column of each code id of ``corpus``, matched by typed code string, -1 for a code the model
        does not know; None when the vocabularies are identical (the usual case: parts of one corpus)."""
        cached = self._code_map
        if cached is not None and cached[0] is corpus.vocab:
            return cached[1]
        if tuple(corpus.vocab.codes) == tuple(self.meta.codes):
            mapping = None
        else:
            index = {code: i for i, code in enumerate(self.meta.codes)}
            mapping = np.array([index.get(code, -1) for code in corpus.vocab.codes], dtype=np.int64)
        self._code_map = (corpus.vocab, mapping)
        return mapping

    def label_columns(self, corpus: PatientCorpus) -> np.ndarray:
        """Corpus label column of each model label.

        Raises:
            ConfigError: when the corpus lacks one of them.
        """
        missing = [n for n in self.layout.label_names if n not in corpus.label_names]
        if missing:
            raise ConfigError(f"corpus lacks the model's label(s) {missing!r}; it has {list(corpus.label_names)!r}")
        return np.array([corpus.label_names.index(n) for n in self.layout.label_names], dtype=np.int64)

    # ---- likelihood ----------------------------------------------------------------------------------------
    def log_likelihood(self, corpus: PatientCorpus, *, batch_size: int = 256,
                       unknown: Literal["error", "drop"] = "error") -> LikelihoodResult:
        """Exact log-likelihood of every patient of ``corpus`` (:func:`.likelihood.log_likelihood`)."""
        return log_likelihood(self, corpus, batch_size=batch_size, unknown=unknown)

    def patient_log_likelihood(self, corpus: PatientCorpus, *, batch_size: int = 256,
                               unknown: Literal["error", "drop"] = "error") -> np.ndarray:
        """(P,) log p(record) in nats of every patient of ``corpus`` (for the likelihood membership attack)."""
        return log_likelihood(self, corpus, batch_size=batch_size, unknown=unknown).patient_log_likelihood

    def perplexity(self, corpus: PatientCorpus, *, batch_size: int = 256,
                   unknown: Literal["error", "drop"] = "error") -> dict[str, Any]:
        """Per-code and per-visit perplexity of ``corpus`` and what was scored, as a JSON-able dict.

        per_code = exp(-(sum of visit-row log-likelihoods) / code occurrences), per_visit likewise per visit;
        a visit row's log-likelihood covers all its columns (codes present and absent, gap bin, not-the-end).
        """
        result = log_likelihood(self, corpus, batch_size=batch_size, unknown=unknown)
        return {
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

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(
        self,
        n: int,
        *,
        seed: int = 0,
        conditions: dict[str, str] | None = None,
        batch_size: int = 256,
        progress: bool = False,
        condition: Literal["forced", "posterior"] = "forced",
    ) -> PatientCorpus:
        """Sample ``n`` patients; patient i depends only on (seed, i), never on ``batch_size``.

        Args:
            n: number of patients.
            seed: run seed (>= 0).
            conditions: static-row values to fix, e.g. ``{"label:mortality": "1", "sex": "F", "age": "67"}``
                (labels "0"/"1", also by bare name; sex "F"/"M"; age in years, fixing its bucket).
            batch_size: records sampled together.
            progress: show a tqdm bar.
            condition: ``"forced"`` samples the static row with the conditioned columns forced (columns after
                them follow exactly; earlier ones keep their marginal); ``"posterior"`` samples exactly from
                p(record | conditions) by rejecting static rows. See :mod:`.sampling`.

        Returns:
            A corpus with visit_days from the gap bins, sex/age/labels from the static row, the training
            vocabulary (counts = generated visit counts), split all train; days, dates, ages and birth years
            drawn by :mod:`ehrsynth.models.dates` (visit_start NaT for a model saved without a date model).
        """
        from ehrsynth.models.halo.sampling import sample

        corpus = sample(self, n, generator=torch.Generator().manual_seed(_seed(seed)), conditions=conditions,
                        condition=condition, batch_size=batch_size, progress=progress)
        corpus.stats["seed"] = int(seed)
        return date_generated(self.meta.extra, corpus, seed=seed)

    def iter_generate(
        self,
        n: int,
        *,
        seed: int = 0,
        conditions: dict[str, str] | None = None,
        batch_size: int = 256,
        chunk_size: int = 10_000,
        progress: bool = False,
        condition: Literal["forced", "posterior"] = "forced",
    ) -> Iterator[PatientCorpus]:
        """Like :meth:`generate`, yielding corpora of up to ``chunk_size`` patients (bounded memory); patient
        ids continue across chunks and the patients are the same as :meth:`generate`'s."""
        from ehrsynth.models.halo.sampling import sample_stream

        for corpus in date_chunks(self.meta.extra, sample_stream(
                self, n, generator=torch.Generator().manual_seed(_seed(seed)), conditions=conditions,
                condition=condition, batch_size=batch_size, chunk_size=chunk_size, progress=progress), seed=seed):
            corpus.stats["seed"] = int(seed)
            yield corpus


def unknown_code_names(corpus: PatientCorpus, code_ids: np.ndarray, limit: int = 10) -> list[str]:
    """The typed names of (up to ``limit``) distinct corpus code ids, for error messages."""
    return [corpus.vocab.codes[i] for i in np.unique(code_ids)[:limit]]


def _seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)

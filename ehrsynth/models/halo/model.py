"""HaloModel: HALO's network tied to the corpus (encoding, loss, generation, likelihood).

What differs from the reference code, and why:

* Rows: start, static (labels + sex + age bucket), visits (codes + gap bin), then a separate end row (the
  paper's layout; the reference code put the end token inside the last visit row and had no sex, age or time).
* Structure by construction (:mod:`.encoding`): a visit row starts with one categorical {end, lowest code,
  no code}, so empty visits are impossible unless the training corpus has them; sex, age bucket and gap bin are
  one softmax each (with "unknown" only where the training data has unknowns), so every record has exactly one
  of each and every visit after the first a gap.
* Code order inside a visit is the vocabulary order (descending training count), not an unseeded shuffle.
* The loss is the exact negative log-likelihood of the scored rows, per one in them: padding neither costs
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

from ehrsynth.data.corpus import PatientCorpus, ragged_indices
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError
from ehrsynth.models.base import CorpusMeta, GenerativeModel
from ehrsynth.models.dates import date_chunks, date_generated
from ehrsynth.models.dates import fit as fit_dates
from ehrsynth.models.halo.config import HaloConfig
from ehrsynth.models.halo.encoding import (
    STRUCTURE_FLAGS, UNSCORED, ColumnLayout, bin_values, clock_extra, dense_rows, encode_records, input_rows,
    model_clock, row_kinds,
)
from ehrsynth.models.halo.likelihood import LikelihoodResult, factor_log_likelihood, log_likelihood, perplexity_report
from ehrsynth.models.halo.network import (
    CLOCK_FEATURES,
    CoarseTransformer,
    FineHead,
    HaloNetwork,
    packed_mask,
)
from ehrsynth.models.halo.sampling import Decoding, GenerationConfig, sample, sample_stream


class HaloModel(GenerativeModel):
    """HALO: coarse visit-level transformer ``self.coarse`` + fine code-level MADE head ``self.fine``.

    Example:
        >>> model = HaloModel.from_corpus(corpus.part("train"), HaloConfig.small())      # doctest: +SKIP
        >>> # train with ehrsynth.training.loop.train(model, ...), then
        >>> synthetic = model.generate(1_000, seed=0, conditions={"label:mortality": "1"})  # doctest: +SKIP
    """

    family = "halo"
    config_class = HaloConfig
    validation_unit = "token"  # codes, statics, gap bins and end tokens: the ones validation_loss scores

    def __init__(self, config: HaloConfig, meta: CorpusMeta) -> None:
        super().__init__(config, meta)
        structure = meta.extra.get("structure", {})
        self.layout = ColumnLayout(
            n_codes=len(meta.codes),
            label_names=tuple(meta.label_names) if config.use_labels else (),
            sex=config.use_sex,
            age_edges=config.age_bucket_edges,
            gap_edges=config.gap_bin_edges,
            **{k: bool(structure.get(k, False)) for k in STRUCTURE_FLAGS},
        )
        C = self.layout.n_columns
        self.coarse = CoarseTransformer(C, config.n_embd, config.n_head, config.n_layer, config.n_ctx,
                                        dropout=config.dropout, eps=config.layer_norm_eps,
                                        n_features=CLOCK_FEATURES * config.uses_clock
                                        + self.layout.n_codes * config.uses_history_input)
        self.fine = FineHead(config.n_embd, C, config.fine_hidden, order=torch.as_tensor(self.layout.order),
                             group_first=torch.as_tensor(self.layout.group_first()), n_first=self.layout.n_first,
                             direct=config.fine_head == "made_direct",
                             rank=config.fine_rank if config.fine_head == "made_lowrank" else 0,
                             seen_codes=self.layout.n_codes if config.uses_seen_codes else 0)
        self.gap_days = tuple(meta.extra.get("gap_bin_days", bin_values(config.gap_bin_edges)))
        self.age_years = tuple(meta.extra.get("age_bucket_years", bin_values(config.age_bucket_edges)))
        clock = model_clock(self.layout, meta.extra, self.gap_days, self.age_years) if config.uses_clock else None
        self.register_buffer("clock", clock, persistent=False)  # rebuilt from meta.extra, not saved with the weights
        self._code_map: tuple[Any, np.ndarray | None] | None = None  # (corpus vocabulary, its column map)

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def config_from_saved(cls, data: dict[str, Any]) -> HaloConfig:
        """A saved config; one written before the seen-codes terms, the clock or the history input existed has
        none of them."""
        return super().config_from_saved({"seen_codes": False, "clock": False, "history_input": False, **data})

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
        dates = fit_dates(view, config.gap_bin_edges, config.age_bucket_edges)
        meta = CorpusMeta.from_corpus(
            view,
            structure=corpus_structure(view),
            gap_bin_edges=list(config.gap_bin_edges),
            gap_bin_days=list(bin_values(config.gap_bin_edges)),
            age_bucket_edges=list(config.age_bucket_edges),
            age_bucket_years=list(bin_values(config.age_bucket_edges)),
            max_visits=config.max_visits,
            patients_truncated=int((over > 0).sum()),
            visits_truncated=int(over.sum()),
            dates=dates.to_dict(),
            **clock_extra(dates, config.gap_bin_edges, config.age_bucket_edges),
        )
        return cls(config, meta)

    @classmethod
    def default_train_config(cls) -> dict[str, Any]:
        """The paper's optimiser (Adam, lr 1e-4, batch 48, constant rate); instead of its fixed 50 epochs, up to
        400, stopped when the validation likelihood has not improved for 10 epochs (the loop's patience)."""
        return {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "batch_size": 48, "max_epochs": 400,
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

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: the exact negative log-likelihood of the scored rows (the static row, the visit
        rows and the end row of each record) per one in those rows. See :meth:`loss`."""
        return self.loss(batch)

    def loss(self, batch: dict[str, torch.Tensor], *, packed: bool | None = None) -> torch.Tensor:
        """The training loss (:meth:`forward`), computed on only the rows that exist: padding costs nothing.

        ``packed=False`` runs the coarse module on the batch padded to its longest record. ``packed=True``
        concatenates the records' rows into one sequence with their own positions and a block-diagonal causal
        mask, so compute follows the number of rows, not batch x longest record (MIMIC-like data: about 3.3
        rows per record against a longest record of 10-20). Both give the same loss; None picks the cheaper
        by a cost model of the linear layers and attention.
        """
        nll, units = self._row_nll(batch, packed)
        return nll / units.clamp_min(1)

    def validation_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the exact negative log-likelihood of the batch's scored rows, number of units): the units
        are the ones of those rows -- codes, labels, sex, age bucket, gap bins and end tokens -- so the ratio
        is a per-token NLL of exactly the factors :mod:`.likelihood` scores (structural zeros never count)."""
        return self._row_nll(batch, None)

    def _row_nll(self, batch: dict[str, torch.Tensor], packed: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
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
        network = self.network
        seen_all = network.seen_codes(x)  # (B, T, V) codes of rows 0..t, or None when nothing takes them
        row_inputs = network.coarse_inputs(x, seen_all)  # (B, T, 3 + V): clock and codes so far, either, or None
        if packed:
            features = None if row_inputs is None else row_inputs.view(B * T, -1).index_select(0, inputs)[None]
            h = self.coarse(flat.index_select(0, inputs)[None], positions=positions,
                            attn_mask=packed_mask(record, positions), features=features)[0]  # (N, d)
        else:
            features = None if row_inputs is None else row_inputs[:, :-1]
            h = self.coarse(x[:, :-1], features=features).reshape(B * (T - 1), -1).index_select(0, rows)  # (N, d)
        seen = None
        if self.fine.seen_chain is not None:  # the codes of the rows up to each input row
            seen = seen_all.view(B * T, -1).index_select(0, inputs)
        targets = flat.index_select(0, targets)  # (N, C): the row after each input row
        kinds = row_kinds(positions + 1, batch["lengths"][record], self.config.n_ctx)  # (N,)
        logits, first = self.fine(h, targets, seen)
        ll = factor_log_likelihood(logits, first, targets, kinds, self.layout)  # (N,)
        units = torch.where((kinds != UNSCORED)[:, None], targets, 0.0).sum()
        return -ll.sum(), units

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

    # ---- the pieces the sampler and the likelihood take ------------------------------------------------------
    @property
    def network(self) -> HaloNetwork:
        return HaloNetwork(self.coarse, self.fine, self.clock,
                           self.layout.n_codes if self.config.uses_history_input else 0)

    @property
    def decoding(self) -> Decoding:
        return Decoding(codes=tuple(self.meta.codes), gap_days=self.gap_days, age_years=self.age_years)

    # ---- likelihood ----------------------------------------------------------------------------------------
    def log_likelihood(self, corpus: PatientCorpus, *, batch_size: int = 256,
                       unknown: Literal["error", "drop"] = "error") -> LikelihoodResult:
        """Exact log-likelihood of every patient of ``corpus`` (:func:`.likelihood.log_likelihood`), its codes
        matched by typed string and its labels by name.

        Raises:
            ConfigError: for unknown codes with ``unknown="error"`` or a missing label.
        """
        return log_likelihood(self.network, self.layout, corpus, code_map=self.code_map(corpus),
                              label_columns=self.label_columns(corpus), batch_size=batch_size, unknown=unknown)

    def patient_log_likelihood(self, corpus: PatientCorpus, *, batch_size: int = 256,
                               unknown: Literal["error", "drop"] = "error") -> np.ndarray:
        """(P,) log p(record) in nats of every patient of ``corpus`` (for the likelihood membership attack)."""
        return self.log_likelihood(corpus, batch_size=batch_size, unknown=unknown).patient_log_likelihood

    def perplexity(self, corpus: PatientCorpus, *, batch_size: int = 256,
                   unknown: Literal["error", "drop"] = "error") -> dict[str, Any]:
        """Per-code and per-visit perplexity of ``corpus`` and what was scored, as a JSON-able dict.

        per_code = exp(-(sum of visit-row log-likelihoods) / code occurrences), per_visit likewise per visit;
        a visit row's log-likelihood covers all its factors (first step, later codes, gap bin).
        """
        return perplexity_report(self.log_likelihood(corpus, batch_size=batch_size, unknown=unknown), corpus)

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
        config = GenerationConfig(conditions=conditions or {}, condition=condition, batch_size=batch_size,
                                  progress=progress)
        corpus = sample(self.network, self.layout, self.decoding, n,
                        generator=torch.Generator().manual_seed(_seed(seed)), config=config)
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
        config = GenerationConfig(conditions=conditions or {}, condition=condition, batch_size=batch_size,
                                  chunk_size=chunk_size, progress=progress)
        for corpus in date_chunks(self.meta.extra, sample_stream(
                self.network, self.layout, self.decoding, n, generator=torch.Generator().manual_seed(_seed(seed)),
                config=config), seed=seed):
            corpus.stats["seed"] = int(seed)
            yield corpus


def corpus_structure(view: CorpusView) -> dict[str, bool]:
    """Which kinds of record the training patients contain (the layout's validity flags, :mod:`.encoding`):
    unknown sex, unknown age, unknown gaps, empty visits (a corpus built with ``--empty keep``), records
    without visits. What they lack, the model can never generate."""
    corpus, patients = view.corpus, view.patients
    vo, co = np.asarray(corpus.visit_offsets), np.asarray(corpus.code_offsets)
    visits = ragged_indices(vo[patients], vo[patients + 1])
    later = visits[np.isin(visits, vo[patients], invert=True)]  # visits after each patient's first
    days = np.asarray(corpus.visit_days)
    return {
        "sex_unknown": bool((np.asarray(corpus.sex)[patients] < 0).any()),
        "age_unknown": bool(np.isnan(np.asarray(corpus.age_at_first_visit)[patients]).any()),
        "gap_unknown": bool(np.isnan(days[later].astype(np.float64) - days[later - 1]).any()),
        "empty_visits": bool((co[visits + 1] == co[visits]).any())
        or corpus.stats.get("options", {}).get("empty") == "keep",  # built with --empty keep
        "zero_visits": bool((vo[patients + 1] == vo[patients]).any()),
    }


def unknown_code_names(corpus: PatientCorpus, code_ids: np.ndarray, limit: int = 10) -> list[str]:
    """The typed names of (up to ``limit``) distinct corpus code ids, for error messages."""
    return [corpus.vocab.codes[i] for i in np.unique(code_ids)[:limit]]


def _seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)

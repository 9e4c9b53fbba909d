"""TimelineModel: one causal transformer over the whole patient timeline (CEHR-GPT style), structured by a
grammar-masked softmax (:mod:`.tokens`), exact in sampling (:mod:`.sampling`) and likelihood.

The transformer is HALO's coarse module fed token embeddings (one transformer implementation in the project);
the output is a softmax over the token vocabulary, linear in the number of codes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError
from ehrsynth.models.base import CorpusMeta, GenerativeModel
from ehrsynth.models.dates import date_chunks
from ehrsynth.models.dates import fit as fit_dates
from ehrsynth.models.halo.encoding import STRUCTURE_FLAGS, ColumnLayout, bin_values, clock_extra, model_clock
from ehrsynth.models.halo.model import _seed, corpus_structure, unknown_code_names
from ehrsynth.models.halo.network import CLOCK_FEATURES, CoarseTransformer, packed_mask
from ehrsynth.models.halo.sampling import Decoding, GenerationConfig
from ehrsynth.models.timeline.config import TimelineConfig
from ehrsynth.models.halo.likelihood import perplexity_report
from ehrsynth.models.timeline.likelihood import LikelihoodResult, log_likelihood
from ehrsynth.models.timeline.sampling import TimelineNetwork, sample_stream
from ehrsynth.models.timeline.tokens import EncodedTokens, Grammar, encode_tokens


class TimelineModel(GenerativeModel):
    """Token-level causal transformer ``self.coarse`` + output head ``self.head``.

    Example:
        >>> model = TimelineModel.from_corpus(corpus.part("train"), TimelineConfig.small())   # doctest: +SKIP
        >>> synthetic = model.generate(1_000, seed=0, conditions={"sex": "F"})               # doctest: +SKIP
    """

    family = "timeline"
    config_class = TimelineConfig
    validation_unit = "token"  # every predicted token but the window's forced [EOS]

    def __init__(self, config: TimelineConfig, meta: CorpusMeta) -> None:
        super().__init__(config, meta)
        structure = meta.extra.get("structure", {})
        self.layout = ColumnLayout(
            n_codes=len(meta.codes), label_names=tuple(meta.label_names) if config.use_labels else (),
            sex=config.use_sex, age_edges=config.age_bucket_edges, gap_edges=config.gap_bin_edges,
            **{k: bool(structure.get(k, False)) for k in STRUCTURE_FLAGS})
        K = self.layout.n_columns
        if len(self.layout.label_names) + 6 > config.n_ctx:
            raise ConfigError(f"n_ctx ({config.n_ctx}) leaves no room for a visit after "
                              f"{len(self.layout.label_names)} label tokens")
        self.coarse = CoarseTransformer(K, config.n_embd, config.n_head, config.n_layer, config.n_ctx,
                                        dropout=config.dropout, eps=config.layer_norm_eps, tokens=True,
                                        n_features=CLOCK_FEATURES if config.clock else 0)
        self.head = torch.nn.Linear(config.n_embd, K)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)
        self.tail_scale = None
        if config.tail_term:  # beta starts at softplus(log(e - 1)) = 1 whatever the state
            self.tail_scale = torch.nn.Linear(config.n_embd, 1)
            torch.nn.init.zeros_(self.tail_scale.weight)
            torch.nn.init.constant_(self.tail_scale.bias, float(np.log(np.e - 1.0)))
            # saved with the weights: log T(c) of the training codes (from_corpus), uniform until then
            self.register_buffer("code_log_tail", log_tail_mass(np.ones(self.layout.n_codes)))
        self.grammar = Grammar(self.layout, config.n_ctx)
        self.decoding = Decoding(codes=tuple(meta.codes),
                                 gap_days=tuple(meta.extra.get("gap_bin_days", bin_values(config.gap_bin_edges))),
                                 age_years=tuple(meta.extra.get("age_bucket_years",
                                                                bin_values(config.age_bucket_edges))))
        # tokens are the layout's columns, so HALO's clock matrix applies as it is
        clock = model_clock(self.layout, meta.extra, self.decoding.gap_days, self.decoding.age_years) \
            if config.clock else None
        self.register_buffer("clock", clock, persistent=False)
        self._code_map: tuple[Any, np.ndarray | None] | None = None

    @classmethod
    def config_from_saved(cls, data: dict[str, Any]) -> TimelineConfig:
        """A saved config; one written before the clock or the tail term existed has neither."""
        return super().config_from_saved({"clock": False, "tail_term": False, **data})

    @classmethod
    def from_corpus(cls, corpus: PatientCorpus | CorpusView, config: TimelineConfig | None = None) -> TimelineModel:
        """An untrained model for the training patients ``corpus``: vocabulary, validity flags, bins, the date
        model (:mod:`ehrsynth.models.dates`) and how many records the window truncates (warned and counted)."""
        config = config or TimelineConfig()
        if not isinstance(config, TimelineConfig):
            raise ConfigError(f"config must be a TimelineConfig, got {type(config).__name__}")
        view = CorpusView.of(corpus)
        dates = fit_dates(view, config.gap_bin_edges, config.age_bucket_edges)
        meta = CorpusMeta.from_corpus(
            view, structure=corpus_structure(view),
            gap_bin_days=list(bin_values(config.gap_bin_edges)),
            age_bucket_years=list(bin_values(config.age_bucket_edges)),
            dates=dates.to_dict(), **clock_extra(dates, config.gap_bin_edges, config.age_bucket_edges))
        model = cls(config, meta)
        trunc = {"patients_truncated": 0, "visits_truncated": 0, "codes_truncated": 0}
        target_counts = np.zeros(model.layout.n_columns, dtype=np.float64)
        for start in range(0, view.n_patients, 4096):
            enc = model.encode(view.corpus, view.patients[start:start + 4096])
            trunc["patients_truncated"] += int(((enc.truncated_visits + enc.truncated_codes) > 0).sum())
            trunc["visits_truncated"] += int(enc.truncated_visits.sum())
            trunc["codes_truncated"] += int(enc.truncated_codes.sum())
            position = np.arange(enc.tokens.shape[1])[None, :]
            targets = enc.tokens[(position >= 1) & (position < enc.lengths[:, None])]
            target_counts += np.bincount(targets, minlength=model.layout.n_columns)
        model.init_from_frequencies(target_counts)
        if trunc["patients_truncated"]:
            warnings.warn(f"{trunc['patients_truncated']} of {view.n_patients} patients do not fit n_ctx = "
                          f"{config.n_ctx} tokens; their last visits are kept ({trunc['visits_truncated']} earlier "
                          f"visits, {trunc['codes_truncated']} codes of over-long visits dropped)", stacklevel=2)
        meta.extra.update(trunc)
        return model

    def init_from_frequencies(self, target_counts: np.ndarray) -> None:
        """Start the output layer at the log-frequency of each token as a target in the training records (add-one
        smoothed), and the tail term at the training code masses (beta stays 1: starting it at the mean visit's
        codes to come was measured worse on MIMIC-III). With a zero bias the untrained masked softmax is uniform
        over the codes after the previous one, so a visit ends after about ln(V) codes whatever the data
        (docs/benchmarks.md "Quality, round 4")."""
        counts = torch.as_tensor(target_counts, dtype=torch.float64) + 1.0
        with torch.no_grad():
            self.head.bias.copy_((counts / counts.sum()).log().to(self.head.bias.dtype))
            if self.tail_scale is not None:
                self.code_log_tail.copy_(log_tail_mass(target_counts[:self.layout.n_codes] + 1.0))

    @classmethod
    def default_train_config(cls) -> dict[str, Any]:
        """AdamW, lr 1e-3 with warm-up and cosine decay, batch 32, up to 400 epochs with the loop's early
        stopping on the validation likelihood."""
        return {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "batch_size": 32, "max_epochs": 400,
                "lr_schedule": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.1}

    # ---- encoding and loss ---------------------------------------------------------------------------------
    def encode(self, corpus: PatientCorpus, patients: np.ndarray) -> EncodedTokens:
        return encode_tokens(corpus, patients, self.layout, self.config.n_ctx, code_map=self.code_map(corpus),
                             label_columns=self.label_columns(corpus))

    def collate(self, corpus: PatientCorpus, patients: np.ndarray) -> dict[str, Any]:
        """``{"tokens" (B, T), "lengths" (B,), "scored" (N,)}``: ``scored`` are the flat positions in (B, T-1) of
        the predicted tokens that count (all but the padding and the window's forced [EOS]), decided on the
        host so the step never reads the device.

        Raises:
            ConfigError: for codes the model does not know or a missing label.
        """
        enc = self.encode(corpus, patients)
        if len(enc.unknown_codes):
            raise ConfigError(f"{len(np.unique(enc.unknown_codes))} code(s) of the batch are not in the model "
                              f"vocabulary, e.g. {unknown_code_names(corpus, enc.unknown_codes)!r}")
        return {"tokens": torch.from_numpy(enc.tokens), "lengths": torch.from_numpy(enc.lengths),
                "scored": torch.from_numpy(scored_positions(enc.lengths, enc.tokens.shape[1], self.config.n_ctx))}

    def token_log_probs(self, tokens: torch.Tensor, scored: torch.Tensor, *, packed: bool | None = None
                        ) -> torch.Tensor:
        """(N,) log-probability of each scored target token (flat positions ``scored`` in (B, T-1)).

        ``packed=True`` runs the transformer on the scored inputs only, the records concatenated with their own
        positions and a block-diagonal causal mask (HALO's packing), so padding costs nothing; ``False`` on the
        batch padded to its longest record. Both give the same values; None picks the cheaper by HALO's cost
        model (12 d per token for the linear layers, 2 x keys seen for attention)."""
        B, T = tokens.shape
        n, d = scored.shape[0], self.config.n_embd
        if packed is None:
            packed = n * (12 * d + 2 * n) < B * (T - 1) * (12 * d + 2 * (T - 1))
        clock = self.network.clock_inputs(tokens[:, :-1])  # (B, T-1, 3) or None
        if packed:
            record, positions = scored // (T - 1), scored % (T - 1)
            inputs = tokens.reshape(-1).index_select(0, record * T + positions)
            features = None if clock is None else clock.reshape(B * (T - 1), -1).index_select(0, scored)[None]
            h = self.coarse(inputs[None], positions=positions, attn_mask=packed_mask(record, positions),
                            features=features)[0]
        else:
            h = self.coarse(tokens[:, :-1], features=clock).reshape(B * (T - 1), -1).index_select(0, scored)
        prev = tokens[:, :-1].reshape(-1).index_select(0, scored)
        target = tokens[:, 1:].reshape(-1).index_select(0, scored)
        logp = self.network.log_probs(h, prev, scored % (T - 1) + 1)
        return logp.gather(1, target[:, None]).squeeze(1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The exact masked negative log-likelihood per scored token."""
        nll, units = self.validation_loss(batch)
        return nll / units.clamp_min(1)

    def validation_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed exact NLL of the batch's scored tokens, their number)."""
        ll = self.token_log_probs(batch["tokens"], batch["scored"])
        return -ll.sum(), torch.tensor(float(ll.shape[0]), device=ll.device)

    # ---- vocabulary and labels of another corpus -----------------------------------------------------------
    def code_map(self, corpus: PatientCorpus) -> np.ndarray | None:
        """Model token of each code id of ``corpus`` by typed string (-1 unknown); None for the same vocabulary."""
        cached = self._code_map
        if cached is not None and cached[0] is corpus.vocab:
            return cached[1]
        mapping = None
        if tuple(corpus.vocab.codes) != tuple(self.meta.codes):
            index = {code: i for i, code in enumerate(self.meta.codes)}
            mapping = np.array([index.get(code, -1) for code in corpus.vocab.codes], dtype=np.int64)
        self._code_map = (corpus.vocab, mapping)
        return mapping

    def label_columns(self, corpus: PatientCorpus) -> np.ndarray:
        missing = [n for n in self.layout.label_names if n not in corpus.label_names]
        if missing:
            raise ConfigError(f"corpus lacks the model's label(s) {missing!r}; it has {list(corpus.label_names)!r}")
        return np.array([corpus.label_names.index(n) for n in self.layout.label_names], dtype=np.int64)

    @property
    def network(self) -> TimelineNetwork:
        tail = {} if self.tail_scale is None else {"tail_scale": self.tail_scale, "code_log_tail": self.code_log_tail}
        return TimelineNetwork(self.coarse, self.head, self.grammar, self.clock, **tail)

    # ---- likelihood ----------------------------------------------------------------------------------------
    def log_likelihood(self, corpus: PatientCorpus, *, batch_size: int = 256,
                       unknown: Literal["error", "drop"] = "error") -> LikelihoodResult:
        """Exact log-likelihood of every patient of ``corpus`` (:func:`.likelihood.log_likelihood`)."""
        return log_likelihood(self, corpus, batch_size=batch_size, unknown=unknown)

    def patient_log_likelihood(self, corpus: PatientCorpus, *, batch_size: int = 256,
                               unknown: Literal["error", "drop"] = "error") -> np.ndarray:
        """(P,) log p(record) in nats (for the likelihood membership attack)."""
        return self.log_likelihood(corpus, batch_size=batch_size, unknown=unknown).patient_log_likelihood

    def perplexity(self, corpus: PatientCorpus, *, batch_size: int = 256,
                   unknown: Literal["error", "drop"] = "error") -> dict[str, Any]:
        """Per-code and per-visit perplexity of ``corpus`` as a JSON-able dict (keys as HALO's)."""
        return perplexity_report(self.log_likelihood(corpus, batch_size=batch_size, unknown=unknown), corpus)

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, n: int, *, seed: int = 0, conditions: dict[str, str] | None = None, batch_size: int = 256,
                 progress: bool = False, condition: Literal["forced", "posterior"] = "forced") -> PatientCorpus:
        """Sample ``n`` dated patients; patient i depends only on (seed, i). Conditions fix prompt tokens
        (``label:<name>``, ``sex``, ``age``): ``condition="forced"`` as the module docstring of :mod:`.sampling`
        says, ``"posterior"`` exactly from p(record | conditions)."""
        from ehrsynth.data.corpus import concat_corpora

        chunks = list(self.iter_generate(n, seed=seed, conditions=conditions, batch_size=batch_size,
                                         chunk_size=max(int(n), 1), progress=progress, condition=condition))
        return chunks[0] if len(chunks) == 1 else concat_corpora(chunks)

    def iter_generate(self, n: int, *, seed: int = 0, conditions: dict[str, str] | None = None,
                      batch_size: int = 256, chunk_size: int = 10_000, progress: bool = False,
                      condition: Literal["forced", "posterior"] = "forced") -> Iterator[PatientCorpus]:
        """Like :meth:`generate`, in corpora of up to ``chunk_size`` patients (ids continue across chunks)."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"n must be a positive integer, got {n!r}")
        config = GenerationConfig(conditions=conditions or {}, condition=condition, batch_size=batch_size,
                                  chunk_size=chunk_size, progress=progress)
        stream = sample_stream(self.network, self.decoding, n, generator=torch.Generator().manual_seed(_seed(seed)),
                               config=config)
        for corpus in date_chunks(self.meta.extra, stream, seed=seed):
            corpus.stats["seed"] = int(seed)
            yield corpus


def log_tail_mass(code_counts: np.ndarray) -> torch.Tensor:
    """(V + 1,) float32 log T(c) = log of the share of code occurrences at ids c, c + 1, ... (the last entry, for
    after the last code, repeats the one before: no code can follow it, so the value is never used)."""
    share = np.asarray(code_counts, dtype=np.float64) / float(np.sum(code_counts))
    tail = np.log(np.maximum(np.cumsum(share[::-1])[::-1], 1e-300))
    return torch.as_tensor(np.r_[tail, tail[-1:]], dtype=torch.float32)


def scored_positions(lengths: np.ndarray, T: int, n_ctx: int) -> np.ndarray:
    """Flat positions in (B, T-1) of the targets scored: 1 .. length-1 of each record, but a target at n_ctx-1
    (the window's forced [EOS], probability 1)."""
    target = np.arange(1, T)[None, :]
    return np.flatnonzero((target < np.asarray(lengths)[:, None]) & (target < n_ctx - 1))

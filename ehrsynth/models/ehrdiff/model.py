"""EHRDiff (Yuan, Zhou & Yu, TMLR 2024): EDM score-based diffusion over each patient's multi-hot code vector.

One patient is one 0/1 vector over the vocabulary: every code the patient ever had (plus, optionally, the
labels and sex as extra 0/1 columns, so they are generated too). A continuous EDM diffusion model is trained on
these vectors; samples are rounded back to 0/1 and returned as single-visit patients.

What differs from the reference code, and why:

* ``sigma_data`` is estimated from the training data rather than hard-coded (0.14 for MIMIC): the standard
  deviation of all entries of the training matrix, sqrt(p (1 - p)) with p its density.
* The sinusoidal time features have their own width, so any vocabulary size works (odd ones crashed).
* Class-conditional generation works: one learned embedding per (attribute, value) plus a null value, label
  dropout in training, classifier-free guidance at sampling.
* Generation runs in bounded-memory chunks, and patient i depends only on (seed, i), never on the chunk size.
* The warm-up of the learning rate is a fraction of the run (see :meth:`EHRDiffModel.default_train_config`).

* The default raw network is not the paper's MLP (``denoiser="mlp"`` keeps it) but residual blocks with
  LayerNorm and FiLM time modulation, trained with a loss weighted per code by its variance
  (``column_weight_power``). The paper's MLP cannot make each coordinate a sharp 0/1 decision: the continuous
  samples of a code spread around its prevalence (on GiBleed about 20% of values end between 0.2 and 0.8), and
  rounding loses codes rarer than about 1% (NZC 75-77 of 80). The uniform loss also gives a code of prevalence
  p a squared error of order p, too small to shape the network for the rare ones.
* Samples are binarised per column at a threshold calibrated after training (``calibrate``), not at 0.5: even
  the residual network leaves a rare code's samples spread below 0.5, so rounding makes it at about half its
  training rate (GiBleed: detection AUROC 0.59 rounded, 0.48 calibrated; real holdout 0.48).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ehrsynth.data.corpus import PatientCorpus, empty_statics
from ehrsynth.data.view import CorpusView
from ehrsynth.data.vocab import Vocabulary
from ehrsynth.errors import ConfigError
from ehrsynth.models.conditions import Conditions
from ehrsynth.models.base import CorpusMeta, GenerativeModel
from ehrsynth.models.ehrdiff.columns import column_means, static_column_names
from ehrsynth.models.ehrdiff.config import EHRDiffConfig
from ehrsynth.models.ehrdiff.network import DENOISERS, EDMLoss, EDMPrecond, MLPDenoiser, column_weights
from ehrsynth.models.ehrdiff.sampling import (
    EHRDiffSampling,
    binarize,
    calibrated_thresholds,
    edm_sigma_schedule,
    guided_denoiser,
    heun_sampler,
    per_sample_noise,
)

ROW_MULTIPLE = 16  # pad every network batch to a multiple of 16 rows: CPU GEMMs are then row-independent bitwise
CALIBRATION_SEED = 2_147_483_647  # the calibration samples' own noise stream, apart from generation seeds 0, 1, ...
CALIBRATION_FLOATS = 2 ** 26  # at most 256 MiB of float32 calibration samples


class _Chunk(NamedTuple):
    """Generated patients start .. start+n-1, sparse: codes per patient, code ids, static columns."""

    start: int
    counts: np.ndarray  # (n,) codes per patient
    codes: np.ndarray  # (nnz,) int32 code ids, ascending within each patient
    labels: np.ndarray  # (n, L) uint8 (L = 0 when labels are not modelled)
    sex: np.ndarray  # (n,) int8, -1 unknown


class EHRDiffModel(GenerativeModel):
    """EHRDiff: the preconditioned denoiser ``self.denoiser`` (EDM) around a raw network (``config.denoiser``).

    Example:
        >>> model = EHRDiffModel.from_corpus(train_corpus, EHRDiffConfig())          # doctest: +SKIP
        >>> # train with ehrsynth.training.loop.train(model, ...), then
        >>> synthetic = model.generate(10_000, seed=0, progress=True)                 # doctest: +SKIP
    """

    family = "ehrdiff"
    config_class = EHRDiffConfig
    # calibrated thresholds give the generated codes the training prevalence, which DP-SGD does not cover
    private_defaults = {"calibrate": False}

    def __init__(self, config: EHRDiffConfig, meta: CorpusMeta) -> None:
        super().__init__(config, meta)
        sigma_data = config.sigma_data if config.sigma_data is not None else meta.extra.get("sigma_data")
        if sigma_data is None or not sigma_data > 0:
            raise ConfigError("sigma_data is unknown: build the model with EHRDiffModel.from_corpus(corpus, config) "
                              f"or set EHRDiffConfig.sigma_data (got meta sigma_data={sigma_data!r})")
        self.n_codes = len(meta.codes)
        self.static_columns = static_column_names(meta.label_names) if config.model_statics else ()
        self.attributes = (*meta.label_names, "sex") if config.conditional else ()
        net = DENOISERS[config.denoiser](self.n_codes + len(self.static_columns), config.hidden_dims,
                                         time_dim=config.time_dim, fourier_dim=config.fourier_dim,
                                         n_attributes=len(self.attributes))
        self.denoiser = EDMPrecond(net, float(sigma_data))
        self.loss = EDMLoss(float(sigma_data), p_mean=config.p_mean, p_std=config.p_std)
        weights = None
        if config.column_weight_power:
            means = meta.extra.get("column_means")
            if means is None:
                raise ConfigError("column_weight_power needs the training column means: build the model with "
                                  "EHRDiffModel.from_corpus(corpus, config)")
            if len(means) != self.dim:
                raise ConfigError(f"column_means holds {len(means)} values but the model has {self.dim} columns "
                                  f"({len(meta.codes)}-code vocabulary): the vocabulary and the means disagree")
            weights = torch.tensor(column_weights(np.asarray(means, dtype=np.float64), config.column_weight_power),
                                   dtype=torch.float32)  # (D,)
        self.register_buffer("column_weight", weights, persistent=False)
        # per-column binarisation thresholds (0.5, rounding, until calibrated) and whether they are calibrated,
        # saved with the weights
        self.register_buffer("thresholds", torch.full((self.dim,), 0.5) if config.calibrate else None)
        self.register_buffer("calibrated", torch.zeros(1, dtype=torch.uint8) if config.calibrate else None)

    @property
    def sigma_data(self) -> float:
        return self.denoiser.sigma_data

    @property
    def dim(self) -> int:
        """Width of the diffused vector: codes plus modelled static columns."""
        return self.n_codes + len(self.static_columns)

    # ---- building and training -----------------------------------------------------------------------------
    @classmethod
    def config_from_saved(cls, data: dict[str, Any]) -> EHRDiffConfig:
        """A saved config; one written before ``denoiser`` existed is the paper's MLP (codes only), one written
        before ``calibrate`` rounds at 0.5."""
        return super().config_from_saved({"denoiser": "mlp", "column_weight_power": 0.0, "model_statics": False,
                                          "calibrate": False, **data})

    @classmethod
    def from_corpus(cls, corpus: PatientCorpus | CorpusView, config: EHRDiffConfig | None = None) -> EHRDiffModel:
        """An untrained model for ``corpus``; ``sigma_data`` (if not set) is estimated from its train split (or
        from the patients of a view).

        The estimate and the density it came from are kept in ``meta.extra`` (``sigma_data``,
        ``data_density``, ``sigma_data_source``), so a saved model carries them.
        """
        config = config or EHRDiffConfig()
        if not isinstance(config, EHRDiffConfig):
            raise ConfigError(f"config must be an EHRDiffConfig, got {type(config).__name__}")
        means = column_means(corpus, model_statics=config.model_statics)
        density = float(means.mean())
        if config.sigma_data is None:
            if not 0 < density < 1:
                raise ConfigError(f"cannot estimate sigma_data: the training data density is {density!r}; "
                                  "set EHRDiffConfig.sigma_data")
            sigma_data, source = float(np.sqrt(density * (1 - density))), "estimated: sqrt(p(1-p)), p = density"
        else:
            sigma_data, source = float(config.sigma_data), "config"
        meta = CorpusMeta.from_corpus(corpus, sigma_data=sigma_data, data_density=density, sigma_data_source=source,
                                      column_means=[round(float(m), 6) for m in means])
        return cls(config, meta)

    @classmethod
    def default_train_config(cls) -> dict[str, Any]:
        """The paper's training settings (AdamW 3e-4 without weight decay, batch 1024, cosine, EMA 0.999, about
        200k steps), with the warm-up a fraction of the run: the reference's fixed 20,000 steps never finish on a
        short run. Keys are :class:`~ehrsynth.training.loop.TrainConfig` fields."""
        return {
            "optimizer": "adamw",
            "lr": 3e-4,
            "weight_decay": 0.0,
            "batch_size": 1024,
            "max_steps": 200_000,
            "max_epochs": 5_000,  # the reference's n_epochs; max_steps binds first on MIMIC (about 41 steps/epoch)
            "lr_schedule": "cosine",
            "warmup_fraction": 0.05,
            "ema_decay": 0.999,
        }

    def collate(self, corpus: PatientCorpus, patients: np.ndarray) -> dict[str, torch.Tensor]:
        """``{"x": (B, D) float32}`` (codes, then label and sex columns if modelled), plus
        ``"label": (B, A) int64`` in {0, 1, 2 = unknown} for a conditional model (labels, then sex).

        Raises:
            ConfigError: when ``corpus`` has another vocabulary or lacks one of the model's labels.
        """
        if corpus.vocab.codes != self.meta.codes:
            raise ConfigError(f"corpus vocabulary ({corpus.vocab_size} codes) differs from the model's "
                              f"({self.n_codes} codes); use parts of the corpus the model was built from")
        patients = np.asarray(patients, dtype=np.int64)
        labels = self._corpus_labels(corpus, patients)  # (B, L) uint8
        sex = np.asarray(corpus.sex)[patients]
        x = corpus.patient_multi_hot(patients)  # (B, V)
        if self.static_columns:
            x = np.concatenate([x, labels, sex[:, None] == 0, sex[:, None] == 1], axis=1, dtype=np.float32)
        batch = {"x": torch.from_numpy(x)}
        if self.attributes:
            sex_value = np.where(sex < 0, MLPDenoiser.NULL, sex)
            batch["label"] = torch.from_numpy(np.concatenate([labels, sex_value[:, None]], axis=1).astype(np.int64))
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean EDM loss of a batch (label dropout applies in training mode). Noise levels, noise and label
        dropout are drawn from ``batch["generator"]`` (the loop's); without one, from a generator seeded 0."""
        if "noise" not in batch:  # pre-drawn by draw_training_noise (DP-SGD's per-patient gradients)
            batch = self.draw_training_noise(batch, batch.get("generator"))
        label = batch.get("label") if self.attributes else None
        loss = self.loss(self.denoiser, batch["x"], label, sigma=batch["sigma"], noise=batch["noise"])  # (B, D)
        return (loss if self.column_weight is None else loss * self.column_weight).mean()

    def draw_training_noise(self, batch: dict[str, torch.Tensor],
                            generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """``batch`` with this step's random draws added (``"sigma"`` (B,), ``"noise"`` (B, D)) and label dropout
        applied: the loss is then a deterministic per-row function, which DP-SGD differentiates row by row."""
        x = batch["x"]
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        out = {key: value for key, value in batch.items() if key != "generator"}
        label = batch.get("label") if self.attributes else None
        if label is not None and self.training and self.config.label_dropout > 0:
            out["label"] = self._drop_labels(label, generator)
        out["sigma"] = (torch.randn(x.shape[0], device=x.device, generator=generator) * self.loss.p_std
                        + self.loss.p_mean).exp()  # EDM: ln(sigma) ~ N(p_mean, p_std^2)
        out["noise"] = torch.randn(x.shape, device=x.device, generator=generator)
        return out

    def _drop_labels(self, label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.config.label_dropout
        drop_all = torch.rand(label.shape[0], 1, device=label.device, generator=generator) < p  # unconditional
        drop_each = torch.rand(label.shape, device=label.device, generator=generator) < p  # partial conditions
        return torch.where(drop_all | drop_each, torch.full_like(label, MLPDenoiser.NULL), label)

    def _corpus_labels(self, corpus: PatientCorpus, patients: np.ndarray) -> np.ndarray:
        missing = [name for name in self.meta.label_names if name not in corpus.label_names]
        if missing:
            raise ConfigError(f"corpus lacks the model's label(s) {missing!r}; it has {list(corpus.label_names)!r}")
        columns = [corpus.label_names.index(name) for name in self.meta.label_names]
        return np.asarray(corpus.labels)[patients][:, columns].astype(np.uint8).reshape(len(patients), len(columns))

    # ---- generation ------------------------------------------------------------------------------------------
    def generate(
        self,
        n: int,
        *,
        seed: int = 0,
        conditions: dict[str, str] | None = None,
        batch_size: int = 1024,
        progress: bool = False,
        sampling: EHRDiffSampling | None = None,
    ) -> PatientCorpus:
        """Sample ``n`` single-visit patients; patient i depends only on (seed, i), never on ``batch_size``.

        Args:
            n: number of patients.
            seed: run seed (>= 0).
            conditions: e.g. ``{"label:mortality": "1", "sex": "F"}`` (labels also by bare name) for a model
                trained with ``conditional=True``; label values "0"/"1", sex "F"/"M". Unnamed ones are left free.
            batch_size: patients per chunk (memory is O(batch_size x codes)).
            progress: show a tqdm bar.
            sampling: steps and guidance (default :class:`EHRDiffSampling`).

        Returns:
            A corpus of ``n`` patients with one visit each (visit_days 0, visit_start NaT; a patient may have
            no code), the training vocabulary (counts = generated counts, zeros allowed), split all train.
            Its labels are all the model's labels when they are modelled (``model_statics``), else the
            conditioned ones; sex comes from the modelled columns or the condition, else unknown (-1).

        Raises:
            ConfigError: for a bad ``n``, ``seed``, ``batch_size`` or condition.
        """
        chunks = list(self._sample(n, seed=seed, conditions=conditions, batch_size=batch_size, progress=progress,
                                   sampling=sampling))
        merged = _Chunk(0, *(np.concatenate([getattr(c, f) for c in chunks]) for f in _Chunk._fields[1:]))
        return self._to_corpus(merged, seed=seed, conditions=conditions, sampling=sampling)

    def iter_generate(
        self,
        n: int,
        *,
        seed: int = 0,
        conditions: dict[str, str] | None = None,
        batch_size: int = 1024,
        progress: bool = False,
        sampling: EHRDiffSampling | None = None,
    ) -> Iterator[PatientCorpus]:
        """Like :meth:`generate`, streaming one corpus of up to ``batch_size`` patients per chunk, for ``n`` too
        large to hold at once. Chunk k holds patients k*batch_size .. ; ids continue across chunks."""
        chunks = self._sample(n, seed=seed, conditions=conditions, batch_size=batch_size, progress=progress,
                              sampling=sampling)  # validates now, samples lazily
        return (self._to_corpus(chunk, seed=seed, conditions=conditions, sampling=sampling) for chunk in chunks)

    def _sample(
        self, n: int, *, seed: int, conditions: dict[str, str] | None, batch_size: int, progress: bool,
        sampling: EHRDiffSampling | None,
    ) -> Iterator[_Chunk]:
        sampling = sampling or EHRDiffSampling()
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"n must be a positive integer, got {n!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        condition = self._condition_vector(conditions)  # (A,) or None
        return self._sample_chunks(n, seed, condition, batch_size, progress, sampling)

    def _sample_chunks(self, n: int, seed: int, condition: torch.Tensor | None, batch_size: int, progress: bool,
                       sampling: EHRDiffSampling) -> Iterator[_Chunk]:
        if self.thresholds is not None and not self.is_calibrated:
            print("EHRDiff: calibrating the binarisation thresholds first (they are fitted when training ends; "
                  "this model's training did not end)", file=sys.stderr)
            self.calibrate(batch_size=batch_size)
        for start, x in self._continuous_chunks(n, seed, condition, batch_size, progress, sampling, "EHRDiff sampling"):
            yield self._decode(start, x)

    def _continuous_chunks(self, n: int, seed: int, condition: torch.Tensor | None, batch_size: int,
                           progress: bool, sampling: EHRDiffSampling, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, samples ``start .. start+b-1`` before binarisation) for the n samples of a run, in eval mode."""
        sigmas = edm_sigma_schedule(sampling.steps, sampling.sigma_min, sampling.sigma_max, sampling.rho)
        sigmas = sigmas.to(self.device)
        was_training = self.training
        self.eval()
        try:
            with tqdm(total=n, unit="patient", disable=not progress, desc=desc) as bar:
                for start in range(0, n, batch_size):
                    stop = min(start + batch_size, n)
                    yield start, self._continuous_samples(start, stop, seed, condition, sigmas, sampling)
                    bar.update(stop - start)
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def _continuous_samples(self, start: int, stop: int, seed: int, condition: torch.Tensor | None,
                            sigmas: torch.Tensor, sampling: EHRDiffSampling) -> torch.Tensor:
        """Samples ``start .. stop-1`` of a run before binarisation: (stop - start, D) float32 on the CPU."""
        b, device = stop - start, self.device
        padded = -(-b // ROW_MULTIPLE) * ROW_MULTIPLE
        latents = torch.zeros(padded, self.dim)
        latents[:b] = per_sample_noise(seed, start, stop, self.dim)
        if self.attributes:
            # no condition: one pass with the null label (guidance would compare the null label with itself)
            label = condition if condition is not None else torch.full((len(self.attributes),), MLPDenoiser.NULL)
            scale = sampling.guidance if condition is not None else 1.0
            denoise = guided_denoiser(self.denoiser, label.expand(padded, -1).to(device), scale)
        else:
            denoise = guided_denoiser(self.denoiser, None, 1.0)
        return heun_sampler(denoise, latents.to(device), sigmas)[:b].cpu()

    def _decode(self, start: int, x: torch.Tensor) -> _Chunk:
        """Continuous samples -> codes, labels and sex of the patients from ``start`` on."""
        b = len(x)
        thresholds = None if self.thresholds is None else self.thresholds.cpu()
        bits = binarize(x, thresholds).numpy()  # (b, D) bool
        rows, codes = np.nonzero(bits[:, :self.n_codes])  # row-major: code ids ascending within a patient
        n_labels = len(self.meta.label_names) if self.static_columns else 0
        labels = bits[:, self.n_codes:self.n_codes + n_labels].astype(np.uint8)
        sex = np.full(b, -1, dtype=np.int8)
        if self.static_columns:
            # the two columns are one categorical (F, M, or neither = unknown). The network learns F + M = 1
            # well before it commits each column to 0 or 1, so rounding them separately leaves many patients
            # with neither or both: take the larger one unless F + M says "unknown" is nearer.
            sex_scores = x[:, -2:].clamp(0, 1).numpy()  # (b, 2): F, M
            sex = np.where(sex_scores.sum(1) >= 0.5, sex_scores.argmax(1), -1).astype(np.int8)
        return _Chunk(start, np.bincount(rows, minlength=b), codes.astype(np.int32), labels, sex)

    def calibrate(self, *, batch_size: int = 1024, progress: bool = False) -> None:
        """Fit the per-column binarisation thresholds (``config.calibrate``) to the training prevalence.

        Draws unconditional samples from a seed of their own (no generation seed repeats their noise): about 8
        / (the rarest code's prevalence), between 1,024 and ``config.calibration_samples``. It then sets each
        code and label column's threshold to the quantile that leaves the training share of them above it
        (:func:`~ehrsynth.models.ehrdiff.sampling.calibrated_thresholds`).
        The sex columns keep their own rule (the larger of F and M). Only the training column means and the
        model's own samples are used, no patient record.
        """
        if self.thresholds is None:
            raise ConfigError("this model rounds at 0.5 (EHRDiffConfig(calibrate=False)); it has no thresholds")
        means = self.meta.extra.get("column_means")
        if means is None or len(means) != self.dim:
            raise ConfigError("calibration needs the training column means: build the model with "
                              "EHRDiffModel.from_corpus(corpus, config)")
        means = np.asarray(means, dtype=np.float64)
        rarest = means[means > 0].min(initial=1.0)
        # enough samples for the rarest code to have about 8 above its threshold, within the config's cap
        n = min(self.config.calibration_samples, max(1024, math.ceil(8 / rarest)),
                max(1024, CALIBRATION_FLOATS // self.dim))
        chunks = self._continuous_chunks(n, CALIBRATION_SEED, None, batch_size, progress, EHRDiffSampling(),
                                         "EHRDiff calibration")
        thresholds = calibrated_thresholds(np.concatenate([x.numpy() for _, x in chunks]), means)
        if self.static_columns:
            thresholds[-2:] = 0.5  # sex: decoded from F and M together, not thresholded
        self.thresholds.copy_(torch.from_numpy(thresholds))
        self.calibrated.fill_(1)

    @property
    def is_calibrated(self) -> bool:
        """Whether the binarisation thresholds have been fitted (False for a model that rounds at 0.5)."""
        return self.calibrated is not None and bool(self.calibrated.item())

    def after_training(self, *, progress: bool = False) -> bool:
        """Calibrate the thresholds of the trained weights (when ``config.calibrate``)."""
        if self.thresholds is None:
            return False
        self.calibrate(progress=progress)
        return True

    def _condition_vector(self, conditions: dict[str, str] | None) -> torch.Tensor | None:
        """{"mortality": "1", "sex": "F"} -> (A,) int64 in {0, 1, 2 = free}, or None for no condition."""
        parsed = self._parse_conditions(conditions)
        if not parsed:
            return None
        values = torch.full((len(self.attributes),), MLPDenoiser.NULL, dtype=torch.int64)
        for name, value in parsed.items():
            values[self.attributes.index(name)] = value
        return values

    def _parse_conditions(self, conditions: dict[str, str] | None) -> dict[str, int]:
        """Validate conditions: keys are label names (bare or ``label:<name>``) or ``sex``; values "0"/"1", "F"/"M".

        Raises:
            ConfigError: for conditions on an unconditional model, an unknown key or a bad value.
        """
        if not conditions:
            return {}
        if not self.attributes:
            raise ConfigError(f"conditions {conditions!r} need a model trained with EHRDiffConfig(conditional=True)")
        parsed = Conditions.parse(conditions, labels=[a for a in self.attributes if a != "sex"],
                                  sex="sex" in self.attributes)
        return {**parsed.labels, **({} if parsed.sex is None else {"sex": parsed.sex})}

    def _to_corpus(self, chunk: _Chunk, *, seed: int, conditions: dict[str, str] | None,
                   sampling: EHRDiffSampling | None) -> PatientCorpus:
        n = len(chunk.counts)
        fixed = self._parse_conditions(conditions)
        label_names = tuple(self.meta.label_names) if self.static_columns else tuple(
            name for name in self.meta.label_names if name in fixed)
        labels = np.zeros((n, len(label_names)), dtype=np.uint8)
        for j, name in enumerate(label_names):
            labels[:, j] = fixed[name] if name in fixed else chunk.labels[:, self.meta.label_names.index(name)]
        sex = np.full(n, fixed["sex"], dtype=np.int8) if "sex" in fixed else chunk.sex
        statics = empty_statics(n)
        statics["sex"] = sex.astype(np.int8)
        code_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(chunk.counts, out=code_offsets[1:])
        ids = np.char.add("ehrdiff-", np.arange(chunk.start, chunk.start + n).astype(str)).astype(object)
        return PatientCorpus(
            patient_ids=ids,
            visit_offsets=np.arange(n + 1, dtype=np.int64),
            code_offsets=code_offsets,
            codes=chunk.codes,
            visit_days=np.zeros(n, dtype=np.float64),
            visit_start=np.full(n, np.datetime64("NaT"), dtype="datetime64[s]"),
            labels=labels,
            label_names=label_names,
            vocab=Vocabulary(tuple(self.meta.codes), np.bincount(chunk.codes, minlength=self.n_codes).astype(np.int64)),
            split=np.zeros(n, dtype=np.int8),
            stats={"source": "ehrdiff", "seed": int(seed), "first_patient": int(chunk.start),
                   "conditions": dict(conditions or {}),
                   "sampling": dataclasses.asdict(sampling or EHRDiffSampling())},
            **statics,
        )

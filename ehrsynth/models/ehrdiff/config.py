"""EHRDiff's architecture and diffusion settings (training settings are the shared TrainConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ehrsynth.errors import ConfigError
from ehrsynth.models.ehrdiff.network import DENOISERS, residual_widths


@dataclass(frozen=True)
class EHRDiffConfig:
    """EHRDiff's architecture and diffusion settings (training settings are the shared TrainConfig).

    Attributes:
        denoiser: the raw network: ``"resnet"`` (default), residual blocks with LayerNorm and FiLM time
            modulation (:class:`~ehrsynth.models.ehrdiff.network.ResidualDenoiser`), or ``"mlp"``, the paper's MLP
            without residuals or normalisation. Models saved before this option load as ``"mlp"``.
        hidden_dims: hidden widths; the paper's MIMIC MLP is D -> 1024 -> 384 -> 384 -> 384 -> 1024 -> D. For
            ``"resnet"`` the first (and last) width is the residual stream's and each middle one a block's.
        time_dim: width of the time (and label) embedding injected in every block (384 in the paper).
        fourier_dim: width of the sinusoidal features of c_noise (even). The reference used the vocabulary size.
        sigma_data: data standard deviation for preconditioning; None estimates it from the training data as
            sqrt(p (1 - p)), p = the mean of all entries of the training matrix (0.14 is the paper's MIMIC value).
        p_mean, p_std: training noise distribution, ln(sigma) ~ N(p_mean, p_std^2) (EDM: -1.2, 1.2).
        model_statics: append the labels and sex (F, M) as extra 0/1 columns, so they are generated too (the
            default: otherwise every record comes out without sex and labels). False is the paper's model of the
            codes alone; models saved before this default load with their own setting.
        conditional: learn label/sex embeddings for classifier-free guided conditional generation.
        label_dropout: in conditional training, the probability of dropping all conditions of a patient (the
            unconditional model) and, independently, each single condition (for partial conditions).
        column_weight_power: weight each column's loss by (mean variance / its variance)^power (see
            :func:`~ehrsynth.models.ehrdiff.network.column_weights`); 0 is the paper's uniform loss. 0.5 (the
            default) brings back codes rarer than 1% on GiBleed (benchmarks/bench_ehrdiff.py, section compare).
            Needs the training column means (``meta.extra["column_means"]``, kept by
            :meth:`EHRDiffModel.from_corpus`).
        calibrate: binarise each code and label column at its own threshold, calibrated once after training so
            that the model's samples have the training prevalence (:meth:`EHRDiffModel.calibrate`,
            :func:`~ehrsynth.models.ehrdiff.sampling.calibrated_thresholds`); False rounds at 0.5 as the paper.
            Rounding makes rare codes at about half their rate. Models saved before this option round.
        calibration_samples: the most samples the thresholds are fitted on: about 8 / (the rarest code's
            training prevalence) are drawn, at least 1,024, and fewer when one float32 copy of them would pass
            256 MiB.
    """

    denoiser: Literal["resnet", "mlp"] = "resnet"
    hidden_dims: tuple[int, ...] = (1024, 384, 384, 384, 1024)
    time_dim: int = 384
    fourier_dim: int = 256
    sigma_data: float | None = None
    p_mean: float = -1.2
    p_std: float = 1.2
    model_statics: bool = True
    conditional: bool = False
    label_dropout: float = 0.1
    column_weight_power: float = 0.5
    calibrate: bool = True
    calibration_samples: int = 8192

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        if not self.hidden_dims or any(not isinstance(w, int) or w < 1 for w in self.hidden_dims):
            raise ConfigError(f"hidden_dims must be one or more positive integers, got {self.hidden_dims!r}")
        if self.denoiser not in DENOISERS:
            raise ConfigError(f"denoiser must be one of {sorted(DENOISERS)!r}, got {self.denoiser!r}")
        if self.denoiser == "resnet":
            try:
                residual_widths(self.hidden_dims)
            except ValueError as exc:
                raise ConfigError(f"hidden_dims: {exc}") from None
        if self.time_dim < 1:
            raise ConfigError(f"time_dim must be >= 1, got {self.time_dim!r}")
        if self.fourier_dim < 2 or self.fourier_dim % 2:
            raise ConfigError(f"fourier_dim must be even and >= 2, got {self.fourier_dim!r}")
        if self.sigma_data is not None and not self.sigma_data > 0:
            raise ConfigError(f"sigma_data must be > 0 (or None to estimate it), got {self.sigma_data!r}")
        if not self.p_std > 0:
            raise ConfigError(f"p_std must be > 0, got {self.p_std!r}")
        if not 0 <= self.column_weight_power <= 2:
            raise ConfigError(f"column_weight_power must be in [0, 2], got {self.column_weight_power!r}")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 2:
            raise ConfigError(f"calibration_samples must be an integer >= 2, got {self.calibration_samples!r}")

"""Sampling for EHRDiff as plain functions: the EDM noise schedule, the deterministic Heun sampler (EDM
Algorithm 1), classifier-free guidance, binarisation, and per-sample seeded noise.

Binarisation is the reference's round(clip(x, 0, 1)), that is x > 0.5, or x > t_c with one threshold per
column calibrated after training (:func:`calibrated_thresholds`, EHRDiff's default): the samples of a rare code
end spread between 0 and 1 rather than at 0 or 1, so rounding at 0.5 makes it about half as often as the
training data has it (GiBleed: codes held by 2-24 of 1,940 patients came out at 40-75% of their rate over 19,400
samples), and at 1x the rarest vanish. A Bernoulli draw with probability clip(x, 0, 1) was measured as another
alternative (benchmarks/bench_ehrdiff.py, GiBleed, 32 steps): it recovers the rarest codes (NZC 80 of 80
against 77) but lowers the prevalence correlation (0.978 against 0.994), inflates patients (15.0 codes against
12.7; real 12.2) and worsens CMD (0.024 against 0.022), so it is not offered.

A denoiser here is any callable ``denoise(x, sigma) -> x0_hat`` with x (B, D) and sigma a 0-d tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ehrsynth.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NOISE_BLOCK = 256  # rows of noise drawn per seeded generator; patient i's noise is row i % 256 of block i // 256


@dataclass(frozen=True)
class EHRDiffSampling:
    """How EHRDiff samples (the paper's settings are the defaults).

    Attributes:
        steps: Heun steps N; the sampler makes 2N - 1 network evaluations (the last step is Euler).
            Sensible range 8-64; 32 as the paper (see benchmarks/bench_ehrdiff.py for the trade-off).
        sigma_min, sigma_max: ends of the noise schedule (0.02, 80 as the paper).
        rho: schedule curvature (EDM eq. 5); 7 as EDM.
        guidance: classifier-free guidance scale w in D = D_uncond + w (D_cond - D_uncond); 1 is plain
            conditional sampling, 0 ignores the condition, 1.5-3 strengthens it. The reference's scale is w - 1.
    """

    steps: int = 32
    sigma_min: float = 0.02
    sigma_max: float = 80.0
    rho: float = 7.0
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min!r}, "
                              f"sigma_max={self.sigma_max!r}")
        if self.rho <= 0:
            raise ConfigError(f"rho must be > 0, got {self.rho!r}")
        if self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0, got {self.guidance!r}")


def edm_sigma_schedule(steps: int, sigma_min: float = 0.02, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (eq. 5): sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho for
    i < N, then sigma_N = 0.

    Returns:
        (steps + 1,) float64, decreasing from ``sigma_max`` to ``sigma_min`` and then 0.

    Example:
        >>> s = edm_sigma_schedule(32)
        >>> len(s), float(s[0]), round(float(s[-2]), 4), float(s[-1])
        (33, 80.0, 0.02, 0.0)
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def heun_sampler(denoise: Denoiser, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic Heun sampler: EDM Algorithm 1 (the ODE dx/dsigma = (x - D(x; sigma)) / sigma).

    Args:
        denoise: ``D(x, sigma)``, the denoised estimate of x_0.
        latents: (B, D) unit-normal noise; it is scaled to the first noise level here.
        sigmas: (N + 1,) decreasing noise levels ending in 0, e.g. :func:`edm_sigma_schedule`.

    Returns:
        (B, D) samples at sigma = 0, in the dtype of ``latents`` (EDM keeps float64; float32 halves the memory
        traffic of the state updates, and 0/1 data rounded at the end do not need more).
    """
    x_next = latents * sigmas[0].to(latents.dtype)  # line 2: x_0 ~ N(0, t_0^2 I)
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):  # line 3: i = 0 .. N-1
        x_cur = x_next
        d_cur = (x_cur - denoise(x_cur, t_cur).to(x_cur.dtype)) / t_cur  # line 4: d_i = (x_i - D(x_i; t_i)) / t_i
        x_next = x_cur + (t_next - t_cur) * d_cur  # line 5: Euler step to t_{i+1}
        if t_next > 0:  # line 6: second-order correction unless t_{i+1} = 0 (so the last step is Euler)
            d_prime = (x_next - denoise(x_next, t_next).to(x_cur.dtype)) / t_next  # line 7
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)  # line 8: trapezoidal rule
    return x_next  # line 9: x_N


def guided_denoiser(
    denoiser: Callable[..., torch.Tensor], label: torch.Tensor | None, scale: float, *, null: int = 2
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_uncond + w (D_cond - D_uncond).

    Args:
        denoiser: ``denoiser(x, sigma, label)``; ``label`` (B, A) with ``null`` meaning "no condition".
        label: the condition, or None for unconditional sampling.
        scale: w; 1 needs one evaluation (plain conditional), 0 one evaluation (unconditional).
    """
    if label is None or scale == 0:
        uncond = None if label is None else torch.full_like(label, null)
        return lambda x, sigma: denoiser(x, sigma, uncond)
    if scale == 1:
        return lambda x, sigma: denoiser(x, sigma, label)
    null_label = torch.full_like(label, null)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_uncond = denoiser(x, sigma, null_label)
        return d_uncond + scale * (denoiser(x, sigma, label) - d_uncond)

    return denoise


def binarize(x: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous samples -> 0/1: ``x > thresholds`` per column, or as the reference without thresholds:
    ``round(clip(x, 0, 1))``, the same as ``x > 0.5`` (exactly 0.5 rounds to 0).

    Args:
        x: (B, D) samples.
        thresholds: (D,) or None.

    Returns:
        bool tensor shaped like ``x``.
    """
    if thresholds is None:
        return x.clamp(0, 1).round().bool()
    return x > thresholds.to(x.dtype)


def calibrated_thresholds(samples: np.ndarray, prevalence: np.ndarray) -> np.ndarray:
    """One binarisation threshold per column, so that ``samples > threshold`` is 1 in a share ``prevalence`` of
    the rows: the (1 - p_c) quantile of column c (linear between order statistics, as ``numpy.quantile``).

    Thresholding keeps the model's ranking of the samples within each column (which patients get a code, so
    its co-occurrences) and moves only the cut, to the training prevalence. A column never seen in training
    gets +inf (never generated), one always seen -inf.

    Args:
        samples: (M, D) continuous samples of the trained model, M >= 2.
        prevalence: (D,) target shares in [0, 1] (the training column means).

    Returns:
        (D,) float32.

    Example:
        >>> x = np.array([[0.1, 0.9], [0.3, 0.2], [0.2, 0.4], [0.6, 0.8], [0.4, 0.0]])
        >>> t = calibrated_thresholds(x, np.array([0.4, 0.0]))
        >>> (x > t).mean(0).tolist(), float(t[1])
        ([0.4, 0.0], inf)
    """
    samples = np.asarray(samples, dtype=np.float32)
    prevalence = np.asarray(prevalence, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[0] < 2 or prevalence.shape != samples.shape[1:]:
        raise ConfigError(f"need (M >= 2, D) samples and (D,) prevalences, got {samples.shape} and "
                          f"{prevalence.shape}")
    ordered = np.sort(samples, axis=0)  # (M, D) ascending per column
    position = (1.0 - np.clip(prevalence, 0.0, 1.0)) * (len(ordered) - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, len(ordered) - 1)
    columns = np.arange(ordered.shape[1])
    low, high = ordered[below, columns], ordered[above, columns]
    thresholds = low + (position - below) * (high - low)
    thresholds[prevalence <= 0] = np.inf
    thresholds[prevalence >= 1] = -np.inf
    return thresholds.astype(np.float32)


def per_sample_noise(seed: int, start: int, stop: int, dim: int) -> torch.Tensor:
    """Unit-normal latents for samples ``start .. stop-1`` of a run; sample i's row depends only on (seed, i).

    Rows are drawn in fixed blocks of :data:`NOISE_BLOCK` from generators seeded by (seed, block), so any
    chunking of a run sees the same noise per sample (EDM seeds one generator per sample; blocks give the same
    guarantee at a fraction of the cost: 45 us per sample for a generator each at 1,782 codes).

    Returns:
        (stop - start, dim) float32 on the CPU.

    Raises:
        ConfigError: for a negative seed.
    """
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed!r}")
    first, last = start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK
    blocks = []
    for block in range(first, last + 1):
        state = np.random.SeedSequence([seed, block]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
        blocks.append(torch.randn((NOISE_BLOCK, dim), generator=generator))
    noise = torch.cat(blocks)  # (n_blocks * NOISE_BLOCK, dim)
    offset = first * NOISE_BLOCK
    return noise[start - offset:stop - offset]

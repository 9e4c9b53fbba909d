"""EHRDiff's modules and math: the raw denoisers F (the paper's MLP and a residual network), the EDM
preconditioner D and the EDM loss.

References are to Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(EDM), Table 1, and to Yuan et al. 2024, "EHRDiff" (TMLR), section 3.

    D(x; s) = c_skip(s) * x + c_out(s) * F(c_in(s) * x; c_noise(s))            (EDM eq. 7)

The network only ever sees inputs and targets of unit variance, whatever the noise level; ``sigma_data`` is the
standard deviation of the data, which for 0/1 multi-hot vectors of density p is sqrt(p (1 - p)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM's preconditioning coefficients (Table 1), elementwise in ``sigma``.

    Returns:
        ``(c_skip, c_out, c_in, c_noise)``, each shaped like ``sigma``.

    Example:
        >>> c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([0.14]), 0.14)
        >>> round(float(c_skip), 3), round(float(c_in * 0.14), 4)
        (0.5, 0.7071)
    """
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(s) = (s^2 + s_d^2) / (s s_d)^2 = 1 / c_out(s)^2 (EDM Table 1), so the network's effective
    target has unit weight at every noise level."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal features of a scalar (here c_noise), as EDM's PositionalEmbedding.

    The width is fixed by the config, not by the vocabulary: the reference used the data width, so an odd
    number of codes made ``cat(sin, cos)`` one column short and crashed.
    """

    def __init__(self, dim: int, max_positions: float = 10_000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"sinusoidal embedding width must be even and >= 2, got {dim!r}")
        freqs = (1 / max_positions) ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None, :]  # (B, dim/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)


class ConditionEmbedding(nn.Module):
    """Base of the raw networks: the (time + label) embedding and its per-block projections.

    ``emb = Linear(SiLU(Linear(sinusoid(c_noise)) + sum_a E_a[label_a]))``: each conditioning attribute a has an
    embedding row per value (0, 1) plus a "null" row (index 2) used for unconditional (classifier-free) passes.
    The label embeddings start at zero, so an untrained conditional model equals an unconditional one.
    Subclasses fill ``self.time_proj`` with one projection of ``emb`` per place the embedding enters.
    """

    NULL = 2  # the label value meaning "no condition"

    def __init__(self, *, time_dim: int, fourier_dim: int, n_attributes: int) -> None:
        super().__init__()
        self.fourier = SinusoidalEmbedding(fourier_dim)
        self.time_in = nn.Linear(fourier_dim, time_dim)
        self.time_out = nn.Linear(time_dim, time_dim)
        self.n_attributes = n_attributes
        if n_attributes:
            self.label_embedding = nn.Embedding(3 * n_attributes, time_dim)
            nn.init.zeros_(self.label_embedding.weight)
            self.register_buffer("label_offsets", 3 * torch.arange(n_attributes), persistent=False)
        self.time_proj = nn.ModuleList()

    def embed(self, c_noise: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """(B,) c_noise and (B, A) labels in {0, 1, 2=null} (None = all null) -> (B, time_dim)."""
        e = self.time_in(self.fourier(c_noise))
        if self.n_attributes:
            if label is None:  # no condition at all = the null value of every attribute
                label = torch.full((len(c_noise), self.n_attributes), self.NULL, device=c_noise.device)
            e = e + self.label_embedding(label + self.label_offsets).sum(1)  # (B, A, T) -> (B, T)
        return self.time_out(F.silu(e))

    def projections(self, c_noise: torch.Tensor, label: torch.Tensor | None) -> list[torch.Tensor]:
        """``[proj(emb) for proj in self.time_proj]``, each (B, width) in training and (B or 1, width) in eval."""
        if self.training:
            emb = self.embed(c_noise, label)  # (B, T)
            return [proj(emb) for proj in self.time_proj]
        return self._shared_projections(c_noise, label)

    def _shared_projections(self, c_noise: torch.Tensor, label: torch.Tensor | None) -> list[torch.Tensor]:
        """At sampling time every row of a batch shares sigma (and usually the condition): embed and project
        only the distinct (c_noise, label) rows, about 30% of the forward cost at EHRDiff's widths."""
        key = c_noise[:, None].float()
        if label is not None and self.n_attributes:
            key = torch.cat([key, label.float()], dim=1)  # (B, 1 + A)
        if bool((key == key[:1]).all()):  # the usual case: one row, broadcast in h + p
            emb = self.embed(key[:1, 0], key[:1, 1:].long() if key.shape[1] > 1 else None)  # (1, T)
            return [proj(emb) for proj in self.time_proj]  # each (1, width)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        u_label = unique[:, 1:].long() if key.shape[1] > 1 else None
        emb = self.embed(unique[:, 0], u_label)  # (U, T)
        return [proj(emb)[inverse] for proj in self.time_proj]  # each (B, width)


class MLPDenoiser(ConditionEmbedding):
    """The raw network F of EHRDiff: an MLP without residuals or normalisation, with the (time + label)
    embedding injected before every layer (see :class:`ConditionEmbedding`):

        h_0 = x;   h_{k+1} = Linear_k(ReLU(h_k + Proj_k(emb)))

    Args:
        dim: input/output width (codes plus modelled static columns); any positive integer.
        hidden: hidden widths; EHRDiff's MIMIC network is (1024, 384, 384, 384, 1024).
        time_dim: width of the time embedding (384 in the paper).
        fourier_dim: width of the sinusoidal features of c_noise (even).
        n_attributes: number of conditioning attributes (0 for an unconditional model).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (1024, 384, 384, 384, 1024),
        *,
        time_dim: int = 384,
        fourier_dim: int = 256,
        n_attributes: int = 0,
    ) -> None:
        super().__init__(time_dim=time_dim, fourier_dim=fourier_dim, n_attributes=n_attributes)
        widths = [dim, *hidden, dim]
        self.time_proj.extend(nn.Linear(time_dim, w) for w in widths[:-1])
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """(B, dim) input, (B,) c_noise, optional (B, A) labels -> (B, dim)."""
        projections = self.projections(c_noise, label)  # each (B or 1, width)
        # h_{k+1} = Linear_k(ReLU(h_k + p_k)): the next block's p_{k+1} joins layer k's bias inside one addmm,
        # so with a shared time row (sampling) the time injection costs no pass over the activations
        h = F.relu(x + projections[0], inplace=True)
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            shift = layer.bias if k == last else layer.bias + projections[k + 1]
            h = torch.addmm(shift, h, layer.weight.t())  # (B, out) = shift + h W^T
            if k < last:
                h = F.relu(h, inplace=True)
        return h


class ResidualDenoiser(ConditionEmbedding):
    """A raw network F beyond the paper: a pre-norm residual MLP whose blocks are modulated by the (time +
    label) embedding (FiLM, Perez et al. 2018, as the adaptive norms of DiT/EDM2):

        h = W_in x + Proj_0(emb);   per block k:  u = W1_k LN(h) (1 + s_k) + t_k,  h = h + W2_k SiLU(u);
        F = W_out SiLU(LN(h))

    with (s_k, t_k) = Proj_k(emb): the embedding enters the stream once, additively, and modulates every block.
    The residual path and the norms let F make each code a sharper 0/1 decision at small sigma than the paper's
    MLP (whose rare codes round to 0). W2_k and W_out start at zero, so an
    untrained F is 0 and every block starts as the identity.

    Args:
        dim: input/output width; any positive integer.
        hidden: ``(trunk, inner_1, ..., inner_k, trunk)``: the residual stream's width, then one block per inner
            width (the paper preset (1024, 384, 384, 384, 1024) gives three 384-wide blocks on a 1024 stream; a
            width list of one or two entries gives one block as wide as the stream).
        time_dim, fourier_dim, n_attributes: as :class:`MLPDenoiser`.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (1024, 384, 384, 384, 1024),
        *,
        time_dim: int = 384,
        fourier_dim: int = 256,
        n_attributes: int = 0,
    ) -> None:
        super().__init__(time_dim=time_dim, fourier_dim=fourier_dim, n_attributes=n_attributes)
        trunk, inner = residual_widths(hidden)
        self.input = nn.Linear(dim, trunk)
        self.norms = nn.ModuleList(nn.LayerNorm(trunk) for _ in inner)
        self.up = nn.ModuleList(nn.Linear(trunk, w) for w in inner)
        self.down = nn.ModuleList(nn.Linear(w, trunk) for w in inner)
        self.time_proj.append(nn.Linear(time_dim, trunk))  # added to the stream
        self.time_proj.extend(nn.Linear(time_dim, 2 * w) for w in inner)  # (scale, shift) per block
        self.out_norm = nn.LayerNorm(trunk)
        self.output = nn.Linear(trunk, dim)
        for layer in (*self.down, self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """(B, dim) input, (B,) c_noise, optional (B, A) labels -> (B, dim)."""
        stream, *films = self.projections(c_noise, label)  # (B or 1, trunk), then (B or 1, 2 inner) per block
        h = torch.addmm(self.input.bias + stream, x, self.input.weight.t())  # (B, trunk)
        for norm, up, down, film in zip(self.norms, self.up, self.down, films):
            scale, shift = film.chunk(2, dim=1)  # each (B or 1, inner)
            u = torch.addcmul(shift, up(norm(h)), 1 + scale)  # (B, inner)
            h = h + down(F.silu(u))
        return self.output(F.silu(self.out_norm(h)))


def residual_widths(hidden: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """``hidden`` -> (stream width, inner width of each block) for :class:`ResidualDenoiser`.

    Raises:
        ValueError: when the last width differs from the first (both are the stream's).
    """
    hidden = tuple(hidden)
    if len(hidden) > 2 and hidden[-1] != hidden[0]:
        raise ValueError(f"a residual network's first and last widths are its stream width and must be equal, "
                         f"got {hidden!r}")
    return hidden[0], hidden[1:-1] if len(hidden) > 2 else (hidden[-1],)


DENOISERS = {"mlp": MLPDenoiser, "resnet": ResidualDenoiser}  # EHRDiffConfig.denoiser -> raw network class


class EDMPrecond(nn.Module):
    """EDM's preconditioner D(x; sigma) around a raw network (EDM eq. 7 and Table 1).

    Args:
        net: the raw network F(x_in, c_noise, label).
        sigma_data: standard deviation of the training data.
        sigma_min, sigma_max: the noise range the model supports (exposed to samplers).
    """

    def __init__(self, net: nn.Module, sigma_data: float, *, sigma_min: float = 0.02, sigma_max: float = 80.0) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, label: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, D) noisy data, sigma a scalar or (B,) -> the denoised estimate of x_0, (B, D) float32."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1)  # (B or 1, 1)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x = self.net(c_in * x, c_noise.flatten().expand(x.shape[0]), label)
        return c_skip * x + c_out * F_x.to(torch.float32)


class EDMLoss:
    """EDM's training loss (EDM section 5, Table 1): ln(sigma) ~ N(p_mean, p_std^2) and
    lambda(sigma) ||D(x + sigma n; sigma) - x||^2 per element. Returns the per-element loss; callers reduce it.

    ``sigma`` and ``noise`` (unit normal) may be passed in, so a test can check an exact value.
    """

    def __init__(self, sigma_data: float, *, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.sigma_data = float(sigma_data)
        self.p_mean = p_mean
        self.p_std = p_std

    def __call__(
        self,
        denoiser: nn.Module,
        x: torch.Tensor,
        label: torch.Tensor | None = None,
        *,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if sigma is None:
            sigma = (torch.randn(x.shape[0], device=x.device) * self.p_std + self.p_mean).exp()
        sigma = sigma.reshape(-1, 1)  # (B, 1)
        if noise is None:
            noise = torch.randn_like(x)
        weight = edm_loss_weight(sigma, self.sigma_data)
        denoised = denoiser(x + sigma * noise, sigma.flatten(), label)
        return weight * (denoised - x) ** 2  # (B, D)


def column_weights(means: np.ndarray, power: float) -> np.ndarray:
    """Loss weight per column, ``(mean v / v_c)^power`` with v_c = p_c (1 - p_c) the column's variance (floored
    at 1e-4), normalised to mean 1: power 0 is the paper's uniform loss; power > 0 raises rare codes, whose
    squared error is otherwise too small to shape the network (they then round to 0 in every sample)."""
    variance = np.maximum(means * (1 - means), 1e-4)
    weights = (variance.mean() / variance) ** power
    return weights / weights.mean()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "DENOISERS", "ConditionEmbedding", "EDMLoss", "EDMPrecond", "MLPDenoiser", "ResidualDenoiser",
    "SinusoidalEmbedding", "column_weights", "count_parameters", "edm_coefficients", "edm_loss_weight",
    "residual_widths",
]

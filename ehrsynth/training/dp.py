"""DP-SGD (Abadi et al. 2016) with the patient as the privacy unit, and its privacy accountant.

One private step (Algorithm 1 of the paper):

1. Poisson-sample the batch: each training patient joins independently with probability q.
2. Compute each patient's gradient on its own (HALO packs several patients into one sequence for speed, so a
   per-row or per-sequence gradient would mix patients: here every patient is collated alone).
3. Clip each patient's gradient to L2 norm C, sum, add N(0, (sigma C)^2) noise from a passed-in generator,
   divide by the expected batch size q N.

The accountant is Google's dp-accounting RDP accountant over Poisson-sampled Gaussian steps; its whole state is
(q, sigma, steps), so a resumed run rebuilds it exactly from the checkpoint.

The loop calls two functions (its "DP hook"): :func:`start` once, and :func:`private_backward` in place of
``loss.backward()``. The accountant's state rides in the loop state (so in the checkpoint), each step's noise
generator is seeded from (seed, step) (so a resumed run draws what an uninterrupted one would), and the spent
epsilon goes into the model's ``meta.extra["dp"]`` (so into ``model.json``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError


def default_delta(n_patients: int) -> float:
    """delta = 1 / N^1.1: below 1/N, so the guarantee is not met by releasing one whole patient."""
    return 1.0 / float(n_patients) ** 1.1


@dataclass(frozen=True)
class DPConfig:
    """Target privacy of a DP-SGD run.

    Attributes:
        epsilon: the (epsilon, delta) budget; training stops before a step would exceed it.
        delta: None for :func:`default_delta` of the number of training patients.
        max_grad_norm: C, the L2 bound on each patient's gradient.
        noise_multiplier: sigma; None to choose the smallest sigma that spends ``epsilon`` in the planned steps.
    """

    epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ConfigError(f"--dp-epsilon must be > 0, got {self.epsilon!r}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta!r}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"--dp-max-grad-norm must be > 0, got {self.max_grad_norm!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")


def rdp_epsilon(q: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """epsilon after ``steps`` Poisson-sampled Gaussian steps (rate q, noise sigma), by the RDP accountant."""
    from dp_accounting import dp_event, rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # orders whose series does not converge are dropped, loudly
    if steps == 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(noise_multiplier)), steps)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, q: float, steps: int, *, tolerance: float = 1e-3) -> float:
    """The smallest sigma (to ``tolerance``) whose ``steps`` steps at rate q spend at most ``epsilon``.

    Raises:
        ConfigError: when even sigma = 1000 spends more (too many steps or too large a rate for the budget).
    """
    low, high = 0.1, 1000.0
    if rdp_epsilon(q, high, steps, delta) > epsilon:
        raise ConfigError(f"epsilon {epsilon} cannot be met in {steps} steps at sampling rate {q:.4g}; "
                          "train fewer steps or with smaller batches")
    while high - low > tolerance:  # epsilon falls as sigma grows: bisect
        mid = (low + high) / 2
        low, high = (mid, high) if rdp_epsilon(q, mid, steps, delta) > epsilon else (low, mid)
    return high


class PrivacyAccountant:
    """Privacy spent so far by Poisson-sampled Gaussian steps (rate ``q``, noise ``noise_multiplier``)."""

    def __init__(self, q: float, noise_multiplier: float, delta: float, steps: int = 0) -> None:
        self.q, self.noise_multiplier, self.delta, self.steps = float(q), float(noise_multiplier), float(delta), int(steps)

    def epsilon(self, steps: int | None = None) -> float:
        """epsilon spent after ``steps`` steps (default: the steps taken)."""
        return rdp_epsilon(self.q, self.noise_multiplier, self.steps if steps is None else steps, self.delta)

    def would_exceed(self, target: float) -> bool:
        """Whether one more step would spend more than ``target``."""
        return self.epsilon(self.steps + 1) > target

    def step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: with it a resumed run continues the same account."""
        return {"q": self.q, "noise_multiplier": self.noise_multiplier, "delta": self.delta, "steps": self.steps,
                "accountant": "dp_accounting.rdp"}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        return cls(state["q"], state["noise_multiplier"], state["delta"], state["steps"])


def poisson_sample(n_patients: int, q: float, generator: torch.Generator) -> np.ndarray:
    """Indices of the patients that join this step's batch, each independently with probability q."""
    return torch.nonzero(torch.rand(n_patients, generator=generator) < q).flatten().numpy()


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def clipped_gradient_sum(model: torch.nn.Module, corpus: Any, patients: np.ndarray, max_grad_norm: float,
                         generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], np.ndarray]:
    """Sum over ``patients`` of each patient's loss gradient clipped to L2 norm ``max_grad_norm``.

    Each patient is collated alone, so no packed sequence mixes two patients in one gradient. ``generator``
    feeds a model whose loss is random (EHRDiff's noise levels); without it such a model would draw the same
    noise for every patient at every step.

    Returns:
        (per-parameter sums, (B,) the patients' unclipped gradient norms).
    """
    view = CorpusView.of(corpus)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    if generator is not None and generator.device != device:  # the model draws on its own device
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    if hasattr(model, "draw_training_noise"):  # a per-row loss (EHRDiff): every patient's gradient at once
        batch = _on_device(model.collate(view.corpus, view.patients[np.asarray(patients)]), device)
        return _vectorised_clipped_sum(model, model.draw_training_noise(batch, generator), max_grad_norm)
    total = [torch.zeros_like(p) for p in params]
    norms = np.zeros(len(patients))
    for i, patient in enumerate(patients):
        batch = _on_device(model.collate(view.corpus, view.patients[[patient]]), device)
        if generator is not None:
            batch["generator"] = generator
        loss = model(batch)  # forward = loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms[i] = float(norm)
        scale = torch.clamp(max_grad_norm / (norm + 1e-12), max=1.0)
        for t, g in zip(total, grads):
            t.add_(g * scale)
    return total, norms


def _vectorised_clipped_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], max_grad_norm: float,
                            chunk: int | None = None) -> tuple[list[torch.Tensor], np.ndarray]:
    """:func:`clipped_gradient_sum` for a model whose loss is a mean over independent rows (one row = one
    patient, its random draws already in ``batch``): per-row gradients by ``torch.func`` (vmap of grad),
    ``chunk`` rows at a time so memory stays O(chunk x parameters). On one CPU thread this is only ~15% faster
    than the loop (the per-row weight gradients are the same work); on a GPU it replaces B tiny launches."""
    from torch.func import functional_call, grad, vmap

    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    fixed = {**{name: p.detach() for name, p in model.named_parameters() if not p.requires_grad},
             **dict(model.named_buffers())}
    rows = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}

    def row_loss(params: dict[str, torch.Tensor], row: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, {**params, **fixed}, ({key: v.unsqueeze(0) for key, v in row.items()},))

    per_row = vmap(grad(row_loss), in_dims=(None, 0))
    chunk = chunk or (256 if trainable and next(iter(trainable.values())).is_cuda else 16)  # 16: fastest on a CPU
    total = [torch.zeros_like(p) for p in trainable.values()]
    norms = []
    n = next(iter(rows.values())).shape[0]
    for start in range(0, n, chunk):
        grads = per_row(trainable, {key: v[start:start + chunk] for key, v in rows.items()})
        flat = [grads[name].flatten(1) for name in trainable]
        norm = torch.sqrt(sum(g.pow(2).sum(1) for g in flat))  # (chunk,)
        scale = torch.clamp(max_grad_norm / (norm + 1e-12), max=1.0)
        for t, name in zip(total, trainable):
            t.add_(torch.einsum("b,b...->...", scale, grads[name]))
        norms.append(norm.detach().cpu().numpy())
    return total, np.concatenate(norms) if norms else np.zeros(0)


def dp_step(model: torch.nn.Module, corpus: Any, n_patients: int, config: DPConfig, accountant: PrivacyAccountant,
            generator: torch.Generator) -> dict[str, float] | None:
    """Set ``.grad`` of every trainable parameter to one DP-SGD step's noisy clipped average, and account it.

    ``corpus`` is the training part (a corpus or view ``model.collate`` reads); the caller then calls
    ``optimizer.step()``. Returns None, touching nothing, when the step would exceed ``config.epsilon``.
    """
    spent_after = accountant.epsilon(accountant.steps + 1)
    if spent_after > config.epsilon:
        return None
    patients = poisson_sample(n_patients, accountant.q, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    total, norms = (clipped_gradient_sum(model, corpus, patients, config.max_grad_norm, generator)
                    if len(patients) else ([torch.zeros_like(p) for p in params], np.zeros(0)))
    expected = accountant.q * n_patients
    std = accountant.noise_multiplier * config.max_grad_norm
    for p, t in zip(params, total):
        noise = torch.normal(0.0, std, size=p.shape, generator=generator).to(p.device, p.dtype)
        p.grad = (t + noise) / expected
    accountant.step()
    return {"batch_patients": float(len(patients)), "clipped_share": float(np.mean(norms > config.max_grad_norm))
            if len(norms) else math.nan, "epsilon_spent": spent_after}


@dataclass
class PrivateRun:
    """What the loop's DP hook carries between steps."""

    config: DPConfig
    accountant: PrivacyAccountant
    n_patients: int
    seed: int


def start(train_config: Any, n_patients: int, planned_steps: int, state: dict[str, Any],
          world_size: int) -> PrivateRun | None:
    """The DP side of a run (None without ``dp_epsilon``): sampling rate q = batch_size / N, and the smallest
    noise that spends ``dp_epsilon`` in the planned steps -- or, on resume, the saved accountant."""
    if train_config.dp_epsilon is None:
        return None
    if world_size > 1:
        raise ConfigError("--dp-epsilon trains in one process; drop --nproc/torchrun")
    config = DPConfig(epsilon=train_config.dp_epsilon, delta=train_config.dp_delta,
                      max_grad_norm=train_config.dp_max_grad_norm)
    if "dp" in state:
        accountant = PrivacyAccountant.from_state_dict(state["dp"])
    else:
        delta = config.delta if config.delta is not None else default_delta(n_patients)
        q = min(1.0, train_config.batch_size / n_patients)
        accountant = PrivacyAccountant(q, noise_multiplier_for(config.epsilon, delta, q, planned_steps), delta)
        state["dp"] = accountant.state_dict()
    return PrivateRun(config, accountant, n_patients, int(train_config.seed))


def private_backward(run: PrivateRun, model: torch.nn.Module, train_view: Any, state: dict[str, Any]) -> bool:
    """One DP step's gradient into ``.grad`` (False, touching nothing, when it would exceed the budget)."""
    seed = int(np.random.SeedSequence([run.seed, state["step"]]).generate_state(1)[0])
    done = dp_step(model, train_view, run.n_patients, run.config, run.accountant,
                   torch.Generator().manual_seed(seed))
    if done is None:
        return False
    state["dp"] = run.accountant.state_dict()
    model.meta.extra["dp"] = {"epsilon_spent": done["epsilon_spent"], "epsilon_target": run.config.epsilon,
                              "delta": run.accountant.delta, "noise_multiplier": run.accountant.noise_multiplier,
                              "sampling_rate": run.accountant.q, "max_grad_norm": run.config.max_grad_norm,
                              "steps": run.accountant.steps, "accountant": "dp_accounting RDP",
                              "privacy_unit": "patient"}
    return True

"""HALO's architecture and record-encoding settings (training settings are the shared TrainConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from ehrsynth.errors import ConfigError

FINE_HEADS = ("made", "made_direct", "made_lowrank")  # the fine heads (network.FineHead)

# Lower edges of the inter-visit gap bins in days: [0,1) [1,7) [7,30) [30,90) [90,180) [180,365) [365,730), then
# yearly-ish bins to 15 years and an open last bin. The HALO issue's bins stopped at an open [730, inf), which holds
# 45% of GiBleed's gaps: a generated record then cannot tell 2 years from 12, its dates drift and age-bound codes
# land at the wrong ages (the cohort's index condition at ages 25-55 for real 34-43; 32-47 with these bins).
DEFAULT_GAP_EDGES = (0.0, 1.0, 7.0, 30.0, 90.0, 180.0, 365.0, 730.0, 1095.0, 1460.0, 2190.0, 2920.0, 3650.0, 5475.0)
# Lower edges of the age-at-first-visit buckets in years; the last, [90, inf), holds MIMIC's ages capped at 90.
DEFAULT_AGE_EDGES = (0.0, 18.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)


@dataclass(frozen=True)
class HaloConfig:
    """HALO's architecture (Theodorou et al. 2023) and how a record becomes rows of columns.

    The defaults are the paper's network: 12 layers, 12 heads, width 768, n_ctx 48. :meth:`small` gives the
    2 layers / 4 heads / 128 config used in tests and CPU benchmarks.

    Attributes:
        n_layer: transformer blocks of the coarse (visit-level) module.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: width of the coarse module (768 in the paper).
        n_ctx: rows per record -- start row, static row, visits, end row -- so at most ``n_ctx - 3`` visits;
            longer histories keep their last ``n_ctx - 3`` visits (counted in ``meta.extra``).
        dropout: dropout in the coarse module (the reference uses none).
        layer_norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
        fine_hidden: hidden width of the fine (code-level) MADE head. None is the reference: two square masked
            layers of width ``n_embd + columns`` (2 (W^2 + W) parameters, W = n_embd + columns); an integer H
            gives a narrower MADE (H W + H + C H + C parameters, C = columns), for large vocabularies where
            the square head's W^2 does not fit.
        fine_head: the fine head's kind (:class:`~.network.FineHead`): ``"made"`` is the reference MADE;
            ``"made_direct"`` adds MADE's direct masked input-to-output connections (C^2 more parameters), so
            every code's logit has a linear term in every earlier code of its visit; ``"made_lowrank"`` the
            same connections with a rank-``fine_rank`` weight (2 C r parameters: linear in the vocabulary); the
            default: on GiBleed and the MIMIC-III demo it ties the reference on held-out NLL per code and
            raises the within-visit pair Pearson r (benchmarks/bench_fine_heads.py, docs/benchmarks.md), where
            ``"made_direct"`` overfits the 72-patient MIMIC-III demo.
        fine_rank: rank of the ``"made_lowrank"`` direct term.
        seen_codes: give the fine head a learned per-code term for "this code is already in the record"
            (:class:`~.network.FineHead`; 2 V parameters). None: on, except for the reference ``"made"`` head,
            which stays the paper's.
        clock: feed the coarse module each row's approximate age and time since the first visit, computed from
            the record's age bucket and gap bins so far (:data:`~.network.CLOCK_FEATURES`). None: on, except
            with the reference ``"made"`` head (``fine_head="made"`` is the paper's HALO throughout).
        history_input: feed the coarse module, with each row, the set of codes recorded in the record so far
            (0/1 per code, V x n_embd more parameters): attention averages over the visits, so "coronary
            disease once, 20 visits ago" fades, and the model generated myocardial infarctions with no coronary
            disease before them (GiBleed: 87% of synthetic infarction visits, real 0%). None: on, except with
            the reference ``"made"`` head.
        use_labels: put the corpus labels on the static row (the reference's label row).
        use_sex: put sex (an F and an M column; neither when unknown) on the static row.
        age_bucket_edges: lower edges (years, increasing) of the age-at-first-visit buckets on the static row;
            the last bucket is open and ages below the first edge fall in the first bucket. ``()`` disables.
        gap_bin_edges: lower edges (days, increasing) of the inter-visit gap bins; each visit after the first
            carries the bin of its gap to the previous visit (no token when the gap is unknown). The last bin
            is open. ``()`` disables gaps (generated visit_days are then unknown, NaN, after the first visit).
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 48
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    fine_hidden: int | None = None
    fine_head: Literal["made", "made_direct", "made_lowrank"] = "made_lowrank"
    fine_rank: int = 32
    seen_codes: bool | None = None
    clock: bool | None = None
    history_input: bool | None = None
    use_labels: bool = True
    use_sex: bool = True
    age_bucket_edges: tuple[float, ...] = DEFAULT_AGE_EDGES
    gap_bin_edges: tuple[float, ...] = DEFAULT_GAP_EDGES

    def __post_init__(self) -> None:
        check_transformer(self, min_ctx=4, ctx_meaning="start, static, one visit, end")
        if self.fine_hidden is not None and (not isinstance(self.fine_hidden, int) or self.fine_hidden < 1):
            raise ConfigError(f"fine_hidden must be None (square reference head) or a positive integer, "
                              f"got {self.fine_hidden!r}")
        if self.fine_head not in FINE_HEADS:
            raise ConfigError(f"fine_head must be one of {list(FINE_HEADS)!r}, got {self.fine_head!r}")
        if not isinstance(self.fine_rank, int) or self.fine_rank < 1:
            raise ConfigError(f"fine_rank must be a positive integer, got {self.fine_rank!r}")
        for name in ("seen_codes", "clock", "history_input"):
            if getattr(self, name) not in (None, True, False):
                raise ConfigError(f"{name} must be true, false or null, got {getattr(self, name)!r}")

    @classmethod
    def small(cls, **overrides: Any) -> HaloConfig:
        """The small config: 2 layers, 4 heads, width 128 (n_ctx 48), plus any ``overrides``."""
        return replace(cls(n_layer=2, n_head=4, n_embd=128), **overrides)

    @property
    def uses_seen_codes(self) -> bool:
        """Whether the fine head has the "seen before" terms (``seen_codes``, resolved)."""
        return self.fine_head != "made" if self.seen_codes is None else bool(self.seen_codes)

    @property
    def uses_clock(self) -> bool:
        """Whether the coarse module takes the clock inputs (``clock``, resolved)."""
        return self.fine_head != "made" if self.clock is None else bool(self.clock)

    @property
    def uses_history_input(self) -> bool:
        """Whether the coarse module takes the codes recorded so far (``history_input``, resolved)."""
        return self.fine_head != "made" if self.history_input is None else bool(self.history_input)

    @property
    def max_visits(self) -> int:
        """Visits a record can hold: n_ctx minus the start, static and end rows."""
        return self.n_ctx - 3


def check_transformer(config: Any, *, min_ctx: int, ctx_meaning: str) -> None:
    """Validate the transformer fields HALO and the timeline model share (n_layer, n_head, n_embd, n_ctx,
    dropout, layer_norm_eps) and their bin edges (age_bucket_edges, gap_bin_edges), normalising the edges to
    float tuples; ``ctx_meaning`` says what ``min_ctx`` stands for in the message."""
    object.__setattr__(config, "age_bucket_edges", tuple(float(e) for e in config.age_bucket_edges))
    object.__setattr__(config, "gap_bin_edges", tuple(float(e) for e in config.gap_bin_edges))
    for name in ("n_layer", "n_head", "n_embd"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head:
        raise ConfigError(f"n_embd ({config.n_embd!r}) must be a multiple of n_head ({config.n_head!r})")
    if not isinstance(config.n_ctx, int) or config.n_ctx < min_ctx:
        raise ConfigError(f"n_ctx must be an integer >= {min_ctx} ({ctx_meaning}), got {config.n_ctx!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {config.dropout!r}")
    if not config.layer_norm_eps > 0:
        raise ConfigError(f"layer_norm_eps must be > 0, got {config.layer_norm_eps!r}")
    for name in ("age_bucket_edges", "gap_bin_edges"):
        edges = getattr(config, name)
        if any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ConfigError(f"{name} must be finite, strictly increasing lower edges (the last bin is "
                              f"open-ended), got {edges!r}")

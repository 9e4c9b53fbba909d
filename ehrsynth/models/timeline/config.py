"""The timeline transformer's architecture and token settings (training settings are the shared TrainConfig)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ehrsynth.errors import ConfigError
from ehrsynth.models.halo.config import DEFAULT_AGE_EDGES, DEFAULT_GAP_EDGES, check_transformer


@dataclass(frozen=True)
class TimelineConfig:
    """A causal transformer over a patient's whole token sequence (CEHR-GPT style; see :mod:`.tokens`).

    The defaults are HALO's paper width (12 layers, 12 heads, 768) over a 512-token window; :meth:`small` gives
    2 layers / 4 heads / 128 over 256 tokens.

    Attributes:
        n_layer, n_head, n_embd: the transformer (HALO's coarse module, fed token embeddings).
        n_ctx: tokens per record, [BOS] and [EOS] included; longer records keep their last visits (counted in
            ``meta.extra``), and a visit longer than the whole window keeps its lowest code ids.
        dropout, layer_norm_eps: as HALO's.
        use_labels, use_sex: put the corpus labels / sex into the prompt.
        age_bucket_edges: lower edges (years) of the age-at-first-visit buckets; ``()`` disables the age token.
        gap_bin_edges: lower edges (days) of the gap bins; a gap token opens every visit after the first, so
            at least one bin is required (it is also what separates visits).
        clock: feed the transformer each token's approximate age and time since the first visit, summed from
            the age and gap tokens so far (HALO's clock, :data:`~ehrsynth.models.halo.network.CLOCK_FEATURES`).
        tail_term: add beta(h) * log(T(c) / T(after prev)) to each code's logit, T(c) being the training
            frequency mass of codes from c on and beta >= 0 learned from the state: the exact conditional of a
            visit's codes drawn independently and then sorted, beta + 1 codes still to come. Without it an
            untrained or data-starved model jumps far ahead in the canonical order and ends visits early
            (:class:`~ehrsynth.models.timeline.sampling.TimelineNetwork`).
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 512
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    use_labels: bool = True
    use_sex: bool = True
    age_bucket_edges: tuple[float, ...] = DEFAULT_AGE_EDGES
    gap_bin_edges: tuple[float, ...] = DEFAULT_GAP_EDGES
    clock: bool = True
    tail_term: bool = True

    def __post_init__(self) -> None:
        check_transformer(self, min_ctx=8, ctx_meaning="tokens")
        if not self.gap_bin_edges:
            raise ConfigError("gap_bin_edges must hold at least one edge: gap tokens separate the visits")

    @classmethod
    def small(cls, **overrides: Any) -> TimelineConfig:
        """2 layers, 4 heads, width 128, 256 tokens, plus any ``overrides``."""
        return replace(cls(n_layer=2, n_head=4, n_embd=128, n_ctx=256), **overrides)

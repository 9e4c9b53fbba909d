"""Exact ancestral sampling of token sequences: KV-cached, batched, each record stopping at its own [EOS].

Each step runs the transformer one position for the records still running, masks the softmax with the grammar
(and the conditions), and draws the next token by inversion of its CDF with one uniform. The uniform of
patient i at position t is HALO's counter-based hash of (run key, i, t) (:func:`~ehrsynth.models.halo.sampling.
stream_keys`), so patient i depends only on (seed, i): not on the batch size, the chunking or the other records
-- up to the last bit of batched matrix products.

Conditions fix prompt tokens ("forced", as HALO's default). A condition on sex or the age bucket gives the
fixed token its whole group's probability: every token before it keeps its model distribution, every token
after it follows its exact conditional. A label fixed to 0 is never emitted and a label fixed to 1 must be
emitted before any later prompt token (masked and renormalised): for the first label of the prompt that is the
exact posterior p(record | label); for a later label, the labels before it are renormalised too.

``condition="posterior"`` samples exactly from p(record | conditions) instead: each record's prompt (its tokens
up to the first code, or [EOS]) is drawn without conditions until it matches them -- attempt a of patient i on
its own streams (position t + a n_ctx), attempt 0 on the unconditional streams, so a record whose first prompt
matches is the unconditional sample -- and the record continues from the accepted prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.models.halo.encoding import ColumnLayout, decode_records
from ehrsynth.models.halo.network import CoarseTransformer, clock_features
from ehrsynth.errors import ConfigError
from ehrsynth.models.halo.sampling import MAX_ATTEMPTS, Decoding, GenerationConfig, parse_conditions, run_key, \
    stream_keys, stream_uniforms
from ehrsynth.models.timeline.tokens import Grammar, sequence_ones


@dataclass(frozen=True)
class TimelineNetwork:
    """What the sampler and the likelihood run: the transformer, its output head and the grammar."""

    coarse: CoarseTransformer
    head: torch.nn.Linear
    grammar: Grammar
    clock: torch.Tensor | None = None  # (K, 3): HALO's clock matrix over the tokens, when the transformer takes it
    tail_scale: torch.nn.Linear | None = None  # h -> beta (before softplus), with the tail term
    code_log_tail: torch.Tensor | None = None  # (V + 1,): log T(c), the training mass of codes c, c + 1, ...

    def clock_inputs(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, T, 3) clock inputs of token sequences (B, T): token t's from tokens 0..t (None without a clock)."""
        return None if self.clock is None else clock_features(torch.cumsum(self.clock[tokens], dim=1))

    def log_probs(self, h: torch.Tensor, prev: torch.Tensor, pos: torch.Tensor,
                  forced: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
        """(N, K) masked log-softmax of the next token after ``prev`` (N,) at ``pos`` (N,), from h (N, d)."""
        allowed = self.grammar.allowed(prev, pos)
        if forced is not None:
            allowed &= condition_mask(self.grammar.layout, prev, *forced)
        logits = self.head(h).float()
        if self.tail_scale is not None:  # codes drawn independently and sorted: p(c) ~ f(c) (T(c) / T(prev+1))^beta
            V, log_tail = self.grammar.layout.n_codes, self.code_log_tail
            beta = F.softplus(self.tail_scale(h).float())  # (N, 1)
            after = torch.where(prev < V, log_tail[(prev + 1).clamp(max=V)], torch.zeros_like(log_tail[0]))
            logits = torch.cat([logits[:, :V] + beta * (log_tail[None, :V] - after[:, None]), logits[:, V:]], 1)
        logp = F.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        if forced is not None:  # a fixed sex / age bucket takes its whole group's mass: what precedes keeps its own
            lay = self.grammar.layout
            for a, b in ((lay.sex_start, lay.age_start), (lay.age_start, lay.gap_start)):
                chosen = np.flatnonzero(forced[0][a:b])
                if len(chosen):
                    group = torch.logsumexp(logp[:, a:b], dim=1)
                    logp[:, a:b] = float("-inf")
                    logp[:, a + int(chosen[0])] = group
        return logp


def condition_mask(layout: ColumnLayout, prev: torch.Tensor, ones: np.ndarray, zeros: np.ndarray) -> torch.Tensor:
    """(N, K) bool: the label tokens the conditions allow after ``prev`` (label columns ``ones`` forced present,
    ``zeros`` absent): a label forced to 1 and not yet emitted bars every prompt token after it. (Sex and age
    conditions are applied on the probabilities, :meth:`TimelineNetwork.log_probs`.)"""
    device = prev.device
    barred = np.zeros_like(zeros)
    barred[layout.label_start:layout.sex_start] = zeros[layout.label_start:layout.sex_start]
    mask = torch.as_tensor(~barred, device=device)[None, :].expand(len(prev), -1)
    must = np.flatnonzero(ones[layout.label_start:layout.sex_start])
    if not len(must):
        return mask
    j = prev - layout.label_start  # label index of prev; [BOS] counts as -1
    j = torch.where(prev == layout.start, -1, j)
    in_labels = (prev == layout.start) | ((j >= 0) & (prev < layout.sex_start))
    must_t = torch.as_tensor(must, device=device)
    nxt = torch.searchsorted(must_t, j + 1)  # first forced label after prev
    pending = in_labels & (nxt < len(must))
    limit = layout.label_start + must_t[nxt.clamp(max=len(must) - 1)]
    k = torch.arange(layout.n_columns, device=device)
    bar = pending[:, None] & ((k[None, :] > limit[:, None]) | (k[None, :] < layout.label_start))
    return mask & ~bar


@torch.no_grad()
def sample_batch(net: TimelineNetwork, patients: np.ndarray, *, key: int,
                 forced: tuple[np.ndarray, np.ndarray] | None = None,
                 condition: str = "forced") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample the records of ``patients`` (global indices), with the conditions ``forced`` (columns forced to
    1 and to 0, :func:`~ehrsynth.models.halo.sampling.parse_conditions`) applied as ``condition`` says.

    Returns:
        (tokens (b, n_ctx) int64 padded, lengths (b,) with [BOS] and [EOS], log-probability (b,) float64 of
        each sampled sequence: the sum of the log-probabilities of its drawn tokens, without conditions under
        ``"posterior"``).
    """
    prompt = None
    if forced is not None and condition == "posterior":
        prompt = _posterior_prompts(net, patients, key=key, forced=forced)
        forced = None
    return _sample(net, patients, key=key, forced=forced, prompt=prompt)


def _sample(net: TimelineNetwork, patients: np.ndarray, *, key: int, forced: tuple[np.ndarray, np.ndarray] | None,
            prompt: np.ndarray | None = None, stop_after_prompt: bool = False, attempt: int = 0,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sampler's loop. ``prompt`` (b, P) fixes each record's first tokens (padding: none given); draws use
    stream positions t + ``attempt`` n_ctx; ``stop_after_prompt`` ends each record with its prompt
    (:func:`prompt_ended`)."""
    lay, n_ctx = net.grammar.layout, net.grammar.n_ctx
    device = net.coarse.wpe.weight.device
    b = len(patients)
    tokens = np.full((b, n_ctx), lay.pad, dtype=np.int64)
    tokens[:, 0] = lay.start
    lengths = np.full(b, n_ctx, dtype=np.int64)
    log_prob = np.zeros(b)
    rows = np.arange(b)  # the batch rows still running
    cache = net.coarse.new_cache(b)
    prev = torch.full((b,), lay.start, dtype=torch.long, device=device)
    running = None if net.clock is None else torch.zeros(b, net.clock.shape[1], device=device)  # clock sums
    for pos in range(1, n_ctx):
        features = None
        if running is not None:
            running += net.clock[prev]
            features = clock_features(running)[:, None]
        h = net.coarse(prev[:, None], cache, features=features)[:, -1]  # (a, d)
        logp = net.log_probs(h, prev, torch.full_like(prev, pos), forced).double()
        cdf = logp.exp().cumsum(-1)
        u = torch.as_tensor(stream_uniforms(stream_keys(key, patients[rows], pos + attempt * n_ctx), 0),
                            device=device)
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp(max=lay.n_columns - 1)
        if prompt is not None and pos < prompt.shape[1]:
            given = torch.as_tensor(prompt[rows, pos], device=device)
            choice = torch.where(given != lay.pad, given, choice)
        drawn = choice.cpu().numpy()
        log_prob[rows] += logp.gather(1, choice[:, None]).squeeze(1).cpu().numpy()
        tokens[rows, pos] = drawn
        done = drawn == lay.end
        if stop_after_prompt:
            done |= prompt_ended(lay, drawn)
        if done.any():
            lengths[rows[done]] = pos + 1
            live = torch.as_tensor(~done, device=device)
            rows = rows[~done]
            if not len(rows):
                break
            cache.keep(live)
            choice = choice[live]
            running = None if running is None else running[live]
        prev = choice
    return tokens, lengths, log_prob


def prompt_ended(layout: ColumnLayout, drawn: np.ndarray) -> np.ndarray:
    """Whether each drawn token closes its record's prompt: the first code (the first visit opens) or [EOS]."""
    return (drawn < layout.n_codes) | (drawn == layout.end)


def _posterior_prompts(net: TimelineNetwork, patients: np.ndarray, *, key: int,
                       forced: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(b, n_ctx) accepted prompts ([BOS] and the positions after the prompt: padding): each record's prompt
    drawn without conditions until its tokens hold every column forced to 1 and none forced to 0."""
    lay, n_ctx = net.grammar.layout, net.grammar.n_ctx
    ones, zeros = (np.flatnonzero(f) for f in forced)
    out = np.full((len(patients), n_ctx), lay.pad, dtype=np.int64)
    todo = np.arange(len(patients))
    for attempt in range(MAX_ATTEMPTS):
        tokens, lengths, _ = _sample(net, patients[todo], key=key, forced=None, stop_after_prompt=True,
                                     attempt=attempt)
        present = np.zeros((len(todo), lay.n_columns), dtype=bool)
        np.put_along_axis(present, tokens, True, axis=1)
        ok = present[:, ones].all(1) & ~present[:, zeros].any(1)
        out[todo[ok]] = np.where(np.arange(n_ctx)[None, :] < lengths[ok, None], tokens[ok], lay.pad)
        out[todo[ok], 0] = lay.pad
        todo = todo[~ok]
        if not len(todo):
            return out
    raise ConfigError(f"posterior conditioning found no prompt matching the conditions in {MAX_ATTEMPTS} tries "
                      f"for {len(todo)} record(s): the conditions are too rare under the model; use "
                      "condition='forced'")


def sample_stream(net: TimelineNetwork, decoding: Decoding, n: int, *, generator: torch.Generator,
                  config: GenerationConfig = GenerationConfig()) -> Iterator[PatientCorpus]:
    """Sample ``n`` patients in corpora of up to ``config.chunk_size`` (undated: the model applies dates)."""
    conditions = dict(config.conditions)
    forced = parse_conditions(net.grammar.layout, conditions) if conditions else None
    key = run_key(generator)
    modes = (net.coarse.training, net.head.training)
    net.coarse.eval()
    net.head.eval()
    try:
        with tqdm(total=n, unit="patient", disable=not config.progress, desc="timeline sampling") as bar:
            for first in range(0, n, config.chunk_size):
                last = min(first + config.chunk_size, n)
                parts = []
                for start in range(first, last, config.batch_size):
                    patients = np.arange(start, min(start + config.batch_size, last), dtype=np.int64)
                    parts.append(sample_batch(net, patients, key=key, forced=forced,
                                              condition=config.condition)[:2])
                    bar.update(len(patients))
                yield decode(net.grammar, decoding, first, parts, conditions, config.condition)
    finally:
        net.coarse.train(modes[0])
        net.head.train(modes[1])


def decode(grammar: Grammar, decoding: Decoding, first: int, parts: list, conditions: dict,
           condition: str = "forced") -> PatientCorpus:
    """Sampled sequences -> a corpus through HALO's record decoder (ids ``timeline-<index>``)."""
    width = max(p[0].shape[1] for p in parts)
    tokens = np.concatenate([np.pad(p[0], ((0, 0), (0, width - p[0].shape[1])),
                                    constant_values=grammar.layout.pad) for p in parts])
    lengths = np.concatenate([p[1] for p in parts])
    n_visits, patient, row, column = sequence_ones(grammar.layout, tokens, lengths)
    stats = {"source": "timeline", "first_patient": int(first), "conditions": conditions, "condition": condition,
             "records_filling_window": int((lengths == grammar.n_ctx).sum())}
    corpus = decode_records(grammar.layout, first_patient=first, n_visits=n_visits, patient=patient, row=row,
                            column=column, codes=decoding.codes, gap_days=decoding.gap_days,
                            age_years=decoding.age_years, stats=stats)
    corpus.patient_ids = np.char.add("timeline-", np.arange(first, first + len(lengths)).astype(str)).astype(object)
    return corpus

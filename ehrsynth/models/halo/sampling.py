"""Exact ancestral sampling from HALO, one visit row at a time, each record advancing on its own.

For each new row the coarse transformer runs one position (its KV cache holds the prefix), then the fine head
decides the row left to right (in its fine order: the end token first, then the columns; see encoding.py).
The reference code (REFERENCE.md, "Sampling in the reference") Bernoulli-samples
every remaining column, takes the smallest column any record of the batch drew as 1, fixes it for the whole
batch and repeats: the batch moves at its slowest record's pace, about V passes per visit. Here every record
keeps its own cursor:

1. The logits of all undecided columns are computed with them at 0 -- which is exactly their value as long as
   no earlier 1 has been fixed -- so the conditionals are exact up to and including the record's next 1.
2. The index of that next 1 among independent Bernoullis p_j has the CDF 1 - prod_{j' <= j} (1 - p_j'). It is
   drawn by inversion with one uniform per record and pass (the first j with prod (1 - p) < u): the same draw
   as sampling every column and taking the first 1, without the per-column noise.
3. The 1 is fixed, the first layer of the fine head is updated by one weight row (no matmul), and the record
   continues from the next column; a record whose undecided columns all drew 0 has finished its row.

So a row costs (its number of ones + 1) fine passes at most, and a batch as many as its fullest record.
Structural zeros (encoding.py) are never sampled. Each record also carries the codes it has generated so far
(the fine head's "seen codes" terms, added to the logits) and the running sums of its clock (the coarse
module's age and time inputs), both updated once per row.

Conditions fix static-row columns in one of two exact ways:

* ``"forced"`` (default, the issue's definition): the static row is sampled left to right with the conditioned
  columns forced (a forced 1 is a certain "next 1", a forced 0 is not decided). Columns after a condition are
  drawn from their exact conditionals; columns before it (e.g. the labels, when conditioning on sex) keep their
  unconditional model distribution. Conditioning on the first static column (the first label) is therefore
  exact posterior conditioning.
* ``"posterior"``: p(record | conditions) exactly, by rejection on the static row alone -- it depends only on
  the start row, so a rejected static row costs a few fine passes and no coarse step. Costs 1 / p(conditions)
  static rows per record; a condition rarer than 1 / ``MAX_ATTEMPTS`` under the model is an error.

Randomness: every uniform is a counter-based hash of (run key, patient index, row, pass), the run key drawn
from the caller's ``torch.Generator``. Patient i therefore depends only on (seed, i): not on the batch size,
the chunking, or which other records are still running -- up to the last bit of batched matrix products,
which could flip a draw that lands within about 1e-7 of its threshold (not seen in practice: 1,000 patients of
a trained model at batch sizes 7, 100, 333 and 1,000 came out identical, on one and on two threads).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError
from ehrsynth.models.conditions import Conditions
from ehrsynth.models.halo.encoding import FIRST_VISIT, STATIC, VISIT, ColumnLayout, bin_index, decode_records
from ehrsynth.models.halo.network import FineWeights, HaloNetwork, clock_features, coarse_features, fine_weights

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MAX_ATTEMPTS = 10_000  # static rows tried per record by posterior conditioning


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014) on a uint64 array (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_keys(key: int, patients: np.ndarray, row: int) -> np.ndarray:
    """(n,) uint64 hash of (run key, patient, row): the root of the uniforms a patient's row consumes."""
    z = _splitmix64(np.asarray(patients, dtype=np.uint64) ^ np.uint64(key))
    return _splitmix64(z ^ np.uint64(row))


def stream_uniforms(keys: np.ndarray, draw: int) -> np.ndarray:
    """(n,) float64 uniforms in (0, 1], the ``draw``-th of each stream (53 random bits)."""
    z = _splitmix64(keys ^ np.uint64(draw))
    return ((z >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53


def run_key(generator: torch.Generator) -> int:
    """The run key every uniform of a sampling run derives from, drawn from ``generator``."""
    return int(torch.randint(0, 2**62, (), generator=generator))


@dataclass
class PassCounts:
    """Fine-head passes spent on visit rows (the static row excluded), for benchmarks."""

    passes: int = 0
    visit_steps: int = 0  # batch-level visit rows (one per coarse step after the static row)
    visits: int = 0  # record-level visit rows sampled (including the end rows)
    per_step: list[int] = field(default_factory=list)


def closing_positions(layout: ColumnLayout) -> np.ndarray:
    """(C + 1,) int64, in fine-order positions: the last position a 1 at position i decides -- i itself, the
    last of its one-hot group (groups stay contiguous in the fine order), or every position for the end token
    (an end row holds nothing else) -- and C at index C ("none left")."""
    rank = layout.rank
    close = np.arange(layout.n_columns + 1, dtype=np.int64)
    for a, b in layout.group_spans():
        close[rank[a]:rank[b - 1] + 1] = rank[b - 1]
    close[rank[layout.end]] = layout.n_columns - 1
    close[-1] = layout.n_columns
    return close


def parse_conditions(layout: ColumnLayout, conditions: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Static-row conditions (:class:`~ehrsynth.models.conditions.Conditions`) -> ((C,) columns forced to 1,
    (C,) columns forced to 0). Keys: labels "0"/"1", ``"sex"`` "F"/"M", ``"age"`` in years (fixes its bucket).

    Raises:
        ConfigError: for a key the model does not model, a bad value, or conflicting values (all shown).
    """
    parsed = Conditions.parse(conditions, labels=layout.label_names, sex=layout.sex, age=bool(layout.age_edges))
    ones = np.zeros(layout.n_columns, dtype=bool)
    zeros = np.zeros(layout.n_columns, dtype=bool)
    for name, bit in parsed.labels.items():
        (ones if bit else zeros)[layout.label_start + layout.label_names.index(name)] = True
    if parsed.sex is not None:
        zeros[layout.sex_start:layout.age_start] = True
        ones[layout.sex_start + parsed.sex] = True
    if parsed.age is not None:
        zeros[layout.age_start:layout.gap_start] = True
        ones[layout.age_start + int(bin_index(np.array([parsed.age]), layout.age_edges)[0])] = True
    zeros &= ~ones
    return ones, zeros


def stick_breaking(log_probs: torch.Tensor, log_rest: torch.Tensor | None = None) -> torch.Tensor:
    """(n, K) log(1 - p_k) of the chain of Bernoullis that draws the categorical ``log_probs`` (n, K) -- plus
    an outcome "none of them" of log-probability ``log_rest`` (n,), when given -- as "first 1 at k": p_k is
    the probability of k given that none before it was chosen. Without a rest the last is certain (-inf)."""
    rest = torch.full_like(log_probs[:, :1], float("-inf")) if log_rest is None else log_rest[:, None]
    tails = torch.logcumsumexp(torch.cat([log_probs, rest], 1).flip(1), dim=1).flip(1)  # (n, K+1) P(>= k)
    keep = tails[:, 1:] - tails[:, :-1]
    return torch.where(torch.isinf(log_probs) & (log_probs < 0), 0.0, keep)  # an impossible outcome: skipped


def sample_row(
    weights: FineWeights,
    h: torch.Tensor,
    pending: torch.Tensor,
    *,
    must: torch.Tensor | None,
    close_to: torch.Tensor,
    end: int,
    keys: np.ndarray,
    blocks: list[tuple[int, int]],
    first: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Exact per-record sampling of one row of every record (see the module docstring). Everything here is
    indexed by fine-order position (:attr:`~.encoding.ColumnLayout.order`), not by column.

    Args:
        weights: the fine head's weights (:func:`~.network.fine_weights`).
        h: (b, d) coarse output of the previous row.
        pending: (b, C) bool, the positions each record decides.
        must: (b, C) bool positions forced to 1 (a subset of ``pending``), or None.
        close_to: (C + 1,) int64 (:func:`closing_positions`): a 1 at position j decides every position up to
            ``close_to[j]``; ``close_to[C] = C`` closes a finished row.
        end: the end token's position (a 1 before it, when it comes last, rules it out).
        keys: (b,) uint64 random streams of the records' rows (:func:`stream_keys`).
        blocks: fine-order spans of the categorical groups (one softmax each).
        first: (b, V + 2) log-probabilities of a visit row's first step {end (position 0), codes (positions
            1..V), no code}, or None for the static row.
        shift: (b, C) terms added to every record's logits (the "seen before" terms), or None.

    Returns:
        ((b, C) float32 sampled row in fine order, number of fine passes, (b,) float64 log-probability of
        each sampled row: the sum over passes of log P(this pass's next 1, or none)).
    """
    b, C = pending.shape
    device = h.device
    x = torch.zeros(b * C, device=device)
    columns = torch.arange(C, device=device)
    any_pending = pending.any(0).nonzero()
    hi = int(any_pending.max()) + 1 if len(any_pending) else 0  # no position from hi on is decided here
    cols = torch.cat([weights.cols, weights.cols.new_zeros(1, weights.cols.shape[1])])  # (C+1, H), row C = 0
    direct = None if weights.direct is None else torch.cat([weights.direct, weights.direct.new_zeros(1, C)])
    # the state of the records still sampling (a of them), compacted as they finish
    rows = torch.arange(b, device=device)  # their batch rows
    z1 = torch.addmm(weights.bias1, h, weights.hist)  # (a, H): layer 1 with every column at 0
    zd = None if direct is None else h.new_zeros(b, C)  # (a, C): direct terms of the ones fixed so far
    prefix_in = None if weights.prefix_in is None else torch.cat(
        [weights.prefix_in, weights.prefix_in.new_zeros(1, weights.prefix_in.shape[1])])  # (C+1, r), row C = 0
    zp = None if prefix_in is None else h.new_zeros(b, prefix_in.shape[1])  # (a, r): sum of v_j of the ones
    pending = pending.clone()
    must = None if must is None else must.clone()
    cursor = torch.zeros(b, dtype=torch.long, device=device)
    log_prob = torch.zeros(b, dtype=torch.float64, device=device)
    passes = 0
    while True:
        live = pending.any(1)  # records with a position left to decide
        if not bool(live.all()):
            rows, z1, pending, cursor = rows[live], z1[live], pending[live], cursor[live]
            zd = None if zd is None else zd[live]
            zp = None if zp is None else zp[live]
            keys = keys[live.cpu().numpy()]
            must = None if must is None else must[live]
            first = None if first is None else first[live]
            shift = None if shift is None else shift[live]
        if len(rows) == 0:
            break
        lo = int(cursor.min())
        logits = torch.addmm(weights.bias2[lo:hi], torch.relu(z1), weights.out[:, lo:hi])  # (a, hi-lo)
        if zd is not None:
            logits = logits + zd[:, lo:hi]
        if zp is not None:
            logits = logits + zp @ weights.prefix_out[lo:hi].T
        if shift is not None:
            logits = logits + shift[:, lo:hi]
        log_keep = F.logsigmoid(-logits)  # log(1 - p_j): the Bernoulli chain
        for a, z in blocks:  # a categorical group as the chain that draws it (its logits see nothing of it)
            if a >= lo and z <= hi:
                log_keep[:, a - lo:z - lo] = stick_breaking(torch.log_softmax(logits[:, a - lo:z - lo], 1))
        if passes == 0 and first is not None:  # a visit row's first step: {end, codes} with "no code" the rest
            V = first.shape[1] - 2
            log_keep[:, :V + 1] = stick_breaking(first[:, :V + 1], first[:, V + 1])
        log_keep = torch.where(pending[:, lo:hi], log_keep, 0.0)  # undecided positions only
        if must is not None:
            log_keep = log_keep.masked_fill(must[:, lo:hi], float("-inf"))
        survival = torch.cumsum(log_keep, dim=1, dtype=torch.float64)  # log P(no 1 in lo..j)
        threshold = torch.from_numpy(np.log(stream_uniforms(keys, passes))).to(device)
        j = lo + (survival >= threshold[:, None]).sum(1)  # the next 1, or hi when every position drew 0
        passes += 1
        hit = j < hi
        # log P(first 1 at j) = log P(none before j) + log p_j; log P(none) = the survival over the whole range
        at = (j - lo).clamp(max=hi - lo - 1)[:, None]
        before = torch.where(at > 0, survival.gather(1, (at - 1).clamp(min=0)), 0.0)[:, 0]
        step = torch.log(-torch.expm1(survival.gather(1, at)[:, 0] - before))
        log_prob[rows] += torch.where(hit, before + step, survival[:, -1])
        j = torch.where(hit, j, C)
        x[(rows * C + j)[hit]] = 1.0
        z1 += cols[j]  # fixing x_j = 1 adds position j's first-layer weights (row C adds nothing)
        if zd is not None:
            zd += direct[j]
        if zp is not None:
            zp += prefix_in[j]
        cursor = j + 1
        pending &= columns[None, :] > close_to[j][:, None]  # decided: up to j, or to the end of j's group
        pending[:, end] &= ~hit  # a row with a 1 is a visit, not the end row (a no-op when the end comes first)
        if must is not None:
            must &= pending
    return x.view(b, C), passes, log_prob


@torch.no_grad()
def sample_batch(
    network: HaloNetwork,
    layout: ColumnLayout,
    patients: np.ndarray,
    *,
    key: int,
    weights: FineWeights,
    forced: tuple[np.ndarray, np.ndarray] | None = None,
    condition: Literal["forced", "posterior"] = "forced",
    counts: PassCounts | None = None,
    log_prob: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample the records of global patient indices ``patients`` together (``forced``: the columns forced to
    1 and to 0 by :func:`parse_conditions`, applied as ``condition`` says; see the module docstring).
    ``log_prob`` (b,) float64, when given, receives the log-probability of each sampled record: the sum of the
    sampler's draws (without conditions it equals :mod:`.likelihood`'s log p(record)).

    Returns:
        (n_visits (b,), patient (N,), row (N,), column (N,)): the visits of each record and the ones of its
        static and visit rows (local patient indices; no start/end tokens).
    """
    coarse, n_ctx, device = network.coarse, network.n_ctx, network.device
    b, C = len(patients), layout.n_columns
    table = torch.as_tensor(layout.free_table(), device=device)
    close_to = torch.as_tensor(closing_positions(layout), device=device)
    order, rank = weights.order.to(device), torch.as_tensor(layout.rank, device=device)
    end = int(rank[layout.end])  # the end token's fine-order position
    blocks = [(int(layout.rank[a]), int(layout.rank[b - 1]) + 1) for a, b in layout.group_spans()]
    forced_one = forced_zero = None
    if forced is not None and forced[0].any() | forced[1].any():
        forced_one, forced_zero = (torch.as_tensor(f, device=device) for f in forced)
    cache = coarse.new_cache(b)
    alive = torch.arange(b, device=device)  # batch rows of the unfinished records
    x = torch.zeros(b, 1, C, device=device)
    x[:, 0, layout.start] = 1.0
    V = layout.n_codes
    seen_terms = weights.seen_chain is not None  # the fine head's "seen before" terms
    track = seen_terms or network.history_codes > 0
    seen = torch.zeros(b, V, device=device) if track else None  # codes recorded so far
    clock = network.clock
    running = None if clock is None else torch.zeros(b, clock.shape[1], device=device)  # the clock's sums
    n_visits = np.full(b, n_ctx - 3, dtype=np.int64)  # records that never draw the end fill the window
    found: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    for row in range(1, n_ctx - 1):
        if running is not None:
            running += x[:, 0] @ clock
        features = coarse_features(None if running is None else clock_features(running)[:, None],
                                   seen[:, None] if network.history_codes else None)
        h = coarse(x, cache, features=features)[:, -1]  # (a, d) summary of rows < row
        kind = STATIC if row == 1 else FIRST_VISIT if row == 2 else VISIT
        pending = table[kind].expand(len(alive), C).clone()
        must = None
        if kind == STATIC and forced_one is not None and condition == "forced":
            pending &= ~forced_zero
            pending |= forced_one
            must = forced_one.expand(len(alive), C).clone()
        ids = patients[alive.cpu().numpy()]  # global patient indices of the unfinished records
        pending = pending[:, order]  # columns -> fine-order positions
        must = None if must is None else must[:, order]
        first = shift = None
        if kind != STATIC:  # the first step's categorical {end, codes, no code}, masked to what is valid
            allowed = torch.ones(len(alive), layout.n_first, dtype=torch.bool, device=device)
            allowed[:, 0] = pending[:, end]
            allowed[:, -1] = layout.empty_visits
            first = torch.addmm(weights.first_bias, h, weights.first)
            if seen_terms:
                first[:, 1:V + 1] += seen * weights.seen_first
                shift = torch.zeros(len(alive), C, device=device)
                shift[:, :V] = seen
                shift = shift[:, order] * weights.seen_chain  # fine order
            first = torch.log_softmax(first.masked_fill(~allowed, float("-inf")), dim=1)  # (a, V + 2)
        if kind == STATIC and forced_one is not None and condition == "posterior":
            sampled, passes = _posterior_static_row(weights, h, pending, forced_one[order], forced_zero[order],
                                                    close_to, end, key, ids, n_ctx, blocks)
        else:
            sampled, passes, row_log_prob = sample_row(weights, h, pending, must=must, close_to=close_to, end=end,
                                                       keys=stream_keys(key, ids, row), blocks=blocks, first=first,
                                                       shift=shift)
            if log_prob is not None:
                log_prob[alive.cpu().numpy()] += row_log_prob.cpu().numpy()
        sampled = sampled[:, rank]  # fine-order positions -> columns
        if counts is not None and kind != STATIC:
            counts.passes += passes
            counts.visit_steps += 1
            counts.visits += len(alive)
            counts.per_step.append(passes)
        r, c = sampled[:, :layout.end].nonzero(as_tuple=True)
        found.append((alive[r], row, c))
        if seen is not None:
            seen = torch.maximum(seen, sampled[:, :V])
        ended = sampled[:, layout.end] == 1
        if ended.any():
            n_visits[alive[ended].cpu().numpy()] = row - 2
            keep = ~ended
            cache.keep(keep)
            alive, sampled = alive[keep], sampled[keep]
            seen = None if seen is None else seen[keep]
            running = None if running is None else running[keep]
            if len(alive) == 0:
                break
        x = sampled.unsqueeze(1)  # (a, 1, C)
    patient = torch.cat([p for p, _, _ in found]).cpu().numpy()
    rows = np.concatenate([np.full(len(p), r, dtype=np.int64) for p, r, _ in found])
    column = torch.cat([c for _, _, c in found]).cpu().numpy()
    return n_visits, patient, rows, column


def _posterior_static_row(weights, h, pending, forced_one, forced_zero, close_to, end, key, patients, n_ctx,
                          blocks):
    """Static rows drawn until each matches the conditions; attempt a of a record uses its own random stream
    (row index 1 + a * n_ctx, never a visit row's), so a record's result does not depend on the others."""
    b, C = pending.shape
    out = torch.zeros(b, C, device=h.device)
    todo = torch.arange(b, device=h.device)
    passes = 0
    for attempt in range(MAX_ATTEMPTS):
        keys = stream_keys(key, patients[todo.cpu().numpy()], 1 + attempt * n_ctx)
        rows, n, _ = sample_row(weights, h[todo], pending[todo], must=None, close_to=close_to, end=end, keys=keys,
                                blocks=blocks)
        passes += n
        ok = rows[:, forced_one].all(1) & ~rows[:, forced_zero].bool().any(1)
        out[todo[ok]] = rows[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            return out, passes
    raise ConfigError(f"posterior conditioning found no static row matching the conditions in {MAX_ATTEMPTS} "
                      f"tries for {len(todo)} record(s): the conditions are too rare under the model; use "
                      f"condition='forced'")


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate (the one generation config; the model and the seed are separate).

    Attributes:
        conditions: static-row conditions as (key, value) pairs (a dict is accepted): see :func:`parse_conditions`.
        condition: how conditions apply: ``"forced"`` or ``"posterior"`` (module docstring).
        batch_size: records sampled together (patient i does not depend on it).
        chunk_size: patients per yielded corpus (memory is bounded by the chunk).
        progress: show a tqdm bar.
    """

    conditions: tuple[tuple[str, str], ...] = ()
    condition: Literal["forced", "posterior"] = "forced"
    batch_size: int = 256
    chunk_size: int = 10_000
    progress: bool = False

    def __post_init__(self) -> None:
        pairs = self.conditions.items() if isinstance(self.conditions, dict) else (self.conditions or ())
        object.__setattr__(self, "conditions", tuple((str(k), str(v)) for k, v in pairs))
        for name in ("batch_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.condition not in ("forced", "posterior"):
            raise ConfigError(f"condition must be 'forced' or 'posterior', got {self.condition!r}")


@dataclass(frozen=True)
class Decoding:
    """What turns sampled columns into a corpus: the model vocabulary, the days each gap bin decodes to and
    the years each age bucket decodes to."""

    codes: tuple[str, ...]
    gap_days: tuple[float, ...]
    age_years: tuple[float, ...]


def sample_stream(
    network: HaloNetwork,
    layout: ColumnLayout,
    decoding: Decoding,
    n: int,
    *,
    generator: torch.Generator,
    config: GenerationConfig = GenerationConfig(),
    counts: PassCounts | None = None,
) -> Iterator[PatientCorpus]:
    """Sample ``n`` patients in corpora of up to ``config.chunk_size``, with a tqdm bar when asked.

    Args:
        network: the coarse and fine modules.
        layout: their column layout.
        decoding: how sampled columns decode.
        n: number of patients.
        generator: seeds the run (one key is drawn from it).
        config: conditions, batch and chunk sizes, progress.
        counts: filled with fine-pass counts when given.

    Raises:
        ConfigError: for a bad ``n`` or condition.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    conditions = dict(config.conditions)
    forced = parse_conditions(layout, conditions)
    key = run_key(generator)
    modes = (network.coarse.training, network.fine.training)
    network.coarse.eval()
    network.fine.eval()
    try:
        weights = fine_weights(network.fine)
        with tqdm(total=n, unit="patient", disable=not config.progress, desc="HALO sampling") as bar:
            for first in range(0, n, config.chunk_size):
                last = min(first + config.chunk_size, n)
                parts = []
                for start in range(first, last, config.batch_size):
                    patients = np.arange(start, min(start + config.batch_size, last), dtype=np.int64)
                    parts.append(sample_batch(network, layout, patients, key=key, weights=weights, forced=forced,
                                              condition=config.condition, counts=counts))
                    bar.update(len(patients))
                yield _decode(layout, decoding, network.n_ctx - 3, first, parts, conditions, config.condition)
    finally:
        network.coarse.train(modes[0])
        network.fine.train(modes[1])


def sample(
    network: HaloNetwork,
    layout: ColumnLayout,
    decoding: Decoding,
    n: int,
    *,
    generator: torch.Generator,
    config: GenerationConfig = GenerationConfig(),
    counts: PassCounts | None = None,
) -> PatientCorpus:
    """Sample ``n`` patients as one corpus (:func:`sample_stream` with a single chunk)."""
    chunk = max(int(n), 1) if isinstance(n, (int, np.integer)) else 1
    return next(sample_stream(network, layout, decoding, n, generator=generator,
                              config=replace(config, chunk_size=chunk), counts=counts))


def _decode(layout: ColumnLayout, decoding: Decoding, max_visits: int, first: int, parts: list,
            conditions: dict[str, Any], condition: str) -> PatientCorpus:
    offsets = np.cumsum([0] + [len(p[0]) for p in parts])
    n_visits = np.concatenate([p[0] for p in parts])
    patient = np.concatenate([p[1] + off for p, off in zip(parts, offsets)])
    row = np.concatenate([p[2] for p in parts])
    column = np.concatenate([p[3] for p in parts])
    stats = {"source": "halo", "first_patient": int(first), "conditions": conditions, "condition": condition,
             "records_filling_window": int((n_visits == max_visits).sum())}
    return decode_records(layout, first_patient=first, n_visits=n_visits, patient=patient, row=row, column=column,
                          codes=decoding.codes, gap_days=decoding.gap_days, age_years=decoding.age_years,
                          stats=stats)

"""Records <-> HALO's multi-hot rows.

A record is ``n_ctx`` rows over one column layout (:class:`ColumnLayout`)::

    columns:  [ codes (V) | labels (L) | sex F, M | age buckets (A) | gap bins (G) | start | end | pad ]
    row 0     start token
    row 1     static row: the patient's labels, sex and age-at-first-visit bucket
    row 2     first visit: its codes (no gap token: it is the first)
    row 2+k   visit k: its codes and the bin of the days since visit k-1 (no token when unknown)
    row n+2   end row: only the end token (n = visits kept, at most n_ctx - 3)
    after     padding rows (the pad token); never scored, and causality keeps them from touching earlier rows

Code columns follow the vocabulary ids, which are ordered by descending training count: within a visit the
fine head decides the most frequent codes first. That order is deterministic (the reference shuffled it
without a seed). Histories longer than ``n_ctx - 3`` visits keep their last ``n_ctx - 3`` visits -- the recent
history is what the next visit depends on -- and the age bucket is taken at the first kept visit.

Structure by construction. Every record the model can produce is valid the way the training corpus is:

* the static row holds exactly one sex column and exactly one age bucket (an explicit "unknown" column when
  the training data has unknown sex or age: ``ColumnLayout.sex_unknown`` / ``age_unknown``);
* every visit after the first holds exactly one gap bin ("unknown" only when the training data has unknown gaps);
* a visit holds at least one code unless the training corpus keeps empty visits (``empty_visits``), and the
  first visit row may be the end row only when the training corpus has records without visits.

The fine head decides a row in its fine order -- the end token first, then the columns in layout order -- as a
sequence of exact conditionals of three kinds (:mod:`.likelihood` scores them, :mod:`.sampling` draws them):

* the first step of a visit row is one categorical over {end, code 0, ..., code V-1, no code}: "end" makes the
  row the end row, "no code" (allowed only with ``empty_visits``) an empty visit, code c the visit's lowest code;
* the codes after that first code, and the static row's labels, are Bernoulli columns (MADE chain);
* sex, age bucket and gap bin are one categorical (softmax over the group's columns) each.

Every other column of a row is 0 by construction and is never sampled or scored. The row at index
``n_ctx - 1``, when reached, is the end row by construction (the window is full).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ehrsynth.data.corpus import SEX_NAMES, PatientCorpus, empty_statics, ragged_indices
from ehrsynth.data.vocab import Vocabulary

# row kinds: which columns a row decides
STATIC, FIRST_VISIT, VISIT, UNSCORED = 0, 1, 2, 3
# the validity flags of a layout, learnt from the training corpus (HaloModel keeps them in meta.extra["structure"])
STRUCTURE_FLAGS = ("sex_unknown", "age_unknown", "gap_unknown", "empty_visits", "zero_visits")


def bin_index(values: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Bin of each value given lower ``edges`` (last bin open, values below edges[0] in bin 0); -1 for NaN.

    Example:
        >>> bin_index(np.array([0.0, 3.0, 800.0, np.nan]), (0.0, 1.0, 7.0, 730.0)).tolist()
        [0, 1, 3, -1]
    """
    values = np.asarray(values, dtype=np.float64)
    bins = np.clip(np.searchsorted(np.asarray(edges), values, side="right") - 1, 0, max(len(edges) - 1, 0))
    return np.where(np.isnan(values), -1, bins).astype(np.int64)


def bin_values(edges: tuple[float, ...]) -> tuple[float, ...]:
    """The value a generated bin decodes to: the midpoint of a closed bin, the lower edge of the open last one.

    Example:
        >>> bin_values((0.0, 1.0, 7.0))
        (0.5, 4.0, 7.0)
    """
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    return tuple(mids + list(edges[-1:]))


@dataclass(frozen=True)
class ColumnLayout:
    """Where each kind of column sits, and which records are valid; see the module docstring.

    Attributes:
        n_codes: vocabulary size V (code id i is column i).
        label_names: labels on the static row.
        sex: whether the static row has the sex group (F, M, and "unknown" with ``sex_unknown``).
        age_edges: lower edges of the age buckets (one column each, plus "unknown" with ``age_unknown``).
        gap_edges: lower edges of the gap bins (one column each, plus "unknown" with ``gap_unknown``).
        sex_unknown, age_unknown, gap_unknown: the training data has unknown values of that group.
        empty_visits: visits without a code are valid (the training corpus keeps empty visits).
        zero_visits: records without a visit are valid.
    """

    n_codes: int
    label_names: tuple[str, ...]
    sex: bool
    age_edges: tuple[float, ...]
    gap_edges: tuple[float, ...]
    sex_unknown: bool = False
    age_unknown: bool = False
    gap_unknown: bool = False
    empty_visits: bool = False
    zero_visits: bool = False

    @property
    def label_start(self) -> int:
        return self.n_codes

    @property
    def sex_start(self) -> int:
        return self.label_start + len(self.label_names)

    @property
    def age_start(self) -> int:
        return self.sex_start + ((2 + self.sex_unknown) if self.sex else 0)

    @property
    def gap_start(self) -> int:
        return self.age_start + ((len(self.age_edges) + self.age_unknown) if self.age_edges else 0)

    @property
    def start(self) -> int:
        """Column of the start token (then end, then pad)."""
        return self.gap_start + ((len(self.gap_edges) + self.gap_unknown) if self.gap_edges else 0)

    @property
    def end(self) -> int:
        return self.start + 1

    @property
    def pad(self) -> int:
        return self.start + 2

    @property
    def n_columns(self) -> int:
        return self.start + 3

    @property
    def order(self) -> np.ndarray:
        """(C,) int64: the column the fine head decides at each position (the end token, then the columns)."""
        columns = np.arange(self.n_columns, dtype=np.int64)
        return np.concatenate([[self.end], columns[columns != self.end]])

    @property
    def rank(self) -> np.ndarray:
        """(C,) int64: the fine-order position of each column (the inverse of :attr:`order`)."""
        return np.argsort(self.order)

    def column_names(self) -> list[str]:
        """Human-readable names of all columns, in order (codes by their vocabulary index)."""
        def bins(kind: str, edges: tuple[float, ...], unknown: bool) -> list[str]:
            if not edges:
                return []
            names = [f"{kind}:[{lo:g},{hi:g})" for lo, hi in zip(edges, (*edges[1:], np.inf))]
            return names + ([f"{kind}:unknown"] if unknown else [])

        names = [f"code:{i}" for i in range(self.n_codes)]
        names += [f"label:{n}" for n in self.label_names]
        names += ([f"sex:{s}" for s in SEX_NAMES] + (["sex:unknown"] if self.sex_unknown else [])) if self.sex else []
        names += bins("age", self.age_edges, self.age_unknown) + bins("gap", self.gap_edges, self.gap_unknown)
        return names + ["<start>", "<end>", "<pad>"]

    def free_table(self) -> np.ndarray:
        """(4, C) bool: the columns each row kind decides (STATIC, FIRST_VISIT, VISIT, UNSCORED)."""
        table = np.zeros((4, self.n_columns), dtype=bool)
        table[STATIC, self.label_start:self.gap_start] = True
        table[FIRST_VISIT, :self.n_codes] = True
        table[FIRST_VISIT, self.end] = self.zero_visits
        table[VISIT, :self.n_codes] = True
        table[VISIT, self.end] = True
        table[VISIT, self.gap_start:self.start] = True
        return table

    def group_spans(self) -> list[tuple[int, int]]:
        """Column spans of the categorical groups that exist: sex, age bucket, gap bin."""
        spans = [(self.sex_start, self.age_start), (self.age_start, self.gap_start), (self.gap_start, self.start)]
        return [(a, b) for a, b in spans if b > a]

    def group_first(self) -> np.ndarray:
        """(C,) int64 in fine order: the first position of each position's categorical group (itself when it is
        in none). A group's logits see only the columns before the group, so they form one softmax."""
        first = np.arange(self.n_columns, dtype=np.int64)
        rank = self.rank
        for a, b in self.group_spans():
            first[rank[a]:rank[b - 1] + 1] = rank[a]
        return first

    @property
    def n_first(self) -> int:
        """Outcomes of a visit row's first step: end, the V codes, and "no code"."""
        return self.n_codes + 2


def clock_extra(dates: Any, gap_edges: tuple[float, ...], age_edges: tuple[float, ...]) -> dict[str, list[float]]:
    """The ``meta.extra`` entries of the clock: each gap bin and age bucket counted at the mean of its training
    values (from the date model ``dates``, :mod:`ehrsynth.models.dates`), not its edge (the open last gap bin
    would count as its lower edge)."""
    from ehrsynth.models.dates import bin_means

    return {"clock_gap_days": bin_means(dates.gap_quantiles, bin_values(gap_edges)),
            "clock_age_years": bin_means(dates.age_quantiles, bin_values(age_edges))}


def model_clock(layout: ColumnLayout, extra: dict[str, Any], gap_days: tuple[float, ...],
                age_years: tuple[float, ...]) -> torch.Tensor:
    """The (C, 3) clock matrix of a model from its ``meta.extra`` (:func:`clock_extra`), falling back to the
    bins' decoded values ``gap_days`` / ``age_years`` for a model saved without those entries."""
    return torch.from_numpy(clock_matrix(layout, tuple(extra.get("clock_gap_days", gap_days)),
                                         tuple(extra.get("clock_age_years", age_years))))


def clock_matrix(layout: ColumnLayout, gap_days: tuple[float, ...], age_years: tuple[float, ...]) -> np.ndarray:
    """(C, 3) float32: what a 1 in each column adds to the running (age years, elapsed days, age known) of
    HALO's clock (:func:`~.network.row_clock`): an age bucket its value in years, a gap bin its days; unknown
    columns add nothing."""
    clock = np.zeros((layout.n_columns, 3), dtype=np.float32)
    if layout.age_edges:
        a = layout.age_start
        clock[a:a + len(layout.age_edges), 0] = age_years
        clock[a:a + len(layout.age_edges), 2] = 1.0
    if layout.gap_edges:
        g = layout.gap_start
        clock[g:g + len(layout.gap_edges), 1] = gap_days
    return clock


@dataclass(frozen=True)
class EncodedRecords:
    """A batch of records as the flat positions of its ones in a (B, T, C) array.

    Attributes:
        ones: (N,) int64 flat indices ``(b * T + row) * C + column`` of the ones.
        lengths: (B,) int64 visits kept per record; T = lengths.max() + 3.
        truncated_visits: (B,) int64 visits dropped from the front of each record (over n_ctx - 3).
        unknown_codes: (K,) corpus code ids of the kept visits that ``code_map`` maps to -1 (dropped), with
            repetition (one entry per occurrence).
    """

    ones: np.ndarray
    lengths: np.ndarray
    truncated_visits: np.ndarray
    unknown_codes: np.ndarray


def encode_records(
    corpus: PatientCorpus,
    patients: np.ndarray,
    layout: ColumnLayout,
    *,
    max_visits: int,
    code_map: np.ndarray | None = None,
    label_columns: np.ndarray | None = None,
) -> EncodedRecords:
    """Encode ``patients`` of ``corpus`` (vectorised over the CSR arrays: no loop over visits or codes).

    Args:
        corpus: the corpus.
        patients: (B,) patient indices.
        layout: the column layout.
        max_visits: keep at most this many visits, the last ones.
        code_map: (corpus vocab size,) model column of each corpus code id, -1 to drop it; None = identity.
        label_columns: (len(layout.label_names),) corpus label column of each model label; None = identity.

    Returns:
        The :class:`EncodedRecords` of the batch.
    """
    patients = np.asarray(patients, dtype=np.int64)
    B, C = len(patients), layout.n_columns
    vo, co = np.asarray(corpus.visit_offsets), np.asarray(corpus.code_offsets)
    n_visits = vo[patients + 1] - vo[patients]
    keep = np.minimum(n_visits, max_visits)
    first = vo[patients + 1] - keep
    T = int(keep.max()) + 3 if B else 3

    # visits: batch row, record row (2, 3, ...)
    visits = ragged_indices(first, vo[patients + 1])  # (Vb,)
    v_batch = np.repeat(np.arange(B), keep)
    v_row = 2 + np.arange(len(visits)) - np.repeat(np.cumsum(keep) - keep, keep)

    # codes of those visits
    per_visit = co[visits + 1] - co[visits]
    occurrences = ragged_indices(co[visits], co[visits + 1])
    columns = np.asarray(corpus.codes)[occurrences].astype(np.int64)
    c_batch, c_row = np.repeat(v_batch, per_visit), np.repeat(v_row, per_visit)
    unknown = np.zeros(0, dtype=np.int64)
    if code_map is not None:
        mapped = code_map[columns]
        known = mapped >= 0
        unknown = columns[~known]
        columns, c_batch, c_row = mapped[known], c_batch[known], c_row[known]
    parts = [(c_batch, c_row, columns)]

    days = np.asarray(corpus.visit_days)  # indexed per batch, never converted whole
    if layout.gap_edges:
        later = v_row > 2
        gap = days[visits[later]].astype(np.float64) - days[visits[later] - 1]
        bins = bin_index(gap, layout.gap_edges)
        if layout.gap_unknown:
            bins[bins < 0] = len(layout.gap_edges)
        known = bins >= 0
        parts.append((v_batch[later][known], v_row[later][known], layout.gap_start + bins[known]))

    # static row
    if layout.label_names:
        labels = np.asarray(corpus.labels)[patients]
        if label_columns is not None:
            labels = labels[:, label_columns]
        lb, lc = np.nonzero(labels)
        parts.append((lb, np.ones_like(lb), layout.label_start + lc))
    if layout.sex:
        sex = np.asarray(corpus.sex)[patients].astype(np.int64)
        if layout.sex_unknown:
            sex[sex < 0] = len(SEX_NAMES)
        known = np.flatnonzero(sex >= 0)
        parts.append((known, np.ones_like(known), layout.sex_start + sex[known]))
    if layout.age_edges:
        # the age at the first kept visit (visit_days counts from the patient's first visit)
        shift = np.zeros(B)
        has = keep > 0
        shift[has] = np.nan_to_num(days[first[has]].astype(np.float64)) / 365.25
        buckets = bin_index(np.asarray(corpus.age_at_first_visit)[patients].astype(np.float64) + shift,
                            layout.age_edges)
        if layout.age_unknown:
            buckets[buckets < 0] = len(layout.age_edges)
        known = np.flatnonzero(buckets >= 0)
        parts.append((known, np.ones_like(known), layout.age_start + buckets[known]))

    # start, end and pad tokens
    batch = np.arange(B)
    parts.append((batch, np.zeros(B, dtype=np.int64), np.full(B, layout.start)))
    parts.append((batch, keep + 2, np.full(B, layout.end)))
    pad_rows = ragged_indices(keep + 3, np.full(B, T))
    pad_batch = np.repeat(batch, T - keep - 3)
    parts.append((pad_batch, pad_rows, np.full(len(pad_rows), layout.pad)))

    b, r, c = (np.concatenate([np.asarray(p[i], dtype=np.int64) for p in parts]) for i in range(3))
    return EncodedRecords(ones=(b * T + r) * C + c, lengths=keep.astype(np.int64),
                          truncated_visits=(n_visits - keep).astype(np.int64), unknown_codes=unknown)


def dense_rows(ones: torch.Tensor, lengths: torch.Tensor, n_columns: int, n_rows: int | None = None) -> torch.Tensor:
    """(B, T, C) float32 multi-hot rows from an encoded batch, on the device of ``ones``. ``n_rows`` (T, from
    ``collate``) spares reading the longest length back from the device."""
    B = lengths.shape[0]
    T = n_rows if n_rows is not None else (int(lengths.max()) + 3 if B else 3)
    x = torch.zeros(B * T * n_columns, device=ones.device)
    x[ones] = 1.0
    return x.view(B, T, n_columns)  # (B, T, C)


def input_rows(lengths: np.ndarray, device: torch.device | None = None) -> dict[str, Any]:
    """``{"input_rows": (N,) int64, "n_rows": T}`` of records with ``lengths`` visits: T = longest + 3 rows, and
    the flat positions in (B, T-1) of the input rows that exist (rows 0 .. length + 1 of each record)."""
    n_rows = int(lengths.max()) + 3 if len(lengths) else 3
    rows = np.flatnonzero(np.arange(n_rows - 1)[None, :] <= np.asarray(lengths)[:, None] + 1)
    return {"input_rows": torch.from_numpy(rows).to(device or "cpu"), "n_rows": n_rows}


def row_kinds(rows: torch.Tensor, lengths: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Kind of record row ``rows`` of records with ``lengths`` visits (broadcast): the static row, visits, the
    end row (a visit-kind row that holds only the end token), and UNSCORED for padding and for an end row forced
    by a full window (row n_ctx - 1)."""
    last = lengths + 2  # the end row
    kind = torch.where(rows <= last, VISIT, UNSCORED)
    kind = torch.where(rows == 2, FIRST_VISIT, kind)
    kind = torch.where(rows == 1, STATIC, kind)
    return torch.where((rows == n_ctx - 1) & (rows == last), UNSCORED, kind)


def target_row_kinds(lengths: torch.Tensor, n_rows: int, n_ctx: int) -> torch.Tensor:
    """(B, T-1) kind of target rows 1..T-1 (:func:`row_kinds`)."""
    rows = torch.arange(1, n_rows, device=lengths.device)  # (T-1,)
    return row_kinds(rows[None, :], lengths[:, None], n_ctx)


def decode_records(
    layout: ColumnLayout,
    *,
    first_patient: int,
    n_visits: np.ndarray,
    patient: np.ndarray,
    row: np.ndarray,
    column: np.ndarray,
    codes: tuple[str, ...],
    gap_days: tuple[float, ...],
    age_years: tuple[float, ...],
    stats: dict,
) -> PatientCorpus:
    """Sampled ones -> a :class:`PatientCorpus` (vectorised).

    Args:
        layout: the column layout.
        first_patient: global index of patient 0 here (ids are ``halo-<index>``).
        n_visits: (P,) visits of each record.
        patient, row, column: (N,) the ones of the static and visit rows (no start/end/pad tokens).
        codes: the model vocabulary.
        gap_days: days each gap bin decodes to; age_years likewise for age buckets.
        stats: provenance for ``corpus.stats``.
    """
    P = len(n_visits)
    visit_offsets = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(n_visits, out=visit_offsets[1:])
    n_total = int(visit_offsets[-1])

    in_visit = row >= 2
    visit = visit_offsets[patient[in_visit]] + row[in_visit] - 2
    vcol = column[in_visit]
    is_code = vcol < layout.n_codes
    order = np.lexsort((vcol[is_code], visit[is_code]))  # by visit, then code id (ascending)
    code_visit = visit[is_code][order]
    code_ids = vcol[is_code][order].astype(np.int32)
    code_offsets = np.zeros(n_total + 1, dtype=np.int64)
    np.cumsum(np.bincount(code_visit, minlength=n_total), out=code_offsets[1:])

    # visit_days: 0 at the first visit, then the running sum of decoded gaps (NaN from an unknown gap on)
    gaps = np.full(n_total, np.nan)
    first_visits = visit_offsets[:-1][n_visits > 0]
    gaps[first_visits] = 0.0
    is_gap = (vcol >= layout.gap_start) & (vcol < layout.start)
    gaps[visit[is_gap]] = np.append(np.asarray(gap_days, dtype=np.float64), np.nan)[vcol[is_gap] - layout.gap_start]
    unknown = np.cumsum(np.isnan(gaps))
    running = np.cumsum(np.nan_to_num(gaps))
    start_of = np.repeat(visit_offsets[:-1], n_visits)  # first visit of each visit's patient
    visit_days = running - running[start_of]
    visit_days[unknown - unknown[start_of] > 0] = np.nan

    static = ~in_visit
    sp, sc = patient[static], column[static]
    labels = np.zeros((P, len(layout.label_names)), dtype=np.uint8)
    is_label = (sc >= layout.label_start) & (sc < layout.sex_start)
    labels[sp[is_label], sc[is_label] - layout.label_start] = 1
    statics = empty_statics(P)
    is_sex = (sc >= layout.sex_start) & (sc < layout.age_start)
    statics["sex"][sp[is_sex]] = np.where(sc[is_sex] - layout.sex_start < len(SEX_NAMES), sc[is_sex] - layout.sex_start,
                                          -1)
    is_age = (sc >= layout.age_start) & (sc < layout.gap_start)
    ages = np.append(np.asarray(age_years, dtype=np.float32), np.float32(np.nan))  # the last: "unknown"
    statics["age_at_first_visit"][sp[is_age]] = ages[sc[is_age] - layout.age_start]

    ids = np.char.add("halo-", np.arange(first_patient, first_patient + P).astype(str)).astype(object)
    return PatientCorpus(
        patient_ids=ids,
        visit_offsets=visit_offsets,
        code_offsets=code_offsets,
        codes=code_ids,
        visit_days=visit_days,
        visit_start=np.full(n_total, np.datetime64("NaT"), dtype="datetime64[s]"),
        labels=labels,
        label_names=layout.label_names,
        vocab=Vocabulary(tuple(codes), np.bincount(code_ids, minlength=len(codes)).astype(np.int64)),
        split=np.zeros(P, dtype=np.int8),
        stats=stats,
        **statics,
    )

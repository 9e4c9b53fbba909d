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

Fine order. The fine head decides a row's columns in the layout order, except that by default
(``HaloConfig.end_first``) the end token comes first: "is this the end row?" is one Bernoulli given the history,
then a visit's codes given that it is not. Decided last (after every code, as the reference's last column), a
row ends only when all V codes drew 0 -- a probability a lightly trained model puts near zero when it is unsure
whether another visit follows, so its records run on. MIMIC-III demo, small config, 800 steps, seeds 0-3:
1.8 to 39 generated visits per patient with the end token last, 1.1 to 1.9 with it first (data: 1.3). The
column layout is the same either way.

Structural zeros. Each row kind has its "free" columns, the ones the model decides: the static row its
label/sex/age columns; a visit row its codes, its gap bins (not the first visit) and the end token. Every other
column of that row is 0 by construction and is never sampled or scored. Three exact constraints of the record
space are also built in, each triggered only by a 1 earlier in the fine order (so they never break it): one
sex, one age bucket and one gap bin at most (after a 1 in the group the rest of the group is 0), and an end row
holds nothing but the end token (end first: a 1 there closes the row; end last: it is decided only on an
otherwise empty row). The model's distribution over records is the product, over rows and free columns, of the
fine head's Bernoulli conditionals; the sampler draws from it and :mod:`.likelihood` scores it. The row at
index ``n_ctx - 1``, when reached, is the end row by construction (the window is full).
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
    """Where each kind of column sits; see the module docstring for the picture.

    Attributes:
        n_codes: vocabulary size V (code id i is column i).
        label_names: labels on the static row.
        sex: whether the static row has the F and M columns.
        age_edges: lower edges of the age buckets (one column each).
        gap_edges: lower edges of the gap bins (one column each).
        end_first: the fine head decides the end token before the other columns (see the module docstring).
    """

    n_codes: int
    label_names: tuple[str, ...]
    sex: bool
    age_edges: tuple[float, ...]
    gap_edges: tuple[float, ...]
    end_first: bool = True

    @property
    def label_start(self) -> int:
        return self.n_codes

    @property
    def sex_start(self) -> int:
        return self.label_start + len(self.label_names)

    @property
    def age_start(self) -> int:
        return self.sex_start + (2 if self.sex else 0)

    @property
    def gap_start(self) -> int:
        return self.age_start + len(self.age_edges)

    @property
    def start(self) -> int:
        """Column of the start token (then end, then pad)."""
        return self.gap_start + len(self.gap_edges)

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
        """(C,) int64: the column the fine head decides at each position."""
        columns = np.arange(self.n_columns, dtype=np.int64)
        if not self.end_first:
            return columns
        return np.concatenate([[self.end], columns[columns != self.end]])

    @property
    def rank(self) -> np.ndarray:
        """(C,) int64: the fine-order position of each column (the inverse of :attr:`order`)."""
        return np.argsort(self.order)

    def column_names(self) -> list[str]:
        """Human-readable names of all columns, in order (codes by their vocabulary index)."""
        names = [f"code:{i}" for i in range(self.n_codes)]
        names += [f"label:{n}" for n in self.label_names]
        names += [f"sex:{s}" for s in SEX_NAMES] if self.sex else []
        names += [f"age:[{lo:g},{hi:g})" for lo, hi in zip(self.age_edges, (*self.age_edges[1:], np.inf))]
        names += [f"gap:[{lo:g},{hi:g})" for lo, hi in zip(self.gap_edges, (*self.gap_edges[1:], np.inf))]
        return names + ["<start>", "<end>", "<pad>"]

    def free_table(self) -> np.ndarray:
        """(4, C) bool: the columns each row kind decides (STATIC, FIRST_VISIT, VISIT, UNSCORED)."""
        table = np.zeros((4, self.n_columns), dtype=bool)
        table[STATIC, self.label_start:self.gap_start] = True
        table[FIRST_VISIT, :self.n_codes] = True
        table[FIRST_VISIT, self.end] = True
        table[VISIT] = table[FIRST_VISIT]
        table[VISIT, self.gap_start:self.start] = True
        return table

    def groups(self) -> np.ndarray:
        """(C,) int64: the one-hot group of each column (0 sex, 1 age, 2 gap) or -1."""
        group = np.full(self.n_columns, -1, dtype=np.int64)
        group[self.sex_start:self.age_start] = 0
        group[self.age_start:self.gap_start] = 1
        group[self.gap_start:self.start] = 2
        return group

    def group_spans(self) -> list[tuple[int, int]]:
        spans = [(self.sex_start, self.age_start), (self.age_start, self.gap_start), (self.gap_start, self.start)]
        return [(a, b) for a, b in spans if b > a]


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
        known = np.flatnonzero(sex >= 0)
        parts.append((known, np.ones_like(known), layout.sex_start + sex[known]))
    if layout.age_edges:
        # the age at the first kept visit (visit_days counts from the patient's first visit)
        shift = np.zeros(B)
        has = keep > 0
        shift[has] = np.nan_to_num(days[first[has]].astype(np.float64)) / 365.25
        buckets = bin_index(np.asarray(corpus.age_at_first_visit)[patients].astype(np.float64) + shift,
                            layout.age_edges)
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


def target_row_kinds(lengths: torch.Tensor, n_rows: int, n_ctx: int) -> torch.Tensor:
    """(B, T-1) kind of target rows 1..T-1: the static row, visits, the end row (a visit-kind row that holds
    only the end token), and UNSCORED for padding and for an end row forced by a full window (row n_ctx - 1)."""
    rows = torch.arange(1, n_rows, device=lengths.device)  # (T-1,)
    last = lengths[:, None] + 2  # (B, 1) the end row
    kind = torch.full((lengths.shape[0], n_rows - 1), UNSCORED, dtype=torch.int64, device=lengths.device)
    kind = torch.where(rows <= last, torch.tensor(VISIT, device=lengths.device), kind)
    kind = torch.where(rows == 2, torch.tensor(FIRST_VISIT, device=lengths.device), kind)
    kind = torch.where(rows == 1, torch.tensor(STATIC, device=lengths.device), kind)
    return torch.where((rows == n_ctx - 1) & (rows == last), torch.tensor(UNSCORED, device=lengths.device), kind)


def constrained_free(targets: torch.Tensor, kinds: torch.Tensor, layout: ColumnLayout) -> torch.Tensor:
    """(..., C) bool: the columns the model decides in each target row, given the row's own ones.

    The row kind's free columns, minus a one-hot group's columns after its first 1, minus what an end row
    excludes: the columns after an end token of 1, and an end token after a 1 (see the module docstring).
    """
    table = torch.as_tensor(layout.free_table(), device=targets.device)
    free = table[kinds].clone()  # (..., C)
    for a, b in layout.group_spans():
        group = targets[..., a:b]
        seen = torch.cumsum(group, dim=-1) - group  # ones strictly before each column of the group
        free[..., a:b] &= seen == 0
    rank = torch.as_tensor(layout.rank, device=targets.device)
    before, after = rank < rank[layout.end], rank > rank[layout.end]  # (C,) in fine order
    free[..., layout.end] &= (targets * before).sum(-1) == 0
    free &= ~(after & (targets[..., layout.end:layout.end + 1] > 0))
    return free


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
    gaps[visit[is_gap]] = np.asarray(gap_days, dtype=np.float64)[vcol[is_gap] - layout.gap_start]
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
    statics["sex"][sp[is_sex]] = sc[is_sex] - layout.sex_start
    is_age = (sc >= layout.age_start) & (sc < layout.gap_start)
    statics["age_at_first_visit"][sp[is_age]] = np.asarray(age_years, dtype=np.float32)[sc[is_age] - layout.age_start]

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

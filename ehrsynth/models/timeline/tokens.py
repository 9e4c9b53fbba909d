"""Records <-> token sequences of the timeline transformer, and the grammar every sequence obeys.

A patient is one sequence (CEHR-GPT style)::

    [BOS]  labels that are 1 (ascending)  sex  age-bucket   codes of visit 1 (ascending)
           gap  codes of visit 2 (ascending)  gap  codes of visit 3 ...  [EOS]

Token ids are HALO's column ids (:class:`~ehrsynth.models.halo.encoding.ColumnLayout`): codes 0..V-1, labels,
sex (F, M, and "unknown" where the training data has unknown sex), age buckets (and "unknown"), gap bins (and
"unknown"), then [BOS] = ``start``, [EOS] = ``end``, padding = ``pad``. So the layout's validity flags, HALO's
condition parser and HALO's record decoder serve this family unchanged. A gap token (days since the previous
visit, binned) opens every visit after the first, and is what separates visits. The corpus carries no visit
type, so there is no visit-type token.

The grammar (:class:`Grammar`), applied as a mask on the softmax identically in the loss and in sampling, so
every sampled sequence is a valid record and the loss is the exact masked NLL:

* after [BOS] or label j: a label > j, or the next prompt group (sex, else age, else the first visit);
* after the sex token: an age token; after the age token: the first visit;
* the first visit opens with a code ([EOS] there only when the training data has records without visits, a
  gap only when it keeps empty visits);
* after code c: a code > c (same visit, ascending), a gap (next visit) or [EOS];
* after a gap: a code (a gap or [EOS] as well only when the training corpus keeps empty visits);
* window: a gap only at positions <= n_ctx - 3 (room for a code and [EOS]); position n_ctx - 1 is [EOS].

Records longer than the window keep their last visits (counted); a single visit longer than the whole window
keeps its lowest code ids (counted). A value the training data never lacked is scored as HALO scores it: an
unknown sex or age gets no token (the record then has probability 0); an unknown gap, which must still separate
the visits, takes the first gap bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ehrsynth.data.corpus import SEX_NAMES, PatientCorpus, ragged_indices
from ehrsynth.models.halo.encoding import ColumnLayout, bin_index

NONE, SEX, AGE, GAP, EOS = range(5)  # token groups of the grammar tables


class Grammar:
    """The masked-softmax grammar of a layout and window (module docstring): a function of the previous token
    and the position only, held as (K,) tables so the mask costs O(N K) comparisons, never a K x K matrix."""

    def __init__(self, layout: ColumnLayout, n_ctx: int) -> None:
        self.layout, self.n_ctx = layout, n_ctx
        K, V, L = layout.n_columns, layout.n_codes, len(layout.label_names)
        code_lo = np.full(K, V, dtype=np.int64)  # codes >= code_lo[prev] may follow prev
        label_lo = np.full(K, L, dtype=np.int64)  # labels >= label_lo[prev] may follow prev
        ok = np.zeros((K, 5), dtype=bool)  # ok[prev, group]: a token of group may follow prev
        groups = ([(SEX, layout.sex_start, layout.age_start)] if layout.sex else []) + \
                 ([(AGE, layout.age_start, layout.gap_start)] if layout.age_edges else [])

        def opens(rows, k: int) -> None:  # what may come after the prompt's k-th single-token group
            if k < len(groups):
                ok[rows, groups[k][0]] = True
            else:  # the first visit
                code_lo[rows] = 0
                ok[rows, GAP] = layout.empty_visits
                ok[rows, EOS] = layout.zero_visits

        prompt = np.r_[layout.start, np.arange(layout.label_start, layout.sex_start)]
        label_lo[prompt] = np.r_[0, np.arange(1, L + 1)]
        opens(prompt, 0)
        for k, (_, a, b) in enumerate(groups):
            opens(np.arange(a, b), k + 1)
        code_lo[:V] = np.arange(1, V + 1)
        ok[:V, GAP] = ok[:V, EOS] = True
        gaps = np.arange(layout.gap_start, layout.start)
        code_lo[gaps] = 0
        ok[gaps, GAP] = ok[gaps, EOS] = layout.empty_visits
        ok[[layout.end, layout.pad], EOS] = True  # after the end: padding, never scored (keeps softmax finite)
        group = np.full(K, NONE, dtype=np.int64)
        for g, a, b in groups:
            group[a:b] = g
        group[gaps] = GAP
        group[layout.end] = EOS
        self.tables = {"code_lo": code_lo, "label_lo": label_lo, "ok": ok, "group": group}
        self._device_tables: dict[str, dict[str, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = {k: torch.as_tensor(v, device=device) for k, v in self.tables.items()}
        return self._device_tables[key]

    def allowed(self, prev: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(N, K) bool: the tokens that may stand at positions ``pos`` (N,) after tokens ``prev`` (N,)."""
        t, lay = self._on(prev.device), self.layout
        k = torch.arange(lay.n_columns, device=prev.device)
        mask = (k < lay.n_codes) & (k >= t["code_lo"][prev][:, None])
        label = k - lay.label_start
        mask |= (label >= 0) & (k < lay.sex_start) & (label >= t["label_lo"][prev][:, None])
        mask |= t["ok"][prev][:, t["group"]]
        is_gap = (k >= lay.gap_start) & (k < lay.start)
        mask &= ~(is_gap & (pos >= self.n_ctx - 2)[:, None])
        return torch.where((pos >= self.n_ctx - 1)[:, None], k == lay.end, mask)


@dataclass(frozen=True)
class EncodedTokens:
    """A batch of records as token sequences.

    Attributes:
        tokens: (B, T) int64, padded with ``layout.pad``; T = the longest sequence.
        lengths: (B,) int64 tokens per record, [BOS] and [EOS] included.
        visits: (B,) int64 visits kept per record.
        truncated_visits: (B,) int64 visits dropped from the front (window).
        truncated_codes: (B,) int64 codes dropped from a lone visit longer than the window.
        unknown_codes: (U,) corpus code ids the model does not know, one per occurrence (dropped).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    visits: np.ndarray
    truncated_visits: np.ndarray
    truncated_codes: np.ndarray
    unknown_codes: np.ndarray


def encode_tokens(corpus: PatientCorpus, patients: np.ndarray, layout: ColumnLayout, n_ctx: int, *,
                  code_map: np.ndarray | None = None, label_columns: np.ndarray | None = None) -> EncodedTokens:
    """Token sequences of ``patients`` of ``corpus`` (vectorised over the CSR arrays: no loop over visits or
    codes). ``code_map`` maps corpus code ids to model tokens (-1: unknown, dropped and returned);
    ``label_columns`` picks the corpus label column of each model label."""
    patients = np.asarray(patients, dtype=np.int64)
    B = len(patients)
    vo, co = np.asarray(corpus.visit_offsets), np.asarray(corpus.code_offsets)
    visits = ragged_indices(vo[patients], vo[patients + 1])
    n_visits = vo[patients + 1] - vo[patients]
    v_rec = np.repeat(np.arange(B), n_visits)
    occ = ragged_indices(co[visits], co[visits + 1])
    o_visit = np.repeat(np.arange(len(visits)), co[visits + 1] - co[visits])  # index into ``visits``
    tok = np.asarray(corpus.codes)[occ].astype(np.int64)
    unknown = np.zeros(0, dtype=np.int64)
    if code_map is not None:
        mapped = code_map[tok]
        unknown, tok, o_visit = tok[mapped < 0], mapped[mapped >= 0], o_visit[mapped >= 0]

    # prompt: [BOS], labels that are 1, sex, age bucket at the first kept visit
    parts_r, parts_s, parts_k, parts_t = [], [], [], []

    def add(rec, section, sub, token):
        parts_r.append(np.asarray(rec, np.int64))
        parts_s.append(np.broadcast_to(np.asarray(section, np.int64), np.shape(rec)))
        parts_k.append(np.broadcast_to(np.asarray(sub, np.int64), np.shape(rec)))
        parts_t.append(np.broadcast_to(np.asarray(token, np.int64), np.shape(rec)))

    add(np.arange(B), 0, 0, layout.start)
    prompt_len = np.ones(B, dtype=np.int64)
    if layout.label_names:
        labels = np.asarray(corpus.labels)[patients]
        labels = labels[:, label_columns] if label_columns is not None else labels
        lr, lc = np.nonzero(labels)
        add(lr, 1, lc, layout.label_start + lc)
        prompt_len += np.bincount(lr, minlength=B)
    if layout.sex:
        sex = np.asarray(corpus.sex)[patients].astype(np.int64)
        sex = np.where(sex < 0, len(SEX_NAMES) if layout.sex_unknown else -1, sex)
        has = np.flatnonzero(sex >= 0)  # an unknown sex the model never saw has no token (scores -inf)
        add(has, 2, 0, layout.sex_start + sex[has])
        prompt_len[has] += 1

    # window: keep the last visits whose tokens (codes + a gap each, none before the first kept) fit
    n_tok = np.bincount(o_visit, minlength=len(visits)) + 1
    total = np.cumsum(n_tok)
    rec_end = np.r_[0, total][np.cumsum(n_visits)]  # running total at each record's end
    suffix = rec_end[v_rec] - total + n_tok  # tokens from this visit to the record's end
    budget = n_ctx - 1 - prompt_len - (1 if layout.age_edges else 0)  # minus [EOS] and the age token
    last = np.zeros(len(visits), dtype=bool)
    last[np.cumsum(n_visits)[n_visits > 0] - 1] = True
    keep = (suffix - 1 <= budget[v_rec]) | last  # a lone over-long last visit is cut below
    kept = np.bincount(v_rec[keep], minlength=B)
    first_kept = np.cumsum(n_visits) - kept  # index into ``visits`` of each record's first kept visit
    rank = np.arange(len(visits)) - np.repeat(first_kept, n_visits)  # kept visit index (< 0: dropped)

    if layout.age_edges:
        days = np.asarray(corpus.visit_days)
        shift = np.zeros(B)
        has = kept > 0
        shift[has] = np.nan_to_num(days[visits[first_kept[has]]].astype(np.float64)) / 365.25
        buckets = bin_index(np.asarray(corpus.age_at_first_visit)[patients].astype(np.float64) + shift,
                            layout.age_edges)
        buckets = np.where(buckets < 0, len(layout.age_edges) if layout.age_unknown else -1, buckets)
        has = np.flatnonzero(buckets >= 0)
        add(has, 3, 0, layout.age_start + buckets[has])
    later = keep & (rank > 0)
    gap = days_between(corpus, visits[later])
    bins = bin_index(gap, layout.gap_edges)
    bins = np.where(bins < 0, len(layout.gap_edges) if layout.gap_unknown else 0, bins)
    add(v_rec[later], 4 + rank[later], -1, layout.gap_start + bins)
    in_kept = keep[o_visit]
    add(v_rec[o_visit[in_kept]], 4 + rank[o_visit[in_kept]], tok[in_kept], tok[in_kept])

    r, s, k, t = (np.concatenate(p) for p in (parts_r, parts_s, parts_k, parts_t))
    order = np.lexsort((k, s, r))
    r, t = r[order], t[order]
    count = np.bincount(r, minlength=B)
    pos = np.arange(len(r)) - np.repeat(np.cumsum(count) - count, count)
    fits = pos < n_ctx - 1  # only a lone visit longer than the window loses codes here
    cut = np.bincount(r[~fits], minlength=B)
    r, t, pos = r[fits], t[fits], pos[fits]
    lengths = count - cut + 1
    T = int(lengths.max()) if B else 1
    tokens = np.full((B, T), layout.pad, dtype=np.int64)
    tokens[r, pos] = t
    tokens[np.arange(B), lengths - 1] = layout.end
    return EncodedTokens(tokens=tokens, lengths=lengths, visits=kept, truncated_visits=n_visits - kept,
                         truncated_codes=cut, unknown_codes=unknown)


def days_between(corpus: PatientCorpus, visits: np.ndarray) -> np.ndarray:
    """Days from the visit before each of ``visits`` (never a patient's first) to it; NaN when unknown."""
    days = np.asarray(corpus.visit_days)
    return days[visits].astype(np.float64) - days[visits - 1]


def sequence_ones(layout: ColumnLayout, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sampled sequences -> (visits per record, patient, row, column) of HALO's record rows (row 1 the prompt,
    row 2 + k visit k), what :func:`~ehrsynth.models.halo.encoding.decode_records` turns into a corpus."""
    B, T = tokens.shape
    inside = np.arange(T)[None, :] < lengths[:, None] - 1
    inside[:, 0] = False  # [BOS]
    is_prompt = (tokens >= layout.label_start) & (tokens < layout.gap_start)
    is_gap = (tokens >= layout.gap_start) & (tokens < layout.start)
    body = inside & ~is_prompt
    row = 2 + np.cumsum(is_gap & inside, axis=1)
    n_visits = np.where(body.any(1), (is_gap & inside).sum(1) + 1, 0)
    p, c = np.nonzero(inside)
    return n_visits, p, np.where(is_prompt[p, c], 1, row[p, c]), tokens[p, c]

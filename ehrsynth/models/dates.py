"""Dates that look real: turn a generated record's gap bins and age bucket into calendar dates and a birth year.

A generator such as HALO decides coarse facts -- the bin of each inter-visit gap, the age-at-first-visit bucket --
and decodes them to one representative value per bin. :func:`fit` learns, from the training patients, what a
data scientist expects to see inside those bins; :func:`assign` draws it for every generated patient:

* the days of a gap: drawn from the training gaps that fell in the same bin (whole days when every training gap
  is whole days, as in OMOP data with dates only); a gap the generator left unknown is first given a bin drawn
  from the training share of each bin, so no visit is left undated;
* the age at the first visit: drawn from the training ages of the same bucket;
* the calendar: one "anchor" visit per record gets a year drawn from the training distribution of that visit's
  calendar year, a uniform day within the year, time 00:00; the other visits follow from the gaps. The anchor is
  the first visit, or the last when the training last-visit years are more concentrated (records that run up to
  an extraction date, as Synthea's do: anchored at the first visit their synthetic copies would run decades
  past it);
* the birth year: the first visit's (fractional) calendar year minus the drawn age, rounded down.

What is stored (all JSON): at most ``max_quantiles`` (64) quantiles per bin, bucket and for the year, at the
mid levels (k + 0.5) / Q, where Q also keeps every quantile summarising at least ``min_per_quantile`` (5)
training values; a bin with fewer values stores none and is drawn uniformly inside the bin (an open last bin:
its lower edge). Draws interpolate linearly between quantiles, so a calendar year is never one patient's:
years with few patients are smoothed into their neighbours, and the extreme 1/(2Q) tails are cut. No date finer
than the year, and no record, is kept.

Randomness: patient i's draws depend only on (seed, i) -- counter-based SplitMix64 streams, as in HALO's
sampler -- so the result does not depend on batch size or chunking.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ehrsynth.data.corpus import PatientCorpus, ragged_indices
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError

MAX_QUANTILES = 64
MIN_PER_QUANTILE = 5
_SALT = 0x6461746573  # "dates": keeps these streams apart from the sampler's
_PATIENT_ROW = 1 << 48  # stream row of a patient's own draws (visit rows are visit numbers, far below)
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class DateModel:
    """What :func:`assign` draws from; see the module docstring. All fields are JSON-able tuples.

    Attributes:
        gap_edges: lower edges (days) of the gap bins; the last bin is open.
        gap_quantiles: per bin, increasing quantiles of the training gaps in that bin (empty: too few).
        gap_share: per bin, the share of the training gaps (for gaps the generator left unknown).
        whole_days: every training gap is a whole number of days, so drawn gaps are too.
        age_edges: lower edges (years) of the age buckets; the last bucket is open.
        age_quantiles: per bucket, quantiles of the training ages at the first visit.
        age_share: per bucket, the share of training patients (for records without an age bucket).
        fill_age: the training ages are all known, so a record without an age bucket gets one.
        anchor: ``"first"`` or ``"last"``: which visit's calendar year ``year_quantiles`` describe.
        year_quantiles: quantiles of the anchor visit's calendar year (empty: too few dated patients).
    """

    gap_edges: tuple[float, ...]
    gap_quantiles: tuple[tuple[float, ...], ...]
    gap_share: tuple[float, ...]
    whole_days: bool
    age_edges: tuple[float, ...]
    age_quantiles: tuple[tuple[float, ...], ...]
    age_share: tuple[float, ...]
    fill_age: bool
    anchor: str
    year_quantiles: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {k: _lists(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DateModel:
        try:
            return cls(**{k: _tuples(v) for k, v in data.items()})
        except TypeError as error:
            raise ConfigError(f"model.json: bad date model ({error})") from None


def fit(corpus: PatientCorpus | CorpusView, gap_edges: tuple[float, ...], age_edges: tuple[float, ...], *,
        max_quantiles: int = MAX_QUANTILES, min_per_quantile: int = MIN_PER_QUANTILE) -> DateModel:
    """The date model of the training patients ``corpus`` (a corpus or a view of one), for the generator's gap
    bins and age buckets (``()`` = none: one bin holding everything)."""
    from ehrsynth.models.halo.encoding import bin_index  # here: halo's model imports this module

    view = CorpusView.of(corpus)
    base, patients = view.corpus, view.patients
    gap_edges, age_edges = _edges(gap_edges), _edges(age_edges)
    vo = np.asarray(base.visit_offsets)
    visits = ragged_indices(vo[patients], vo[patients + 1])
    n_visits = vo[patients + 1] - vo[patients]
    days = np.asarray(base.visit_days, dtype=np.float64)[visits]
    first = np.cumsum(n_visits) - n_visits  # local index of each patient's first visit
    later = np.ones(len(visits), dtype=bool)
    later[first[n_visits > 0]] = False
    gaps = np.diff(days, prepend=np.nan)[later]
    gaps = gaps[np.isfinite(gaps)]
    gap_bins = bin_index(gaps, gap_edges)
    ages = np.asarray(base.age_at_first_visit, dtype=np.float64)[patients]
    age_bins = bin_index(ages, age_edges)

    def per_bin(values: np.ndarray, bins: np.ndarray, n_bins: int) -> tuple[tuple[float, ...], ...]:
        return tuple(_quantiles(values[bins == b], max_quantiles, min_per_quantile) for b in range(n_bins))

    starts = np.asarray(base.visit_start)[visits]
    has = n_visits > 0
    first_start, last_start = starts[first[has]], starts[(first + n_visits - 1)[has]]
    first_year, last_year = _years(first_start), _years(last_start)
    anchor = "last" if _spread(last_year) < _spread(first_year) else "first"
    year = last_year if anchor == "last" else first_year
    return DateModel(
        gap_edges=gap_edges,
        gap_quantiles=per_bin(gaps, gap_bins, len(gap_edges)),
        gap_share=_shares(gap_bins, len(gap_edges)),
        whole_days=bool(len(gaps) and np.all(gaps == np.round(gaps))),
        age_edges=age_edges,
        age_quantiles=per_bin(ages, age_bins, len(age_edges)),
        age_share=_shares(age_bins[age_bins >= 0], len(age_edges)),
        fill_age=bool(len(ages) and np.all(np.isfinite(ages))),
        anchor=anchor,
        year_quantiles=_quantiles(year[np.isfinite(year)], max_quantiles, min_per_quantile),
    )


def assign(model: DateModel, corpus: PatientCorpus, *, seed: int, first_patient: int = 0) -> PatientCorpus:
    """``corpus`` (generated) with drawn gaps, visit_days, visit_start, ages and birth years; see the module
    docstring. Patient i of the corpus is patient ``first_patient + i`` of the run: its draws depend only on
    (``seed``, that index). The corpus is modified in place and returned."""
    from ehrsynth.models.halo.encoding import bin_index  # here: halo's model imports this module
    from ehrsynth.models.halo.sampling import stream_keys, stream_uniforms

    P, V = corpus.n_patients, corpus.n_visits
    vo = np.asarray(corpus.visit_offsets)
    vpp, vp = corpus.visits_per_patient(), corpus.visit_patient()
    number = np.arange(V, dtype=np.int64) - vo[:-1][vp]  # visit number within the patient
    key = int(stream_keys(_SALT, np.array([seed]), 0)[0])
    run_index = (first_patient + np.arange(P)).astype(np.uint64)

    # gaps: the generated bin, or one drawn from the training shares where unknown; then a value inside it
    vkeys = stream_keys(key, run_index[vp], number.astype(np.uint64))
    gaps = np.diff(np.asarray(corpus.visit_days, dtype=np.float64), prepend=np.nan)
    bins = bin_index(gaps, model.gap_edges)
    unknown = bins < 0
    bins[unknown] = _pick(model.gap_share, stream_uniforms(vkeys[unknown], 0))
    gap = _draw(model.gap_quantiles, model.gap_edges, bins, stream_uniforms(vkeys, 1), whole=model.whole_days)
    seconds = np.where(number > 0, np.round(gap * _SECONDS_PER_DAY), 0).astype(np.int64)
    running = np.cumsum(seconds)
    offset = running - running[vo[:-1][vp]]  # seconds since the patient's first visit
    corpus.visit_days = offset / _SECONDS_PER_DAY

    # ages and birth years
    pkeys = stream_keys(key, run_index, np.uint64(_PATIENT_ROW))
    age = np.asarray(corpus.age_at_first_visit, dtype=np.float64)
    buckets = bin_index(age, model.age_edges)
    if model.fill_age:
        missing = buckets < 0
        buckets[missing] = _pick(model.age_share, stream_uniforms(pkeys[missing], 0))
    known_age = buckets >= 0
    age = np.full(P, np.nan)
    age[known_age] = _draw(model.age_quantiles, model.age_edges, buckets[known_age],
                           stream_uniforms(pkeys[known_age], 1))
    corpus.age_at_first_visit = age.astype(np.float32)
    if not model.year_quantiles:  # the training patients had (almost) no dates: keep the writers' fallback
        corpus.visit_start = np.full(V, np.datetime64("NaT"), dtype="datetime64[s]")
        return corpus

    # calendar: the anchor visit on a drawn day at 00:00, the others at their offsets from it
    year = np.floor(_interpolate(model.year_quantiles, stream_uniforms(pkeys, 2))).astype(np.int64)
    jan1 = (year - 1970).astype("datetime64[Y]").astype("datetime64[D]")
    length = ((year + 1 - 1970).astype("datetime64[Y]").astype("datetime64[D]") - jan1).astype(np.int64)
    day = np.minimum(np.floor(stream_uniforms(pkeys, 3) * length), length - 1).astype(np.int64)
    anchor = (jan1 + day).astype("datetime64[s]")
    span = np.zeros(P, dtype=np.int64)
    span[vpp > 0] = offset[vo[1:][vpp > 0] - 1]
    first = anchor - span.astype("timedelta64[s]") if model.anchor == "last" else anchor
    corpus.visit_start = first[vp] + offset.astype("timedelta64[s]")
    birth = np.floor(_decimal_years(first) - np.nan_to_num(age))
    corpus.birth_year = np.where(known_age, birth, -1).astype(np.int32)
    return corpus


def date_generated(extra: dict[str, Any], corpus: PatientCorpus, *, seed: int, first_patient: int = 0) -> PatientCorpus:
    """:func:`assign` with the date model a generator keeps in ``meta.extra["dates"]``; ``corpus`` unchanged
    when there is none (models saved before date models existed keep their old output)."""
    if "dates" not in extra:
        return corpus
    return assign(DateModel.from_dict(extra["dates"]), corpus, seed=seed, first_patient=first_patient)


def date_chunks(extra: dict[str, Any], chunks: Any, *, seed: int) -> Any:
    """:func:`date_generated` over consecutive generated chunks, counting patients across them."""
    done = 0
    for chunk in chunks:
        yield date_generated(extra, chunk, seed=seed, first_patient=done)
        done += chunk.n_patients


def bin_means(quantiles: tuple[tuple[float, ...], ...], fallback: tuple[float, ...]) -> list[float]:
    """The mean training value of each bin, from its stored quantiles (``fallback[b]`` for a bin without)."""
    return [float(np.mean(q)) if len(q) else float(f) for q, f in zip(quantiles, fallback)]


# ---- helpers -----------------------------------------------------------------------------------------------
def _edges(edges: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(e) for e in edges) or (0.0,)


def _quantiles(values: np.ndarray, cap: int, min_per: int) -> tuple[float, ...]:
    """At most ``cap`` quantiles at mid levels, each standing for at least ``min_per`` values (none if fewer)."""
    q = min(cap, len(values) // max(min_per, 1))
    if q < 1:
        return ()
    return tuple(float(v) for v in np.quantile(values, (np.arange(q) + 0.5) / q))


def _draw(quantiles: tuple[tuple[float, ...], ...], edges: tuple[float, ...], bins: np.ndarray, u: np.ndarray,
          *, whole: bool = False) -> np.ndarray:
    """(n,) a value in bin ``bins[i]`` for uniform ``u[i]``: the inverse of the piecewise-linear CDF through the
    bin's lower edge, its quantiles and (a closed bin) its upper edge -- uniform inside the bin when it has no
    quantiles, its lower edge for an open last bin without any. ``whole``: whole numbers inside the bin."""
    out = np.zeros(len(bins))
    for b, q in enumerate(quantiles):  # a handful of bins: the loop is over bins, not visits
        at = bins == b
        if not at.any():
            continue
        lo, hi = edges[b], (edges[b + 1] if b + 1 < len(edges) else None)
        levels = [0.0, *((np.arange(len(q)) + 0.5) / len(q))] + ([1.0] if hi is not None else [])
        points = [lo, *q] + ([hi] if hi is not None else [])
        value = np.interp(u[at], levels, points)
        if whole:
            value = np.clip(np.round(value), np.ceil(lo), np.inf if hi is None else np.ceil(hi) - 1)
        elif hi is not None:  # u is in (0, 1]: keep the upper edge itself out
            value = np.minimum(value, np.nextafter(hi, -np.inf))
        out[at] = value
    return out


def _interpolate(quantiles: tuple[float, ...], u: np.ndarray) -> np.ndarray:
    """(n,) the inverse of the piecewise-linear CDF through mid-level ``quantiles``, flat beyond the extremes."""
    return np.interp(u, (np.arange(len(quantiles)) + 0.5) / len(quantiles), quantiles)


def _pick(shares: tuple[float, ...], u: np.ndarray) -> np.ndarray:
    """(n,) bin index drawn from ``shares`` for uniforms ``u`` in (0, 1]."""
    cumulative = np.cumsum(shares)
    return np.minimum(np.searchsorted(cumulative, u * cumulative[-1]), len(shares) - 1).astype(np.int64)


def _shares(bins: np.ndarray, n: int) -> tuple[float, ...]:
    counts = np.bincount(bins[bins >= 0], minlength=n).astype(np.float64)
    return tuple(float(c) for c in (counts / counts.sum() if counts.sum() else np.full(n, 1.0 / n)))


def _years(starts: np.ndarray) -> np.ndarray:
    """(n,) float calendar year of each datetime, NaN for NaT."""
    starts = np.asarray(starts).astype("datetime64[s]")
    year = starts.astype("datetime64[Y]").astype(np.int64) + 1970.0
    return np.where(np.isnat(starts), np.nan, year)


def _decimal_years(times: np.ndarray) -> np.ndarray:
    """(n,) calendar year plus the elapsed fraction of it, of each datetime64[s]."""
    year = times.astype("datetime64[Y]")
    start, end = year.astype("datetime64[s]"), (year + 1).astype("datetime64[s]")
    return 1970.0 + year.astype(np.int64) + (times - start).astype(np.int64) / (end - start).astype(np.int64)


def _spread(years: np.ndarray) -> float:
    """Interquartile range of the known years (inf when there are none)."""
    years = years[np.isfinite(years)]
    return float(np.subtract(*np.percentile(years, [75, 25]))) if len(years) else float("inf")


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


__all__ = ["DateModel", "assign", "date_chunks", "date_generated", "fit"]

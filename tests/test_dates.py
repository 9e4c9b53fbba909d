"""Date model: fitted on real corpora, it dates every generated visit inside its gap bin, in the training years,
with birth years that match the drawn age, per (seed, patient); the writers then show those dates."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch

from ehrsynth.data.corpus import concat_corpora
from ehrsynth.data.readers.mimic3 import read_mimic3
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.data.writers.long import write_long
from ehrsynth.data.writers.meds import write_meds
from ehrsynth.data.writers.omop import write_omop
from ehrsynth.demo_data import demo_directory
from ehrsynth.models.dates import DateModel, assign, fit
from ehrsynth.models.halo import HaloConfig, HaloModel, bin_index, bin_values
from ehrsynth.models.io import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

GAPS, AGES = HaloConfig().gap_bin_edges, HaloConfig().age_bucket_edges


@pytest.fixture(scope="module")
def demo_train():
    return read_omop(demo_directory()).part("train")


@pytest.fixture(scope="module")
def mimic_train(data_dir):
    return read_mimic3(data_dir / "mimic-iii-demo").part("train")


def as_generated(corpus, *, unknown_every: int = 0):
    """``corpus`` as a generator hands it over: gaps and ages decoded to their bin's value, no dates or birth
    years; with ``unknown_every`` every such visit's gap unknown (its and the later visit_days NaN)."""
    vp = corpus.visit_patient()
    number = np.arange(corpus.n_visits) - corpus.visit_offsets[:-1][vp]
    gaps = np.diff(corpus.visit_days, prepend=np.nan)
    gaps = np.where(number > 0, np.asarray(bin_values(GAPS))[bin_index(gaps, GAPS)], 0.0)
    if unknown_every:
        gaps[(number > 0) & (np.arange(corpus.n_visits) % unknown_every == 0)] = np.nan
    running = np.cumsum(gaps)
    age = np.asarray(bin_values(AGES), dtype=np.float32)[bin_index(corpus.age_at_first_visit, AGES)]
    return dataclasses.replace(
        corpus, visit_days=running - running[corpus.visit_offsets[:-1][vp]],
        visit_start=np.full(corpus.n_visits, np.datetime64("NaT"), dtype="datetime64[s]"),
        birth_year=np.full(corpus.n_patients, -1, dtype=np.int32), age_at_first_visit=age)


def years(times):
    return times.astype("datetime64[Y]").astype(np.int64) + 1970


@pytest.mark.parametrize("name, anchor, whole_days", [("demo_train", "last", True), ("mimic_train", "first", False)])
def test_fit_on_real_corpora(request, name, anchor, whole_days):
    corpus = request.getfixturevalue(name)
    model = fit(corpus, GAPS, AGES)
    assert model.anchor == anchor and model.whole_days == whole_days and model.fill_age
    for edges, quantiles in ((GAPS, model.gap_quantiles), (AGES, model.age_quantiles)):
        assert len(quantiles) == len(edges)
        for b, q in enumerate(quantiles):
            assert len(q) <= 64 and list(q) == sorted(q)
            assert all(edges[b] <= v < (edges[b + 1] if b + 1 < len(edges) else np.inf) for v in q)
    assert abs(sum(model.gap_share) - 1) < 1e-9 and abs(sum(model.age_share) - 1) < 1e-9
    first = corpus.visit_offsets[:-1] if anchor == "first" else corpus.visit_offsets[1:] - 1
    real = years(corpus.visit_start[first])
    assert real.min() <= min(model.year_quantiles) <= max(model.year_quantiles) <= real.max()
    # 64 quantiles of at least 5 patients each, at most
    assert len(model.year_quantiles) == min(64, corpus.n_patients // 5)
    assert DateModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model


@pytest.mark.parametrize("name", ["demo_train", "mimic_train"])
def test_assign_dates_every_visit_inside_its_bin(request, name):
    real = request.getfixturevalue(name)
    model = fit(real, GAPS, AGES)
    generated = as_generated(real, unknown_every=5)
    bins = bin_index(np.diff(generated.visit_days, prepend=np.nan), GAPS)
    out = assign(model, dataclasses.replace(generated), seed=3)
    assert not np.isnat(out.visit_start).any() and not np.isnan(out.visit_days).any()
    vp = out.visit_patient()
    later = np.r_[False, vp[1:] == vp[:-1]]
    gaps = np.diff(out.visit_days, prepend=np.nan)
    known = later & (bins >= 0)
    assert known.sum() > 0 and (later & (bins < 0)).sum() > 0
    np.testing.assert_array_equal(bin_index(gaps[known], GAPS), bins[known])  # drawn inside the generated bin
    assert np.all(gaps[later] >= 0)
    if model.whole_days:
        assert np.all(gaps[later] == np.round(gaps[later]))
    # the dates follow the days, and the anchor visit's year is a training year
    first_start = out.visit_start[out.visit_offsets[:-1]][vp]
    np.testing.assert_array_equal((out.visit_start - first_start).astype(np.int64), np.round(out.visit_days * 86400))
    anchor = out.visit_offsets[:-1] if model.anchor == "first" else out.visit_offsets[1:] - 1
    anchor_years = years(out.visit_start[anchor])
    assert min(model.year_quantiles) - 1 < anchor_years.min() and anchor_years.max() <= max(model.year_quantiles)
    if model.anchor == "first":
        assert np.all(out.visit_start[anchor] == out.visit_start[anchor].astype("datetime64[D]"))  # 00:00
    # ages stay in their bucket; birth year = floor(first visit's fractional year - age)
    np.testing.assert_array_equal(bin_index(out.age_at_first_visit, AGES),
                                  bin_index(generated.age_at_first_visit, AGES))
    start = out.visit_start[out.visit_offsets[:-1]]
    jan1 = start.astype("datetime64[Y]")
    fraction = ((start - jan1.astype("datetime64[s]")).astype(np.int64)
                / ((jan1 + 1).astype("datetime64[s]") - jan1.astype("datetime64[s]")).astype(np.int64))
    decimal = years(start) + fraction - out.age_at_first_visit.astype(np.float64)
    assert np.all((out.birth_year <= decimal + 1e-6) & (decimal - 1 - 1e-6 < out.birth_year))


def test_draws_depend_only_on_seed_and_patient(mimic_train):
    model = fit(mimic_train, GAPS, AGES)
    generated = as_generated(mimic_train, unknown_every=3)
    whole = assign(model, dataclasses.replace(generated), seed=7)
    cut = [0, 5, 6, 30, generated.n_patients]
    parts = [assign(model, generated.subset(np.arange(a, b)), seed=7, first_patient=a) for a, b in zip(cut, cut[1:])]
    joined = concat_corpora(parts)
    for name in ("visit_start", "visit_days", "birth_year", "age_at_first_visit"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name))
    other = assign(model, dataclasses.replace(generated), seed=8)
    assert (other.visit_start != whole.visit_start).mean() > 0.9


@pytest.fixture(scope="module")
def halo(mimic_train):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="last 7 visits are kept"):
        model = HaloModel.from_corpus(mimic_train, HaloConfig.small(n_ctx=10))
    with torch.no_grad():  # visits of about 10 codes, as a trained model's
        model.fine.layer2.bias[model.fine.logit_rows.start:][:model.layout.n_codes] -= 4.0
    return model.eval()


def test_halo_generates_dated_records_whatever_the_chunking(halo, tmp_path):
    out = halo.generate(40, seed=2, batch_size=16)
    assert out.n_visits > 40 and not np.isnat(out.visit_start).any() and not np.isnan(out.visit_days).any()
    assert (out.birth_year > 1800).all()
    chunks = concat_corpora(list(halo.iter_generate(40, seed=2, batch_size=7, chunk_size=9)))
    np.testing.assert_array_equal(chunks.visit_start, out.visit_start)
    np.testing.assert_array_equal(chunks.birth_year, out.birth_year)
    # the date model travels in model.json; a model saved without one keeps the old, undated output
    loaded = load_model(save_model(halo, tmp_path / "m"))
    assert loaded.meta.extra["dates"] == halo.meta.extra["dates"]
    np.testing.assert_array_equal(loaded.generate(40, seed=2).visit_start, out.visit_start)
    loaded.meta.extra.pop("dates")
    old = loaded.generate(40, seed=2)
    assert np.isnat(old.visit_start).all() and old.birth_year.max() == -1


def test_writers_show_the_generated_dates(halo, tmp_path):
    out = halo.generate(30, seed=5)
    expected = pl.Series(out.visit_start.astype("datetime64[us]"))
    long = pl.read_parquet(write_long(out, tmp_path / "long.parquet"))
    meds = pl.read_parquet(write_meds(out, tmp_path / "meds") / "data" / "0.parquet")
    omop = write_omop(out, tmp_path / "omop")
    visits = pl.read_csv(omop / "visit_occurrence.csv", try_parse_dates=True)
    person = pl.read_csv(omop / "person.csv")
    assert set(long.unique(["patient", "visit"], keep="first")["time"].to_list()) == set(expected.to_list())
    assert set(meds.filter(pl.col("code").str.contains("//") & ~pl.col("code").str.starts_with("GENDER//")
                           & ~pl.col("code").str.starts_with("LABEL//"))["time"].unique().to_list()) \
        <= set(expected.to_list())
    assert visits["visit_start_datetime"].to_list() == expected.to_list()
    assert person["year_of_birth"].to_list() == out.birth_year.tolist()
    for frame, patient, time in ((long, "patient", "time"), (visits, "person_id", "visit_start_datetime")):
        gaps = frame.sort(patient, time).select((pl.col(time).diff().over(patient)).dt.total_seconds())
        assert gaps.to_series().drop_nulls().ne(1).all()  # no visit pushed 1 s after the one before

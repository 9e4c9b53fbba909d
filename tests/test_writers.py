"""Writers: every format reads back with its reader, on real corpora (GiBleed OMOP, MIMIC-III) and on
"synthetic-like" corpora (a shuffled subset with no visit dates, which is what samplers produce); the output
layouts; and atomicity (a failed write leaves nothing behind).

Vocabulary order is by count within the corpus read, so a subset re-reads with other code ids: those
comparisons go through :func:`assert_same_patients`, which compares typed codes per visit by patient id.
"""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.corpus import PatientCorpus, empty_statics
from ehrsynth.outputs import MARKER
from ehrsynth.data.readers.long import read_long
from ehrsynth.data.readers.meds import read_meds
from ehrsynth.data.readers.mimic3 import read_mimic3
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.data.writers import write_corpus
from ehrsynth.data.writers.long import write_long
from ehrsynth.data.writers.meds import write_meds
from ehrsynth.data.writers.omop import write_omop
from ehrsynth.errors import ConfigError

ALL_OMOP = ("condition", "drug", "procedure")
ONE_SECOND = 1 / 86_400
SAME_DAY_SLACK = 3 * ONE_SECOND  # undated visits on one day are written 1 s apart (GiBleed: 2 at most)


# ---- helpers ----------------------------------------------------------------------------------------------
def visit_table(corpus: PatientCorpus, ids: np.ndarray | None = None) -> pl.DataFrame:
    """One row per visit: patient id, visit number, its typed codes (sorted) and visit_days."""
    ids = np.asarray(corpus.patient_ids if ids is None else ids).astype(str)
    patient = corpus.visit_patient()
    visits = pl.DataFrame({
        "visit_idx": np.arange(corpus.n_visits),
        "patient": ids[patient],
        "visit": np.arange(corpus.n_visits) - corpus.visit_offsets[:-1][patient],
        "days": np.asarray(corpus.visit_days, dtype=np.float64),
    })
    codes = pl.DataFrame({
        "visit_idx": corpus.code_visit(),
        "code": pl.Series(list(corpus.vocab.codes), dtype=pl.String).gather(np.asarray(corpus.codes, dtype=np.int64)),
    }).group_by("visit_idx").agg(pl.col("code").sort())
    return (visits.join(codes, on="visit_idx", how="left")
            .with_columns(pl.col("code").fill_null(pl.lit([], dtype=pl.List(pl.String))))
            .drop("visit_idx").sort("patient", "visit"))


def statics_table(corpus: PatientCorpus, ids: np.ndarray | None = None) -> pl.DataFrame:
    ids = np.asarray(corpus.patient_ids if ids is None else ids).astype(str)
    return pl.DataFrame({"patient": ids, "sex": np.asarray(corpus.sex),
                         "birth_year": np.asarray(corpus.birth_year)}).sort("patient")


def assert_same_patients(a: PatientCorpus, b: PatientCorpus, *, a_ids: np.ndarray | None = None,
                         days_atol: float = 1e-9, order_same_time_visits: bool = True) -> None:
    """Same patients (by id), visits in the same order with the same typed codes, visit_days, sex, birth year.

    ``a_ids`` renames a's patients (e.g. to the integer ids a writer assigned). With
    ``order_same_time_visits=False`` the order of a patient's visits at the same time is not compared.
    Failures report counts only, never a patient's codes.
    """
    left, right = visit_table(a, a_ids), visit_table(b)
    if not order_same_time_visits:
        left, right = (t.sort("patient", "days", pl.col("code").list.join(" ")) for t in (left, right))
    assert left.height == right.height, "different numbers of visits"
    same_visits = left["patient"].equals(right["patient"]) and (
        left["visit"].equals(right["visit"]) or not order_same_time_visits)
    assert same_visits, "different patients or visits"
    different_codes = int((left["code"] != right["code"]).sum())
    assert different_codes == 0, f"{different_codes} visits differ in their codes"
    undated_apart = int((left["days"].is_nan() != right["days"].is_nan()).sum())
    assert undated_apart == 0, f"{undated_apart} visits are undated on one side only"
    far = int((np.abs(right["days"].to_numpy() - left["days"].to_numpy()) > days_atol).sum())
    assert far == 0, f"{far} visits differ in visit_days by more than {days_atol}"
    same_statics = statics_table(a, a_ids).equals(statics_table(b))
    assert same_statics, "different sex or birth year"


def synthetic_like(corpus: PatientCorpus, *, seed: int = 0, statics: bool = True) -> PatientCorpus:
    """A shuffled subset of ``corpus`` without visit dates (and without statics when ``statics`` is False)."""
    rng = np.random.default_rng(seed)
    subset = corpus.subset(rng.permutation(corpus.n_patients)[: max(2, corpus.n_patients * 3 // 4)])
    changes = {"visit_start": np.full(subset.n_visits, np.datetime64("NaT"), dtype="datetime64[s]")}
    if not statics:
        changes.update(empty_statics(subset.n_patients))
    return dataclasses.replace(subset, **changes)


@pytest.fixture(scope="module")
def gibleed(data_dir):
    return read_omop(data_dir / "omop-gibleed")


@pytest.fixture(scope="module")
def gibleed_all(data_dir):
    return read_omop(data_dir / "omop-gibleed", tables=ALL_OMOP)


@pytest.fixture(scope="module")
def mimic3_all(data_dir):
    return read_mimic3(data_dir / "mimic-iii-demo", tables=("diagnoses", "procedures", "prescriptions"))


@pytest.fixture(params=["gibleed", "mimic3"])
def real(request, gibleed, mimic3_all):
    return {"gibleed": gibleed, "mimic3": mimic3_all}[request.param]


# ---- long -------------------------------------------------------------------------------------------------
def test_long_parquet_round_trip_is_exact(real, tmp_path):
    path = write_long(real, tmp_path / "long.parquet")
    assert read_long(path, time="time").equals(real)


def test_long_csv_round_trip(gibleed, mimic3_all, tmp_path):
    for suffix in ("csv", "csv.gz"):
        assert read_long(write_long(mimic3_all, tmp_path / f"m.{suffix}")).equals(mimic3_all)
        assert read_long(write_long(gibleed, tmp_path / f"g.{suffix}")).equals(gibleed)
    with gzip.open(tmp_path / "m.csv.gz", "rt") as handle:
        assert handle.readline().strip() == ("patient,visit,time,code,sex,birth_year,age_at_first_visit,death,"
                                             "label:mortality")


def test_long_keeps_empty_visits(data_dir, tmp_path):
    keep = BuildOptions(empty="keep")
    corpus = read_omop(data_dir / "omop-gibleed", options=keep)
    assert int((corpus.codes_per_visit() == 0).sum()) == 489
    assert read_long(write_long(corpus, tmp_path / "long.parquet"), time="time", options=keep).equals(corpus)


@pytest.mark.parametrize("statics", [True, False])
def test_long_synthetic_like(real, tmp_path, statics):
    synthetic = synthetic_like(real, statics=statics)
    back = read_long(write_long(synthetic, tmp_path / "long.parquet"), time="time")
    # visits on the same day (GiBleed has some) are written a second apart
    assert_same_patients(synthetic, back, days_atol=SAME_DAY_SLACK)
    by_id = dict(zip(back.patient_ids, back.age_at_first_visit))
    ages = np.array([by_id[p] for p in synthetic.patient_ids], dtype=np.float32)
    np.testing.assert_array_equal(ages, synthetic.age_at_first_visit)  # written, not re-derived from dates
    assert not np.isnat(back.visit_start).any()  # undated visits are written with plausible dates


# ---- MEDS -------------------------------------------------------------------------------------------------
def test_meds_layout(mimic3_all, tmp_path):
    root = write_meds(mimic3_all, tmp_path / "meds")
    frame = pl.read_parquet(root / "data" / "0.parquet")
    assert frame.schema == pl.Schema({"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                      "numeric_value": pl.Float32})
    assert frame.equals(frame.sort("subject_id", "time", nulls_last=False, maintain_order=True))
    code = pl.col("code")
    kinds = frame.select(
        code.str.starts_with("GENDER//").sum().alias("gender"),
        code.str.starts_with("LABEL//").sum().alias("label"),
        (code == "MEDS_BIRTH").sum().alias("birth"),
        (code == "MEDS_DEATH").sum().alias("death"),
        (pl.col("time").is_null() & ~code.str.starts_with("GENDER//") & ~code.str.starts_with("LABEL//"))
        .sum().alias("other_static"),
    ).row(0, named=True)
    assert kinds == {"gender": int((mimic3_all.sex >= 0).sum()), "label": mimic3_all.n_patients,
                     "birth": int((mimic3_all.birth_year >= 0).sum()), "death": int((mimic3_all.death == 1).sum()),
                     "other_static": 0}
    clinical = frame.filter(pl.col("time").is_not_null() & code.str.contains("//"))
    assert clinical.height == mimic3_all.n_codes
    assert clinical["code"].str.contains(r"^(ICD9CM|ICD9PROC|NDC)//[^/]").all()
    splits = pl.read_parquet(root / "metadata" / "subject_splits.parquet")["split"].value_counts().sort("split")
    assert dict(splits.iter_rows()) == {"held_out": int((mimic3_all.split == 2).sum()),
                                        "train": int((mimic3_all.split == 0).sum()),
                                        "tuning": int((mimic3_all.split == 1).sum())}
    codes = pl.read_parquet(root / "metadata" / "codes.parquet")
    assert codes.height == frame["code"].n_unique()
    assert (root / "metadata" / "dataset.json").is_file()


def test_meds_real_round_trip(mimic3_all, tmp_path):
    back = read_meds(write_meds(mimic3_all, tmp_path / "meds"))
    assert back.equals(dataclasses.replace(mimic3_all, age_at_first_visit=back.age_at_first_visit))


@pytest.mark.parametrize("statics", [True, False])
def test_meds_synthetic_like(real, tmp_path, statics):
    synthetic = synthetic_like(real, statics=statics)
    back = read_meds(write_meds(synthetic, tmp_path / "meds"))
    assert_same_patients(synthetic, back, days_atol=SAME_DAY_SLACK)
    if statics:
        # the first visit is placed at birth year + age, so the re-read age matches to the day
        by_id = dict(zip(back.patient_ids, back.age_at_first_visit))
        ages = np.array([by_id[p] for p in synthetic.patient_ids])
        known = np.isfinite(synthetic.age_at_first_visit)
        np.testing.assert_allclose(ages[known], synthetic.age_at_first_visit[known], atol=1 / 365)


def test_meds_keeps_visits_on_the_same_day_apart(mimic3_all, tmp_path):
    """Two generated visits with the same day offset stay two visits (written 1 s apart)."""
    synthetic = synthetic_like(mimic3_all, statics=False)
    days = synthetic.visit_days.copy()
    many = np.flatnonzero(synthetic.visits_per_patient() >= 2)
    assert len(many) > 0
    days[synthetic.visit_offsets[many] + 1] = 0.0  # second visit on the day of the first (still in order)
    synthetic = dataclasses.replace(synthetic, visit_days=days)
    back = read_meds(write_meds(synthetic, tmp_path / "meds"))
    assert back.n_visits == synthetic.n_visits
    assert_same_patients(synthetic, back, days_atol=1.01 * ONE_SECOND)


# ---- OMOP -------------------------------------------------------------------------------------------------
OMOP_COLUMNS = {
    "person": ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id", "ethnicity_concept_id",
               "person_source_value", "gender_source_value"],
    "visit_occurrence": ["visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date",
                         "visit_start_datetime", "visit_end_date", "visit_type_concept_id"],
    "condition_occurrence": ["condition_occurrence_id", "person_id", "condition_concept_id", "condition_start_date",
                             "condition_start_datetime", "condition_type_concept_id", "visit_occurrence_id",
                             "condition_source_value", "condition_source_concept_id"],
    "drug_exposure": ["drug_exposure_id", "person_id", "drug_concept_id", "drug_exposure_start_date",
                      "drug_exposure_start_datetime", "drug_exposure_end_date", "drug_type_concept_id",
                      "visit_occurrence_id", "drug_source_value", "drug_source_concept_id"],
    "procedure_occurrence": ["procedure_occurrence_id", "person_id", "procedure_concept_id", "procedure_date",
                             "procedure_datetime", "procedure_type_concept_id", "visit_occurrence_id",
                             "procedure_source_value", "procedure_source_concept_id"],
    "death": ["person_id", "death_date", "death_datetime", "death_type_concept_id"],
}


def _rows(directory, table: str) -> pl.DataFrame:
    return pl.read_csv(directory / f"{table}.csv", infer_schema=False)


def test_omop_layout_and_routing(mimic3_all, tmp_path):
    out = write_omop(mimic3_all, tmp_path / "omop")
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == sorted(f"{t}.csv" for t in OMOP_COLUMNS)
    for table, columns in OMOP_COLUMNS.items():
        header = _rows(out, table).columns
        assert [c for c in columns if c not in header] == [], table
    systems = mimic3_all.describe()["codes_by_system"]
    assert set(systems) == {"ICD9CM", "ICD9PROC", "NDC"}
    per_system = {s: int(sum(1 for c in np.asarray(mimic3_all.vocab.codes)[mimic3_all.codes] if c.startswith(s + "/")))
                  for s in systems}
    assert _rows(out, "condition_occurrence").height == per_system["ICD9CM"] == 1761
    assert _rows(out, "procedure_occurrence").height == per_system["ICD9PROC"]
    assert _rows(out, "drug_exposure").height == per_system["NDC"]
    conditions = _rows(out, "condition_occurrence")
    assert (conditions["condition_concept_id"] == "0").all()
    assert conditions["condition_source_value"].str.starts_with("ICD9CM/").all()
    person = _rows(out, "person")
    assert person["gender_concept_id"].value_counts().sort("gender_concept_id").rows() == [
        ("8507", int((mimic3_all.sex == 1).sum())), ("8532", int((mimic3_all.sex == 0).sum()))]
    assert _rows(out, "death").height == int((mimic3_all.death == 1).sum())
    assert _rows(out, "visit_occurrence").height == mimic3_all.n_visits


def test_omop_real_round_trip(real, tmp_path):
    tables = ALL_OMOP if real.vocab.systems().keys() != {"OMOP"} else ("condition",)
    back = read_omop(write_omop(real, tmp_path / "omop"), tables=tables)
    # exact but for the age (OMOP keeps only the year of birth here) and labels (OMOP has no place for them)
    same = dataclasses.replace(real, age_at_first_visit=back.age_at_first_visit, labels=back.labels,
                               label_names=back.label_names)
    assert back.equals(same)


def test_omop_domains_route_concepts(data_dir, gibleed_all, tmp_path):
    domains = {}
    for table in ALL_OMOP:
        domains.update(dict.fromkeys(read_omop(data_dir / "omop-gibleed", tables=(table,)).vocab.codes, table))
    out = write_omop(gibleed_all, tmp_path / "omop", domains=domains)
    assert _rows(out, "drug_exposure").height == 67672  # GiBleed's drug rows less 35 duplicates in a visit
    assert _rows(out, "procedure_occurrence").height == 37388
    assert _rows(out, "condition_occurrence").height == 65332
    concept = _rows(out, "drug_exposure")["drug_concept_id"].cast(pl.Int64)
    assert (concept > 0).all()
    back = read_omop(out, tables=ALL_OMOP)
    assert back.equals(dataclasses.replace(gibleed_all, age_at_first_visit=back.age_at_first_visit))
    only_drugs = read_omop(out, tables=("drug",))
    assert only_drugs.vocab_size == 113


@pytest.mark.parametrize("statics", [True, False])
def test_omop_synthetic_like(real, tmp_path, statics):
    synthetic = synthetic_like(real, statics=statics)
    back = read_omop(write_omop(synthetic, tmp_path / "omop"), tables=ALL_OMOP)
    assert_same_patients(synthetic, back, days_atol=SAME_DAY_SLACK)


def test_omop_anchor_and_non_integer_ids(mimic3_all, tmp_path):
    synthetic = synthetic_like(mimic3_all, statics=False)
    synthetic = dataclasses.replace(synthetic, patient_ids=np.array([f"synth-{i}" for i in range(synthetic.n_patients)],
                                                                    dtype=object))
    out = write_omop(synthetic, tmp_path / "omop", anchor_date="2050-06-01")
    person = _rows(out, "person")
    assert person["person_id"].to_list() == [str(i) for i in range(1, synthetic.n_patients + 1)]
    assert person["person_source_value"].to_list() == list(synthetic.patient_ids)
    assert person["year_of_birth"].is_null().all() and (person["gender_concept_id"] == "0").all()
    assert not (out / "death.csv").exists()  # death unknown (-1) for everyone: no DEATH table
    back = read_omop(out, tables=ALL_OMOP)
    assert (back.visit_start[back.visit_offsets[:-1]] == np.datetime64("2050-06-01")).all()
    assert_same_patients(synthetic, back, a_ids=np.arange(1, synthetic.n_patients + 1), days_atol=SAME_DAY_SLACK)
    assert (back.death == -1).all()


def test_omop_bad_options(mimic3_all, tmp_path):
    with pytest.raises(ConfigError, match="domains values must be one of .*'measurement'"):
        write_omop(mimic3_all, tmp_path / "o", domains={"ICD9CM/4019": "measurement"})
    with pytest.raises(ConfigError, match="anchor_date must be an ISO date .*'someday'"):
        write_omop(mimic3_all, tmp_path / "o", anchor_date="someday")
    assert not (tmp_path / "o").exists()


def test_undated_visits(gibleed, tmp_path):
    """Input may lack days (NaN from some visit on). Every format keeps those visits, in their place: an undated
    visit is written one day after its predecessor."""
    synthetic = synthetic_like(gibleed)
    number = np.arange(synthetic.n_visits) - synthetic.visit_offsets[:-1][synthetic.visit_patient()]
    undated = number >= 10
    assert 0 < int(undated.sum()) and int((synthetic.visits_per_patient() > 20).sum()) > 0
    synthetic = dataclasses.replace(synthetic, visit_days=np.where(undated, np.nan, synthetic.visit_days))
    tenth_visit_day = synthetic.visit_days[np.flatnonzero(number == 9)][np.cumsum(number == 9) - 1]
    carried = dataclasses.replace(synthetic, visit_days=np.where(undated, tenth_visit_day + number - 9,
                                                                 synthetic.visit_days))
    for back in (read_long(write_long(synthetic, tmp_path / "long.parquet")),
                 read_omop(write_omop(synthetic, tmp_path / "omop")),
                 read_meds(write_meds(synthetic, tmp_path / "meds"))):
        assert_same_patients(carried, back, days_atol=SAME_DAY_SLACK + 60 / 86_400)


# ---- dispatcher and atomicity ------------------------------------------------------------------------------
def test_write_corpus_dispatch(mimic3_all, tmp_path):
    assert write_corpus(mimic3_all, tmp_path / "l", "long") == tmp_path / "l" / "long.parquet"
    assert write_corpus(mimic3_all, tmp_path / "x.csv", "long").is_file()
    assert (write_corpus(mimic3_all, tmp_path / "m", "meds") / "data" / "0.parquet").is_file()
    assert (write_corpus(mimic3_all, tmp_path / "o", "omop", anchor_date="2000-01-01") / "person.csv").is_file()
    with pytest.raises(ConfigError, match="format must be one of .*'fhir'"):
        write_corpus(mimic3_all, tmp_path / "f", "fhir")
    with pytest.raises(ConfigError, match="format 'meds' does not take option.*domains"):
        write_corpus(mimic3_all, tmp_path / "m2", "meds", domains={})


def _fail_on_call(monkeypatch, method: str, n: int) -> None:
    """Make ``pl.DataFrame.<method>`` raise on its n-th call (1-based), after really writing the earlier ones."""
    original = getattr(pl.DataFrame, method)
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError("disk full (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, method, flaky)


@pytest.mark.parametrize("fmt, method, n", [("omop", "write_csv", 3), ("meds", "write_parquet", 2),
                                            ("long", "write_parquet", 1)])
def test_failed_write_leaves_nothing(mimic3_all, tmp_path, monkeypatch, fmt, method, n):
    _fail_on_call(monkeypatch, method, n)
    with pytest.raises(OSError, match="simulated"):
        write_corpus(mimic3_all, tmp_path / "out", fmt)
    assert list(tmp_path.iterdir()) == []  # no output, no staging file or folder, not even out/ for long


def test_failed_write_keeps_previous_output(mimic3_all, tmp_path, monkeypatch):
    write_omop(mimic3_all, tmp_path / "omop")
    before = sorted(p.name for p in (tmp_path / "omop").iterdir())
    _fail_on_call(monkeypatch, "write_csv", 4)
    with pytest.raises(OSError, match="simulated"):
        write_omop(mimic3_all, tmp_path / "omop")
    assert sorted(p.name for p in (tmp_path / "omop").iterdir()) == before
    assert _rows(tmp_path / "omop", "condition_occurrence").height == 1761
    assert [p.name for p in tmp_path.iterdir()] == ["omop"]  # no staging directory left beside it

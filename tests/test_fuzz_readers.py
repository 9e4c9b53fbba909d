"""Property: every reader, fed a small real extract broken one way, either reads it or raises the project's own
error whose one-line message (at most 300 characters) names the file or directory it was given.

The extracts are cut from ../shared/data so each read takes a fraction of a second; hypothesis picks the table,
the column, the row and the damage (a hostile cell value, a truncated or ragged file, a stray byte, a corrupt
gzip stream, a column repeated in another letter case). Examples are bounded so the module stays fast.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.readers import read_source
from ehrsynth.errors import MAX_MESSAGE_CHARS, EhrsynthError, InputError

# source -> {table file: columns worth breaking}
TARGETS = {
    "long": {"long.csv": ["patient", "visit", "time", "code", "birth_year", "death", "label:mortality"]},
    "meds": {"0.parquet": ["subject_id", "time", "code", "numeric_value"]},
    "mimic3": {"ADMISSIONS.csv": ["subject_id", "hadm_id", "admittime", "hospital_expire_flag"],
               "PATIENTS.csv": ["subject_id", "gender", "dob"], "DIAGNOSES_ICD.csv": ["hadm_id", "icd9_code", "seq_num"]},
    "mimic4": {"admissions.csv.gz": ["subject_id", "hadm_id", "admittime", "hospital_expire_flag"],
               "patients.csv.gz": ["subject_id", "anchor_age", "anchor_year"],
               "diagnoses_icd.csv.gz": ["hadm_id", "icd_code", "icd_version"]},
    "omop": {"person.csv.gz": ["person_id", "year_of_birth", "gender_concept_id"],
             "condition_occurrence.csv.gz": ["person_id", "condition_concept_id", "condition_start_date"],
             "visit_occurrence.csv.gz": ["visit_occurrence_id", "visit_start_date"]},
    "synthea": {"patients.csv": ["Id", "BIRTHDATE", "GENDER"], "encounters.csv": ["Id", "START", "PATIENT"],
                "conditions.csv": ["START", "PATIENT", "ENCOUNTER", "CODE"]},
}
HOSTILE = st.one_of(
    st.sampled_from(["NaN", "inf", "1e20", "9" * 5000, "-1", "", "7", "0000-01-01", "23/10/2164", "23-Oct-2164",
                     "2164-13-45", "\x00", "x" * 300, "-9223372036854775809", "1.5", "\ufeff1", '"', "a,b"]),
    st.text(max_size=10),
)
DAMAGE = st.sampled_from(["cell", "cell", "cell", "truncate", "short_row", "stray_byte", "case_duplicate"])


def _subset(frame: pl.DataFrame, column: str, keep: pl.Series) -> pl.DataFrame:
    return frame.filter(pl.col(column).is_in(keep.implode()))


@pytest.fixture(scope="module")
def bases(data_dir, tmp_path_factory, mimic3_corpus) -> dict[str, Path]:
    """Small valid inputs, one per source: MIMIC as shipped, OMOP and Synthea cut to a few patients."""
    from ehrsynth.data.writers.long import write_long
    from ehrsynth.data.writers.meds import write_meds

    root = tmp_path_factory.mktemp("bases")
    out = {"mimic3": root / "mimic3", "mimic4": root / "mimic4", "omop": root / "omop", "synthea": root / "synthea"}
    for path in out.values():
        path.mkdir()
    for name in TARGETS["mimic3"]:
        shutil.copy(data_dir / "mimic-iii-demo" / name, out["mimic3"])
    for name in TARGETS["mimic4"]:
        shutil.copy(data_dir / "mimic-iv-demo" / "hosp" / name, out["mimic4"])
    person = pl.read_csv(data_dir / "omop-gibleed" / "person.csv.gz", infer_schema=False).head(40)
    for name in TARGETS["omop"]:
        frame = pl.read_csv(data_dir / "omop-gibleed" / name, infer_schema=False)
        with gzip.open(out["omop"] / name, "wb") as handle:
            _subset(frame, "person_id", person["person_id"]).write_csv(handle)
    patients = pl.read_csv(data_dir / "synthea-111" / "patients.csv", infer_schema=False).head(10)
    for name in TARGETS["synthea"]:
        frame = pl.read_csv(data_dir / "synthea-111" / name, infer_schema=False)
        key = "Id" if name == "patients.csv" else "PATIENT"
        _subset(frame, key, patients["Id"]).write_csv(out["synthea"] / name)
    out["long"] = write_long(mimic3_corpus, root / "long.csv")
    out["meds"] = write_meds(mimic3_corpus, root / "meds") / "data" / "0.parquet"
    return out


def _break(path: Path, damage: str, column: str, row: int, value: str) -> None:
    if path.name.endswith(".parquet"):
        frame = pl.read_parquet(path)
        text = frame[column].cast(pl.String).scatter(row % frame.height, value)
        frame.with_columns(text.alias(column)).write_parquet(path)
        return
    packed = path.name.endswith(".gz")
    data = gzip.decompress(path.read_bytes()) if packed else path.read_bytes()
    if damage in ("cell", "case_duplicate"):
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
        if damage == "cell":
            rows[1 + row % (len(rows) - 1)][rows[0].index(column)] = value
        else:
            rows = [r + [column.swapcase() if i == 0 else value] for i, r in enumerate(rows)]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        data = buffer.getvalue().encode("utf-8")
    else:
        lines = data.split(b"\n")
        at = 1 + row % max(1, len(lines) - 2)
        if damage == "truncate":
            data = data[: len(lines[0]) + 1 + row % max(1, len(data) - len(lines[0]) - 1)]
        elif damage == "short_row":
            lines[at] = lines[at].rsplit(b",", 1)[0]
            data = b"\n".join(lines)
        else:  # stray_byte
            lines[at] += b"\xff"
            data = b"\n".join(lines)
    if packed and damage == "truncate":  # a cut gzip stream, not a cut CSV inside a whole one
        whole = gzip.compress(data)
        path.write_bytes(whole[: max(10, len(whole) - 1 - row % 50)])
        return
    path.write_bytes(gzip.compress(data) if packed else data)


def _check_read(source: str, bases: dict[str, Path], table: str, column: str, damage: str, row: int, value: str):
    with tempfile.TemporaryDirectory() as tmp:
        base = bases[source]
        if base.is_dir():
            where = Path(tmp) / source
            shutil.copytree(base, where)
            path = where / table
        else:
            where = path = Path(tmp) / base.name
            shutil.copy(base, path)
        if path.name.endswith(".parquet") and damage != "cell":
            damage = "cell"
        _break(path, damage, column, row, value)
        try:
            corpus = read_source(source, where)
        except EhrsynthError as exc:
            message = str(exc)
            assert isinstance(exc, InputError), message
            assert str(where) in message, message
            assert len(message) <= MAX_MESSAGE_CHARS and "\n" not in message
            return
        assert isinstance(corpus, PatientCorpus) and corpus.n_patients > 0


def _targets(source: str) -> list[tuple[str, str]]:
    return [(table, column) for table, columns in TARGETS[source].items() for column in columns]


FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


@pytest.mark.parametrize("source", list(TARGETS))
def test_reader_reads_or_names_the_file(source, bases):
    @FUZZ
    @given(target=st.sampled_from(_targets(source)), damage=DAMAGE, row=st.integers(0, 10**6), value=HOSTILE)
    def check(target, damage, row, value):
        _check_read(source, bases, *target, damage, row, value)

    check()

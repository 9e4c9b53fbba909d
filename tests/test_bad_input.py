"""Bad input: every failure is an InputError naming the file (and the column and first bad row where there is
one); recoverable oddities (patients without codes, duplicate rows) are counted in ``corpus.stats``; the CLI turns
each failure into one stderr line and exit code 2 without leaving an output directory; and no malformed long
table, however garbled, escapes as anything but an :class:`~ehrsynth.errors.EhrsynthError`.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ehrsynth.cli import main
from ehrsynth.data.build import BuildOptions
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.readers.long import read_long as _read_long
from ehrsynth.errors import (
    EhrsynthError,
    EmptyTableError,
    InputError,
    MissingColumnError,
    MissingFileError,
    ParseError,
)
from conftest import all_train

read_long = all_train(_read_long)  # counts below are facts of the files: every patient in train

GOOD = b"patient,visit,code\n1,2020-01-01,A\n1,2020-01-02,B\n2,2020-01-01,C\n"

# name -> (file bytes or None for "no file", InputError subclass, message pattern after the path)
BAD_FILES = {
    "missing": (None, MissingFileError, r": file not found"),
    "missing_column": (b"patient,code\n1,A\n", MissingColumnError,
                       r", column 'visit': required column missing"),
    "bad_date": (b"patient,visit,code\n1,2020-01-01,A\n1,2020-13-45,B\n", ParseError,
                 r", column 'visit', row 2: unparsable date '2020-13-45'"),
    "empty": (b"patient,visit,code\n", EmptyTableError, r": table has no data rows"),
    "not_utf8": (b"patient,visit,code\n1,2020-01-01,A\n1,2020-01-02,B\n2,2020-01-01,\xe9\n", ParseError,
                 r", row 3: invalid UTF-8 byte b'\\xe9'"),
}


def _write(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / f"{name}.csv"
    if content is not None:
        path.write_bytes(content)
    return path


def counts(corpus) -> tuple[int, int, int, int]:
    """(patients, visits, code occurrences, vocabulary size): assert on these, never on the corpus repr."""
    return corpus.n_patients, corpus.n_visits, corpus.n_codes, corpus.vocab_size


# ---- library errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_raises_input_error_naming_where(tmp_path, name):
    content, error, message = BAD_FILES[name]
    path = _write(tmp_path, name, content)
    with pytest.raises(error, match="^" + re.escape(str(path)) + message) as info:
        read_long(path)
    assert isinstance(info.value, InputError) and info.value.file == str(path)


def test_bad_date_error_carries_column_and_row(tmp_path):
    path = _write(tmp_path, "bad_date", BAD_FILES["bad_date"][0])
    with pytest.raises(ParseError) as info:
        read_long(path)
    assert (info.value.column, info.value.row) == ("visit", 2)


def test_bad_date_in_time_column(tmp_path):
    path = _write(tmp_path, "times", b"patient,visit,code,time\n1,a,A,2020-01-01\n1,b,B,yesterday\n2,c,C,\n")
    with pytest.raises(ParseError, match=re.escape(f"{path}, column 'time', row 2: unparsable date 'yesterday'")):
        read_long(path, time="time")


def test_blank_patient_id_names_row(tmp_path):
    path = _write(tmp_path, "blank_id", b"patient,visit,code\n1,v1,A\n,v2,B\n")
    with pytest.raises(ParseError, match=re.escape(f"{path}, column 'patient', row 2: blank identifier")):
        read_long(path)


def test_non_utf8_row_number_deep_in_a_gzip_file(tmp_path):
    """The reported row is right far beyond polars' first chunk, and through gzip."""
    lines = [b"patient,visit,code"] + [f"{i // 3},2020-01-0{1 + i % 3},C{i % 7}".encode() for i in range(5000)]
    lines[4321] += b"\xe9"  # data row 4321
    path = tmp_path / "deep.csv.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(ParseError, match=re.escape(f"{path}, row 4321: invalid UTF-8 byte")):
        read_long(path)


def test_non_utf8_row_number_after_a_quoted_newline(tmp_path):
    """Rows are CSV records, not physical lines: a quoted line break in row 1 must not shift the bad row."""
    content = b'patient,visit,code\n1,2020-01-01,"A\nB"\n1,2020-01-02,B\n2,2020-01-01,\xe9\n'
    path = _write(tmp_path, "multiline", content)
    with pytest.raises(ParseError, match=re.escape(f"{path}, row 3: invalid UTF-8 byte")):
        read_long(path)


def test_directory_reader_missing_table(tmp_path):
    from ehrsynth.data.readers.mimic3 import read_mimic3

    with pytest.raises(MissingFileError, match=re.escape(f"{tmp_path}: required table 'admissions' not found")):
        read_mimic3(tmp_path)
    with pytest.raises(MissingFileError, match=re.escape(f"{tmp_path / 'nope'}: directory not found")):
        read_mimic3(tmp_path / "nope")


# ---- recoverable oddities are counted -------------------------------------------------------------------------

NO_CODES = b"patient,visit,code\n1,2020-01-01,A\n1,2020-01-02,B\n2,2020-01-05,\n"


def test_patient_without_codes_dropped_and_counted(tmp_path):
    c = read_long(_write(tmp_path, "no_codes", NO_CODES))
    got = counts(c)
    assert got == (1, 2, 2, 2)
    stats = c.stats
    assert (stats["empty_visits"], stats["patients_without_codes"]) == (1, 1)


def test_patient_without_codes_kept_as_empty_visit(tmp_path):
    c = read_long(_write(tmp_path, "no_codes", NO_CODES), options=BuildOptions(empty="keep"))
    got = counts(c)
    assert got == (2, 3, 2, 2)
    empty_per_patient = [int(n) for n in c.codes_per_visit()[c.visit_offsets[:-1]]]
    assert sorted(empty_per_patient) == [0, 1]  # patient 2's only visit holds no code
    stats = c.stats
    assert (stats["empty_visits"], stats["patients_without_codes"]) == (1, 1)


def test_duplicate_rows_are_merged_and_counted(tmp_path):
    content = b"patient,visit,code\n1,2020-01-01,A\n1,2020-01-01,A\n1,2020-01-01, A \n1,2020-01-02,A\n2,2020-01-01,B\n"
    c = read_long(_write(tmp_path, "dups", content), options=BuildOptions(split=(1.0, 0.0, 0.0)))  # both kept
    stats = c.stats
    assert (stats["input_rows"], stats["duplicate_events"]) == (5, 2)  # ' A ' is A once stripped
    got = counts(c)
    assert got == (2, 3, 3, 2)


# ---- the CLI: one line on stderr, exit code 2, no output ------------------------------------------------------

def _prepare_args(path: Path, output: Path) -> list[str]:
    # every patient a training patient, every code kept: a two-patient file has no held-out part to filter by
    return ["ehrsynth", "prepare", "--source", "long", "--input", str(path), "--output", str(output),
            "--profile", "research", "--split", "1,0,0"]


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_cli_bad_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys, name):
    content, _, message = BAD_FILES[name]
    path = _write(tmp_path, name, content)
    output = tmp_path / "out" / "corpus"
    monkeypatch.setattr(sys, "argv", _prepare_args(path, output))
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.endswith("\n")
    assert re.match("^error: " + re.escape(str(path)) + message, err)
    assert not output.exists() and not (tmp_path / "out").exists()


def test_cli_error_stays_one_line_when_a_header_holds_a_newline(tmp_path, monkeypatch, capsys):
    """A quoted header cell may hold a line break; the message must still be one line (names shown with repr)."""
    path = _write(tmp_path, "newline_header", b'patient,"vi\nsit",code\n1,2020-01-01,A\n')
    monkeypatch.setattr(sys, "argv", _prepare_args(path, tmp_path / "corpus"))
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}, column 'visit': required column missing")


def test_cli_good_file_writes_corpus(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, "good", GOOD)
    output = tmp_path / "corpus"
    monkeypatch.setattr(sys, "argv", _prepare_args(path, output))
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"wrote {output}: 2 patients, 3 visits, 3 codes")
    got = counts(PatientCorpus.load(output))
    assert got == (2, 3, 3, 3)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == []


def test_cli_entry_point_subprocess(tmp_path):
    path = _write(tmp_path, "bad_date", BAD_FILES["bad_date"][0])
    output = tmp_path / "corpus"
    executable = Path(sys.executable).parent / "ehrsynth"
    result = subprocess.run([str(executable), *_prepare_args(path, output)[1:]], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: {path}, column 'visit', row 2: unparsable date '2020-13-45' (1 of 2 fail; expected ISO (YYYY-MM-DD))\n"
    assert result.stdout == ""
    assert not output.exists()


# ---- property: malformed long tables raise only EhrsynthError ------------------------------------------------

HEADER_NAMES = ["patient", "visit", "code", "time", "sex", "birth_year", "death", "age_at_first_visit",
                "label:x", "junk", "", "PATIENT", "Code"]
PLAUSIBLE = st.sampled_from(["1", "2", "3", "p1", "A", "B", "ICD9CM/4019", "2020-01-01", "2020-01-02 10:00:00",
                             "2020-01-03T04:05:06Z", "20200101", "0", "1.0", "F", "M", "1970"])
ODD = st.one_of(
    st.sampled_from(["", " ", "2020-13-45", "-1", "1.5", "nan", "NULL", '"', "'", ",", "\n", "\r", "é", "\x00",
                     "\ufeff", "9" * 30, "1e400", "2020-02-30", "1900-01-01 25:61:00"]),
    st.text(max_size=8),
)
CELLS = st.one_of(PLAUSIBLE, PLAUSIBLE, ODD)
# Mostly UTF-8, so most examples get past decoding and exercise the parsing behind it.
ENCODINGS = ["utf-8"] * 5 + ["utf-8-sig", "latin-1", "cp1252", "utf-16", "utf-32"]


@st.composite
def malformed_tables(draw) -> tuple[bytes, bool, bool]:
    """(file bytes, gzip it, pass time='time'): a header, rows of odd cells, an encoding, perhaps stray bytes.

    Most examples keep the required columns and a rectangular shape so the test reaches the date, id and
    builder code; the rest break the header, the row widths, the quoting or the encoding.
    """
    header = draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=4))
    if draw(st.integers(0, 5)) > 0:
        header = draw(st.permutations(["patient", "visit", "code", *header]))
    ragged = draw(st.integers(0, 4)) == 0
    width = st.integers(0, len(header) + 2) if ragged else st.just(len(header))
    rows = draw(st.lists(width.flatmap(lambda n: st.lists(CELLS, min_size=n, max_size=n)), max_size=8))
    if draw(st.integers(0, 4)) > 0:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows([header, *rows])
        text = buffer.getvalue()
    else:  # naive join: commas, quotes and newlines inside cells break the table's shape
        text = "\n".join(",".join(row) for row in [header, *rows]) + draw(st.sampled_from(["", "\n"]))
    data = text.encode(draw(st.sampled_from(ENCODINGS)), errors="replace")
    if draw(st.integers(0, 3)) == 0:
        position = draw(st.integers(0, len(data)))
        data = data[:position] + draw(st.binary(min_size=1, max_size=6)) + data[position:]
    return data, draw(st.booleans()), "time" in header and draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=malformed_tables())
# Shrunk failures found by longer runs of this property, kept so every run checks them.
@example(table=(b"patient,visit,code,birth_year\n1,2020-01-01,A,nan\n", False, False))
@example(table=(b"patient,visit,code,label:x\n1,2020-01-01,A,-1\n", False, False))
@example(table=(b"patient,visit,code,death\n1,2020-01-01,A,1e30\n", False, False))
def test_malformed_long_tables_raise_only_project_errors(tmp_path, table):
    data, compress, with_time = table
    path = tmp_path / ("table.csv.gz" if compress else "table.csv")
    path.write_bytes(gzip.compress(data) if compress else data)
    try:
        corpus = read_long(path, time="time" if with_time else None)
    except EhrsynthError:
        return
    assert isinstance(corpus, PatientCorpus)


# ---- issue 12: each listed kind has its own one-line error ------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and len(message) <= 300, message
    return message


def test_one_megabyte_code_is_refused_by_row(tmp_path):
    path = _write(tmp_path, "huge", b"patient,visit,code\n1,2020-01-01,A\n2,2020-01-02," + b"9" * 1_000_000 + b"\n")
    with pytest.raises(ParseError) as info:
        read_long(path)
    assert (info.value.file, info.value.column, info.value.row) == (str(path), "code", 2)
    assert "longer than 256 characters: '9999" in _one_line(info.value)


@pytest.mark.parametrize("value", ["NaN", "1e20", "inf", "9" * 30, "-9223372036854775809"])
def test_id_that_is_no_int64_is_refused(tmp_path, value):
    from ehrsynth.data.tables import parse_int, read_table

    path = _write(tmp_path, "ids", f"subject_id\n1\n{value}\n".encode())
    frame = read_table(path, ["subject_id"])
    with pytest.raises(ParseError, match=re.escape(f"{path}, column 'subject_id', row 2: not an integer")):
        parse_int(frame, "subject_id", path)


def test_corrupt_and_truncated_gzip(tmp_path):
    whole = gzip.compress(GOOD * 50)
    for name, data in (("cut.csv.gz", whole[: len(whole) // 2]), ("junk.csv.gz", b"\x1f\x8b" + b"junk" * 20)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ParseError, match=re.escape(f"{path}: corrupt or truncated gzip file")):
            read_long(path)


def _parquet(tmp_path, name, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.table(list(columns.values()), names=list(columns)), path)
    return path


def test_odd_parquet_files(tmp_path):
    import pyarrow as pa

    good = {"patient": pa.array([1, 2]), "visit": pa.array(["2020-01-01", "2020-01-02"]), "code": pa.array(["A", "B"])}
    cases = {
        "duration": ({**good, "patient": pa.array([1, 2], pa.duration("s"))}, "column 'patient': unsupported column type"),
        "list": ({**good, "code": pa.array([["A"], ["B"]])}, "column 'code': unsupported column type List"),
        "uint64": ({**good, "patient": pa.array([1, 2**64 - 1], pa.uint64())}, "column 'patient', row 2: integer too large"),
    }
    for name, (columns, message) in cases.items():
        path = _parquet(tmp_path, f"{name}.parquet", columns)
        with pytest.raises(ParseError, match=re.escape(f"{path}, {message}")):
            read_long(path)
    duplicate = tmp_path / "duplicate.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table([good["patient"], good["visit"], good["code"], good["code"]],
                            names=["patient", "visit", "code", "code"]), duplicate)
    with pytest.raises(ParseError, match=re.escape(f"{duplicate}: a column name appears twice")):
        read_long(duplicate)
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(_parquet(tmp_path, "ok.parquet", good).read_bytes()[:-30])
    with pytest.raises(ParseError, match=re.escape(f"{damaged}: not a readable Parquet file")):
        read_long(damaged)
    ok = read_long(_parquet(tmp_path, "uint_ok.parquet", {**good, "patient": pa.array([1, 2], pa.uint64())}),
                   options=BuildOptions(split=(1.0, 0.0, 0.0)))
    assert counts(ok) == (2, 2, 2, 2)


def test_permission_denied_is_one_line(tmp_path, monkeypatch):
    import polars as pl

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = _write(tmp_path, "locked", GOOD)
    monkeypatch.setattr(pl, "read_csv", denied)
    with pytest.raises(InputError, match=re.escape(f"{path}: permission denied")):
        read_long(path)


def test_same_column_for_two_roles(tmp_path):
    from ehrsynth.errors import ConfigError

    path = _write(tmp_path, "good", GOOD)
    with pytest.raises(ConfigError, match="--patient-col and --time-col both name column 'Patient'"):
        read_long(path, time="Patient")


def test_column_twice_in_other_case(tmp_path):
    path = _write(tmp_path, "twice", b"patient,visit,code,PATIENT\n1,2020-01-01,A,9\n")
    with pytest.raises(ParseError, match=re.escape(f"{path}, column 'PATIENT': column named twice")):
        read_long(path)


def test_row_with_too_few_fields(tmp_path):
    path = _write(tmp_path, "cut", GOOD + b"3,2020-01-0")
    assert read_long(_write(tmp_path, "whole", GOOD)).n_patients == 2
    path.write_bytes(GOOD[:-1] + b"\n3,2020")
    with pytest.raises(ParseError, match=re.escape(f"{path}, row 4: too few fields (2, the header has 3)")):
        read_long(path)


def test_bom_and_crlf_read_like_the_plain_file(tmp_path):
    plain = read_long(_write(tmp_path, "plain", GOOD))
    windows = read_long(_write(tmp_path, "windows", b"\xef\xbb\xbf" + GOOD.replace(b"\n", b"\r\n")))
    assert counts(windows) == counts(plain) == (2, 3, 3, 3)


# ---- dates --------------------------------------------------------------------------------------------------------

def test_day_first_and_month_name_dates_keep_their_times(tmp_path):
    for name, dates in (("dmy", ["23/10/2164", "24/10/2164"]), ("mon", ["23-Oct-2164", "24-Oct-2164"])):
        path = _write(tmp_path, name, f"patient,visit,code\n1,{dates[0]},A\n1,{dates[1]},B\n".encode())
        corpus = read_long(path)
        assert counts(corpus) == (1, 2, 2, 2)
        assert [str(d)[:10] for d in corpus.visit_start] == ["2164-10-23", "2164-10-24"]


def test_ambiguous_day_month_needs_date_format(tmp_path):
    from ehrsynth.data.notes import reading

    path = _write(tmp_path, "amb", b"patient,visit,code\n1,01/02/2164,A\n1,03/02/2164,B\n")
    with pytest.raises(ParseError, match=re.escape(f"{path}, column 'visit': dates fit both DD/MM/YYYY and MM/DD")):
        read_long(path)
    with reading(date_format="%m/%d/%Y"):
        corpus = read_long(path)
    assert [str(d)[:10] for d in corpus.visit_start] == ["2164-01-02", "2164-03-02"]


def test_few_unparsed_dates_counted_many_refused(tmp_path):
    rows = [f"{i},v{i},A,2020-01-{1 + i % 28:02d}" for i in range(300)]
    rows[150] = "150,v150,A,someday"
    path = _write(tmp_path, "few", ("patient,visit,code,time\n" + "\n".join(rows) + "\n").encode())
    corpus = read_long(path, time="time")
    assert corpus.stats["unparsed_dates"] == 1 and corpus.stats["unparsed_dates_by_column"] == {"few.csv:time": 1}
    rows[10] = rows[20] = rows[30] = "9,v9,A,later"
    path.write_text("patient,visit,code,time\n" + "\n".join(rows) + "\n")
    with pytest.raises(ParseError, match=re.escape(f"{path}, column 'time', row 11: unparsable date 'later' "
                                                   "(4 of 300 fail; expected ISO (YYYY-MM-DD))")):
        read_long(path, time="time")


def test_cli_date_format(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, "dmy", b"patient,visit,code\n1,01/02/2164,A\n1,03/02/2164,B\n")
    monkeypatch.setattr(sys, "argv", [*_prepare_args(path, tmp_path / "c"), "--date-format", "%d/%m/%Y"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert [str(d)[:10] for d in PatientCorpus.load(tmp_path / "c").visit_start] == ["2164-02-01", "2164-02-03"]


# ---- domains ------------------------------------------------------------------------------------------------------

def _mimic3_copy(data_dir, tmp_path, table, column, value):
    import shutil

    import polars as pl

    where = tmp_path / "m3"
    where.mkdir()
    for name in ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD"):
        shutil.copy(data_dir / "mimic-iii-demo" / f"{name}.csv", where)
    frame = pl.read_csv(where / f"{table}.csv", infer_schema=False)
    frame.with_columns(frame[column].scatter(4, value)).write_csv(where / f"{table}.csv")
    return where


def test_flag_outside_its_domain(data_dir, tmp_path):
    from ehrsynth.data.readers.mimic3 import read_mimic3

    where = _mimic3_copy(data_dir, tmp_path, "ADMISSIONS", "hospital_expire_flag", "7")
    with pytest.raises(ParseError, match=re.escape(f"{where / 'ADMISSIONS.csv'}, column 'hospital_expire_flag', "
                                                   "row 5: expected 0 or 1, got 7")):
        read_mimic3(where)


@pytest.mark.parametrize("year", ["0", "-5", "9999"])
def test_impossible_birth_year(tmp_path, year):
    path = _write(tmp_path, "born", f"patient,visit,code,birth_year\n1,2020-01-01,A,1970\n2,2020-01-01,B,{year}\n".encode())
    with pytest.raises(ParseError, match=re.escape(f"{path}, column 'birth_year', row 2: expected a birth year in "
                                                   "[1850, ")):
        read_long(path)


def test_shifted_dates_widen_birth_years():
    from ehrsynth.data.checks import birth_year_bounds

    import datetime

    import polars as pl

    now = datetime.date.today().year
    assert birth_year_bounds(None) == (1850, now + 1)
    shifted = pl.Series([datetime.datetime(now + 100, 1, 1)])
    assert birth_year_bounds(shifted) == (1750, now + 101)


def test_negative_age(data_dir, tmp_path):
    import shutil

    import polars as pl

    from ehrsynth.data.readers.mimic4 import read_mimic4

    for name in ("admissions", "patients", "diagnoses_icd"):
        shutil.copy(data_dir / "mimic-iv-demo" / "hosp" / f"{name}.csv.gz", tmp_path)
    frame = pl.read_csv(tmp_path / "patients.csv.gz", infer_schema=False)
    with gzip.open(tmp_path / "patients.csv.gz", "wb") as handle:
        frame.with_columns(frame["anchor_age"].scatter(2, "-3")).write_csv(handle)
    with pytest.raises(ParseError, match=re.escape(f"{tmp_path / 'patients.csv.gz'}, column 'anchor_age', row 3: "
                                                   "expected an age >= 0, got -3")):
        read_mimic4(tmp_path)


def test_missing_optional_omop_tables_are_announced_and_counted(data_dir, tmp_path, caplog):
    import shutil

    from ehrsynth.data.readers.omop import read_omop

    for name in ("person", "condition_occurrence"):
        shutil.copy(data_dir / "omop-gibleed" / f"{name}.csv.gz", tmp_path)
    (tmp_path / "visit_occurrence.csv").write_bytes(b"\x00\x01not a table")
    with caplog.at_level("WARNING", logger="ehrsynth"):
        corpus = read_omop(tmp_path)
    assert corpus.stats["missing_optional_tables"] == 2
    assert corpus.stats["missing_optional_table_names"] == ["visit_occurrence", "death"]
    notices = [r.getMessage() for r in caplog.records]
    assert notices[0].startswith("notice: optional table 'visit_occurrence' unreadable (required column missing")
    assert notices[1] == "notice: optional table 'death' not found; continuing without it"


# ---- options, models and evaluation -------------------------------------------------------------------------------

def _run_cli(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["ehrsynth", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_visit_window_hours_must_be_finite(tmp_path, monkeypatch, capsys, value):
    code, err = _run_cli(monkeypatch, capsys, ["prepare", "--source", "meds", "--input", str(tmp_path), "--output",
                                               str(tmp_path / "c"), "--visit-window-hours", value])
    assert code == 2 and "'--visit-window-hours': must be a finite number >= 0" in err


@pytest.mark.parametrize("argv", [["--guidance", "nan"], ["--guidance", "-1"], ["--device", "cuda"]])
def test_generate_refuses_impossible_options(tmp_path, monkeypatch, capsys, argv):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _run_cli(monkeypatch, capsys, ["generate", str(tmp_path), "-n", "2", "--out", str(tmp_path / "g"),
                                               *argv])
    assert code == 2 and f"Invalid value for '{argv[0]}'" in err


@pytest.fixture
def saved_model(mimic3_corpus, tmp_path):
    from ehrsynth.models.ehrdiff import EHRDiffConfig, EHRDiffModel
    from ehrsynth.models.io import save_model

    config = EHRDiffConfig(hidden_dims=(8,), time_dim=8, fourier_dim=4, column_weight_power=0.0)  # weights checked
    model = EHRDiffModel.from_corpus(mimic3_corpus, config)
    return save_model(model, tmp_path / "model")


def test_damaged_model_files_are_named(saved_model):
    import json

    from ehrsynth.models.io import load_model

    header = json.loads((saved_model / "model.json").read_text())
    codes = header["meta"]["codes"]
    weights = (saved_model / "model.safetensors").read_bytes()
    json_file = saved_model / "model.json"
    cases = [
        ([header], f"{json_file}: expected a JSON object with family, config and meta, got a list"),
        ({**header, "meta": {**header["meta"], "codes": [None, *codes[1:]]}},
         f"{json_file}: meta 'codes' entry 0 must be a non-empty string, got None"),
        ({**header, "meta": {**header["meta"], "codes": [codes[1], *codes[1:]]}},
         f"{json_file}: meta 'codes' entry 1 repeats {codes[1]!r}"),
        ({**header, "meta": {**header["meta"], "codes": codes[:-3]}},
         f"{saved_model}: weights do not match model.json: "),
    ]
    for content, message in cases:
        json_file.write_text(json.dumps(content))
        with pytest.raises(InputError, match="^" + re.escape(message)) as info:
            load_model(saved_model)
        _one_line(info.value)
    json_file.write_bytes(json.dumps(header).encode()[:-1] + b"\xff}")
    with pytest.raises(InputError, match=re.escape(f"{json_file}: not UTF-8 (byte b'\\xff'")):
        load_model(saved_model)
    json_file.write_text(json.dumps(header))
    for keep in (0, 8, len(weights) // 2):
        (saved_model / "model.safetensors").write_bytes(weights[:keep])
        with pytest.raises(InputError, match=re.escape(f"{saved_model / 'model.safetensors'}: damaged or truncated")):
            load_model(saved_model)


def test_wrong_vocabulary_size_says_what_mismatched(saved_model):
    import json

    from ehrsynth.models.io import load_model

    header = json.loads((saved_model / "model.json").read_text())
    header["meta"]["codes"] = header["meta"]["codes"][:-3]
    (saved_model / "model.json").write_text(json.dumps(header))
    with pytest.raises(InputError) as info:
        load_model(saved_model)
    message = _one_line(info.value)
    assert "Error(s) in loading state_dict" not in message
    # the saved width: 453 codes, plus sex and label columns when the model generates them
    assert re.search(r"is \((45[36], ?\d*|\d+, 45[36])\) in model.safetensors", message), message
    assert "450-code vocabulary in model.json" in message


def test_evaluate_refuses_unrelated_corpora(mimic3_corpus, data_dir):
    from ehrsynth.data.readers.omop import read_omop
    from ehrsynth.pipeline import check_vocabulary_overlap

    omop = read_omop(data_dir / "omop-gibleed")
    with pytest.raises(InputError, match=r"^synthetic: only 0 of the 453 synthetic codes occur in the real training"):
        check_vocabulary_overlap(mimic3_corpus, omop, where="synthetic")
    check_vocabulary_overlap(mimic3_corpus, mimic3_corpus)  # the same vocabulary passes


def test_unexpected_error_prints_one_line_and_logs_the_traceback(tmp_path, monkeypatch, capsys):
    import ehrsynth.data.readers as readers

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(readers, "read_source", broken)
    code, err = _run_cli(monkeypatch, capsys, _prepare_args(_write(tmp_path, "g", GOOD), tmp_path / "c")[1:])
    assert code == 1 and len(err.splitlines()) == 1
    log = Path(re.search(r"traceback in (\S+)$", err.strip()).group(1))
    assert err.startswith("internal error (RuntimeError)") and "RuntimeError: a bug" in log.read_text()
    log.unlink()

"""Malformed input through the real CLI: >= 1,000 cases derived from ../shared/data, each a subprocess.

Every case copies a small, valid input of one of the six sources, breaks it one way (a hostile cell value in an
id, code, date, flag or birth column; a truncated, ragged, empty, mis-encoded or unreadable file; a corrupt
gzip or Parquet file; odd Parquet types; a column twice; a bad option; a damaged model file), runs
``python -m ehrsynth.cli prepare ...`` (or ``generate``/``evaluate`` for model and evaluation cases) and
records the exit code, stderr, time and the child's peak memory (``ru_maxrss`` from ``wait4``).

Printed: exit 0 / exit 2 / other, tracebacks, how often the last-resort handler fired, how many exit-2
messages name the file (and column / row), messages over 300 characters, peak memory (overall and on the
1 MB field) and the slowest case, then the same counts per kind.

    PYTHONPATH=. python benchmarks/fuzz_readers.py [--limit N] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" if (ROOT.parent / "shared" / "data").is_dir() else Path("/work/shared/data")
MB = "9" * 1_000_000
HOSTILE = {
    "nan": "NaN", "inf": "inf", "1e20": "1e20", "1mb_number": MB, "negative": "-1", "blank": "", "seven": "7",
    "year0": "0000-01-01", "dd/mm": "23/10/2164", "dd-Mon": "23-Oct-2164", "bad_date": "2164-13-45",
    "nul": "\u00e9\x00", "long_text": "x" * 300, "int_overflow": "-9223372036854775809", "fraction": "1.5",
    "bom": "\ufeff1",
}


@dataclass
class Case:
    kind: str
    argv: list[str]
    names: list[str]  # strings a good error message contains: the file, or the flag
    setup: object = None  # callable(case_dir) -> None, run in the worker
    as_nobody: bool = False
    result: dict = field(default_factory=dict)


# ---- base inputs ------------------------------------------------------------------------------------------------

def build_bases(work: Path) -> dict[str, Path]:
    """One small, valid input per source under ``work/base``."""
    sys.path.insert(0, str(ROOT))
    from ehrsynth.data.readers.mimic3 import read_mimic3
    from ehrsynth.data.writers.long import write_long
    from ehrsynth.data.writers.meds import write_meds

    base = work / "base"
    bases = {}
    m3 = base / "mimic3"
    m3.mkdir(parents=True)
    for name in ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD"):
        shutil.copy(DATA / "mimic-iii-demo" / f"{name}.csv", m3)
    bases["mimic3"] = m3
    m4 = base / "mimic4"
    m4.mkdir()
    for name in ("admissions", "patients", "diagnoses_icd"):
        shutil.copy(DATA / "mimic-iv-demo" / "hosp" / f"{name}.csv.gz", m4)
    bases["mimic4"] = m4
    omop = base / "omop"
    omop.mkdir()
    for name in ("person", "visit_occurrence", "death"):
        shutil.copy(DATA / "omop-gibleed" / f"{name}.csv.gz", omop)
    conditions = pl.read_csv(DATA / "omop-gibleed" / "condition_occurrence.csv.gz", infer_schema=False, n_rows=4000)
    with gzip.open(omop / "condition_occurrence.csv.gz", "wb") as handle:
        conditions.write_csv(handle)
    bases["omop"] = omop
    syn = base / "synthea"
    syn.mkdir()
    for name in ("patients", "encounters", "conditions"):
        shutil.copy(DATA / "synthea-111" / f"{name}.csv", syn)
    bases["synthea"] = syn
    corpus = read_mimic3(m3)
    bases["long"] = write_long(corpus, base / "long.csv")
    bases["long.parquet"] = write_long(corpus, base / "long.parquet")
    bases["meds"] = write_meds(corpus, base / "meds") / "data" / "0.parquet"
    return bases


# table files and the columns whose cells the fuzzer breaks
TARGETS = {
    "long": {"long.csv": ["patient", "visit", "time", "code", "birth_year", "death", "age_at_first_visit",
                          "label:mortality"]},
    "meds": {"0.parquet": ["subject_id", "time", "code", "numeric_value"]},
    "mimic3": {"ADMISSIONS.csv": ["subject_id", "hadm_id", "admittime", "hospital_expire_flag"],
               "PATIENTS.csv": ["subject_id", "gender", "dob"], "DIAGNOSES_ICD.csv": ["hadm_id", "icd9_code", "seq_num"]},
    "mimic4": {"admissions.csv.gz": ["subject_id", "hadm_id", "admittime", "hospital_expire_flag"],
               "patients.csv.gz": ["subject_id", "anchor_age", "anchor_year"],
               "diagnoses_icd.csv.gz": ["hadm_id", "icd_code", "icd_version"]},
    "omop": {"person.csv.gz": ["person_id", "year_of_birth", "gender_concept_id"],
             "condition_occurrence.csv.gz": ["person_id", "condition_concept_id", "condition_start_date",
                                             "visit_occurrence_id"],
             "visit_occurrence.csv.gz": ["visit_occurrence_id", "visit_start_date"]},
    "synthea": {"patients.csv": ["Id", "BIRTHDATE", "GENDER"], "encounters.csv": ["Id", "START", "PATIENT"],
                "conditions.csv": ["START", "PATIENT", "ENCOUNTER", "CODE"]},
}


def source_input(source: str, case_dir: Path) -> Path:
    """Where a case's copy of the source lives (a file for long/meds, else a directory)."""
    return {"long": case_dir / "long.csv", "meds": case_dir / "meds" / "data" / "0.parquet"}.get(source, case_dir / source)


def copy_base(bases: dict[str, Path], source: str, case_dir: Path) -> Path:
    target = source_input(source, case_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    if bases[source].is_dir():
        shutil.copytree(bases[source], target)
    else:
        shutil.copy(bases[source], target)
    return target


def table_path(source: str, case_dir: Path, table: str) -> Path:
    where = source_input(source, case_dir)
    return where if where.is_file() or source in ("long", "meds") else where / table


def read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.name.endswith(".gz") else data)


# ---- mutations --------------------------------------------------------------------------------------------------

def set_cell(path: Path, column: str, value: str, rng: random.Random) -> None:
    if path.name.endswith(".parquet"):
        frame = pl.read_parquet(path)
        row = rng.randrange(frame.height)
        text = frame[column].cast(pl.String)
        frame = frame.with_columns(text.scatter(row, value).alias(column))
        frame.write_parquet(path)
        return
    rows = list(csv.reader(io.StringIO(read_bytes(path).decode("utf-8"))))
    index = rows[0].index(column)
    rows[1 + rng.randrange(len(rows) - 1)][index] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    write_bytes(path, out.getvalue().encode("utf-8"))


def edit_lines(path: Path, how: str, rng: random.Random, column: str) -> None:
    data = read_bytes(path)
    lines = data.split(b"\n")
    body = [i for i in range(1, len(lines)) if lines[i]]
    row = body[len(body) // 2] if body else 1
    if how == "truncate":
        data = data[: rng.randrange(len(lines[0]) + 2, len(data) - 1)]
        data = data if not data.endswith(b"\n") else data[:-2]
    elif how == "short_row":
        lines[row] = lines[row].rsplit(b",", 1)[0]
        data = b"\n".join(lines)
    elif how == "long_row":
        lines[row] = lines[row] + b",extra"
        data = b"\n".join(lines)
    elif how == "latin1":
        lines[row] = lines[row] + b"\xe9"
        data = b"\n".join(lines)
    elif how == "empty":
        data = b""
    elif how == "header_only":
        data = lines[0] + b"\n"
    elif how == "dup_case":  # the first target column again, in the other letter case
        lines = [line + b"," + (column.swapcase().encode() if i == 0 else b"X") if line else line
                 for i, line in enumerate(lines)]
        data = b"\n".join(lines)
    elif how == "drop_first_column":
        data = b"\n".join(line.split(b",", 1)[-1] if line else line for line in lines)
    elif how == "quote_open":
        lines[row] = b'"' + lines[row]
        data = b"\n".join(lines)
    elif how == "crlf_bom":
        data = b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
    write_bytes(path, data)


def damage_raw(path: Path, how: str, rng: random.Random) -> None:
    """Byte-level damage to the file as stored (gzip or Parquet container)."""
    data = path.read_bytes()
    if how == "cut":
        data = data[: rng.randrange(1, max(2, len(data) - 1))]
    elif how == "flip":
        data = bytearray(data)
        for _ in range(8):
            data[rng.randrange(len(data))] ^= 0xFF
        data = bytes(data)
    elif how == "plain_text":
        data = b"this is not the format its name says\n"
    path.write_bytes(data)


def parquet_types(path: Path, how: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    n = table.num_rows
    if how == "duration":
        table = table.set_column(0, table.column_names[0], pa.array([1] * n, pa.duration("s")))
    elif how == "list":
        table = table.set_column(2, table.column_names[2], pa.array([["a"]] * n))
    elif how == "uint64_huge":
        table = table.set_column(0, table.column_names[0], pa.array([2**64 - 1] * n, pa.uint64()))
    elif how == "uint64_ok":
        table = table.set_column(0, table.column_names[0], pa.array(list(range(n)), pa.uint64()))
    elif how == "duplicate_names":
        table = pa.table(table.columns + [table.column(0)], names=table.column_names + [table.column_names[0]])
    elif how == "case_duplicate":
        table = pa.table(table.columns + [table.column(2)], names=table.column_names + [table.column_names[2].upper()])
    elif how == "categorical":
        table = table.set_column(2, table.column_names[2], table.column(2).dictionary_encode())
    pq.write_table(table, path)


# ---- cases ------------------------------------------------------------------------------------------------------

def prepare_argv(source: str, where: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--source", source, "--input", str(where), "--output", str(out), *extra]


def make_cases(bases: dict[str, Path], rng: random.Random) -> list[Case]:
    cases: list[Case] = []

    def add(kind, source, mutate, extra=(), names=None, as_nobody=False, table=None):
        def setup(case_dir, mutate=mutate, source=source, table=table, seed=rng.randrange(2**31)):
            copy_base(bases, source, case_dir)
            if mutate is not None:
                mutate(table_path(source, case_dir, table) if table else case_dir, random.Random(seed))
        cases.append(Case(kind, ["SOURCE", source, *extra], names or [table or ""], setup, as_nobody))

    for source, tables in TARGETS.items():
        for table, columns in tables.items():
            for column in columns:
                for label, value in HOSTILE.items():
                    add(f"cell:{label}", source, lambda p, r, c=column, v=value: set_cell(p, c, v, r), table=table)
            if table.endswith(".parquet"):
                for how in ("cut", "flip", "plain_text"):
                    add(f"parquet:{how}", source, lambda p, r, h=how: damage_raw(p, h, r), table=table)
                for how in ("duration", "list", "uint64_huge", "uint64_ok", "duplicate_names", "case_duplicate",
                            "categorical"):
                    add(f"parquet:{how}", source, lambda p, r, h=how: parquet_types(p, h), table=table)
                continue
            for how in ("truncate", "truncate", "truncate", "short_row", "long_row", "latin1", "empty",
                        "header_only", "dup_case", "drop_first_column", "quote_open", "crlf_bom"):
                add(f"file:{how}", source, lambda p, r, h=how, c=columns[0]: edit_lines(p, h, r, c), table=table)
            if table.endswith(".gz"):
                for how in ("cut", "cut", "flip", "plain_text"):
                    add(f"gzip:{how}", source, lambda p, r, h=how: damage_raw(p, h, r), table=table)
            add("file:permission_denied", source, lambda p, r: p.chmod(0), table=table, as_nobody=True)
            add("file:missing", source, lambda p, r: p.unlink(), table=table,
                names=[table.split(".")[0], "meds/data"])
            add("file:is_directory", source, lambda p, r: (p.unlink(), p.mkdir()), table=table)
    # long parquet: the same Parquet damage as MEDS
    for how in ("duration", "list", "uint64_huge", "duplicate_names", "case_duplicate"):
        def setup(case_dir, h=how):
            shutil.copy(bases["long.parquet"], case_dir / "long.parquet")
            parquet_types(case_dir / "long.parquet", h)
        cases.append(Case(f"parquet:{how}", ["SOURCE", "long.parquet"], ["long.parquet"], setup))
    # bad options
    for extra, flag in ((["--patient-col", "patient", "--time-col", "patient"], "--time-col"),
                        (["--visit-col", "code", "--code-col", "CODE"], "--code-col"),
                        (["--date-format", "%Q"], "--date-format"), (["--tables", "nope"], "tables")):
        add("option:" + flag.strip("-"), "long" if "tables" not in extra else "mimic3", None, extra, names=[flag])
    for value in ("inf", "-inf", "nan", "-1", "1e300"):
        add("option:visit-window-hours", "meds", None, ["--visit-window-hours", value], names=["--visit-window-hours"])
    # day-first dates: refused when ambiguous, read with --date-format
    def day_first(path, r):
        frame = pl.read_csv(path, infer_schema=False)
        frame = frame.with_columns(pl.col("time").str.to_datetime().dt.strftime("%d/%m/%Y %H:%M:%S"))
        frame.write_csv(path)
    add("dates:day_first", "long", day_first, table="long.csv")
    add("dates:day_first+format", "long", day_first, ["--date-format", "%d/%m/%Y %H:%M:%S"], table="long.csv")
    # optional OMOP tables
    add("omop:no_visit_occurrence", "omop", lambda p, r: p.unlink(), table="visit_occurrence.csv.gz")
    add("omop:no_death", "omop", lambda p, r: p.unlink(), table="death.csv.gz")
    return cases


def model_cases(work: Path, env: dict) -> list[Case]:
    """Damaged model files, impossible devices and guidance, and evaluation against an unrelated corpus."""
    run = work / "run"
    corpus = work / "m3corpus"
    omop_corpus = work / "omopcorpus"
    cli = [sys.executable, "-m", "ehrsynth.cli", "--threads", "1"]
    subprocess.run([*cli, "prepare", "--source", "mimic3", "--input", str(DATA / "mimic-iii-demo"), "--output",
                    str(corpus)], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "prepare", "--source", "omop", "--input", str(DATA / "omop-gibleed"), "--output",
                    str(omop_corpus)], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "train", "ehrdiff", "--data", str(corpus), "--out", str(run), "--preset", "small",
                    "--max-steps", "2", "--device", "cpu"], env=env, check=True, capture_output=True)
    synthetic = work / "synthetic"
    subprocess.run([*cli, "generate", str(run), "-n", "20", "--out", str(synthetic)], env=env, check=True,
                   capture_output=True)
    cases = []
    import json

    header = json.loads((run / "model" / "model.json").read_text())

    def damaged(kind, change):
        def setup(case_dir, change=change):
            shutil.copytree(run / "model", case_dir / "model")
            change(case_dir / "model")
        cases.append(Case(kind, ["generate", "{case}/model", "-n", "5", "--out", "{case}/gen"], ["model"], setup))

    def header_as(value):
        return lambda d: (d / "model.json").write_text(json.dumps(value))

    damaged("model:json_list", header_as([header]))
    damaged("model:null_code", header_as({**header, "meta": {**header["meta"], "codes": [None] + header["meta"]["codes"][1:]}}))
    damaged("model:duplicate_code", header_as({**header, "meta": {**header["meta"], "codes": [header["meta"]["codes"][1]] + header["meta"]["codes"][1:]}}))
    damaged("model:wrong_vocab_size", header_as({**header, "meta": {**header["meta"], "codes": header["meta"]["codes"][:-3]}}))
    damaged("model:non_utf8", lambda d: (d / "model.json").write_bytes((d / "model.json").read_bytes()[:-3] + b"\xff}\n"))
    damaged("model:not_json", lambda d: (d / "model.json").write_text("{"))
    for keep in (0, 8, 100, 1000, 100_000):
        damaged("model:truncated_weights",
                lambda d, k=keep: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:k]))
    for value in ("nan", "-1", "inf"):
        cases.append(Case("option:guidance", ["generate", str(run), "-n", "5", "--out", "{case}/gen", "--guidance",
                                              value], ["--guidance"]))
    cases.append(Case("option:device_cuda", ["generate", str(run), "-n", "5", "--out", "{case}/gen", "--device",
                                             "cuda"], ["--device"]))
    cases.append(Case("evaluate:disjoint_codes", ["evaluate", "--train", str(omop_corpus), "--test", str(omop_corpus),
                                                  "--synthetic", str(synthetic), "--out", "{case}/report"],
                      [str(synthetic)]))
    return cases


# ---- running ----------------------------------------------------------------------------------------------------

def run_case(case: Case, index: int, work: Path, env: dict, timeout: float) -> None:
    case_dir = work / "cases" / str(index)
    case_dir.mkdir(parents=True)
    if case.setup is not None:
        case.setup(case_dir)
    if case.argv[0] == "SOURCE":
        source = case.argv[1]
        where = case_dir / "long.parquet" if source == "long.parquet" else source_input(source, case_dir)
        if source == "meds":
            where = case_dir / "meds"
        argv = prepare_argv("long" if source == "long.parquet" else source, where, case_dir / "out", *case.argv[2:])
    else:
        argv = [a.replace("{case}", str(case_dir)) for a in case.argv]
    # prepare never imports torch; --threads would (a second per case), so only the model cases pass it
    threads = ["--threads", "1"] if argv[0] in ("generate", "evaluate") else []
    command = [sys.executable, "-m", "ehrsynth.cli", *threads, *argv]
    if case.as_nobody:
        case_dir.chmod(0o777)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=case_dir)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    case.result = {"rc": process.returncode, "stderr": stderr, "seconds": elapsed, "maxrss_mb": usage.ru_maxrss / 1024}
    shutil.rmtree(case_dir, ignore_errors=True)


def names_one(case: Case, line: str) -> bool:
    """Whether an error line names the case's file (or flag), in any letter case."""
    return any(name and name.lower() in line.lower() for name in case.names)


def summarise(cases: list[Case]) -> None:
    def error_line(case):
        lines = [line for line in case.result["stderr"].splitlines() if line.startswith(("error:", "Error:"))]
        return lines[-1] if lines else ""

    rows = []
    total = {"n": 0, "exit0": 0, "exit2": 0, "other": 0, "traceback": 0, "net": 0, "exit2_named": 0,
             "column": 0, "row": 0, "over300": 0}
    by_kind: dict[str, dict] = {}
    for case in cases:
        r = case.result
        line = error_line(case)
        k = by_kind.setdefault(case.kind, {key: 0 for key in total})
        for bucket in (total, k):
            bucket["n"] += 1
            bucket["exit0" if r["rc"] == 0 else "exit2" if r["rc"] == 2 else "other"] += 1
            bucket["traceback"] += "Traceback (most recent call last)" in r["stderr"]
            bucket["net"] += "internal error (" in r["stderr"]
            if r["rc"] == 2:
                bucket["exit2_named"] += names_one(case, line)
                bucket["column"] += "column '" in line
                bucket["row"] += ", row " in line
            bucket["over300"] += len(line) > 300
        rows.append(r)
    slowest = max(cases, key=lambda c: c.result["seconds"])
    peak = max(cases, key=lambda c: c.result["maxrss_mb"])
    mb_cases = [c for c in cases if c.kind == "cell:1mb_number"]
    print(f"cases {total['n']}: exit 0 {total['exit0']}, exit 2 {total['exit2']}, other {total['other']}")
    print(f"tracebacks {total['traceback']}; last-resort handler fired {total['net']}")
    print(f"exit-2 messages naming the file (or flag) {total['exit2_named']}/{total['exit2']}; "
          f"naming a column {total['column']}; naming a row {total['row']}")
    print(f"messages over 300 characters {total['over300']}")
    print(f"peak memory {peak.result['maxrss_mb']:.0f} MB ({peak.kind}); 1 MB field: max "
          f"{max(c.result['maxrss_mb'] for c in mb_cases):.0f} MB, slowest {max(c.result['seconds'] for c in mb_cases):.1f} s")
    print(f"slowest case {slowest.result['seconds']:.1f} s ({slowest.kind} {' '.join(slowest.argv[:2])})")
    print()
    print("| kind | cases | exit 0 | exit 2 | other | tracebacks | exit 2 naming file/flag |")
    print("|---|---|---|---|---|---|---|")
    for kind in sorted(by_kind):
        k = by_kind[kind]
        print(f"| {kind} | {k['n']} | {k['exit0']} | {k['exit2']} | {k['other']} | {k['traceback']} | "
              f"{k['exit2_named']}/{k['exit2']} |")
    bad = [c for c in cases if c.result["rc"] not in (0, 2) or "Traceback" in c.result["stderr"]
           or (c.result["rc"] == 2 and not names_one(c, error_line(c)))]
    for case in bad[:20]:
        print("NOTE", case.kind, case.argv[:2], case.result["rc"], error_line(case)[:200] or case.result["stderr"][-300:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="run only every k-th case to reach about N")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="ehrsynth-fuzz-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        bases = build_bases(work)
        cases = make_cases(bases, random.Random(args.seed)) + model_cases(work, env)
        if args.limit and args.limit < len(cases):
            step = len(cases) / args.limit
            cases = [cases[int(i * step)] for i in range(args.limit)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda ic: run_case(ic[1], ic[0], work, env, args.timeout), enumerate(cases)))
        print(f"{len(cases)} cases in {time.perf_counter() - start:.0f} s with {args.workers} workers")
        summarise(cases)


if __name__ == "__main__":
    main()

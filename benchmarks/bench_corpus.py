"""Corpus benchmark: read + build GiBleed (OMOP) and a synthetic 1M-patient / 20M-code long table.

Prints wall time and peak memory (RSS) for each stage. The long table is generated here from a fixed seed
(never downloaded): Zipf-like code frequencies over 5,000 ICD-10-like codes, 1-8 visits per patient.

    python benchmarks/bench_corpus.py [--patients 1000000] [--codes-per-patient 20]

Each measured stage runs in a fresh subprocess so peak RSS belongs to that stage alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_long_table(path: Path, n_patients: int, codes_per_patient: int, seed: int = 0) -> int:
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    n_rows = n_patients * codes_per_patient
    patient = np.repeat(np.arange(n_patients, dtype=np.int64), codes_per_patient)
    visits_of_patient = rng.integers(1, 9, size=n_patients)
    visit = (rng.random(n_rows) * np.repeat(visits_of_patient, codes_per_patient)).astype(np.int64)
    visit_id = patient * 16 + visit
    ranks = np.arange(1, 5001)
    weights = 1.0 / ranks
    code_index = rng.choice(5000, size=n_rows, p=weights / weights.sum())
    names = np.array([f"ICD10CM/C{i:04d}" for i in range(5000)])
    day0 = np.datetime64("2015-01-01")
    time_ = day0 + (np.repeat(rng.integers(0, 1000, n_patients), codes_per_patient) + visit * 30).astype("timedelta64[D]")
    pl.DataFrame({"patient": patient, "visit": visit_id, "code": names[code_index],
                  "time": time_.astype("datetime64[us]")}).write_parquet(path)
    return n_rows


def measure(stage: str, arg: str) -> dict:
    code = f"""
import json, resource, time, sys
t = time.perf_counter()
if {stage!r} == "gibleed":
    from ehrsynth.data.readers.omop import read_omop
    corpus = read_omop({arg!r})
elif {stage!r} == "long":
    from ehrsynth.data.readers.long import read_long
    corpus = read_long({arg!r}, time="time")
elif {stage!r} == "load":
    from ehrsynth.data.corpus import PatientCorpus
    corpus = PatientCorpus.load({arg!r})
    corpus.codes.sum()
build = time.perf_counter() - t
if {stage!r} == "long":
    t2 = time.perf_counter(); corpus.save({arg!r} + ".corpus"); save = time.perf_counter() - t2
else:
    save = None
print(json.dumps({{"stage": {stage!r}, "seconds": round(build, 2), "save_seconds": save and round(save, 2),
    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    "patients": corpus.n_patients, "visits": corpus.n_visits, "codes": corpus.n_codes}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--codes-per-patient", type=int, default=20)
    parser.add_argument("--generate-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only is not None:
        make_long_table(args.generate_only, args.patients, args.codes_per_patient)
        return
    rows = []
    rows.append(measure("gibleed", str(DATA / "omop-gibleed")))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.parquet"
        t = time.perf_counter()
        # generate in a child too: Linux carries ru_maxrss across fork+exec, so the parent must stay small
        subprocess.run([sys.executable, __file__, "--generate-only", str(path), "--patients", str(args.patients),
                        "--codes-per-patient", str(args.codes_per_patient)], check=True)
        print(f"generated the long table in {time.perf_counter() - t:.1f}s ({path.stat().st_size / 2**20:.0f} MiB)")
        rows.append(measure("long", str(path)))
        rows.append(measure("load", str(path) + ".corpus"))
    print(f"{'stage':<10}{'patients':>12}{'visits':>12}{'codes':>14}{'seconds':>10}{'save s':>8}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['stage']:<10}{r['patients']:>12,}{r['visits']:>12,}{r['codes']:>14,}{r['seconds']:>10}"
              f"{str(r['save_seconds'] or '-'):>8}{r['peak_rss_gib']:>10}")


if __name__ == "__main__":
    main()

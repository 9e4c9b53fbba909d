"""Dates of generated HALO records, as written: train briefly, generate, write long / MEDS / OMOP, read the
written times back and compare them with the real training data. Aggregates only (no rows).

    python benchmarks/bench_dates.py --datasets demo synthea --steps 600

Prints, per data set and output format: the share of undated visits, the share of gaps under one hour,
gap quantiles (days), the calendar range of the visits and of the birth years, and OMOP's null year_of_birth.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.data.readers.synthea import read_synthea
from ehrsynth.data.writers import write_corpus
from ehrsynth.demo_data import demo_directory
from ehrsynth.pipeline import DEMO_SETTINGS, generate_corpus, train_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
MAX_VISITS = DEMO_SETTINGS["halo"]["model"]["n_ctx"] - 3
READERS = {
    "demo": lambda: read_omop(demo_directory(), options=BuildOptions(max_visits=MAX_VISITS)),
    "synthea": lambda: read_synthea(DATA / "synthea-111", options=BuildOptions(max_visits=MAX_VISITS)),
}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def summary(patient: np.ndarray, times: np.ndarray, birth_year: np.ndarray) -> dict[str, object]:
    """Aggregates of visit times (datetime64, NaT = undated) grouped by ``patient`` (sorted within patient)."""
    order = np.lexsort((times.astype("datetime64[s]").astype(np.int64), patient))
    patient, times = patient[order], times[order].astype("datetime64[s]")
    later = np.r_[False, patient[1:] == patient[:-1]]
    gaps = (times[1:] - times[:-1]).astype(np.int64)[later[1:]] / 86_400 if len(times) else np.zeros(0)
    dated = times[~np.isnat(times)]
    years = dated.astype("datetime64[Y]").astype(np.int64) + 1970
    births = birth_year[birth_year >= 0]
    return {
        "visits": len(times),
        "undated": float(np.isnat(times).mean()) if len(times) else 0.0,
        "gap<1h": float((gaps < 1 / 24).mean()) if len(gaps) else 0.0,
        "gap=1s": int((gaps * 86_400 == 1).sum()),
        "gap q10..q90 (days)": np.round(np.quantile(gaps, QUANTILES), 1).tolist() if len(gaps) else [],
        "visit years": f"{years.min()}-{years.max()}" if len(years) else "-",
        "birth years": f"{births.min()}-{births.max()} (median {int(np.median(births))})" if len(births) else "-",
    }


def corpus_times(corpus: PatientCorpus) -> dict[str, object]:
    return summary(corpus.visit_patient(), np.asarray(corpus.visit_start), np.asarray(corpus.birth_year))


def written_times(corpus: PatientCorpus, root: Path) -> dict[str, dict[str, object]]:
    """The visit times each writer put on disk, read back from its files."""
    out = {}
    long = pl.read_parquet(write_corpus(corpus, root / "long", "long"))
    visits = long.unique(["patient", "visit"], keep="first")
    births = long.unique("patient")["birth_year"].fill_null(-1).to_numpy()
    out["long"] = summary(visits["patient"].to_numpy(), visits["time"].to_numpy(), births)
    meds = pl.read_parquet(write_corpus(corpus, root / "meds", "meds") / "data" / "0.parquet")
    events = meds.filter(pl.col("time").is_not_null() & ~pl.col("code").is_in(["MEDS_BIRTH", "MEDS_DEATH"]))
    events = events.unique(["subject_id", "time"])
    born = meds.filter(pl.col("code") == "MEDS_BIRTH")["time"].dt.year().to_numpy()
    out["meds"] = summary(events["subject_id"].to_numpy(), events["time"].to_numpy(), born)
    omop = write_corpus(corpus, root / "omop", "omop")
    visit = pl.read_csv(omop / "visit_occurrence.csv", try_parse_dates=True)
    person = pl.read_csv(omop / "person.csv")
    out["omop"] = summary(visit["person_id"].to_numpy(), visit["visit_start_datetime"].to_numpy(),
                          person["year_of_birth"].fill_null(-1).to_numpy())
    out["omop"]["year_of_birth null"] = float(person["year_of_birth"].is_null().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(READERS), choices=list(READERS))
    parser.add_argument("--steps", type=int, default=600, help="training steps (the demo's settings otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    settings = DEMO_SETTINGS["halo"]
    for name in args.datasets:
        corpus = READERS[name]().with_split(seed=args.seed)
        train = corpus.part("train")
        with tempfile.TemporaryDirectory(prefix="bench-dates.") as tmp:
            run = Path(tmp) / "run"
            train_model("halo", corpus, run, model_options=settings["model"],
                        training_options={**settings["training"], "max_steps": args.steps, "seed": args.seed},
                        progress=False)
            synthetic = generate_corpus(run, train.n_patients, seed=args.seed, progress=False)
            rows = {"real train": corpus_times(train), "synthetic": corpus_times(synthetic)}
            rows.update({f"written {k}": v for k, v in written_times(synthetic, Path(tmp)).items()})
        print(f"\n== {name}: {train.n_patients} training patients, {args.steps} steps ==")
        for label, row in rows.items():
            print(f"{label:>15}: " + "; ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()

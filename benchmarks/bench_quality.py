"""Quality benchmark (issue 11): every fidelity and structure metric of each generator beside the noise ceiling
of its data set -- the same metric for the real held-out patients against the real training patients.

    python benchmarks/bench_quality.py                                   # everything (hours on 2 CPU cores)
    python benchmarks/bench_quality.py --datasets mimic3 --variants halo --seeds 0 --train max_steps=200
    python benchmarks/bench_quality.py --variants halo halo:fine_hidden=256 ehrdiff --json out.json

Per data set (GiBleed OMOP conditions, MIMIC-IV demo diagnoses, MIMIC-III demo diagnoses, Synthea-111
conditions; histories capped at the last 45 visits, HALO's default window): a seeded patient split
(``--split-seed``), then for every variant and training seed: train with the ``--preset``'s network and training
(``ehrsynth train --preset``; ``--train KEY=VALUE`` overrides it, e.g. ``max_steps=200`` for a quick run),
generate as many patients as the training part (``--synthetic-factor`` times as many), and score the synthetic
patients against the training part. Beside the holdout ceiling it prints what a perfect generator reaches on
NZC and TSTR: a bootstrap resample of the training patients.

A variant is ``family[:key=value,...]``: model config overrides parsed as JSON where they parse (``halo``,
``halo:fine_hidden=256``, ``ehrdiff``). EHRDiff generates one flattened visit per patient, so it is scored
against the flattened real data, beside a flattened ceiling.

Metrics: HALO's five R^2 and the Pearson r beside each (R^2 is not scale-free), prevalence Pearson r and NZC,
detection AUROC, TSTR and TRTR (logistic, mean AUROC), and the structure of the records -- shares of empty
visits, undated visits and records with unknown sex, and the total-variation distance between the histograms
of codes per visit, visits per patient and log2 gap days (``evaluation.structure.structure_fidelity``, the
numbers ``ehrsynth evaluate`` reports). Training and sampling time. Each cell is the mean +- standard deviation
over the seeds. Only aggregates are printed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.readers.mimic3 import read_mimic3
from ehrsynth.data.readers.mimic4 import read_mimic4
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.data.readers.synthea import read_synthea
from ehrsynth.evaluation import fidelity, utility
from ehrsynth.evaluation.features import aligned_code_matrices, column_counts
from ehrsynth.evaluation.structure import structure_fidelity
from ehrsynth.pipeline import generate_corpus, preset_options, train_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
MAX_VISITS = 45
DATASETS: dict[str, Callable[[BuildOptions], PatientCorpus]] = {
    "gibleed": lambda o: read_omop(DATA / "omop-gibleed", options=o),
    "mimic4": lambda o: read_mimic4(DATA / "mimic-iv-demo" / "hosp", tables=("diagnoses",), options=o),
    "mimic3": lambda o: read_mimic3(DATA / "mimic-iii-demo", tables=("diagnoses",), options=o),
    "synthea": lambda o: read_synthea(DATA / "synthea-111", tables=("conditions",), options=o),
}
HALO_STATISTICS = fidelity.HALO_STATISTICS


def bootstrap_nzc(train: PatientCorpus) -> dict[str, float]:
    """NZC a perfect generator reaches: the expected NZC of a bootstrap resample of the training patients (as many
    as the training part, the size the benchmark generates), and the probability it keeps every training code.
    A code held by k of N patients is missed with probability (1 - k/N)^N, about e^-2 = 0.135 for k = 2."""
    held = column_counts(aligned_code_matrices(train).patients[0])
    held = held[held > 0]
    missed = (1.0 - held / train.n_patients) ** train.n_patients
    return {"NZC, bootstrap": float((1.0 - missed).sum()), "P(NZC = train), bootstrap": float(np.prod(1.0 - missed))}


def bootstrap_tstr(train: PatientCorpus, test: PatientCorpus, *, seed: int, draws: int = 3) -> dict[str, float]:
    """TSTR a perfect generator reaches: training on a bootstrap resample of the training patients (as many as
    the training part), mean over ``draws`` resamples. Below TRTR because a resample repeats some patients and
    misses others."""
    rng = np.random.default_rng(seed)
    scores = [tstr(train, test, train.subset(rng.integers(0, train.n_patients, train.n_patients)), seed=seed)
              for _ in range(draws)]
    return {"TSTR AUROC, bootstrap": statistics.fmean(s["TSTR AUROC"] for s in scores)}


# ---- one comparison -----------------------------------------------------------------------------------------
def score(train: PatientCorpus, other: PatientCorpus, *, seed: int) -> dict[str, float]:
    """Every fidelity and structure metric of ``other`` against ``train`` (either synthetic or the holdout)."""
    halo = fidelity.halo_fidelity(train, other)
    prevalence = fidelity.prevalence_fidelity(train, other)
    shape = structure_fidelity(train, other)
    out = {f"{name} R2": float(getattr(halo, f"{name}_r2")) for name in HALO_STATISTICS}
    out.update({f"{name} r": float(getattr(halo, f"{name}_pearson")) for name in HALO_STATISTICS})
    out.update({"prevalence r": prevalence.pearson, "NZC": float(prevalence.nzc_synthetic),
                "NZC train": float(prevalence.nzc_real)})
    out.update({"empty visit share": shape.empty_visit_share, "undated visit share": shape.undated_visit_share,
                "unknown sex share": shape.unknown_sex_share, "unknown sex share, train": shape.unknown_sex_share_real,
                "TV codes per visit": shape.codes_per_visit_tv, "TV visits per patient": shape.visits_per_patient_tv,
                "TV log2 gap days": shape.log2_gap_days_tv})
    out["detection AUROC"] = fidelity.detection_auroc(train, other, seed=seed).auroc
    return out


def tstr(train: PatientCorpus, test: PatientCorpus, synthetic: PatientCorpus, *, seed: int) -> dict[str, float]:
    result = utility.downstream_utility(train, test, synthetic, models=("logistic",), seed=seed)
    return {"TSTR AUROC": result.mean_auroc.get("tstr.logistic", float("nan")),
            "TRTR AUROC": result.mean_auroc.get("trtr.logistic", float("nan"))}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``'halo:fine_hidden=256,gap_bin_edges=[0,7]'`` -> ("halo", {"fine_hidden": 256, "gap_bin_edges": [0, 7]})."""
    family, _, rest = text.partition(":")
    return family, parse_pairs(re.split(r",(?![^\[]*\])", rest) if rest else [])  # not the commas of a [list]


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_variant(corpus: PatientCorpus, variant: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    family, overrides = parse_variant(variant)
    train, test = corpus.part("train"), corpus.part("test")
    with tempfile.TemporaryDirectory(prefix="bench-quality.") as tmp:
        run_dir = args.keep / f"{args.dataset}.{variant}.{seed}" if args.keep else Path(tmp) / "run"
        start = time.perf_counter()
        preset_model, preset_training = preset_options(family, args.preset)
        result = train_model(family, corpus, run_dir, model_options={**preset_model, **overrides},
                             training_options={**preset_training, **parse_pairs(args.train), "seed": seed},
                             progress=False, overwrite=True)
        trained = time.perf_counter() - start
        start = time.perf_counter()
        n_synthetic = round(args.synthetic_factor * train.n_patients)
        synthetic = generate_corpus(run_dir, n_synthetic, seed=seed, progress=False)
        sampled = time.perf_counter() - start
    real = train if family != "ehrdiff" else train.flatten_visits()
    out = score(real, synthetic, seed=seed)
    out.update(tstr(train, test, synthetic, seed=seed))
    out.update({"train s": trained, "sample s": sampled, "patients/s": n_synthetic / max(sampled, 1e-9),
                "epochs": float(result.epochs_completed), "best step": float(result.best_step or 0),
                "stopped early": float(result.stopped_early), "out of time": float(result.out_of_time)})
    return out


# ---- table --------------------------------------------------------------------------------------------------
def cell(values: list[float], name: str = "") -> str:
    """Mean +- standard deviation over the seeds (counts and large values without decimals, times with one)."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    whole = name.startswith(("NZC", "epochs", "best step")) or abs(mean) >= 100
    digits = 0 if whole else 1 if name.endswith(" s") else 3
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_table(results: dict[str, dict[str, Any]], variants: list[str]) -> None:
    flat = any(parse_variant(v)[0] != "halo" for v in variants)
    header = ["data set", "metric", "holdout ceiling"] + (["ceiling, flattened"] if flat else []) + variants
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dataset, result in results.items():
        names = list(dict.fromkeys([k for runs in result["runs"].values() for run in runs for k in run]
                                   + [k for k in result["ceiling"] if "bootstrap" in k]))
        for name in names:
            row = [dataset, name, cell([result["ceiling"].get(name)], name)]
            row += [cell([result["ceiling_flat"].get(name)], name)] if flat else []
            row += [cell([run.get(name) for run in result["runs"][v]], name) for v in variants]
            print("| " + " | ".join(row) + " |")


def acceptance(results: dict[str, dict[str, Any]], halo: str = "halo", ehrdiff: str = "ehrdiff") -> list[str]:
    """Issue 11's acceptance items, judged on the mean over the seeds of the default variants."""
    lines = []

    def mean(runs: list[dict[str, float]], name: str) -> float:
        return statistics.fmean(run[name] for run in runs)

    def check(dataset: str, what: str, value: float, ok: bool, bound: str) -> None:
        lines.append(f"| {dataset} | {what} | {value:.3f} | {bound} | {'yes' if ok else 'NO'} |")

    for dataset, result in results.items():
        ceiling, runs = result["ceiling"], result["runs"].get(halo)
        if runs:
            for name in ("empty visit share", "undated visit share"):
                check(dataset, f"HALO {name}", mean(runs, name), mean(runs, name) == 0, "0")
            gap = abs(mean(runs, "unknown sex share") - ceiling["unknown sex share, train"])
            check(dataset, "HALO unknown sex share - real", gap, gap <= 0.01, "<= 0.010")
            for name, base in (("TV codes per visit", 0.05), ("TV visits per patient", 0.08),
                               ("TV log2 gap days", 0.08)):
                bound = max(base, ceiling[name] + 0.03) if dataset.startswith("mimic") else base
                check(dataset, f"HALO {name}", mean(runs, name), mean(runs, name) <= bound, f"<= {bound:.3f}")
            for name, slack in (("visit_code R2", 0.02), ("record_code R2", 0.02), ("visit_pair r", 0.05)):
                bound = ceiling[name] - slack
                check(dataset, f"HALO {name}", mean(runs, name), mean(runs, name) >= bound, f">= {bound:.3f}")
            if dataset == "gibleed":
                auroc = mean(runs, "detection AUROC")
                check(dataset, "HALO detection AUROC", auroc, auroc <= 0.60, "<= 0.600")
                ratio = mean(runs, "TSTR AUROC") / mean(runs, "TRTR AUROC")
                floor = ceiling.get("TSTR AUROC, bootstrap", float("nan")) / mean(runs, "TRTR AUROC")
                check(dataset, "HALO TSTR / TRTR", ratio, ratio >= 0.95,
                      f">= 0.950 (a bootstrap of the training patients: {floor:.3f})")
        runs = result["runs"].get(ehrdiff)
        if runs and dataset == "gibleed":
            nzc, real = mean(runs, "NZC"), mean(runs, "NZC train")
            floor = (ceiling.get("NZC, bootstrap", float("nan")), ceiling.get("P(NZC = train), bootstrap", float("nan")))
            check(dataset, "EHRDiff NZC", nzc, nzc == real, f"= {real:.0f} (a bootstrap of the training patients: "
                  f"{floor[0]:.1f}, all {real:.0f} with probability {floor[1]:.2f})")
            auroc = mean(runs, "detection AUROC")
            check(dataset, "EHRDiff detection AUROC", auroc, auroc <= 0.65, "<= 0.650")
    return ["| data set | item (mean over seeds) | value | bound | met |", "|---|---|---|---|---|"] + lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=["halo", "ehrdiff"],
                        help="family[:key=value,...] model config overrides (values parsed as JSON)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training and sampling seeds")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--preset", default="small", choices=["small", "paper"])
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE",
                        help="training overrides (TrainConfig fields), e.g. max_steps=200")
    parser.add_argument("--synthetic-factor", type=float, default=1.0,
                        help="generate this many times as many patients as the training part (default 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every per-seed figure here")
    parser.add_argument("--table-from", nargs="+", type=Path, metavar="JSON",
                        help="print the table of earlier --json files (runs nothing)")
    parser.add_argument("--keep", type=Path, help="keep the trained runs under this folder (DATASET.VARIANT.SEED)")
    args = parser.parse_args()
    if args.table_from:
        results = {k: v for path in args.table_from for k, v in json.loads(path.read_text()).items()}
        print_table(results, args.variants)
        print()
        print("\n".join(acceptance(results)))
        return
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    results: dict[str, dict[str, Any]] = {}
    for dataset in args.datasets:
        args.dataset = dataset
        corpus = DATASETS[dataset](BuildOptions(max_visits=MAX_VISITS, seed=args.split_seed))
        train, test = corpus.part("train"), corpus.part("test")
        print(f"[{dataset}] {train.n_patients} train / {test.n_patients} test patients", flush=True)
        result = {"ceiling": {**score(train, test, seed=args.split_seed), **bootstrap_nzc(train),
                              **bootstrap_tstr(train, test, seed=args.split_seed)},
                  "ceiling_flat": score(train.flatten_visits(), test.flatten_visits(), seed=args.split_seed),
                  "runs": {}}
        for variant in args.variants:
            result["runs"][variant] = []
            for seed in args.seeds:
                run = run_variant(corpus, variant, seed, args)
                result["runs"][variant].append(run)
                print(f"  {variant} seed {seed}: train {run['train s']:.0f} s, detection AUROC "
                      f"{run['detection AUROC']:.3f}", flush=True)
        results[dataset] = result
    print()
    print_table(results, args.variants)
    print()
    print("\n".join(acceptance(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

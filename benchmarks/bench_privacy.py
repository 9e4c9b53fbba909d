"""Privacy benchmark (issue 14): what DP-SGD costs in fidelity and in training time, and what it buys against
the membership attacks, for HALO and EHRDiff (small presets) on GiBleed and the MIMIC-III demo.

    python benchmarks/bench_privacy.py                                   # the whole grid (~30 min, 2 processes)
    python benchmarks/bench_privacy.py --datasets gibleed --families halo --epsilons 3 none --steps 50

Data: GiBleed OMOP conditions (shared/data/omop-gibleed) and MIMIC-III demo diagnoses, histories capped at the
last 45 visits, the default seeded 72/8/20 split, every training code kept (min_patients 1, the research
profile, so the vocabulary is the same for every epsilon and attribute inference has codes to hide).

Per (data set, family) every epsilon in ``--epsilons`` ("none" = no DP) trains the same number of optimizer
steps (``--steps``, no early stopping, one validation at the end) with the same batch size (HALO 48 patients,
EHRDiff 32) and learning rate; delta is fixed at 1/N^1.1 for the N training patients (the CLI default), the
clipping norm at C = 1, and the noise multiplier is the smallest that spends epsilon in those steps at rate
q = batch / N. Then as many patients as the training part are generated and scored by ``ehrsynth evaluate``'s
own path (:func:`ehrsynth.pipeline.evaluate_to`, no bootstrap): the fidelity headline (prevalence Pearson r,
per-visit code R^2, structure TVs), the best membership AUROC over every attack that ran, and wall seconds per
training step (the whole ``train_model`` call over its steps: setup and the final validation included), with
its ratio to the non-DP run of the same invocation. Only aggregates are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.readers.mimic3 import read_mimic3
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.pipeline import MODEL_PRESETS, evaluate_to, generate_corpus, train_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
OPTIONS = BuildOptions(max_visits=45, min_patients=1, seed=0)
DATASETS = {
    "gibleed": lambda: read_omop(DATA / "omop-gibleed", tables=("condition",), options=OPTIONS),
    "mimic3": lambda: read_mimic3(DATA / "mimic-iii-demo", tables=("diagnoses",), options=OPTIONS),
}
TRAINING = {"halo": {"batch_size": 48, "lr": 2e-3}, "ehrdiff": {"batch_size": 32, "lr": 1e-3}}
ATTACKS = ("membership", "membership_domias", "likelihood_membership", "likelihood_membership_per_code",
           "likelihood_membership_per_visit", "likelihood_membership_calibrated")


def best_attack(metrics: dict[str, Any]) -> tuple[float, str]:
    """The highest membership AUROC among the attacks that ran (those "not applicable" are skipped)."""
    ran = [(metrics[name]["auroc"], name) for name in ATTACKS
           if name in metrics and not metrics[name].get("not_applicable") and metrics[name].get("auroc") is not None]
    return max(ran) if ran else (math.nan, "none ran")


def run_one(dataset: str, family: str, epsilon: float | None, steps: int, threads: int) -> dict[str, Any]:
    """Train, generate, evaluate one setting; the figures of the table row."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    corpus = DATASETS[dataset]()
    train, test = corpus.part("train"), corpus.part("test")
    training = {**TRAINING[family], "max_steps": steps, "eval_every": steps, "checkpoint_every": steps,
                "patience": None, "seed": 0, "device": "cpu", "dp_epsilon": epsilon}
    with tempfile.TemporaryDirectory(prefix="bench-privacy.") as tmp:
        start = time.perf_counter()
        result = train_model(family, corpus, Path(tmp) / "run", model_options=MODEL_PRESETS[family]["small"],
                             training_options=training, progress=False)
        seconds = time.perf_counter() - start
        synthetic = generate_corpus(Path(tmp) / "run", train.n_patients, seed=0, progress=False)
        evaluate_to(train, test, synthetic, Path(tmp) / "report", model_dir=Path(tmp) / "run", bootstrap=0)
        metrics = json.loads((Path(tmp) / "report" / "metrics.json").read_text())
    auroc, attack = best_attack(metrics)
    structure = metrics["structure"]
    spent = metrics.get("differential_privacy", {}).get("epsilon_spent")
    return {"dataset": dataset, "family": family, "epsilon": epsilon, "epsilon spent": spent,
            "noise multiplier": metrics.get("differential_privacy", {}).get("noise_multiplier"),
            "steps": result.steps, "s/step": seconds / max(result.steps, 1),
            "prevalence r": metrics["prevalence"]["pearson"], "visit code R2": metrics["halo"]["visit_code_r2"],
            "TV codes/visit": structure.get("codes_per_visit_tv"),
            "TV visits/patient": structure.get("visits_per_patient_tv"),
            "empty visit share": structure.get("empty_visit_share"),
            "best membership AUROC": auroc, "best attack": attack, "train patients": train.n_patients}


def step_cost(dataset: str, family: str, repeats: int, threads: int) -> dict[str, Any]:
    """Median seconds of a non-DP and a DP gradient step on the same model and batch size, interleaved (one of
    each per repeat) so the machine's load hits both alike: the fair form of the table's time ratio."""
    import statistics

    import numpy as np

    from ehrsynth.models import model_class
    from ehrsynth.training import dp

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    train = DATASETS[dataset]().part("train")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_class(family).from_corpus(train, model_class(family).config_class(
            **MODEL_PRESETS[family]["small"]))
    model.train()
    batch_size, generator = TRAINING[family]["batch_size"], torch.Generator().manual_seed(0)
    accountant = dp.PrivacyAccountant(min(1.0, batch_size / train.n_patients), 1.0, 1e-5)
    config = dp.DPConfig(epsilon=1e9)
    plain, private = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        batch = model.collate(train, np.sort(np.random.default_rng(0).choice(train.n_patients, batch_size,
                                                                           replace=False)))
        model.zero_grad()
        model({**batch, "generator": generator}).backward()
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        dp.dp_step(model, train, train.n_patients, config, accountant, generator)
        private.append(time.perf_counter() - start)
    return {"dataset": dataset, "family": family, "plain": statistics.median(plain),
            "private": statistics.median(private)}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    base = {(r["dataset"], r["family"]): r["s/step"] for r in rows if r["epsilon"] is None}
    header = ["data set", "model", "epsilon (spent)", "sigma", "prevalence r", "visit code R^2", "TV codes/visit",
              "TV visits/patient", "best membership AUROC (attack)", "s/step", "x non-DP"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        eps = "none" if r["epsilon"] is None else f"{r['epsilon']:g} ({fmt(r['epsilon spent'], 2)})"
        ratio = r["s/step"] / base[(r["dataset"], r["family"])] if (r["dataset"], r["family"]) in base else None
        print("| " + " | ".join([r["dataset"], r["family"], eps, fmt(r["noise multiplier"], 2),
                                 fmt(r["prevalence r"]), fmt(r["visit code R2"]), fmt(r["TV codes/visit"]),
                                 fmt(r["TV visits/patient"]),
                                 f"{fmt(r['best membership AUROC'])} ({r['best attack']})",
                                 fmt(r["s/step"], 3), fmt(ratio, 1)]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--families", nargs="+", default=["halo", "ehrdiff"], choices=["halo", "ehrdiff"])
    parser.add_argument("--epsilons", nargs="+", default=["none", "10", "3", "1"])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every run")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per process")
    parser.add_argument("--processes", type=int, default=2, help="settings run in parallel")
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--step-cost", type=int, default=0, metavar="REPEATS",
                        help="only time interleaved non-DP and DP gradient steps, REPEATS of each")
    args = parser.parse_args()
    if args.step_cost:
        print("| data set | model | batch | non-DP s/step | DP s/step | x non-DP |\n|---|---|---|---|---|---|")
        for dataset in args.datasets:
            for family in args.families:
                r = step_cost(dataset, family, args.step_cost, args.threads)
                print(f"| {dataset} | {family} | {TRAINING[family]['batch_size']} | {r['plain']:.3f} | "
                      f"{r['private']:.3f} | {r['private'] / r['plain']:.1f} |", flush=True)
        return
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    settings = [(d, f, e, args.steps, args.threads) for d in args.datasets for f in args.families for e in epsilons]
    rows = []
    with ProcessPoolExecutor(max_workers=args.processes) as pool:
        for row in pool.map(run_one, *zip(*settings)):
            print(f"[{row['dataset']} {row['family']} eps={row['epsilon']}] {row['s/step']:.3f} s/step, prevalence r "
                  f"{fmt(row['prevalence r'])}, best AUROC {fmt(row['best membership AUROC'])}", flush=True)
            rows.append(row)
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Time every evaluation metric on 10,000-patient corpora and print a table.

The corpora are random but structured (seeded): each patient follows one of ``--topics`` latent topics, each a
sparse Zipf-like distribution over ``--codes`` codes, with 1 + Geometric visits of 1 + Poisson(9) codes and
exponential gaps. "Real" holds 2 x ``--patients`` patients split into train and holdout halves; "synthetic" is
an independent draw of ``--patients`` patients built separately, so it has its own vocabulary order and every
metric has to align the two. Two labels derive from the topic.

    python benchmarks/bench_metrics.py                # 10,000 patients, 2,000 codes
    python benchmarks/bench_metrics.py --patients 2000

It then times the whole ``evaluate`` (every metric twice, for the synthetic data and for its noise ceiling,
plus bootstrap intervals, clinical checks and the per-code view) and ``write_report``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import numpy as np
import polars as pl

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.evaluation import fidelity, privacy, structure, utility
from ehrsynth.evaluation.bootstrap import bootstrap_intervals
from ehrsynth.evaluation.clinical import clinical_validity
from ehrsynth.evaluation.per_code import per_code_view
from ehrsynth.evaluation.report import evaluate, write_report


def random_corpus(n_patients: int, *, n_codes: int = 2000, n_topics: int = 20, seed: int = 0,
                  topic_seed: int = 1234) -> PatientCorpus:
    """A seeded random corpus with topic structure (co-occurring codes), labels and visit times.

    ``topic_seed`` fixes the topics (the "population"); ``seed`` draws the patients, so two corpora with the
    same topic_seed and different seeds are independent samples of one distribution.
    """
    topics_rng = np.random.default_rng(topic_seed)
    zipf = 1.0 / np.arange(1, n_codes + 1) ** 1.1
    weights = topics_rng.gamma(0.2, size=(n_topics, n_codes)) * zipf          # (topics, codes)
    cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    cdf[:, -1] = 1.0
    rng = np.random.default_rng(seed)
    topic = rng.integers(n_topics, size=n_patients)
    n_visits = rng.geometric(0.45, size=n_patients)
    visit_patient = np.repeat(np.arange(n_patients), n_visits)
    n_draws = 1 + rng.poisson(9, size=len(visit_patient))
    draw_visit = np.repeat(np.arange(len(visit_patient)), n_draws)
    draw_topic = topic[visit_patient[draw_visit]]
    # inverse-CDF sampling from each draw's topic at once: topic rows laid end to end, row t shifted by t
    flat = (cdf + np.arange(n_topics)[:, None]).ravel()
    code = np.searchsorted(flat, draw_topic + rng.random(len(draw_visit)) * (1 - 1e-12)) - draw_topic * n_codes
    code = np.clip(code, 0, n_codes - 1)
    first_visit = np.concatenate([[0], np.cumsum(n_visits)[:-1]])
    gaps = rng.exponential(120.0, size=len(visit_patient))
    gaps[first_visit] = 0.0
    days = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first_visit], n_visits)
    base = np.datetime64(datetime(2010, 1, 1), "us")
    times = base + (days[draw_visit] * 86_400e6).astype("timedelta64[us]")
    events = pl.DataFrame({
        "patient": visit_patient[draw_visit] + seed * 10_000_000,
        "visit": draw_visit + seed * 100_000_000,
        "time": times,
        "code": [f"SYN/{c:05d}" for c in code],
    })
    patients = pl.DataFrame({
        "patient": np.arange(n_patients) + seed * 10_000_000,
        "label:topic_low": (topic < n_topics // 4).astype(np.int64),
        "label:topic_odd": (topic % 2).astype(np.int64),
    })
    return build_corpus(events, patients, BuildOptions(split=(0.5, 0.0, 0.5), seed=seed), source="random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=10_000, help="patients per set (train, holdout, synthetic)")
    parser.add_argument("--codes", type=int, default=2000, help="codes in the random vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpora")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of the intervals")
    parser.add_argument("--report", default=None, help="also write the report into this directory")
    parser.add_argument("--only-evaluate", action="store_true", help="skip the per-metric timings")
    args = parser.parse_args()

    real = random_corpus(2 * args.patients, n_codes=args.codes, seed=args.seed)
    train, holdout = real.part("train"), real.part("test")
    synthetic = random_corpus(args.patients, n_codes=args.codes, seed=args.seed + 1)
    rng = np.random.default_rng(args.seed)
    member_ll, nonmember_ll = rng.normal(-50, 10, train.n_patients), rng.normal(-51, 10, holdout.n_patients)

    def unlabelled(corpus: PatientCorpus) -> PatientCorpus:
        return replace(corpus, labels=corpus.labels[:, :0], label_names=())

    train_nl, holdout_nl, no_labels = unlabelled(train), unlabelled(holdout), unlabelled(synthetic)
    jobs: list[tuple[str, Callable[[], object]]] = [
        ("fidelity.halo_r2", lambda: fidelity.halo_fidelity(train, synthetic)),
        ("fidelity.prevalence", lambda: fidelity.prevalence_fidelity(train, synthetic)),
        ("fidelity.cmd (top 100)", lambda: fidelity.correlation_matrix_distance(train, synthetic)),
        ("fidelity.mmd (n 1000)", lambda: fidelity.maximum_mean_discrepancy(train, synthetic)),
        ("fidelity.structure", lambda: structure.structure_fidelity(train, synthetic)),
        ("fidelity.detection (5 folds)", lambda: fidelity.detection_auroc(train, synthetic)),
        ("utility.tstr labels, logistic", lambda: utility.downstream_utility(train, holdout, synthetic,
                                                                              models=("logistic",))),
        ("utility.tstr labels, gbm", lambda: utility.downstream_utility(train, holdout, synthetic, models=("gbm",))),
        ("utility.tstr next_visit, logistic", lambda: utility.downstream_utility(train_nl, holdout_nl, no_labels,
                                                                                  models=("logistic",))),
        ("privacy.membership_distance", lambda: privacy.distance_membership_inference(train, holdout, synthetic)),
        ("privacy.membership_likelihood", lambda: privacy.likelihood_membership_inference(member_ll, nonmember_ll)),
        ("privacy.attribute_inference", lambda: privacy.attribute_inference(train, holdout, synthetic)),
        ("privacy.nnaa", lambda: privacy.nearest_neighbour_adversarial_accuracy(train, holdout, synthetic)),
        ("privacy.dcr", lambda: privacy.distance_to_closest_record(train, holdout, synthetic)),
        ("privacy.exact_copies", lambda: privacy.exact_copies(train, holdout, synthetic)),
        (f"intervals ({args.bootstrap} replicates)", lambda: _Dict(bootstrap_intervals(
            train, synthetic, replicates=args.bootstrap))),
        ("clinical.validity", lambda: clinical_validity(train, synthetic, holdout)),
        ("per_code", lambda: _Dict(per_code_view(train, synthetic))),
    ]
    print(f"train {train.n_patients:,} / holdout {holdout.n_patients:,} / synthetic {synthetic.n_patients:,} "
          f"patients; {train.n_visits:,} train visits, {train.n_codes:,} code occurrences, "
          f"{len(set(train.vocab.codes) | set(synthetic.vocab.codes)):,} codes")
    print(f"{'metric':36s} {'seconds':>8s}  headline")
    total = 0.0
    for name, job in [] if args.only_evaluate else jobs:
        start = time.perf_counter()
        result = job()
        elapsed = time.perf_counter() - start
        total += elapsed
        print(f"{name:36s} {elapsed:8.2f}  {_headline(result.as_dict())}")
    print(f"{'total':36s} {total:8.2f}")

    start, cpu = time.perf_counter(), time.process_time()
    metrics = evaluate(train, holdout, synthetic, bootstrap=args.bootstrap)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    verdict = ", ".join(f"{area} {v['status']}" for area, v in metrics["verdict"].items())
    print(f"{'evaluate (all, with ceiling + intervals)':36s} {elapsed:8.2f}  CPU {cpu:.1f} s (all threads); {verdict}")
    slowest = sorted(metrics["_meta"]["seconds"].items(), key=lambda kv: -kv[1])[:6]
    print("  slowest parts: " + ", ".join(f"{k} {v:.1f}" for k, v in slowest))
    if args.report:
        start = time.perf_counter()
        page = write_report(metrics, train, synthetic, args.report, reference=holdout)
        print(f"{'write_report':36s} {time.perf_counter() - start:8.2f}  {page.stat().st_size / 1e6:.2f} MB")


class _Dict:
    """A plain dict result, shown like a metric result."""

    def __init__(self, values: dict) -> None:
        self.values = values

    def as_dict(self) -> dict:
        return {k: (vars(v) if hasattr(v, "__dict__") else v) for k, v in self.values.items()}


def _headline(values: dict) -> str:
    """The first few numbers of a result, one level of nesting flattened, for a glance."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key != "metric":
            flat[key] = value
    shown = [f"{k}={v:.3f}" for k, v in flat.items() if isinstance(v, float) and not k.endswith("mean_real")]
    return " ".join(shown[:4])


if __name__ == "__main__":
    main()

"""HALO fine heads compared on real data: held-out likelihood and the structure of generated records.

    python benchmarks/bench_fine_heads.py [--heads made made_direct] [--data gibleed mimic3] [--seeds 0 1]
                                          [--steps 400] [--n-ctx 12] [--threads 1]

For each data set (the bundled OMOP GiBleed demo, about 1 code per visit; the MIMIC-III demo, about 13) and
each fine head, the small config is trained with the shared loop (Adam 1e-3, cosine, batch 32, ``--steps``,
best checkpoint by the exact validation likelihood), then:

* held-out NLL per code: -(visit-row log-likelihood of the test part) / its code occurrences (nats);
* as many patients as the training part are generated (seed 0) and compared with the training part:
  share of empty visits, of records without sex, of undated later visits; total-variation distance of the
  codes-per-visit histogram; Pearson r and R^2 of the within-visit pair probabilities (HALO's visit_pair);
* training and sampling seconds.

Only aggregates are printed, never patient rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

DATA = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
            Path("/work/shared/data"))


def load(name: str, max_visits: int):
    from ehrsynth.data.build import BuildOptions

    if name == "gibleed":
        from ehrsynth.data.readers.omop import read_omop
        from ehrsynth.demo_data import demo_directory

        return read_omop(demo_directory(), options=BuildOptions(max_visits=max_visits, seed=0))
    from ehrsynth.data.readers.mimic3 import read_mimic3

    return read_mimic3(DATA / "mimic-iii-demo", options=BuildOptions(max_visits=max_visits, seed=0))


def tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two integer samples' histograms."""
    n = int(max(a.max(initial=0), b.max(initial=0))) + 1
    pa, pb = np.bincount(a, minlength=n) / max(len(a), 1), np.bincount(b, minlength=n) / max(len(b), 1)
    return float(0.5 * np.abs(pa - pb).sum())


def structure(train, synthetic) -> dict[str, float]:
    from ehrsynth.evaluation.fidelity import halo_statistics

    real_pairs, fake_pairs = halo_statistics(train, synthetic)["visit_pair"]
    later = np.ones(synthetic.n_visits, dtype=bool)
    later[synthetic.visit_offsets[:-1][synthetic.visits_per_patient() > 0]] = False
    r2 = 1 - ((real_pairs - fake_pairs) ** 2).sum() / ((real_pairs - real_pairs.mean()) ** 2).sum()
    return {
        "empty_visits": float((synthetic.codes_per_visit() == 0).mean()),
        "no_sex": float((synthetic.sex < 0).mean()),
        "undated": float(np.isnan(synthetic.visit_days[later]).mean()) if later.any() else 0.0,
        "cpv_tv": tv(train.codes_per_visit(), synthetic.codes_per_visit()),
        "vpp_tv": tv(train.visits_per_patient(), synthetic.visits_per_patient()),
        "pair_r": float(np.corrcoef(real_pairs, fake_pairs)[0, 1]),
        "pair_r2": float(r2),
    }


def run(corpus, head: str, seed: int, steps: int, n_ctx: int) -> dict[str, float]:
    from ehrsynth.models.halo import HaloConfig, HaloModel
    from ehrsynth.models.io import load_model
    from ehrsynth.training.loop import TrainConfig, train

    train_part, val_part, test_part = corpus.part("train"), corpus.part("val"), corpus.part("test")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = HaloModel.from_corpus(train_part, HaloConfig.small(fine_head=head, n_ctx=n_ctx))
        config = TrainConfig(optimizer="adam", lr=1e-3, batch_size=32, max_steps=steps, max_epochs=10_000,
                             lr_schedule="cosine", eval_every=max(steps // 6, 1), checkpoint_every=10**9,
                             device="cpu", seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train(model, train_part, val_part, config, Path(tmp), progress=False)
            train_s = time.perf_counter() - start
            best = load_model(tmp).eval()
    ll = best.log_likelihood(test_part)
    start = time.perf_counter()
    synthetic = best.generate(train_part.n_patients, seed=0)
    sample_s = time.perf_counter() - start
    return {"nll_per_code": float(np.log(ll.per_code_perplexity)),
            "nll_per_patient": float(-ll.patient_log_likelihood.mean()),
            **structure(train_part, synthetic), "train_s": train_s, "sample_s": sample_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=["made", "made_direct", "made_lowrank"])
    parser.add_argument("--data", nargs="+", default=["gibleed", "mimic3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=12, help="rows per record; the corpora keep the last n_ctx - 3 "
                        "visits (GiBleed averages 23 visits: 12 keeps the benchmark short on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keys = ["nll_per_code", "nll_per_patient", "empty_visits", "no_sex", "undated", "cpv_tv", "vpp_tv",
            "pair_r", "pair_r2", "train_s", "sample_s"]
    for name in args.data:
        corpus = load(name, args.n_ctx - 3)
        real = structure(corpus.part("train"), corpus.part("test"))
        print(f"\n{name}: {corpus.n_patients} patients; real test vs train: "
              + ", ".join(f"{k} {real[k]:.3f}" for k in ("cpv_tv", "vpp_tv", "pair_r", "pair_r2")), flush=True)
        print(f"{'head':<12}" + "".join(f"{k:>16}" for k in keys))
        for head in args.heads:
            results = [run(corpus, head, seed, args.steps, args.n_ctx) for seed in args.seeds]
            cells = []
            for k in keys:
                values = np.array([r[k] for r in results])
                cells.append(f"{values.mean():.3f}+-{(values.max() - values.min()) / 2:.3f}")
            print(f"{head:<12}" + "".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

"""EHRDiff benchmark: speed at the paper's MIMIC shape, fidelity against sampling steps, memory of 1M patients,
and the paper's MLP against the default residual denoiser.

    python benchmarks/bench_ehrdiff.py [--section speed|steps|memory|compare|all] [--threads N] [--out results.json]

* speed: the default network (or ``bench_speed("mlp")``, the paper's) at the paper's widths (1,782 codes ->
  1024 -> 384 -> 384 -> 384 -> 1024 -> 1,782) on random multi-hot data of MIMIC-like density (about 15 codes
  per patient, Zipf-like code frequencies, fixed seed): training steps/s through the shared loop at batch
  1,024, the one-off calibration of the binarisation thresholds (8,192 samples), and samples/s for 4,096
  patients with 32 Heun steps (63 evaluations). The reference code measured
  0.32 s per step and 37 s (110 patients/s) on this CPU type.
* steps: the paper's MLP trained on the OMOP GiBleed conditions (train split; batch 256, 4,000 steps), then
  prevalence Pearson r (against train and against the held-out test split), NZC, codes per patient and CMD for
  8, 16, 32 and 64 sampling steps, with the reference's rounding and with Bernoulli binarisation, on the same
  continuous samples; also the share of continuous values left between 0.2 and 0.8.
* memory: peak RSS of generating 1,000,000 patients over 1,782 codes, with ``generate`` (whole corpus in memory)
  and with ``iter_generate`` (streamed, each chunk dropped), each in a fresh process. To keep the time
  reasonable on 2 cores this uses a small network (64, 64), lightly trained on the random MIMIC-shape data so
  the output has realistic sparsity, and 8 sampling steps (4 are too few: the output is then dense); memory
  depends on neither, only on the chunk size, the vocabulary and the number of generated codes.
* compare: the ``ehrsynth demo --model ehrdiff`` path (bundled GiBleed) with the paper's MLP and with the
  default residual network, 2 training seeds each: NZC against the real train part's, prevalence Pearson r and
  R^2 (per-record code R^2), detection AUROC, codes per patient, training time; then the speed section for both
  networks in the same run, and the ratios.

CMD here is the mean absolute difference between the real and synthetic code-code Pearson correlation matrices
over all code pairs (a constant column has correlation 0 with everything).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MIMIC_CODES = 1782


def random_mimic_corpus(n_patients: int, n_codes: int = MIMIC_CODES, codes_per_patient: float = 15.0, seed: int = 0):
    """Single-visit patients with Poisson(15) distinct codes drawn from a Zipf-like frequency table."""
    from ehrsynth.data.corpus import PatientCorpus, empty_statics
    from ehrsynth.data.vocab import Vocabulary

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_codes + 1) ** 0.9
    weights /= weights.sum()
    counts = np.clip(rng.poisson(codes_per_patient, n_patients), 1, None)
    draws = rng.choice(n_codes, size=int(counts.sum() * 1.3), p=weights)
    rows = np.repeat(np.arange(n_patients), (counts * 1.3).astype(int) + 1)[:len(draws)]
    pairs = np.unique(rows.astype(np.int64) * n_codes + draws[:len(rows)])
    patient, code = pairs // n_codes, (pairs % n_codes).astype(np.int32)
    code_offsets = np.zeros(n_patients + 1, dtype=np.int64)
    np.cumsum(np.bincount(patient, minlength=n_patients), out=code_offsets[1:])
    return PatientCorpus(
        patient_ids=np.arange(n_patients).astype(str).astype(object),
        visit_offsets=np.arange(n_patients + 1, dtype=np.int64), code_offsets=code_offsets, codes=code,
        visit_days=np.zeros(n_patients), visit_start=np.full(n_patients, np.datetime64("NaT"), "datetime64[s]"),
        labels=np.zeros((n_patients, 0), np.uint8), label_names=(),
        vocab=Vocabulary(tuple(f"ICD9CM/X{i:04d}" for i in range(n_codes)),
                         np.bincount(code, minlength=n_codes).astype(np.int64)),
        split=np.zeros(n_patients, np.int8), **empty_statics(n_patients))


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def bench_speed(denoiser: str = "resnet") -> dict:
    from ehrsynth.models.ehrdiff import EHRDiffConfig, EHRDiffModel, EHRDiffSampling
    from ehrsynth.models.ehrdiff.network import count_parameters
    from ehrsynth.training.loop import TrainConfig, train

    corpus = random_mimic_corpus(8192)
    torch.manual_seed(0)
    model = EHRDiffModel.from_corpus(corpus, EHRDiffConfig(denoiser=denoiser))
    out = {"denoiser": denoiser, "threads": torch.get_num_threads(), "matmul_gflops": round(matmul_gflops(), 1),
           "parameters": count_parameters(model), "sigma_data": round(model.sigma_data, 4),
           "codes_per_patient": round(corpus.n_codes / corpus.n_patients, 2)}

    # training through the shared loop (collate + forward + backward + AdamW + EMA), batch 1,024
    stamps: list[float] = []
    config = TrainConfig(optimizer="adamw", lr=3e-4, batch_size=1024, max_steps=12, max_epochs=100,
                         lr_schedule="cosine", warmup_fraction=0.05, ema_decay=0.999, eval_every=10_000,
                         checkpoint_every=10_000, log_every=10_000, device="cpu")
    with tempfile.TemporaryDirectory() as run:
        train(model, corpus, None, config, run, on_step=lambda step: stamps.append(time.perf_counter()))
    step_s = float(np.median(np.diff(stamps[2:])))
    out["train_step_s"] = round(step_s, 4)
    out["train_steps_per_s"] = round(1 / step_s, 2)
    out["train_patients_per_s"] = round(1024 / step_s)

    # the binarisation thresholds, fitted once when training ends (8,192 samples of 32 Heun steps); timed apart,
    # or the first generate would fit them inside the sampling time
    model.eval()
    t = time.perf_counter()
    model.calibrate(batch_size=1024)
    out["calibrate_s"] = round(time.perf_counter() - t, 2)
    out["calibrate_in_train_steps"] = round(out["calibrate_s"] / step_s, 1)

    # sampling 4,096 patients, 32 Heun steps
    t = time.perf_counter()
    generated = model.generate(4096, seed=0, batch_size=1024, sampling=EHRDiffSampling(steps=32))
    seconds = time.perf_counter() - t
    out["sample_4096_s"] = round(seconds, 2)
    out["samples_per_s"] = round(4096 / seconds, 1)
    out["generated_codes_per_patient_untrained"] = round(generated.n_codes / 4096, 2)
    return out


def cmd(real: np.ndarray, synthetic: np.ndarray) -> float:
    def corr(x):
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.corrcoef(x.T)
        return np.nan_to_num(c)

    upper = np.triu_indices(real.shape[1], 1)
    return float(np.abs(corr(real)[upper] - corr(synthetic)[upper]).mean())


def bench_steps(train_steps: int = 4000, n_samples: int = 5000) -> dict:
    from ehrsynth.data.readers.omop import read_omop
    from ehrsynth.models.ehrdiff import (
        EHRDiffConfig, EHRDiffModel, binarize, edm_sigma_schedule, guided_denoiser, heun_sampler, per_sample_noise,
    )
    from ehrsynth.models.io import load_model
    from ehrsynth.training.loop import TrainConfig, train

    corpus = read_omop(DATA / "omop-gibleed")
    train_part, test_part = corpus.part("train"), corpus.part("test")
    real = train_part.patient_multi_hot(np.arange(train_part.n_patients))
    test = test_part.patient_multi_hot(np.arange(test_part.n_patients))
    torch.manual_seed(0)
    model = EHRDiffModel.from_corpus(train_part, EHRDiffConfig(denoiser="mlp", column_weight_power=0.0))
    config = TrainConfig(optimizer="adamw", lr=1e-3, batch_size=256, max_steps=train_steps, max_epochs=100_000,
                         lr_schedule="cosine", warmup_fraction=0.05, ema_decay=0.999, eval_every=500,
                         checkpoint_every=100_000, log_every=500, device="cpu")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        result = train(model, train_part, corpus.part("val"), config, run)
        model = load_model(run)
    out = {"train_steps": result.steps, "train_s": round(time.perf_counter() - t, 1),
           "best_val_loss": result.best_val_loss, "codes": corpus.vocab_size,
           "real": {"codes_per_patient": round(float(real.sum(1).mean()), 2),
                    "test_vs_train_prevalence_r": round(float(np.corrcoef(real.mean(0), test.mean(0))[0, 1]), 4),
                    "nzc_train": int((real.sum(0) > 0).sum()),
                    "cmd_test_vs_train": round(cmd(real, test), 4)},
           "by_steps": []}
    latents = per_sample_noise(0, 0, n_samples, model.dim)
    uniform = torch.rand(n_samples, model.dim, generator=torch.Generator().manual_seed(1))
    for steps in (8, 16, 32, 64):
        t = time.perf_counter()
        with torch.inference_mode():
            x = heun_sampler(guided_denoiser(model.denoiser, None, 1.0), latents, edm_sigma_schedule(steps))
        seconds = time.perf_counter() - t
        row = {"steps": steps, "evaluations": 2 * steps - 1, "sample_s": round(seconds, 2),
               "share_of_x_in_0.2_0.8": round(float(((x > 0.2) & (x < 0.8)).double().mean()), 4)}
        # the reference's rounding, against a Bernoulli draw with probability clip(x, 0, 1) (not offered by the
        # library: it measures worse on prevalence r, codes per patient and CMD; better only on NZC)
        for method, bits in (("round", binarize(x)), ("bernoulli", uniform < x.clamp(0, 1))):
            bits = bits.numpy().astype(np.float32)
            prevalence = bits.mean(0)
            row[method] = {
                "prevalence_r_train": round(float(np.corrcoef(real.mean(0), prevalence)[0, 1]), 4),
                "prevalence_r_test": round(float(np.corrcoef(test.mean(0), prevalence)[0, 1]), 4),
                "nzc": int((bits.sum(0) > 0).sum()),
                "codes_per_patient": round(float(bits.sum(1).mean()), 2),
                "cmd": round(cmd(real, bits), 4),
            }
        out["by_steps"].append(row)
    return out


def demo_quality(model_options: dict, training_options: dict, *, seeds=(0, 1), sampling_steps: int = 32,
                 save_to: Path | None = None) -> dict:
    """The ``ehrsynth demo --model ehrdiff`` path (bundled GiBleed, split seed 0, train part only) for each
    training seed: train, generate as many patients as the train part, and score against the real train part
    flattened to one visit per patient (as the demo's evaluation does) with the library's metrics."""
    from ehrsynth.data.build import BuildOptions
    from ehrsynth.data.readers.omop import read_omop
    from ehrsynth.demo_data import demo_directory
    from ehrsynth.evaluation.fidelity import detection_auroc, halo_fidelity, prevalence_fidelity
    from ehrsynth.models.ehrdiff import EHRDiffSampling
    from ehrsynth.models.io import load_model, save_model
    from ehrsynth.pipeline import train_model

    corpus = read_omop(demo_directory(), options=BuildOptions(seed=0))
    real = corpus.part("train").flatten_visits()
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as run:
            t = time.perf_counter()
            result = train_model("ehrdiff", corpus, run, model_options=model_options,
                                 training_options={**training_options, "seed": seed}, progress=False)
            train_s = time.perf_counter() - t
            model = load_model(run)
        if save_to is not None:
            save_model(model, Path(save_to) / f"seed{seed}")
        t = time.perf_counter()
        synthetic = model.generate(real.n_patients, seed=seed, sampling=EHRDiffSampling(steps=sampling_steps))
        sample_s = time.perf_counter() - t
        prevalence = prevalence_fidelity(real, synthetic)
        runs.append({
            "seed": seed, "steps": result.steps, "train_s": round(train_s, 1), "sample_s": round(sample_s, 2),
            "nzc": prevalence.nzc_synthetic, "nzc_real": prevalence.nzc_real,
            "prevalence_r": round(prevalence.pearson, 4),
            "prevalence_r2": round(halo_fidelity(real, synthetic).record_code_r2, 4),
            "codes_per_patient": round(synthetic.n_codes / synthetic.n_patients, 2),
            "detection_auroc": round(detection_auroc(real, synthetic, seed=seed).auroc, 4)})
    summary = {"real_codes_per_patient": round(real.n_codes / real.n_patients, 2)}
    for key in ("nzc", "prevalence_r", "prevalence_r2", "detection_auroc", "codes_per_patient", "train_s"):
        values = np.array([r[key] for r in runs], dtype=float)
        summary[key] = {"mean": round(float(values.mean()), 4), "min": float(values.min()), "max": float(values.max())}
    return {"model": model_options, "training": training_options, "summary": summary, "runs": runs}


# rows of the comparison: (model options, training options) over the demo's (pipeline.DEMO_SETTINGS)
COMPARE_ROWS = {
    "paper MLP, the demo before (lr 3e-4)": ({"denoiser": "mlp", "column_weight_power": 0.0}, {"lr": 3e-4}),
    "paper MLP, new training": ({"denoiser": "mlp"}, {}),
    "residual, new training (default)": ({}, {}),
}


def bench_compare(seeds=(0, 1)) -> dict:
    """The paper's MLP against the default residual network: demo quality over training seeds, and training
    step / sampling speed at the paper's MIMIC shape, both measured in this one run (ratios = default / MLP)."""
    from ehrsynth.pipeline import DEMO_SETTINGS

    demo = DEMO_SETTINGS["ehrdiff"]
    out: dict = {"quality": {}, "speed": {}}
    for name, (model_options, training_options) in COMPARE_ROWS.items():
        out["quality"][name] = demo_quality({**demo["model"], **model_options},
                                            {**demo["training"], **training_options}, seeds=seeds)
    for denoiser in ("mlp", "resnet"):
        out["speed"][denoiser] = bench_speed(denoiser)
    mlp, resnet = out["speed"]["mlp"], out["speed"]["resnet"]
    out["speed"]["ratio_train_step_s"] = round(resnet["train_step_s"] / mlp["train_step_s"], 3)
    out["speed"]["ratio_samples_per_s"] = round(resnet["samples_per_s"] / mlp["samples_per_s"], 3)
    print(compare_table(out), flush=True)
    return out


def compare_table(out: dict) -> str:
    """A markdown table of :func:`bench_compare`'s results: mean [min, max] over seeds."""
    def cell(summary: dict, key: str) -> str:
        s = summary[key]
        return f"{s['mean']:.4g} [{s['min']:.4g}, {s['max']:.4g}]"

    keys = ("nzc", "prevalence_r", "prevalence_r2", "detection_auroc", "codes_per_patient", "train_s")
    lines = ["| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, result in out["quality"].items():
        lines.append(f"| {name} | " + " | ".join(cell(result["summary"], k) for k in keys) + " |")
    first = next(iter(out["quality"].values()))
    lines.append(f"\nreal train: NZC {first['runs'][0]['nzc_real']}, "
                 f"{first['summary']['real_codes_per_patient']} codes per patient")
    for denoiser in ("mlp", "resnet"):
        s = out["speed"][denoiser]
        lines.append(f"{denoiser}: {s['parameters']:,} parameters, {s['train_step_s']} s per training step, "
                     f"{s['samples_per_s']} patients/s sampling (paper shape)")
    lines.append(f"ratios resnet/mlp: train step {out['speed']['ratio_train_step_s']}, "
                 f"sampling patients/s {out['speed']['ratio_samples_per_s']}")
    return "\n".join(lines)


MEMORY_CHILD = """
import json, resource, sys, time
import torch
from ehrsynth.models.io import load_model
from ehrsynth.models.ehrdiff import EHRDiffSampling
torch.set_num_threads(int(sys.argv[4]))
model = load_model(sys.argv[1]); mode = sys.argv[2]; n = int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sampling = EHRDiffSampling(steps=8)
t = time.perf_counter()
if mode == "generate":
    corpus = model.generate(n, seed=0, batch_size=4096, sampling=sampling)
    codes = corpus.n_codes
else:
    codes = 0
    for chunk in model.iter_generate(n, seed=0, batch_size=4096, sampling=sampling):
        codes += chunk.n_codes
seconds = time.perf_counter() - t
print(json.dumps({"mode": mode, "patients": n, "codes": codes, "seconds": round(seconds, 1),
                  "patients_per_s": round(n / seconds), "rss_after_load_mib": round(base),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def bench_memory(n: int = 1_000_000) -> dict:
    from ehrsynth.models.ehrdiff import EHRDiffConfig, EHRDiffModel
    from ehrsynth.models.io import save_model
    from ehrsynth.training.loop import TrainConfig, train

    corpus = random_mimic_corpus(8192)
    torch.manual_seed(0)
    model = EHRDiffModel.from_corpus(corpus, EHRDiffConfig(denoiser="mlp", hidden_dims=(64, 64), time_dim=64,
                                                                 fourier_dim=32, column_weight_power=0.0))
    config = TrainConfig(optimizer="adamw", lr=3e-3, batch_size=512, max_steps=300, max_epochs=1000,
                         lr_schedule="cosine", warmup_fraction=0.05, eval_every=10_000, checkpoint_every=10_000,
                         device="cpu")
    out = {"network": "(64, 64), 8 sampling steps, 1,782 codes, chunks of 4,096"}
    with tempfile.TemporaryDirectory() as run:
        train(model, corpus, None, config, run)
        save_model(model, Path(run) / "saved")
        for mode in ("iter_generate", "generate"):
            done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(Path(run) / "saved"), mode, str(n),
                                   str(torch.get_num_threads())],
                                  capture_output=True, text=True, check=True, env={**os.environ})
            out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("speed", "steps", "memory", "compare", "all"), default="all")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a shared, busy CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"load_average_at_start": os.getloadavg()}
    sections = ("speed", "steps", "memory") if args.section == "all" else (args.section,)
    for name in sections:
        t = time.perf_counter()
        results[name] = {"speed": bench_speed, "steps": bench_steps, "memory": bench_memory,
                         "compare": bench_compare}[name]()
        results[name]["section_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    results["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()


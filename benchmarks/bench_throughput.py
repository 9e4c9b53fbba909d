"""Paper-config throughput: training tokens/s and MFU, and generation patients/s, for HALO and EHRDiff.

    python benchmarks/bench_throughput.py [--device cuda] [--steps 200] [--patients 10000] [--peak-tflops X]

Written for a GPU (the figures docs/benchmarks.md asks for whenever one is lent); it runs on the CPU too, with
fewer steps, where it checks itself and gives CPU figures without MFU.

Training runs through the shared loop (``train``: bf16 autocast and pinned-memory transfer on CUDA, fused Adam),
so the figures are what a user gets, batch building included. The first ``--warmup`` steps are excluded: the
rate is taken between the loop's log lines at ``--warmup`` and at the end.

The data is the MIMIC-III demo (581 codes, 100 patients) repeated 768 times, all of it training data: 76,800
records, a whole number of batches of both models, so every batch is full (the demo alone has fewer patients
than EHRDiff's batch). The mean batch actually trained on is printed.

* HALO, the paper's network (12 layers / 12 heads / 768, square fine head), batch 48. A token is an input row
  of a record (start, static, each visit; the model predicts each next row, up to the end row): the rows of
  every batch are counted as the loop builds them.
* EHRDiff, the paper's network (D -> 1024 -> 384 -> 384 -> 384 -> 1024 -> D), batch 1,024. A token is a patient
  (one multi-hot vector).

MFU = model FLOPs per second / the device's peak dense bf16 FLOPs (``--peak-tflops``; known for a few GPUs by
name). Model FLOPs per token: 6 x (weights of every linear layer the token passes through, masked MADE weights
included, since they are computed) plus, for HALO, 12 x layers x width x E[R^2] / E[R] for attention (R: a
record's input rows; the context length averaged over tokens rather than over records). Generation: the trained model samples ``--patients`` patients (HALO batch 512; EHRDiff 32 Heun steps,
batch 4,096). Only aggregates are printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def linear_weights(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_rate(family: str, corpus, steps: int, warmup: int, device: str, run_dir: Path) -> dict:
    """Train through the shared loop, counting the tokens of every batch; tokens/s after ``warmup`` steps."""
    from ehrsynth.data.view import CorpusView
    from ehrsynth.models import model_class
    from ehrsynth.training.loop import TrainConfig, train

    cls = model_class(family)
    train_view = CorpusView.part(corpus, "train")
    torch.manual_seed(0)
    model = cls.from_corpus(train_view, cls.config_class())
    tokens_per_step: list[int] = []
    patients_per_step: list[int] = []
    collate = model.collate

    def counting_collate(source, patients):
        batch = collate(source, patients)
        tokens_per_step.append(int(batch["lengths"].sum()) + 2 * len(patients) if family == "halo"
                               else len(patients))
        patients_per_step.append(len(patients))
        return batch

    model.collate = counting_collate
    batch = 48 if family == "halo" else 1024
    config = TrainConfig(**{**cls.default_train_config(), "batch_size": batch, "max_steps": steps,
                            "max_epochs": 100_000, "log_every": warmup, "eval_every": steps,
                            "checkpoint_every": steps, "device": device})
    train(model, train_view, None, config, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["seconds"] for r in records if "seconds" in r}
    seconds = times[steps] - times[warmup]
    tokens = sum(tokens_per_step[warmup:steps])
    per_token = 6 * linear_weights(model)
    if family == "halo":
        rows = (np.minimum(train_view.visits_per_patient(), model.config.max_visits) + 2).astype(np.float64)
        per_token += 12 * model.config.n_layer * model.config.n_embd * float((rows ** 2).mean() / rows.mean())
    return {"model": model, "params": sum(p.numel() for p in model.parameters()),
            "batch": float(np.mean(patients_per_step[warmup:steps])),
            "step_seconds": seconds / (steps - warmup), "tokens_per_second": tokens / seconds,
            "flops_per_second": per_token * tokens / seconds}


def generation_rate(model, n: int) -> dict:
    options = {"batch_size": 512} if model.family == "halo" else {"batch_size": 4096}
    model.eval()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    corpus = model.generate(n, seed=0, **options)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"patients_per_second": n / seconds, "visits_per_patient": corpus.n_visits / n,
            "codes_per_visit": corpus.n_codes / max(corpus.n_visits, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 200 GPU, 12 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the rate (default: steps/4)")
    parser.add_argument("--patients", type=int, default=None, help="patients generated (default: 10,000 GPU, "
                                                                    "256 CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOPS")
    parser.add_argument("--families", default="halo,ehrdiff")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    steps = args.steps or (200 if on_gpu else 12)
    warmup = args.warmup or max(1, steps // 4)
    n = args.patients or (10_000 if on_gpu else 256)

    from ehrsynth.data.corpus import concat_corpora
    from ehrsynth.data.readers import read_source

    demo = read_source("mimic3", DATA / "mimic-iii-demo")
    corpus = concat_corpora([demo] * 768).with_split((1.0, 0.0, 0.0))  # 76,800 = 75 x 1,024 = 1,600 x 48
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; MIMIC-III demo ({corpus.vocab_size} codes); {steps} steps, "
          f"rate after step {warmup}; peak {peak or 'unknown'} TFLOPS")
    print("| model | parameters | batch | s/step | training tokens/s | model TFLOPS | MFU | generation patients/s "
          "| visits/patient, codes/visit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            t = train_rate(family, corpus, steps, warmup, args.device, Path(tmp) / "run")
        g = generation_rate(t["model"], n)
        tflops = t["flops_per_second"] / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        print(f"| {family} | {t['params']:,} | {t['batch']:.0f} | {t['step_seconds']:.4f} | {t['tokens_per_second']:,.0f} "
              f"| {tflops:.3f} | {mfu} | {g['patients_per_second']:,.0f} | {g['visits_per_patient']:.2f}, "
              f"{g['codes_per_visit']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

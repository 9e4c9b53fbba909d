"""Training throughput: 1 against 2 processes (torchrun, DDP over gloo), and eager against ``torch.compile``.

    python benchmarks/bench_training.py processes [--steps 150]
    python benchmarks/bench_training.py compile   [--steps 30]

processes: ``ehrsynth --threads 1 train MODEL --preset small --nproc N`` on the OMOP GiBleed conditions (last 45
    visits kept, seeded 72/8/20 split) at the same global batch (HALO 64, EHRDiff 256), N = 1 then 2, back to
    back. Validation and the checkpoint run once, after the last step, so the training-loop time -- the
    ``seconds`` of the last log line in ``metrics.jsonl``, written before them -- is training alone (start-up
    and process launch excluded; the wall time with them is printed too). The validation loss is the end's.
compile: the loop's step (forward, backward, fused Adam) on the same corpus and batches, eager and wrapped in
    ``torch.compile`` (what ``TrainConfig(compile=True)`` does), on one thread. The first compiled steps
    (compilation, recompiles for new batch shapes) are timed apart from the steady state.

Pinned-memory transfer only acts on a CUDA device, so it has no CPU figure. Only aggregates are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH = {"halo": 64, "ehrdiff": 256}


def prepare_gibleed(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ehrsynth.cli", "prepare", "--source", "omop", "--input",
                    str(DATA / "omop-gibleed"), "--output", str(out), "--max-visits", "45"],
                   check=True, capture_output=True)
    return out


def run_processes(corpus: Path, family: str, nproc: int, steps: int, workdir: Path) -> dict:
    run = workdir / f"{family}-{nproc}"
    config = workdir / f"{family}-{nproc}.json"  # validate and checkpoint only after the last step
    config.write_text(json.dumps({"training": {"eval_every": steps, "checkpoint_every": steps}}))
    command = [sys.executable, "-m", "ehrsynth.cli", "--threads", "1", "train", family, "--preset", "small",
               "--data", str(corpus), "--out", str(run), "--max-steps", str(steps), "--batch-size",
               str(BATCH[family]), "--nproc", str(nproc), "--config", str(config)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loop = [r for r in records if "seconds" in r][-1]["seconds"]
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None][-1]
    return {"loop": loop, "wall": wall, "val_loss": val}


def bench_processes(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = prepare_gibleed(Path(tmp) / "gibleed")
        print(f"GiBleed conditions, small presets, {steps} steps, one thread per process")
        print("| model | global batch | processes | training loop | wall time with start-up | speed-up (loop) "
              "| validation loss at the end |")
        print("|---|---|---|---|---|---|---|")
        for family in ("halo", "ehrdiff"):
            one = run_processes(corpus, family, 1, steps, Path(tmp))
            two = run_processes(corpus, family, 2, steps, Path(tmp))
            for n, r in ((1, one), (2, two)):
                print(f"| {family} | {BATCH[family]} | {n} | {r['loop']:.2f} s | {r['wall']:.1f} s "
                      f"| {one['loop'] / r['loop']:.2f}x | {r['val_loss']:.6f} |", flush=True)


def bench_compile(steps: int) -> None:
    import numpy as np
    import torch

    from ehrsynth.data.corpus import PatientCorpus
    from ehrsynth.data.view import CorpusView
    from ehrsynth.models import model_class
    from ehrsynth.models.io import config_from_dict
    from ehrsynth.pipeline import MODEL_PRESETS

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = PatientCorpus.load(prepare_gibleed(Path(tmp) / "gibleed"), mmap=False)
    train = CorpusView.part(corpus, "train")
    print(f"GiBleed conditions, small presets, 1 thread, {steps} measured steps after the first compiled ones")
    print("| model | batch | eager s/step | compiled s/step (steady) | speed-up | first compiled steps "
          "(compilation) |")
    print("|---|---|---|---|---|---|")
    for family in ("halo", "ehrdiff"):
        cls = model_class(family)
        rng = np.random.default_rng(0)
        torch.manual_seed(0)
        model = cls.from_corpus(train, config_from_dict(cls.config_class, MODEL_PRESETS[family]["small"]))
        batches = [model.collate(corpus, train.patients[rng.choice(train.n_patients, BATCH[family], replace=False)])
                   for _ in range(steps)]
        warm = 5

        def timed(module, batch_list):
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
            out = []
            for batch in batch_list:
                start = time.perf_counter()
                loss = module(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                out.append(time.perf_counter() - start)
            return out

        eager = timed(model, batches)
        compiled_model = torch.compile(model)
        compiled = timed(compiled_model, batches[:warm] + batches)
        first, steady = sum(compiled[:warm]), statistics.median(compiled[warm:])
        print(f"| {family} | {BATCH[family]} | {statistics.median(eager):.4f} | {steady:.4f} "
              f"| {statistics.median(eager) / steady:.2f}x | {first:.1f} s for {warm} steps |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["processes", "compile", "all"])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: 150 for processes, 30 for compile)")
    args = parser.parse_args()
    if args.stage in ("processes", "all"):
        bench_processes(args.steps or 150)
    if args.stage in ("compile", "all"):
        bench_compile(args.steps or 30)


if __name__ == "__main__":
    main()

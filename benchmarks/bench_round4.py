"""Cost of round 4's two changes, same run, one torch thread (GiBleed conditions, last 45 visits, seeded split):

* weight averaging (``ema_decay=0.99``, now in the small HALO and timeline presets): seconds per training step
  of the small preset with and without it, runs alternated (A B A B ...) so machine drift cancels;
* the timeline model's tail term (``tail_term``): training step and sampling time per generated token, with and
  without it (the same untrained-but-initialised network, so both sample records of similar length).

    python benchmarks/bench_round4.py [--steps 200] [--repeats 3]

Only aggregates are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import DATASETS, MAX_VISITS  # noqa: E402

from ehrsynth.data.build import BuildOptions  # noqa: E402
from ehrsynth.models.timeline import TimelineConfig, TimelineModel  # noqa: E402
from ehrsynth.pipeline import preset_options, train_model  # noqa: E402


def seconds_per_step(corpus, family: str, steps: int, model_overrides: dict, training_overrides: dict) -> float:
    """Training-loop seconds per step: the ``seconds`` of the last log line in metrics.jsonl, written before the
    run's one validation and checkpoint (start-up excluded too)."""
    model_options, training = preset_options(family, "small")
    with tempfile.TemporaryDirectory() as tmp:
        train_model(family, corpus, Path(tmp) / "run", model_options={**model_options, **model_overrides},
                    training_options={**training, "max_steps": steps, "eval_every": 10 * steps, "patience": None,
                                      "checkpoint_every": 10 * steps, "checkpoint_minutes": None, "log_every": steps,
                                      **training_overrides}, progress=False)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "seconds" in r][-1]["seconds"] / steps


def sampling_seconds_per_token(train, tail: bool, n: int = 500) -> float:
    torch.manual_seed(0)
    model = TimelineModel.from_corpus(train, TimelineConfig.small(tail_term=tail)).eval()
    start = time.perf_counter()
    synthetic = model.generate(n, seed=0, batch_size=256)
    elapsed = time.perf_counter() - start
    tokens = synthetic.n_visits * 2 + int(np.asarray(synthetic.code_offsets)[-1]) + 4 * n  # codes, gaps, prompt
    return elapsed / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    corpus = DATASETS["gibleed"](BuildOptions(max_visits=MAX_VISITS, seed=0))
    train = corpus.part("train")
    cases = {
        "halo step, EMA off": ("halo", {}, {"ema_decay": None}),
        "halo step, EMA 0.99": ("halo", {}, {"ema_decay": 0.99}),
        "timeline step, tail off": ("timeline", {"tail_term": False}, {}),
        "timeline step, tail on": ("timeline", {"tail_term": True}, {}),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (family, model_overrides, training_overrides) in cases.items():
            times[name].append(seconds_per_step(corpus, family, args.steps, model_overrides, training_overrides))
    sampling = {tail: [] for tail in (False, True)}
    for _ in range(args.repeats):
        for tail in (False, True):
            sampling[tail].append(sampling_seconds_per_token(train, tail))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"{name:28s} {1000 * value:8.2f} ms/step (median of {args.repeats})")
    for off, on in (("halo step, EMA off", "halo step, EMA 0.99"), ("timeline step, tail off", "timeline step, tail on")):
        print(f"{on} / {off}: {median[on] / median[off]:.3f}")
    off, on = statistics.median(sampling[False]), statistics.median(sampling[True])
    print(f"timeline sampling, tail off {1e6 * off:.1f} us/token, tail on {1e6 * on:.1f} us/token: ratio {on / off:.3f}")


if __name__ == "__main__":
    main()

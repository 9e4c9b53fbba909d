"""What HALO's inputs beyond the paper cost: the "seen codes" terms of the fine head, the clock of the coarse
module and its history input (``HaloConfig.seen_codes`` / ``clock`` / ``history_input``), against the same model
without them, back to back.

    python benchmarks/bench_halo_inputs.py [--data gibleed mimic3] [--steps 300] [--patients 2000] [--threads 1]

Per data set (GiBleed OMOP conditions, last 45 visits; the MIMIC-III demo diagnoses) and per variant (all
off; seen codes and clock on, history off -- round 3's default; all on -- the default): the small config is trained ``--steps`` steps with the small preset's
optimiser (Adam 2e-3, batch 32); the median time of a training step (forward, backward, Adam) over those steps;
then ``--patients`` patients sampled, as patients/s and generated visit rows/s (sampling cost follows the visits
a model generates, which differ between two trained models). Paper config (12 layers, width 768): the median of
``--paper-steps`` training steps on MIMIC-III. Ratios on/off are measured in the same run. Only aggregates are
printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.readers.mimic3 import read_mimic3
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.models.halo import HaloConfig, HaloModel

DATA = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data"))
             if p.is_dir()), Path("/work/shared/data"))
VARIANTS = {"off": {"seen_codes": False, "clock": False, "history_input": False},
            "round 3": {"history_input": False}, "on": {}}


def load(name: str):
    options = BuildOptions(max_visits=45, seed=0)
    if name == "gibleed":
        return read_omop(DATA / "omop-gibleed", options=options)
    return read_mimic3(DATA / "mimic-iii-demo", tables=("diagnoses",), options=options)


def step_times(model: HaloModel, train, steps: int, batch: int, seed: int = 0) -> list[float]:
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    times = []
    model.train()
    for _ in range(steps):
        data = model.collate(train, rng.choice(train.n_patients, size=batch, replace=False))
        start = time.perf_counter()
        loss = model.loss(data)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["gibleed", "mimic3"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--paper-steps", type=int, default=5)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    print("| data | config | variant | step ms (median) | patients/s | visit rows/s | visits/patient |")
    print("|---|---|---|---|---|---|---|")
    for name in args.data:
        train = load(name).part("train")
        for variant, options in VARIANTS.items():
            torch.manual_seed(0)
            model = HaloModel.from_corpus(train, HaloConfig.small(**options))
            times = step_times(model, train, args.steps, 32)
            model.eval()
            start = time.perf_counter()
            synthetic = model.generate(args.patients, seed=0, batch_size=256)
            seconds = time.perf_counter() - start
            print(f"| {name} | small | {variant} | {1000 * statistics.median(times[10:]):.1f} | "
                  f"{args.patients / seconds:.0f} | {synthetic.n_visits / seconds:.0f} | "
                  f"{synthetic.n_visits / args.patients:.2f} |", flush=True)
    train = load("mimic3").part("train")
    for variant, options in VARIANTS.items():
        torch.manual_seed(0)
        model = HaloModel.from_corpus(train, HaloConfig(**options))
        times = step_times(model, train, args.paper_steps + 1, 48)
        print(f"| mimic3 | paper | {variant} | {1000 * statistics.median(times[1:]):.0f} | - | - | - |", flush=True)


if __name__ == "__main__":
    main()

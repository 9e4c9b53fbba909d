"""Scale benchmark: training memory against corpus size, and HALO's narrow fine head at a 30,000-code vocabulary.

    python benchmarks/bench_scale.py corpora [--patients 1000000]      # once; cached under --cache
    python benchmarks/bench_scale.py memory  [--sizes 10000,100000,1000000] [--steps 200]
    python benchmarks/bench_scale.py vocab   [--codes 30000] [--batch 8]

corpora: the large corpora are *synthetic patients sampled from a HALO model trained on real data*: the small
    config (2 layers / 4 heads / 128) trained on the MIMIC-III demo (72 training patients, 581 ICD-9 codes;
    Adam 1e-3, cosine, batch 12, 800 steps, as bench_halo.py), then ``generate_to`` samples 1M patients (seed 0)
    to a memory-mapped corpus. The 10k and 100k corpora are its first 10k and 100k patients. Each gets a seeded
    72/8/20 split.
memory: each (model, corpus, reading) runs in a fresh process that trains through ``train_model`` (HALO small,
    batch 48; EHRDiff small, batch 256) for ``--steps`` steps with validation at the end. A thread samples the
    process's anonymous memory (``RssAnon``: heap, tensors, copies) every 20 ms; ``VmHWM`` is the peak RSS,
    which also counts the file pages of the memory-mapped corpus that the run touched. "view" is the library's
    path (train and val parts are index views of the mapped corpus); "copy" is the earlier path that copied
    each part out of the map (``corpus.part``), measured in the same run as the baseline.
vocab: a seeded random corpus over ``--codes`` codes (Zipf-like frequencies, 1-6 visits of 1-40 codes, 2,000
    patients). Parameter counts of the square reference head (counted, not built: it does not fit) and of
    the narrow MADE head, and the memory of one training step at ``--batch`` (peak RSS above the model and
    optimizer already in memory) on the CPU, paper widths and small widths.

Only aggregates are printed, never patient rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(tempfile.gettempdir()) / "ehrsynth-bench-scale"
HALO_SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 128}
EHRDIFF_SMALL = {"hidden_dims": [512, 256, 256, 256, 512], "time_dim": 256, "fourier_dim": 128}


def proc_status(field: str) -> int:
    """A /proc/self/status memory field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakSampler:
    """Samples RssAnon every ``interval`` seconds in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status("RssAnon"))


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def run_child(*args) -> dict:
    """Run a measured stage of this script in a fresh process (its peak memory is its own); its JSON result."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- corpora ---------------------------------------------------------------------------------------------------
def make_corpora(cache: Path, n_patients: int, sizes: list[int]) -> None:
    import torch

    from ehrsynth.data.corpus import PatientCorpus
    from ehrsynth.data.readers import read_source
    from ehrsynth.pipeline import generate_to, train_model

    torch.set_num_threads(1)
    cache.mkdir(parents=True, exist_ok=True)
    run = cache / "source-run"
    if not (run / "model").is_dir():
        real = read_source("mimic3", DATA / "mimic-iii-demo").with_split(seed=0)
        start = time.perf_counter()
        train_model("halo", real, run, model_options=HALO_SMALL, progress=False,
                    training_options={"lr": 1e-3, "batch_size": 12, "max_steps": 800, "lr_schedule": "cosine",
                                      "eval_every": 100})
        print(f"source model: HALO small trained on the MIMIC-III demo ({real.n_patients} patients, "
              f"{real.vocab_size} codes) in {time.perf_counter() - start:.0f} s")
    full = cache / f"corpus-{n_patients}"
    if not full.is_dir():
        start = time.perf_counter()
        raw = cache / "sampled"
        generate_to(run, n_patients, raw, seed=0, progress=True, overwrite=True)  # a cache: replaced
        seconds = time.perf_counter() - start
        PatientCorpus.load(raw).with_split(seed=0).save(full)
        print(f"sampled {n_patients:,} patients in {seconds:.0f} s ({n_patients / seconds:,.0f} patients/s)")
    corpus = PatientCorpus.load(full)
    for size in sizes:
        path = cache / f"corpus-{size}"
        if size < n_patients and not path.is_dir():
            corpus.subset(range(size)).with_split(seed=0).save(path)
    for size in sorted(set(sizes) | {n_patients}):
        c = PatientCorpus.load(cache / f"corpus-{size}")
        print(f"corpus-{size}: {c.n_patients:,} patients, {c.n_visits:,} visits, {c.n_codes:,} codes, "
              f"{directory_bytes(cache / f'corpus-{size}') / 2**20:.0f} MiB on disk")


# ---- memory against corpus size ----------------------------------------------------------------------------------
TRAINING = {"halo": ({**HALO_SMALL}, {"batch_size": 48, "lr": 1e-3}),
            "ehrdiff": ({**EHRDIFF_SMALL}, {"batch_size": 256})}


def train_one(family: str, corpus_dir: Path, reading: str, steps: int) -> dict:
    """One measured training run (in its own process: peak memory belongs to it alone)."""
    import torch

    from ehrsynth.data.corpus import PatientCorpus
    from ehrsynth.models import model_class
    from ehrsynth.models.io import config_from_dict
    from ehrsynth.pipeline import train_model
    from ehrsynth.training.loop import TrainConfig, train

    torch.set_num_threads(1)
    model_options, options = TRAINING[family]
    cls = model_class(family)
    options = {**cls.default_train_config(), **options, "max_steps": steps, "eval_every": steps,
               "checkpoint_every": steps, "log_every": steps}
    baseline = proc_status("RssAnon")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, PeakSampler() as sampler:
        if reading == "view":  # the library's path
            result = train_model(family, corpus_dir, Path(tmp) / "run", model_options=model_options,
                                 training_options=options, progress=False)
        else:  # the earlier path: each part copied out of the memory-mapped corpus
            corpus = PatientCorpus.load(corpus_dir)
            train_part, val_part = corpus.part("train"), corpus.part("val")
            torch.manual_seed(0)
            model = cls.from_corpus(train_part, config_from_dict(cls.config_class, model_options))
            result = train(model, train_part, val_part, config_from_dict(TrainConfig, options), Path(tmp) / "run")
    return {"family": family, "reading": reading, "steps": result.steps, "seconds": round(time.perf_counter() - start, 1),
            "val_loss": result.best_val_loss, "anon_before": baseline, "anon_peak": sampler.peak,
            "peak_rss": proc_status("VmHWM"), "file_rss_end": proc_status("RssFile")}


def measure_memory(cache: Path, sizes: list[int], steps: int, families: list[str]) -> None:
    print(f"training {steps} steps, 1 thread; anonymous memory = heap + tensors + copies; peak RSS also counts the "
          "mapped corpus pages touched")
    print("| model | patients | corpus on disk | reading | anon. before | anon. peak | peak RSS | file RSS at end "
          "| seconds | val loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in families:
        for size in sizes:
            corpus_dir = cache / f"corpus-{size}"
            if not corpus_dir.is_dir():
                raise SystemExit(f"{corpus_dir} is missing: run `bench_scale.py corpora` first")
            for reading in ("view", "copy"):
                r = run_child("_train_one", family, corpus_dir, reading, steps)
                print(f"| {family} | {size:,} | {directory_bytes(corpus_dir) / 2**20:.0f} MiB | {reading} "
                      f"| {r['anon_before'] / 2**20:.0f} MiB | {r['anon_peak'] / 2**20:.0f} MiB "
                      f"| {r['peak_rss'] / 2**20:.0f} MiB | {r['file_rss_end'] / 2**20:.0f} MiB | {r['seconds']} "
                      f"| {r['val_loss']:.5f} |", flush=True)


# ---- a 30,000-code vocabulary ----------------------------------------------------------------------------------
VOCAB_CONFIGS = {"paper widths (12/12/768), fine_hidden 1024": {"fine_hidden": 1024},
                 "small (2/4/128), fine_hidden 512": {**HALO_SMALL, "fine_hidden": 512}}


def vocab_corpus(n_codes: int, n_patients: int = 2_000, seed: int = 0):
    """A seeded random corpus that uses every one of ``n_codes`` codes (Zipf-like frequencies), read through the
    long-table reader like a user's table."""
    import numpy as np
    import polars as pl

    from ehrsynth.data.readers.long import read_long

    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 7, n_patients)
    visit_patient = np.repeat(np.arange(n_patients), visits)
    sizes = rng.integers(1, 41, len(visit_patient))
    weights = 1.0 / np.arange(1, n_codes + 1) ** 0.8
    codes = rng.choice(n_codes, sizes.sum(), p=weights / weights.sum())
    codes[rng.choice(len(codes), n_codes, replace=False)] = np.arange(n_codes)  # every code appears
    row_visit = np.repeat(np.arange(len(visit_patient)), sizes)
    table = pl.DataFrame({"patient": visit_patient[row_visit], "visit": row_visit,
                          "code": np.char.add("ICD10CM/X", codes.astype(str))})
    with tempfile.TemporaryDirectory() as tmp:
        table.write_parquet(Path(tmp) / "long.parquet")
        return read_long(Path(tmp) / "long.parquet").with_split(seed=0)


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one batch (distinct storages, weights
    excluded): the activation memory of a step, exactly, independent of the allocator."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def vocab_step(n_codes: int, name: str, batch: int, steps: int) -> dict:
    """Parameters and the memory of training steps at ``batch`` for one config (own process)."""
    import numpy as np
    import torch

    from ehrsynth.data.view import CorpusView
    from ehrsynth.models.halo import HaloConfig, HaloModel

    torch.set_num_threads(1)
    corpus = vocab_corpus(n_codes)
    train = CorpusView.part(corpus, "train")
    torch.manual_seed(0)
    model = HaloModel.from_corpus(train, HaloConfig(**VOCAB_CONFIGS[name]))
    width = model.config.n_embd + model.layout.n_columns
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    rng = np.random.default_rng(0)
    batches = [model.collate(corpus, train.patients[rng.choice(train.n_patients, batch, replace=False)])
               for _ in range(steps + 1)]

    def step(b):
        loss = model(b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(batches[0])  # allocates gradients and Adam's moments
    saved = saved_activation_bytes(model, batches[1])
    optimizer.zero_grad(set_to_none=True)
    settled = proc_status("RssAnon")
    start = time.perf_counter()
    with PeakSampler(0.005) as sampler:
        for b in batches[1:]:
            step(b)
    return {"codes": corpus.vocab_size, "columns": model.layout.n_columns,
            "params": sum(p.numel() for p in model.parameters()),
            "fine_params": sum(p.numel() for p in model.fine.parameters()),
            "square_fine_params": 2 * (width * width + width), "settled": settled, "peak": sampler.peak,
            "saved_activations": saved,
            "step_seconds": (time.perf_counter() - start) / steps,
            "rows_per_batch": float(np.mean([int(b["lengths"].sum()) + 2 * batch for b in batches[1:]]))}


def measure_vocab(n_codes: int, batch: int, steps: int) -> None:
    print(f"HALO at {n_codes:,} codes, CPU, 1 thread, batch {batch}, {steps} steps; fp32 Adam")
    print("| config | columns | parameters | fine head | square reference head (not built) | anon. memory with "
          "model + Adam | gradients | activations kept for backward | peak RSS above model + Adam | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in VOCAB_CONFIGS:
        r = run_child("_vocab_step", n_codes, name, batch, steps)
        print(f"| {name} | {r['columns']:,} | {r['params']:,} | {r['fine_params']:,} | "
              f"{r['square_fine_params']:,} ({r['square_fine_params'] * 16 / 2**30:.1f} GiB with grads + Adam) "
              f"| {gib(r['settled'])} GiB | {r['params'] * 4 / 2**20:.0f} MiB | {r['saved_activations'] / 2**20:.0f} MiB "
              f"| {(r['peak'] - r['settled']) / 2**20:.0f} MiB "
              f"| {r['step_seconds']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(sys.argv) > 1 and sys.argv[1] == "_train_one":  # child process of the memory stage
        family, corpus_dir, reading, steps = sys.argv[2:6]
        print(json.dumps(train_one(family, Path(corpus_dir), reading, int(steps))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_vocab_step":  # child process of the vocab stage
        n_codes, name, batch, steps = sys.argv[2:6]
        print(json.dumps(vocab_step(int(n_codes), name, int(batch), int(steps))))
        return
    parser.add_argument("stage", choices=["corpora", "memory", "vocab", "all"])
    parser.add_argument("--codes", type=int, default=30_000, help="vocab: vocabulary size")
    parser.add_argument("--batch", type=int, default=8, help="vocab: patients per batch")
    parser.add_argument("--vocab-steps", type=int, default=3, help="vocab: measured steps")
    parser.add_argument("--steps", type=int, default=200, help="memory: training steps per run")
    parser.add_argument("--families", default="halo,ehrdiff", help="memory: model families")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.stage in ("corpora", "all"):
        make_corpora(args.cache, args.patients, sizes)
    if args.stage in ("memory", "all"):
        measure_memory(args.cache, sizes, args.steps, args.families.split(","))
    if args.stage in ("vocab", "all"):
        measure_vocab(args.codes, args.batch, args.vocab_steps)


if __name__ == "__main__":
    main()

"""HALO benchmark on the MIMIC-III demo (581 codes): batch building vs a training step, and sampling speed.

    python benchmarks/bench_halo.py [--threads 1] [--train-steps 800] [--patients 256] [--skip-reference]

(a) Paper config (12 layers / 12 heads / 768, n_ctx 48), batch 48: the time to build a batch (``collate``)
    against a full training step (forward, backward, Adam), ours (records packed into one block-diagonal
    causal sequence, or padded to the batch's longest record when that is cheaper) and the reference's
    (every record padded to n_ctx rows), plus the share of the Adam step.
(b) Small config (2 / 4 / 128), lightly trained here with the shared loop (as tests/test_halo_training.py:
    Adam 1e-3, cosine, batch 12, 800 steps): sampling ``--patients`` patients
    with our sampler (per-record cursors, KV cache) and with a faithful re-implementation of the reference
    algorithm on the same weights (no KV cache; Bernoulli-sample every column, advance the whole batch to the
    smallest first hit of any record; run until every record has drawn the end token). Fine passes per visit
    and patients/s of both, as ratios within one run.

Only aggregates are printed, never patient rows. The 2-core machine is shared, so absolute times vary from run
to run; the ratios are measured back to back. One thread is the default: when another process holds a core,
two OpenMP threads wait on each other for a scheduler time slice at every operator (a paper-config step went
from 1.1 s on one thread to 6.7 s on two while the machine was busy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
            Path("/work/shared/data"))


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ---- (a) batch building vs a training step --------------------------------------------------------------------
def bench_training(train, steps: int) -> None:
    from ehrsynth.models.halo import HaloConfig, HaloModel
    from ehrsynth.models.halo.encoding import dense_rows

    torch.manual_seed(0)
    model = HaloModel.from_corpus(train, HaloConfig())
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # the loop's optimizer (not fused)
    rng = np.random.default_rng(0)
    batches = [rng.choice(train.n_patients, 48, replace=False) for _ in range(steps + 1)]

    collate_times = []
    for patients in batches * 10:  # many repeats: a batch builds in about a millisecond
        start = time.perf_counter()
        model.collate(train, patients)
        collate_times.append(time.perf_counter() - start)

    def step(batch, padded: bool) -> None:
        if padded:  # the reference layout: every record padded to n_ctx rows, the fine head on every row
            x = dense_rows(batch["ones"], batch["lengths"], model.layout.n_columns)
            full = torch.zeros(x.shape[0], model.config.n_ctx, x.shape[2])
            full[:, :x.shape[1]] = x
            full[:, x.shape[1]:, model.layout.pad] = 1
            logits = model.fine(model.coarse(full[:, :-1]), full[:, 1:])[0]  # the MADE logits (BCE, as the reference)
            scored = (torch.arange(1, model.config.n_ctx)[None, :] <= batch["lengths"][:, None] + 2)
            bce = F.binary_cross_entropy_with_logits(logits, full[:, 1:], reduction="none")
            loss = (bce * scored[..., None]).sum() / (scored.sum() * x.shape[2])
        else:
            loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    collated = [model.collate(train, p) for p in batches]
    step(collated[0], False)  # warm-up
    ours = [timed(lambda b=b: step(b, False), 1)[0] for b in collated[1:]]
    padded = [timed(lambda b=b: step(b, True), 1)[0] for b in collated[1:]]
    packed_rows = [int(b["lengths"].sum()) + 2 * len(b["lengths"]) for b in collated[1:]]
    padded_rows = [(int(b["lengths"].max()) + 2) * len(b["lengths"]) for b in collated[1:]]
    build = statistics.median(collate_times)
    adam = statistics.median(timed(optimizer.step, 3))
    fused = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    fused.step()
    adam_fused = statistics.median(timed(fused.step, 3))
    print(f"(a) paper config, {n_params / 1e6:.1f}M parameters, batch 48, {model.layout.n_columns} columns")
    print(f"    batch build (collate), median of {len(collate_times)}: {build * 1e3:.2f} ms")
    print(f"    training step, ours (records packed: {packed_rows} input rows, against {padded_rows} padded to "
          f"the longest record): {statistics.mean(ours):.2f} s  -> batch build = "
          f"{100 * build / statistics.mean(ours):.3f}% of a step")
    print(f"    training step, padded to n_ctx = {model.config.n_ctx} rows (reference layout): "
          f"{statistics.mean(padded):.2f} s  -> ours is {statistics.mean(padded) / statistics.mean(ours):.1f}x faster")
    print(f"    of which the Adam step: {adam:.2f} s (torch.optim.Adam default); {adam_fused:.3f} s with fused=True")


# ---- (b) sampling -----------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_sample(model, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """The reference algorithm (HALO_Inpatient ``sample_sequence`` / ``HALOModel.sample``) on our weights.

    One batch; for each new row the coarse transformer runs on the whole prefix (no cache); then, from i = 0,
    the full fine head is evaluated, every column is Bernoulli-sampled, the smallest column >= i that any
    record drew as 1 is fixed (to each record's draw) for the whole batch, and i moves past it. Rows are added
    until every record has an end token or n_ctx rows exist. Returns the (n, rows, C) records and the fine
    passes of each visit row.
    """
    layout, n_ctx = model.layout, model.config.n_ctx
    C = layout.n_columns
    prev = torch.zeros(n, 1, C)
    prev[:, 0, layout.start] = 1.0
    passes_per_row = []
    while prev.shape[1] < n_ctx:
        rows = torch.cat([prev, torch.zeros(n, 1, C)], dim=1)
        h = model.coarse(rows[:, :-1])[:, -1]  # the prefix recomputed every row
        i, passes = 0, 0
        while i < C:
            probs = torch.sigmoid(model.fine(h, rows[:, -1])[0])  # (n, C) full two-layer pass (MADE logits only)
            visit = torch.bernoulli(probs, generator=generator)
            passes += 1
            hits = visit[:, i:].nonzero(as_tuple=True)[1]
            if hits.numel() == 0:
                break
            first = i + int(hits.min())
            rows[:, -1, first] = visit[:, first]
            i = first + 1
        prev = rows
        if prev.shape[1] > 2:
            passes_per_row.append(passes)
        if bool((prev[:, :, layout.end].sum(1) > 0).all()):
            break
    return prev, passes_per_row


def reference_stats(records: torch.Tensor, layout) -> tuple[float, float]:
    """Visits per patient and codes per visit of reference-sampled records (visits: rows 2.. before the first
    row holding the end token)."""
    ended = records[:, :, layout.end] > 0
    end_row = torch.where(ended.any(1), ended.float().argmax(1), torch.tensor(records.shape[1]))
    rows = torch.arange(records.shape[1])
    visit = (rows[None, :] >= 2) & (rows[None, :] < end_row[:, None])
    codes = records[:, :, :layout.n_codes].sum(-1)[visit]
    return float(visit.sum(1).float().mean()), float(codes.mean()) if len(codes) else 0.0


def bench_sampling(train, val, train_steps: int, n: int, skip_reference: bool) -> None:
    from ehrsynth.models.halo import GenerationConfig, HaloConfig, HaloModel, PassCounts, sample
    from ehrsynth.training.loop import TrainConfig
    from ehrsynth.training.loop import train as train_loop

    torch.manual_seed(0)
    model = HaloModel.from_corpus(train, HaloConfig.small())
    with tempfile.TemporaryDirectory() as run:
        start = time.perf_counter()
        config = TrainConfig(lr=1e-3, batch_size=12, max_steps=train_steps, max_epochs=10**6, lr_schedule="cosine",
                             eval_every=200, checkpoint_every=10**9, device="cpu")
        result = train_loop(model, train, val, config, run)
        train_time = time.perf_counter() - start
    model.eval()
    print(f"(b) small config, trained {result.steps} steps in {train_time:.1f} s "
          f"(validation loss {result.history[-1]['val_loss']:.4f})")
    real_vpp, real_cpv = train.visits_per_patient().mean(), train.codes_per_visit().mean()
    print(f"    training data: {real_vpp:.2f} visits/patient, {real_cpv:.1f} codes/visit")

    network, layout, decoding = model.network, model.layout, model.decoding
    sample(network, layout, decoding, 16, generator=torch.Generator().manual_seed(1))  # warm-up
    counts = PassCounts()
    start = time.perf_counter()
    ours = sample(network, layout, decoding, n, generator=torch.Generator().manual_seed(0),
                  config=GenerationConfig(batch_size=n), counts=counts)
    ours_time = time.perf_counter() - start
    ours_pass = counts.passes / counts.visit_steps
    print(f"    ours:      {n} patients in {ours_time:.2f} s = {n / ours_time:.1f} patients/s; "
          f"{ours_pass:.1f} fine passes per visit row (max {max(counts.per_step)}, of {model.layout.n_columns} "
          f"columns); {ours.visits_per_patient().mean():.2f} visits/patient, "
          f"{ours.codes_per_visit().mean():.1f} codes/visit")
    if skip_reference:
        return
    start = time.perf_counter()
    records, passes = reference_sample(model, n, torch.Generator().manual_seed(0))
    ref_time = time.perf_counter() - start
    ref_vpp, ref_cpv = reference_stats(records, model.layout)
    ref_pass = statistics.mean(passes)
    print(f"    reference: {n} patients in {ref_time:.2f} s = {n / ref_time:.2f} patients/s; "
          f"{ref_pass:.1f} fine passes per visit row ({len(passes)} rows); "
          f"{ref_vpp:.2f} visits/patient, {ref_cpv:.1f} codes/visit")
    print(f"    ratio: {ref_time / ours_time:.0f}x patients/s, {ref_pass / ours_pass:.1f}x fewer fine passes per "
          f"visit row")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--paper-steps", type=int, default=2, help="training steps timed at the paper config")
    parser.add_argument("--train-steps", type=int, default=800, help="training steps of the small model")
    parser.add_argument("--patients", type=int, default=256, help="patients to sample")
    parser.add_argument("--skip-reference", action="store_true", help="skip the reference sampler (slow)")
    parser.add_argument("--skip-training", action="store_true", help="skip part (a)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    from ehrsynth.data.readers.mimic3 import read_mimic3

    corpus = read_mimic3(DATA / "mimic-iii-demo")
    train, val = corpus.part("train"), corpus.part("val")
    print(f"MIMIC-III demo: {corpus.n_patients} patients, {corpus.vocab_size} codes; "
          f"train {train.n_patients}, val {val.n_patients}; torch {torch.__version__}, {args.threads} threads")
    if not args.skip_training:
        bench_training(train, args.paper_steps)
    bench_sampling(train, val, args.train_steps, args.patients, args.skip_reference)


if __name__ == "__main__":
    main()

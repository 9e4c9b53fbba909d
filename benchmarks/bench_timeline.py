"""Timeline transformer vs HALO at the small preset (issue 15): held-out per-code perplexity, structure of the
generated records, training time and sampling speed, on one torch thread.

    python benchmarks/bench_timeline.py                       # GiBleed and the MIMIC-III demo, seed 0
    python benchmarks/bench_timeline.py --datasets gibleed mimic3 mimic4 synthea --seeds 0 1
    python benchmarks/bench_timeline.py --datasets mimic3 --max-time 60
    python benchmarks/bench_timeline.py --vocab 30000 --batch 8    # paper width at a 30,000-code vocabulary

Each data set is read as bench_quality.py reads it (last 45 visits, seeded split). Each family trains with its
small preset (``ehrsynth train --preset small``: the small network, lr 2e-3, early stopping on the validation
likelihood; ``--eval-every`` overrides the validation interval), capped by ``--max-time``; then the test part is scored (``perplexity``) and as many patients as
the training part are generated and compared with it. Only aggregates are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import DATASETS, MAX_VISITS, parse_pairs  # noqa: E402

from ehrsynth.data.build import BuildOptions  # noqa: E402
from ehrsynth.evaluation.structure import structure_fidelity  # noqa: E402
from ehrsynth.models.io import load_model  # noqa: E402
from ehrsynth.pipeline import preset_options, train_model  # noqa: E402


def run(corpus, family: str, seed: int, max_time: float, eval_every: int | None, model_overrides=None,
        train_overrides=None) -> dict[str, float]:
    train, test = corpus.part("train"), corpus.part("test")
    model_options, training = preset_options(family, "small")
    if eval_every is not None:
        training["eval_every"] = eval_every
    model_options.update((model_overrides or {}).get(family, {}))
    training.update(train_overrides or {})
    with tempfile.TemporaryDirectory(prefix="bench-timeline.") as tmp:
        start = time.perf_counter()
        result = train_model(family, corpus, Path(tmp) / "run", model_options=model_options,
                             training_options={**training, "seed": seed, "max_time": max_time}, progress=False)
        trained = time.perf_counter() - start
        model = load_model(Path(tmp) / "run")
    scored = model.perplexity(test, batch_size=64)
    start = time.perf_counter()
    synthetic = model.generate(train.n_patients, seed=seed, batch_size=256)
    sampled = time.perf_counter() - start
    return {"test per-code perplexity": scored["per_code_perplexity"],
            "test per-visit perplexity": scored["per_visit_perplexity"],
            "test mean log p(record)": scored["mean_patient_log_likelihood"],
            **structure_rows(train, synthetic),
            "steps": result.steps, "best step": result.best_step, "train s": trained,
            "sample s": sampled, "patients/s": train.n_patients / sampled,
            "parameters": sum(p.numel() for p in model.parameters())}


def structure_rows(train, synthetic) -> dict[str, float]:
    shape = structure_fidelity(train, synthetic)
    return {"empty visit share": shape.empty_visit_share, "undated visit share": shape.undated_visit_share,
            "unknown sex share": shape.unknown_sex_share, "TV codes per visit": shape.codes_per_visit_tv,
            "TV visits per patient": shape.visits_per_patient_tv, "TV log2 gap days": shape.log2_gap_days_tv}


def vocab_step(n_codes: int, batch: int, steps: int = 2) -> dict[str, float]:
    """Parameters, activation memory and seconds of a training step of the paper-width timeline model on a
    random corpus using all ``n_codes`` codes (bench_scale.py's), fp32 Adam, CPU."""
    import numpy as np

    from bench_scale import saved_activation_bytes, vocab_corpus
    from ehrsynth.data.view import CorpusView
    from ehrsynth.models.timeline import TimelineConfig, TimelineModel

    corpus = vocab_corpus(n_codes)
    train = CorpusView.part(corpus, "train")
    torch.manual_seed(0)
    model = TimelineModel.from_corpus(train, TimelineConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    batches = [model.collate(corpus, train.patients[rng.choice(train.n_patients, batch, replace=False)])
               for _ in range(steps + 1)]

    def step(b):
        loss = model(b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(batches[0])
    saved = saved_activation_bytes(model, batches[1])
    start = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return {"codes": corpus.vocab_size, "tokens": model.layout.n_columns,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens per batch": float(np.mean([int(b["lengths"].sum()) for b in batches[1:]])),
            "activations MiB": saved / 2**20, "model+grads+Adam MiB": 16 * sum(p.numel() for p in model.parameters())
            / 2**20, "s/step": (time.perf_counter() - start) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["gibleed", "mimic3"], choices=sorted(DATASETS))
    parser.add_argument("--families", nargs="+", default=["halo", "timeline"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-time", type=float, default=300.0, help="training budget per run, seconds")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="validation interval in steps (default: the loop's, once per epoch or every 100 steps)")
    parser.add_argument("--timeline", nargs="*", default=[], metavar="KEY=VALUE",
                        help="timeline model overrides, e.g. tail_term=false")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE",
                        help="training overrides for both families, e.g. ema_decay=null")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--vocab", type=int, help="instead: one paper-width training step at this vocabulary")
    parser.add_argument("--batch", type=int, default=8, help="--vocab: patients per batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.vocab:
        print(json.dumps(vocab_step(args.vocab, args.batch), indent=1))
        return
    results = {}
    for name in args.datasets:
        corpus = DATASETS[name](BuildOptions(max_visits=MAX_VISITS, seed=0))
        for family, seed in ((f, s) for f in args.families for s in args.seeds):
            row = run(corpus, family, seed, args.max_time, args.eval_every,
                      {"timeline": parse_pairs(args.timeline)}, parse_pairs(args.train))
            results[f"{name}/{family}/{seed}"] = row
            print(f"{name:8s} {family:9s} seed {seed} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in row.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Library entry points behind the CLI: train, generate and score any model family.

Each is one function the CLI calls after parsing; Python users call them directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ehrsynth.data.corpus import PatientCorpus, concat_corpora, held_out_only_codes
from ehrsynth.data.stream import save_stream
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError, InputError, short
from ehrsynth.models import model_class
from ehrsynth.models.io import config_from_dict, load_model
from ehrsynth.outputs import (check_output, make_staging, output_kind, remove_output, scratch_directory,
                              staged_output, write_marker)
from ehrsynth.training.loop import TrainConfig, TrainResult, train

OUTPUT_FORMATS = ("corpus", "long", "meds", "omop")
RUN_HINT = "pass --resume to continue it or --overwrite to start it again"


def read_config_file(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Read a run config (JSON, or TOML on Python >= 3.11) with optional ``model`` and ``training`` tables.

    Raises:
        InputError: for a missing or malformed file, or unknown top-level sections.
    """
    if path is None:
        return {"model": {}, "training": {}}
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", file=path)
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except ModuleNotFoundError:
        raise InputError("TOML configs need Python >= 3.11; use JSON", file=path) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot parse config: {str(exc).splitlines()[0]}", file=path) from None
    unknown = set(data) - {"model", "training"}
    if not isinstance(data, dict) or unknown:
        raise InputError(f"config sections must be 'model' and 'training', got {sorted(unknown)}", file=path)
    return {"model": dict(data.get("model", {})), "training": dict(data.get("training", {}))}


def train_model(
    family: str,
    corpus: PatientCorpus | str | Path,
    run_dir: str | Path,
    *,
    model_options: dict[str, Any] | None = None,
    training_options: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a ``family`` model on the corpus's train part, validating on its val part.

    Model options override the family's defaults; training options override the family's paper defaults
    (``default_train_config``). On ``resume`` the run's own ``config.json`` wins, so the run continues with the
    settings it started with. An existing ``run_dir`` is refused unless it is an ehrsynth run and ``resume``
    (continue it) or ``overwrite`` (delete it once the new run's settings are checked) is given.

    Raises:
        ConfigError: for an unknown family or option.
        OutputError: for a ``run_dir`` that exists and is not to be continued or replaced.
    """
    cls = model_class(family)
    run_dir = Path(run_dir)
    lead = int(os.environ.get("RANK", 0)) == 0  # under torchrun the other ranks would race rank 0's writes
    if lead:
        check_output(run_dir, "run", flag="--out", overwrite=overwrite or resume, hint=RUN_HINT,
                     inputs={"--data": corpus if isinstance(corpus, (str, Path)) else None})
    if isinstance(corpus, (str, Path)):
        corpus = PatientCorpus.load(corpus)
    model_options = dict(model_options or {})
    given = training_options
    training_options = {**cls.default_train_config(), **(training_options or {})}
    if resume and (run_dir / "config.json").is_file():
        resolved = json.loads((run_dir / "config.json").read_text())
        if resolved["family"] != family:
            raise ConfigError(f"{run_dir} holds a {resolved['family']!r} run, not {family!r}")
        # budgets of this invocation (not its trajectory) may change on resume
        budget = {k: v for k, v in (given or {}).items() if k in ("max_time", "checkpoint_minutes")}
        model_options, training_options = resolved["model"], {**resolved["training"], **budget}
    model_options = private_model_options(family, model_options, training_options)
    config = config_from_dict(cls.config_class, model_options)
    train_config = config_from_dict(TrainConfig, training_options)
    # views, not copies: a memory-mapped corpus is read in place, so memory does not grow with its size
    train_part, val_part = CorpusView.part(corpus, "train"), CorpusView.part(corpus, "val")
    if train_part.n_patients == 0:
        raise InputError("the corpus has no training patients (check its split)")
    outside = held_out_only_codes(corpus)
    if len(outside):  # nothing held out may shape the model: its vocabulary is written into model.json
        raise InputError(f"{len(outside)} vocabulary codes occur only in val/test patients (a corpus built "
                         "before split-first, or re-split); re-run `ehrsynth prepare`")
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(train_config.seed)
        model = cls.from_corpus(train_part, config)
    if lead:
        # A run directory is trained in place (so a killed run can --resume), not staged: --overwrite deletes
        # the old run only here, after the new settings are known to be valid. With --nproc the CLI deletes it
        # before launching the ranks, so a rank never deletes what rank 0 is writing.
        if overwrite and not resume and "RANK" not in os.environ and os.path.lexists(run_dir):
            remove_output(run_dir, "run")
        run_dir.mkdir(parents=True, exist_ok=True)
        if output_kind(run_dir) != "run":
            write_marker(run_dir, "run")
    return train(model, train_part, val_part, train_config, run_dir, resume=resume, progress=progress)


def private_model_options(family: str, model_options: dict[str, Any],
                          training_options: dict[str, Any]) -> dict[str, Any]:
    """Model options under DP-SGD (``dp_epsilon``): the family's ``private_defaults`` under the user's own options
    (EHRDiff's binarisation calibration is off unless asked for)."""
    if training_options.get("dp_epsilon"):
        return {**model_class(family).private_defaults, **model_options}
    return model_options


def generate_sharded(run_dir: str | Path, n: int, out: str | Path, output_format: str = "corpus", *,
                     seed: int = 0, progress: bool = True, overwrite: bool = False,
                     **options: Any) -> PatientCorpus | None:
    """:func:`generate_to`, split over the processes of a ``torchrun`` launch (one process: no split).

    Rank r samples its contiguous share of the ``n`` patients (``numpy.array_split`` order) from its own seed,
    ``SeedSequence([seed, r])``, so shares never repeat a stream and a launch with the same world size and seed
    gives the same patients. Patient ids are global (0..n-1). Rank 0 merges the shares and writes the output;
    the other ranks return None.
    """
    from ehrsynth.training import distributed as dist

    world = dist.setup()
    if world.size == 1:
        return generate_to(run_dir, n, out, output_format, seed=seed, progress=progress, overwrite=overwrite,
                           **options)
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    out = check_output(out, "synthetic", flag="--out", overwrite=overwrite, inputs={"RUN": run_dir})
    # one staging folder for every rank: named after torchrun's agent, the parent of all local ranks
    shards = make_staging(out.parent, "shards", pid=os.getppid(), name=out.name)
    share = np.array_split(np.arange(n), world.size)[world.rank]
    rank_seed = int(np.random.SeedSequence([seed, world.rank]).generate_state(1)[0])
    if len(share):
        part = save_stream(generate_chunks(run_dir, len(share), seed=rank_seed, progress=progress and world.rank == 0,
                                           **options), shards / f"rank-{world.rank:05d}")
        ids = np.arange(share[0], share[0] + part.n_patients).astype(str).astype(object)
        dataclasses.replace(part, patient_ids=ids).save(shards / f"rank-{world.rank:05d}")
    dist.barrier(world)
    result = None
    if world.rank == 0:
        parts = (PatientCorpus.load(p) for p in sorted(shards.glob("rank-*")))
        if output_format == "corpus":
            result = save_stream(parts, out, kind="synthetic")
        else:
            corpus = save_stream(parts, shards / "merged")
            write_output(corpus, out, output_format)
            result = corpus
        shutil.rmtree(shards, ignore_errors=True)
    dist.barrier(world)
    dist.teardown(world)
    return result


def parse_conditions(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``['label:mortality=1', 'sex=F']`` -> ``{'label:mortality': '1', 'sex': 'F'}``
    (:func:`ehrsynth.models.conditions.parse_pairs`).

    Raises:
        ConfigError: for an entry without ``=`` or a key given two different values.
    """
    from ehrsynth.models.conditions import parse_pairs

    return parse_pairs(pairs)


def generate_chunks(
    run_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    conditions: dict[str, str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
    device: str = "auto",
    condition_mode: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> Iterator[PatientCorpus]:
    """Sample ``n`` patients from the model saved in ``run_dir``, yielded as corpus chunks.

    Args:
        condition_mode: HALO and timeline: ``'forced'`` or ``'posterior'`` conditioning.
        steps, guidance: EHRDiff only: Heun steps and classifier-free guidance scale.

    Raises:
        ConfigError: for an option the model family does not take (named as its CLI flag).
    """
    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available on this machine")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {guidance!r}")
    if device == "cuda":  # under torchrun each process takes its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    model = load_model(run_dir, device=device)
    options: dict[str, Any] = {}
    if condition_mode is not None:
        if model.family not in ("halo", "timeline"):
            raise ConfigError(f"--condition-mode applies to HALO and the timeline model, not to {model.family!r}")
        options["condition"] = condition_mode
    if steps is not None or guidance is not None:
        if model.family != "ehrdiff":
            raise ConfigError(f"--steps/--guidance apply to EHRDiff, not to {model.family!r}")
        from ehrsynth.models.ehrdiff.sampling import EHRDiffSampling

        defaults = EHRDiffSampling()
        options["sampling"] = EHRDiffSampling(steps=steps or defaults.steps,
                                              guidance=defaults.guidance if guidance is None else guidance)
    if hasattr(model, "iter_generate"):
        return model.iter_generate(n, seed=seed, conditions=conditions, batch_size=batch_size, progress=progress,
                                   **options)
    return iter([model.generate(n, seed=seed, conditions=conditions, batch_size=batch_size, progress=progress,
                                **options)])


def generate_corpus(run_dir: str | Path, n: int, **options: Any) -> PatientCorpus:
    """Sample ``n`` patients into one in-memory corpus (see :func:`generate_chunks` for the options)."""
    return concat_corpora(list(generate_chunks(run_dir, n, **options)))


def generate_to(run_dir: str | Path, n: int, out: str | Path, output_format: str = "corpus", *,
                overwrite: bool = False, **options: Any) -> PatientCorpus:
    """Sample ``n`` patients straight to disk, chunk by chunk, and write them in ``output_format``.

    Generation holds one chunk in memory at a time: chunks are saved as they come and merged through
    memory-mapped arrays. Other formats are then written from that memory-mapped corpus. ``out`` is checked
    before any work (:func:`ehrsynth.outputs.check_output`); ``overwrite`` lets it replace an earlier
    synthetic output.

    Returns:
        The generated corpus (memory-mapped).

    Raises:
        OutputError: for an ``out`` that exists (without ``overwrite``), is not ours, or overlaps ``run_dir``.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    out = check_output(out, "synthetic", flag="--out", overwrite=overwrite, inputs={"RUN": run_dir})
    chunks = generate_chunks(run_dir, n, **options)
    if output_format == "corpus":
        return save_stream(chunks, out, kind="synthetic")
    with scratch_directory(out.parent, "synthetic") as tmp:
        corpus = save_stream(chunks, tmp / "corpus", kind="synthetic")
        write_output(corpus, out, output_format)
        return PatientCorpus.load(tmp / "corpus", mmap=False)


def write_output(corpus: PatientCorpus, out: str | Path, output_format: str) -> Path:
    """Write ``corpus`` to ``out`` in ``output_format`` (corpus, long, meds or omop), atomically."""
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    out = Path(out)
    if output_format == "corpus":
        return corpus.save(out, kind="synthetic")
    from ehrsynth.data.writers import write_corpus

    return write_corpus(corpus, out, output_format)


def perplexity(run_dir: str | Path, corpus: PatientCorpus | str | Path, *, batch_size: int = 64) -> dict[str, Any]:
    """Per-code and per-visit perplexity of ``corpus`` under the model in ``run_dir``.

    Raises:
        ConfigError: when the model family has no likelihood (EHRDiff).
    """
    model = load_model(run_dir)
    if isinstance(corpus, (str, Path)):
        corpus = PatientCorpus.load(corpus)
    if not hasattr(model, "perplexity"):
        raise ConfigError(f"model family {model.family!r} has no likelihood; perplexity needs HALO or timeline")
    return model.perplexity(corpus, batch_size=batch_size)


def load_corpus_part(path: str | Path, part: str) -> PatientCorpus:
    """A saved corpus; when it still holds all split parts (straight from ``prepare``), just ``part``."""
    corpus = PatientCorpus.load(path)
    parts = set(np.unique(np.asarray(corpus.split)).tolist())
    return corpus.part(part) if len(parts) > 1 else corpus


def evaluate_to(
    train: str | Path | PatientCorpus,
    test: str | Path | PatientCorpus,
    synthetic: str | Path | PatientCorpus,
    out: str | Path,
    *,
    synthetic_source: str = "corpus",
    model_dir: str | Path | None = None,
    seed: int = 0,
    privacy_n: int | None = 2000,
    bootstrap: int = 200,
    descriptions: dict[str, str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, list]:
    """Evaluate ``synthetic`` against real ``train``/``test`` and write the report into ``out``.

    ``out`` is checked before any work: it may replace only an earlier report (with ``overwrite``) and never
    overlap an input. ``descriptions`` (typed code -> name) label the per-code tables; by default the
    ``descriptions.json`` that ``prepare`` saved beside a ``train`` corpus directory is used.

    Returns:
        The report path and the headline rows.
    """
    from ehrsynth.data.build import BuildOptions
    from ehrsynth.data.readers import read_source
    from ehrsynth.evaluation.descriptions import load_descriptions
    from ehrsynth.evaluation.report import evaluate, headline, write_report

    paths = {flag: value if isinstance(value, (str, Path)) else None for flag, value in
             (("--train", train), ("--test", test), ("--synthetic", synthetic), ("--model", model_dir))}
    check_output(out, "report", flag="--out", overwrite=overwrite, inputs=paths)

    if descriptions is None and not isinstance(train, PatientCorpus):
        descriptions = load_descriptions(train)
    synthetic_where = None if isinstance(synthetic, PatientCorpus) else synthetic
    # synthetic files are read whole: every record a training record, so split-first drops none of their codes
    whole = BuildOptions(split=(1.0, 0.0, 0.0))
    train = train if isinstance(train, PatientCorpus) else load_corpus_part(train, "train")
    test = test if isinstance(test, PatientCorpus) else load_corpus_part(test, "test")
    if not isinstance(synthetic, PatientCorpus):
        synthetic = (PatientCorpus.load(synthetic) if synthetic_source == "corpus"
                     else read_source(synthetic_source, synthetic, options=whole))
    check_vocabulary_overlap(synthetic, train, where=synthetic_where)
    flattened = bool(synthetic.n_visits == synthetic.n_patients and train.n_visits > train.n_patients)
    if flattened:  # a patient-level generator (EHRDiff): compare it with patient-level real data
        train, test = train.flatten_visits(), test.flatten_visits()
    loglik = None
    extra: dict[str, Any] = {"differential_privacy": {  # replaced below when the model is given
        "metric": "privacy.differential_privacy", "epsilon_spent": None,
        "not_applicable": "no --model given: the privacy budget is read from the model's model.json"}}
    if model_dir is not None:
        model = load_model(model_dir)
        spent = model.meta.extra.get("dp")  # written by DP-SGD training (ehrsynth/training/dp.py)
        extra["differential_privacy"] = {"metric": "privacy.differential_privacy", **(spent or {
            "epsilon_spent": None, "not_applicable": "the model was trained without --dp-epsilon"})}
        if hasattr(model, "patient_log_likelihood"):
            loglik = model.patient_log_likelihood
            extra["perplexity_test"] = model.perplexity(test)
    metrics = evaluate(train, test, synthetic, patient_log_likelihood=loglik, seed=seed, privacy_n=privacy_n,
                       bootstrap=bootstrap, descriptions=descriptions)
    metrics.update(extra)
    metrics["_meta"]["real_flattened_to_one_visit"] = flattened
    report = write_report(metrics, train, synthetic, out, reference=test)
    return report, headline(metrics)


MIN_SHARED_CODE_SHARE = 0.5  # evaluate refuses synthetic data with fewer of its codes known to the real data


def check_vocabulary_overlap(synthetic: PatientCorpus, real: PatientCorpus, *, where: str | Path | None = None) -> None:
    """Refuse to compare corpora that hardly share codes: every metric would be a meaningless normal-looking
    number (a different code system, a missing ``SYSTEM/`` prefix, the wrong corpus).

    Raises:
        InputError: when fewer than :data:`MIN_SHARED_CODE_SHARE` of the synthetic data's distinct codes occur
            in the real corpus.
    """
    used = [c for c, n in zip(synthetic.vocab.codes, synthetic.vocab.counts) if n > 0]
    if not used:
        raise InputError("the synthetic data holds no code", file=where)
    known = set(real.vocab.codes)
    shared = sum(c in known for c in used)
    if shared < MIN_SHARED_CODE_SHARE * len(used):
        example = short(next(c for c in used if c not in known))
        raise InputError(f"only {shared} of the {len(used)} synthetic codes occur in the real training data "
                         f"(at least {MIN_SHARED_CODE_SHARE:.0%} must; e.g. {example} is unknown): wrong corpus "
                         "or code system?", file=where)


# Architecture presets of ``ehrsynth train --preset``: the paper's networks, or small ones for CPUs.
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "halo": {"paper": {}, "small": {"n_layer": 2, "n_head": 4, "n_embd": 128}},
    "ehrdiff": {"paper": {}, "small": {"hidden_dims": [512, 256, 256, 256, 512], "time_dim": 256,
                                       "fourier_dim": 128}},
    "timeline": {"paper": {}, "small": {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_ctx": 256}},
}

# Training that goes with each preset (TrainConfig fields over the family's paper defaults). The paper networks
# keep the papers' optimisers. The small networks take a 20x larger step and stop after 5 validations without a
# better validation likelihood: HALO small at the paper's lr 1e-4 was still improving after 400 epochs on
# GiBleed, while lr 2e-3 reaches its best likelihood near step 1,000 (about 100 CPU-s; benchmarks/bench_quality.py,
# docs/benchmarks.md "Training presets"). At that step size the weights are noisy, so the small HALO and timeline
# presets validate, keep and generate from an exponential moving average of them (decay 0.99, about the last 100
# steps): on GiBleed HALO's detection AUROC 0.610 -> 0.483 (the real holdout's 0.484), gap-days TV 0.038 -> 0.006,
# TSTR 0.621 -> 0.640 (docs/benchmarks.md "Quality, round 4"). EHRDiff's EMA validation loss keeps falling slowly
# for tens of thousands of steps, so its small preset is capped at 5,000 steps (about 2.5 CPU-minutes on GiBleed).
SMALL_EMA_DECAY = 0.99
TRAINING_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "halo": {"paper": {}, "small": {"batch_size": 32, "lr": 2e-3, "patience": 5, "ema_decay": SMALL_EMA_DECAY}},
    "ehrdiff": {"paper": {}, "small": {"batch_size": 256, "lr": 1e-3, "max_steps": 5000, "eval_every": 250}},
    # constant, as HALO's: the family's cosine warm-up spans 5% of 400 epochs, longer than a small run lasts
    "timeline": {"paper": {}, "small": {"batch_size": 32, "lr": 2e-3, "patience": 5, "lr_schedule": "constant",
                                        "warmup_fraction": 0.0, "ema_decay": SMALL_EMA_DECAY}},
}


def preset_options(family: str, preset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model options, training options) of ``ehrsynth train FAMILY --preset PRESET``, before any --config."""
    if family not in MODEL_PRESETS or preset not in MODEL_PRESETS[family]:
        raise ConfigError(f"no preset {preset!r} for {family!r}; known: {sorted(MODEL_PRESETS.get(family, {}))}")
    return dict(MODEL_PRESETS[family][preset]), dict(TRAINING_PRESETS[family][preset])

# Small configs for the bundled demo: the whole path runs in a few minutes on a 2-core CPU.
DEMO_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "halo": {
        "model": {**MODEL_PRESETS["halo"]["small"], "n_ctx": 48},
        # the small preset's training (lr 2e-3 constant, batch 32, patience 5, weights averaged with decay 0.99),
        # validated every 100 steps: the structured HALO reaches its best validation likelihood near step 600-1,000
        # and the run stops 500 steps later instead of running out the 3000-step cap. A cosine schedule was
        # measured worse on GiBleed (detection AUROC 0.652/0.620 against 0.626/0.594 for seeds 0/1).
        "training": {**TRAINING_PRESETS["halo"]["small"], "max_steps": 3000, "eval_every": 100,
                     "checkpoint_every": 250},
    },
    "ehrdiff": {
        # the small preset: 5,000 steps at batch 256 (detection AUROC 0.595/0.598 on GiBleed, against 0.60-0.62
        # at the 1,500 steps the demo took before)
        "model": MODEL_PRESETS["ehrdiff"]["small"],
        "training": {**TRAINING_PRESETS["ehrdiff"]["small"], "checkpoint_every": 250},
    },
    "timeline": {
        "model": MODEL_PRESETS["timeline"]["small"],
        # the small preset, validated every 100 steps and capped at 1,000 steps: GiBleed's best validation
        # likelihood comes at step 800-1,000, and uncapped (stopped at step 1,300) the demo took 181 s
        "training": {**TRAINING_PRESETS["timeline"]["small"], "max_steps": 1000, "eval_every": 100,
                     "checkpoint_every": 250},
    },
}


def run_demo(family: str = "halo", out: str | Path = "ehrsynth-demo", *, seed: int = 0, max_steps: int | None = None,
             progress: bool = True, say=print, overwrite: bool = False) -> tuple[Path, list]:
    """prepare -> split -> train -> generate -> evaluate -> report, on the bundled OMOP GiBleed tables.

    Everything lands under ``out``: ``corpus/``, ``run/`` (model, checkpoint, metrics log), ``synthetic/`` and
    ``report/``, built in a staging folder and renamed into place at the end. A previous demo in ``out`` is
    replaced only with ``overwrite``. ``max_steps`` shortens training (for tests).

    Returns:
        The report path and the headline rows.
    """
    from ehrsynth.demo_data import demo_directory

    if family not in DEMO_SETTINGS:
        raise ConfigError(f"--model must be one of {', '.join(DEMO_SETTINGS)}, got {family!r}")
    out = check_output(out, "demo", flag="--out", overwrite=overwrite, inputs={"demo data": demo_directory()})
    with staged_output(out, "demo") as stage:
        rows = _demo_steps(family, stage, seed=seed, max_steps=max_steps, progress=progress, say=say)
    say("[5/5] report written")
    return out / "report" / "report.html", rows


def _demo_steps(family: str, out: Path, *, seed: int, max_steps: int | None, progress: bool, say) -> list:
    """The demo's steps, written into ``out`` (run_demo's staging folder)."""
    from ehrsynth.data.build import BuildOptions
    from ehrsynth.data.readers.omop import read_omop
    from ehrsynth.demo_data import demo_directory

    settings = DEMO_SETTINGS[family]
    if max_steps is not None:
        settings = {**settings, "training": {**settings["training"], "max_steps": max_steps}}
    max_visits = settings["model"]["n_ctx"] - 3 if family == "halo" else None
    say(f"[1/5] reading the bundled OMOP GiBleed tables (keeping each patient's last {max_visits} visits)"
        if max_visits else "[1/5] reading the bundled OMOP GiBleed tables")
    corpus = read_omop(demo_directory(), options=BuildOptions(max_visits=max_visits, seed=seed))
    corpus.save(out / "corpus")
    train_part, test_part = corpus.part("train"), corpus.part("test")
    say(f"      {corpus.n_patients:,} patients, {corpus.n_visits:,} visits, {corpus.vocab_size} codes; "
        f"split {train_part.n_patients}/{corpus.part('val').n_patients}/{test_part.n_patients}")
    run = out / "run"
    say(f"[2/5] training {family} (small config, up to {settings['training']['max_steps']} steps, early stopping)")
    result = train_model(family, corpus, run, model_options=settings["model"],
                         training_options={**settings["training"], "seed": seed}, progress=progress)
    unit = model_class(family).validation_unit
    say(f"      best validation loss {result.best_val_loss:.4f} per {unit} at step {result.best_step} of "
        f"{result.steps}" if result.best_val_loss is not None else "")
    say(f"[3/5] generating {train_part.n_patients:,} synthetic patients")
    synthetic = generate_corpus(run, train_part.n_patients, seed=seed, progress=progress)
    synthetic.save(out / "synthetic", kind="synthetic")
    say("[4/5] evaluating structure, fidelity, utility and privacy beside the noise ceiling")
    from ehrsynth.evaluation.descriptions import code_descriptions

    _, rows = evaluate_to(train_part, test_part, synthetic, out / "report",
                          model_dir=run if family in ("halo", "timeline") else None, seed=seed,
                          descriptions=code_descriptions("omop", demo_directory()))
    return rows


__all__ = ["OUTPUT_FORMATS", "generate_chunks", "generate_corpus", "generate_to", "generate_sharded", "parse_conditions", "perplexity", "read_config_file",
           "train_model", "write_output", "evaluate_to", "load_corpus_part",
           "run_demo"]

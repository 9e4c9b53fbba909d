"""The ``ehrsynth`` command line: a thin layer that parses, validates and calls one library function.

Every :class:`~ehrsynth.errors.EhrsynthError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from ehrsynth.errors import EhrsynthError

SOURCE_CHOICES = ("long", "meds", "mimic3", "mimic4", "omop", "synthea")


def _split(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three comma-separated fractions, got {value!r}") from None
    if len(parts) != 3:
        raise click.BadParameter(f"expected three comma-separated fractions, got {value!r}")
    return parts  # type: ignore[return-value]


def _overwrite_option(what: str):
    return click.option("--overwrite", is_flag=True,
                        help=f"Replace an existing {what} written by ehrsynth (nothing else is ever replaced).")


def _finite_non_negative(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Option callback: refuse NaN, infinities and negative numbers, naming the flag."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"must be a finite number >= 0, got {value!r}")
    return value


def _cuda_if_available(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Option callback: ``--device cuda`` on a machine without CUDA is a usage error, not a torch traceback."""
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine; use --device cpu or auto")
    return value


class _Group(click.Group):
    """Turns every project error into one line on stderr and exit code 2, whoever invokes the CLI.

    Anything else is a bug: as a last resort it prints one line naming a log file that holds the traceback,
    and exits 1 (never 2), so tests and ``benchmarks/fuzz_readers.py`` can count how often this net fires.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EhrsynthError as exc:
            line = " ".join(f"error: {exc}".splitlines())
            click.echo(line if len(line) <= 300 else line[:297] + "...", err=True)  # one short line, always
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 -- the safety net, see the class docstring
            import tempfile
            import traceback

            fd, log = tempfile.mkstemp(prefix="ehrsynth-crash-", suffix=".log")
            with os.fdopen(fd, "w") as handle:
                handle.write(traceback.format_exc())
            click.echo(f"internal error ({type(exc).__name__}); please report it with the traceback in {log}",
                       err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ehrsynth")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often fastest on a busy machine).")
def cli(threads: int | None) -> None:
    """ehrsynth: learn from longitudinal EHRs, generate synthetic patients, and measure fidelity, utility
    and privacy."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@cli.command()
@click.option("--source", type=click.Choice(SOURCE_CHOICES), required=True, help="Input format.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help="Input file (long, meds) or directory (mimic3, mimic4, omop, synthea).")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Corpus directory to write.")
@click.option("--tables", multiple=True,
              help="Code tables to read (repeatable). mimic3/mimic4: diagnoses, procedures, prescriptions; "
                   "omop: condition, drug, procedure; synthea: conditions, medications, procedures.")
@click.option("--min-count", type=click.IntRange(min=1), default=1, help="Drop codes seen in fewer visits.")
@click.option("--profile", type=click.Choice(["release", "research"]), default="release", show_default=True,
              help="release: drop codes fewer than 11 training patients have (rare codes identify people); "
                   "research: keep every training code, as the papers did.")
@click.option("--min-patients", type=click.IntRange(min=1), default=None,
              help="Drop codes seen in fewer distinct training patients (default: 11 for release, 1 for research).")
@click.option("--systems", default=None, help="Comma-separated code systems to keep, e.g. ICD9CM,ICD9PROC.")
@click.option("--icd9-rollup", is_flag=True, help="Roll ICD-9 codes up to 3 digits (4 for E-codes), as EHRDiff.")
@click.option("--max-visits", type=click.IntRange(min=1), default=None, help="Cap on visits per patient.")
@click.option("--keep-visits", type=click.Choice(["last", "first"]), default="last",
              help="Which end of a capped history is kept.")
@click.option("--max-codes-per-visit", type=click.IntRange(min=1), default=None,
              help="Cap on codes per visit (the first in source order are kept).")
@click.option("--empty", type=click.Choice(["drop", "keep"]), default="drop",
              help="Drop visits/patients with no code, or keep them as empty visits (counted either way).")
@click.option("--split", "split_fractions", default="0.72,0.08,0.2", help="Train,val,test fractions.")
@click.option("--seed", type=int, default=0, help="Seed of the train/val/test split.")
@click.option("--patient-col", default=None, help="long: patient column (default 'patient').")
@click.option("--visit-col", default=None, help="long: visit id or timestamp column (default 'visit').")
@click.option("--code-col", default=None, help="long: code column (default 'code').")
@click.option("--time-col", default=None, help="long: optional event time column.")
@click.option("--code-system", default=None, help="long: system prefix for codes that carry none, e.g. ICD10CM.")
@click.option("--visit-window-hours", type=float, default=None, callback=_finite_non_negative,
              help="meds: merge events within this many hours into one visit (default: same timestamp).")
@click.option("--date-format", default=None,
              help="strftime pattern tried first on every date column, e.g. '%d/%m/%Y' (ISO and a documented "
                   "set of common formats are recognised without it).")
@_overwrite_option("corpus")
def prepare(source, input_path, output, tables, min_count, profile, min_patients, systems, icd9_rollup, max_visits,
            keep_visits, max_codes_per_visit, empty, split_fractions, seed, patient_col, visit_col, code_col,
            time_col, code_system, visit_window_hours, date_format, overwrite) -> None:
    """Read a source into a corpus directory (with a seeded train/val/test split).

    The corpus holds real patients, so it is private to you (0700/0600) whatever your umask."""
    from ehrsynth.data.build import PROFILE_MIN_PATIENTS, BuildOptions
    from ehrsynth.data.readers import read_source
    from ehrsynth.outputs import check_output

    check_output(output, "corpus", flag="--output", overwrite=overwrite, inputs={"--input": input_path})

    options = BuildOptions(
        min_count=min_count,
        min_patients=PROFILE_MIN_PATIENTS[profile] if min_patients is None else min_patients,
        systems=tuple(s.strip() for s in systems.split(",")) if systems else None,
        icd9_rollup=icd9_rollup,
        max_visits=max_visits,
        keep_visits=keep_visits,
        max_codes_per_visit=max_codes_per_visit,
        empty=empty,
        split=_split(split_fractions),
        seed=seed,
    )
    kwargs = {"tables": tuple(tables) or None, "patient": patient_col, "visit": visit_col, "code": code_col,
              "time": time_col, "code_system": code_system, "visit_window_hours": visit_window_hours}
    with _spinner(f"reading {source} from {input_path}"):
        corpus = read_source(source, input_path, options=options, date_format=date_format, **kwargs)
        corpus.stats["profile"] = profile
        corpus.save(output, private=True)
        from ehrsynth.evaluation.descriptions import code_descriptions, save_descriptions

        descriptions = code_descriptions(source, input_path)  # the report's code names, when the source has them
        if descriptions:
            save_descriptions(output, descriptions)
    summary = corpus.describe()
    click.echo(f"wrote {output}: {summary['patients']} patients, {summary['visits']} visits, "
               f"{summary['code_occurrences']} codes, vocabulary {summary['vocabulary_size']}")


@cli.command()
@click.argument("corpus_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
def describe(corpus_dir: Path, as_json: bool) -> None:
    """Describe a saved corpus: counts, distributions and what building dropped (aggregates only)."""
    from ehrsynth.data.corpus import PatientCorpus

    summary = PatientCorpus.load(corpus_dir).describe()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(format_description(summary))


def format_description(summary: dict) -> str:
    """Human-readable lines for :meth:`PatientCorpus.describe` output."""
    lines = [
        f"patients            {summary['patients']:,}",
        f"visits              {summary['visits']:,}",
        f"code occurrences    {summary['code_occurrences']:,}",
        f"vocabulary          {summary['vocabulary_size']:,}  "
        + ", ".join(f"{k}: {v}" for k, v in summary["codes_by_system"].items()),
    ]
    for key in ("visits_per_patient", "codes_per_visit"):
        d = summary[key]
        lines.append(f"{key.replace('_', ' '):<20}mean {d['mean']:.2f}, median {d['median']:g}, "
                     f"p95 {d['p95']:g}, max {d['max']:g}")
    lines.append("sex                 " + ", ".join(f"{k}: {v}" for k, v in summary["sex"].items()))
    if summary["labels"]:
        lines.append("labels              " + ", ".join(f"{k}: {v}" for k, v in summary["labels"].items()))
    lines.append("split               " + ", ".join(f"{k}: {v}" for k, v in summary["split"].items()))
    dropped = {k: v for k, v in summary["build"].items() if isinstance(v, int) and k not in
               ("patients", "visits", "code_occurrences", "input_rows") and v}
    lines.append("dropped/merged      " + (", ".join(f"{k}: {v}" for k, v in dropped.items()) or "nothing"))
    build = summary["build"]
    if build.get("vocabulary_from") == "train":  # split-first corpus: what held-out/rare codes cost each part
        lines.append(f"vocabulary from     training patients only (profile {build.get('profile', 'library')}, "
                     f"min patients {build.get('options', {}).get('min_patients', 1)}); "
                     f"{build.get('codes_only_outside_train', 0)} codes only in val/test dropped")
        for what in ("visits", "patients"):
            emptied = build.get(f"{what}_emptied_by_vocabulary", {})
            lines.append(f"{what + ' emptied':<20}" + ", ".join(f"{k}: {v}" for k, v in emptied.items())
                         + (" (kept as empty visits)" if build.get("options", {}).get("empty") == "keep"
                            else " (dropped)"))
    return "\n".join(lines)


@cli.command("train")
@click.argument("model", type=click.Choice(["halo", "ehrdiff", "timeline"]))
@click.option("--data", "data", type=click.Path(path_type=Path), required=True,
              help="Corpus directory from `ehrsynth prepare` (its train part is used, val for validation).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="JSON/TOML file with 'model' and 'training' sections.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Override training.max_steps.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None, help="Override training.max_epochs.")
@click.option("--max-time", default=None, metavar="DURATION", callback=lambda ctx, param, value: _duration(value),
              help="Wall-clock budget of this invocation, e.g. 90s, 45m, 2h (a bare number is minutes): the run "
                   "then validates, checkpoints and stops; --resume continues it.")
@click.option("--patience", type=click.IntRange(min=0), default=None,
              help="Stop after this many validations without a better validation likelihood (default 10; 0: "
                   "never stop early).")
@click.option("--checkpoint-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Also checkpoint when this many minutes passed since the last checkpoint (default 10).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override training.batch_size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Override training.lr.")
@click.option("--seed", type=int, default=None, help="Override training.seed.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, callback=_cuda_if_available,
              help="Override training.device.")
@click.option("--nproc", type=click.IntRange(min=1), default=1,
              help="Launch this many processes with torchrun (DDP) on this machine.")
@click.option("--preset", type=click.Choice(["paper", "small"]), default="paper",
              help="Preset: the paper's network and optimiser, or a small network with a larger learning rate "
                   "and early stopping for CPUs and quick runs (--config options override it).")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration and exit.")
@click.option("--dp-epsilon", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Train with DP-SGD (per-patient clipping) to this epsilon; training stops before exceeding it.")
@click.option("--dp-delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=None,
              help="DP delta (default 1 / N^1.1 for N training patients).")
@click.option("--dp-max-grad-norm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="DP-SGD per-patient gradient clipping norm C (default 1.0).")
@_overwrite_option("run directory")
def train_command(model, data, out, config_file, resume, max_steps, max_epochs, max_time, patience,
                  checkpoint_minutes, batch_size, lr, seed, device, nproc, preset, dry_run, dp_epsilon, dp_delta,
                  dp_max_grad_norm, overwrite) -> None:
    """Train MODEL (halo, ehrdiff or timeline) on a corpus; the best model lands in OUT/model."""
    from ehrsynth.outputs import check_output, remove_output
    from ehrsynth.pipeline import RUN_HINT, preset_options, private_model_options, read_config_file, train_model

    sections = read_config_file(config_file)
    preset_model, preset_training = preset_options(model, preset)
    sections["model"] = {**preset_model, **sections["model"]}
    sections["training"] = {**preset_training, **sections["training"]}
    overrides = {"max_steps": max_steps, "max_epochs": max_epochs, "batch_size": batch_size, "lr": lr,
                 "seed": seed, "device": device, "max_time": max_time, "checkpoint_minutes": checkpoint_minutes,
                 "dp_epsilon": dp_epsilon, "dp_delta": dp_delta, "dp_max_grad_norm": dp_max_grad_norm}
    sections["training"].update({k: v for k, v in overrides.items() if v is not None})
    if patience is not None:
        sections["training"]["patience"] = patience or None
    if dry_run:
        from ehrsynth.models import model_class

        from dataclasses import asdict

        from ehrsynth.models.io import config_from_dict
        from ehrsynth.training.loop import TrainConfig

        resolved = asdict(config_from_dict(TrainConfig, {**model_class(model).default_train_config(),
                                                         **sections["training"]}))
        shown = private_model_options(model, sections["model"], resolved)
        click.echo(json.dumps({"model": shown, "training": resolved}, indent=2))
        return
    if int(os.environ.get("RANK", 0)) == 0:
        check_output(out, "run", flag="--out", overwrite=overwrite or resume, hint=RUN_HINT,
                     inputs={"--data": data, "--config": config_file})
    if nproc > 1:
        if overwrite and not resume:
            remove_output(out, "run")  # here, not in the ranks, so no rank deletes what another writes
        _relaunch_with_torchrun(nproc)
        return
    result = train_model(model, data, out, model_options=sections["model"], training_options=sections["training"],
                         resume=resume, overwrite=overwrite, progress=True)
    if int(os.environ.get("RANK", 0)) != 0:
        return  # under torchrun only rank 0 reports
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    why = (" (early stop)" if result.stopped_early else
           " (time budget used; --resume continues)" if result.out_of_time else "")
    at = "" if result.best_step is None else f" (step {result.best_step})"
    click.echo(f"trained {result.steps} steps{why}; best validation loss {best}{at}; model in {out / 'model'}")
    spent = json.loads((out / "model" / "model.json").read_text())["meta"]["extra"].get("dp")
    if spent:
        click.echo(f"differential privacy: epsilon {spent['epsilon_spent']:.3f} of {spent['epsilon_target']} "
                   f"spent (delta {spent['delta']:.2e}, {spent['steps']} steps)")


def _duration(value: str | None) -> float | None:
    """'90s', '45m', '2h' or a bare number of minutes -> seconds."""
    if value is None:
        return None
    text = value.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    try:
        seconds = float(text[:-1] if scale else text) * (scale or 60)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise click.BadParameter(f"expected a positive duration such as 90s, 45m or 2h, got {value!r}")
    return seconds


def _relaunch_with_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with --nproc removed (one process per rank)."""
    import subprocess

    argv = sys.argv[1:]
    cleaned, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        cleaned.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ehrsynth.cli", *cleaned]
    completed = subprocess.run(command)
    if completed.returncode:
        sys.exit(completed.returncode)


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("-n", "n", type=click.IntRange(min=1), required=True, help="Number of patients to generate.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--format", "output_format", type=click.Choice(["corpus", "long", "meds", "omop"]), default="corpus",
              help="Output format.")
@click.option("--condition", "conditions", multiple=True,
              help="Fix a static value, e.g. label:mortality=1 or sex=F (repeatable).")
@click.option("--seed", type=int, default=0, help="Sampling seed: the same seed gives the same patients.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Patients sampled at once.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", callback=_cuda_if_available)
@click.option("--condition-mode", type=click.Choice(["forced", "posterior"]), default=None,
              help="HALO and timeline: force the fixed static values (forced), or sample exactly given them "
                   "(posterior).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="EHRDiff: Heun steps (default 32).")
@click.option("--guidance", type=float, default=None, callback=_finite_non_negative,
              help="EHRDiff: classifier-free guidance scale for --condition (default 1).")
@_overwrite_option("synthetic output")
def generate(run, n, out, output_format, conditions, seed, batch_size, device, condition_mode, steps,
             guidance, overwrite) -> None:
    """Generate N synthetic patients from a trained RUN and write them to OUT."""
    from ehrsynth.pipeline import generate_sharded, parse_conditions

    corpus = generate_sharded(run, n, out, output_format, seed=seed, conditions=parse_conditions(conditions),
                              batch_size=batch_size, progress=True, device=device, condition_mode=condition_mode,
                              steps=steps, guidance=guidance, overwrite=overwrite)
    if corpus is None:
        return  # under torchrun, rank 0 reports
    summary = corpus.describe()
    click.echo(f"wrote {summary['patients']} patients, {summary['visits']} visits, "
               f"{summary['code_occurrences']} codes to {out} ({output_format})")


@cli.command("perplexity")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Corpus directory to score.")
@click.option("--part", type=click.Choice(["all", "train", "val", "test"]), default="test",
              help="Which split part of the corpus to score.")
def perplexity_command(run, data, part) -> None:
    """Per-code and per-visit perplexity of a corpus under a trained RUN (likelihood models only)."""
    from ehrsynth.data.corpus import PatientCorpus
    from ehrsynth.pipeline import perplexity

    corpus = PatientCorpus.load(data)
    if part != "all":
        corpus = corpus.part(part)
    click.echo(json.dumps(perplexity(run, corpus), indent=2))


@cli.command("evaluate")
@click.option("--train", "train_dir", type=click.Path(path_type=Path), required=True,
              help="Real training corpus (the members); a prepared corpus uses its train part.")
@click.option("--test", "test_dir", type=click.Path(path_type=Path), required=True,
              help="Real held-out corpus (non-members); a prepared corpus uses its test part.")
@click.option("--synthetic", type=click.Path(path_type=Path), required=True,
              help="Synthetic data: a corpus directory, or any reader format with --synthetic-source.")
@click.option("--synthetic-source", type=click.Choice(("corpus",) + SOURCE_CHOICES), default="corpus",
              help="Format of --synthetic (e.g. long, meds, omop for data made by other tools).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Run directory of the model, for perplexity and the likelihood membership attack.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report directory.")
@click.option("--seed", type=int, default=0, help="Seed of every sampled metric.")
@click.option("--privacy-n", type=click.IntRange(min=10), default=2000, help="Patients per set for privacy metrics.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="Bootstrap replicates of the headline intervals (0: no intervals).")
@click.option("--descriptions", "descriptions_path", type=click.Path(path_type=Path), default=None,
              help="descriptions.json (or a directory holding one) naming codes in the per-code tables; "
                   "default: the one `prepare` saved beside --train.")
@_overwrite_option("report")
def evaluate_command(train_dir, test_dir, synthetic, synthetic_source, model_dir, out, seed, privacy_n, bootstrap,
                     descriptions_path, overwrite) -> None:
    """Measure structure, fidelity, utility and privacy against a noise ceiling; write metrics.json and a
    self-contained report.html."""
    from ehrsynth.evaluation.descriptions import load_descriptions
    from ehrsynth.pipeline import evaluate_to

    descriptions = None
    if descriptions_path is not None:
        if not descriptions_path.exists():
            raise click.BadParameter(f"{str(descriptions_path)!r} does not exist", param_hint="--descriptions")
        descriptions = load_descriptions(descriptions_path if descriptions_path.is_dir() else descriptions_path.parent)
    report, rows = evaluate_to(train_dir, test_dir, synthetic, out, synthetic_source=synthetic_source,
                               model_dir=model_dir, seed=seed, privacy_n=privacy_n, bootstrap=bootstrap,
                               descriptions=descriptions, overwrite=overwrite)
    click.echo(format_headline(rows))
    click.echo(f"report: {report}")


def format_headline(rows) -> str:
    return "\n".join(f"{area:<10}{label:<40}{'n/a' if value is None else f'{value:.3f}':>8}   {reading}"
                      for area, label, value, reading in rows)


@cli.command()
@click.option("--model", "family", type=click.Choice(["halo", "ehrdiff", "timeline"]), default="halo",
              help="Model to run.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("ehrsynth-demo"), help="Output directory.")
@click.option("--seed", type=int, default=0, help="Seed of the split, training, sampling and metrics.")
@_overwrite_option("demo folder")
def demo(family: str, out: Path, seed: int, overwrite: bool) -> None:
    """Run the whole path on the bundled demo data (OMOP GiBleed, 2,694 synthetic persons):
    prepare -> split -> train -> generate -> evaluate -> report."""
    from ehrsynth.pipeline import run_demo

    report, rows = run_demo(family, out, seed=seed, progress=True, say=lambda line: click.echo(line, err=True),
                            overwrite=overwrite)
    click.echo(format_headline(rows))
    click.echo(f"report: {report}")


class _spinner:
    """A progress indicator on stderr for steps that take more than a moment (tqdm, no ETA)."""

    def __init__(self, description: str) -> None:
        self.description = description

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=1, desc=self.description, file=sys.stderr, leave=False,
                        bar_format="{desc} ... {elapsed}", disable=None)
        return self.bar

    def __exit__(self, *exc) -> None:
        self.bar.update(1)
        self.bar.close()


def main() -> None:
    """Entry point (usage errors exit 2 through click, project errors through :class:`_Group`)."""
    cli.main(prog_name="ehrsynth")


if __name__ == "__main__":
    main()

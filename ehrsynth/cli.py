"""The ``ehrsynth`` command line: a thin layer that parses, validates and calls one library function.

Every :class:`~ehrsynth.errors.EhrsynthError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ehrsynth")
def cli() -> None:
    """ehrsynth: learn from longitudinal EHRs, generate synthetic patients, and measure fidelity, utility
    and privacy."""


@cli.command()
@click.option("--source", type=click.Choice(SOURCE_CHOICES), required=True, help="Input format.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help="Input file (long, meds) or directory (mimic3, mimic4, omop, synthea).")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Corpus directory to write.")
@click.option("--tables", multiple=True,
              help="Code tables to read (repeatable). mimic3/mimic4: diagnoses, procedures, prescriptions; "
                   "omop: condition, drug, procedure; synthea: conditions, medications, procedures.")
@click.option("--min-count", type=click.IntRange(min=1), default=1, help="Drop codes seen in fewer visits.")
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
@click.option("--visit-window-hours", type=float, default=None,
              help="meds: merge events within this many hours into one visit (default: same timestamp).")
def prepare(source, input_path, output, tables, min_count, systems, icd9_rollup, max_visits, keep_visits,
            max_codes_per_visit, empty, split_fractions, seed, patient_col, visit_col, code_col, time_col,
            code_system, visit_window_hours) -> None:
    """Read a source into a corpus directory (with a seeded train/val/test split)."""
    from ehrsynth.data.build import BuildOptions
    from ehrsynth.data.readers import read_source

    options = BuildOptions(
        min_count=min_count,
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
        corpus = read_source(source, input_path, options=options, **kwargs)
        corpus.save(output)
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
    return "\n".join(lines)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("ehrsynth-demo"), help="Output directory.")
def demo(out: Path) -> None:
    """Run ehrsynth on its bundled demo data (OMOP GiBleed, 2,694 synthetic persons).

    For now this prepares and describes the bundled corpus; training, generation and the report are added as
    the models land.
    """
    from ehrsynth.data.readers.omop import read_omop
    from ehrsynth.demo_data import demo_directory

    with _spinner("reading the bundled OMOP GiBleed demo data"):
        corpus = read_omop(demo_directory())
        corpus.save(out / "corpus")
    click.echo(f"corpus written to {out / 'corpus'}")
    click.echo(format_description(corpus.describe()))


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
    """Entry point: run the CLI, turning project errors into one line and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except EhrsynthError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

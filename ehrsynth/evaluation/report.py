"""Run the whole evaluation and write ``metrics.json`` plus a self-contained ``report.html``.

The report only formats results computed by the metric modules; it shows aggregates only, never a patient row.
Plots are PNGs embedded as base64, so the page opens offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.evaluation import fidelity, privacy, utility
from ehrsynth.models.io import atomic_write_text

HEADLINES = (
    # (section, label, path into metrics, reading)
    ("structure", "Empty visits (share)", ("structure", "empty_visit_share"), "the real share is ideal"),
    ("structure", "Empty visits, real (share)", ("structure", "empty_visit_share_real"), "reference: real data"),
    ("structure", "Undated visits (share)", ("structure", "undated_visit_share"), "the real share is ideal"),
    ("structure", "Undated visits, real (share)", ("structure", "undated_visit_share_real"), "reference: real data"),
    ("structure", "Unknown sex (share of records)", ("structure", "unknown_sex_share"), "the real share is ideal"),
    ("structure", "Unknown sex, real (share)", ("structure", "unknown_sex_share_real"), "reference: real data"),
    ("structure", "Codes per visit TV distance", ("structure", "codes_per_visit_tv"), "0 is ideal"),
    ("structure", "Visits per patient TV distance", ("structure", "visits_per_patient_tv"), "0 is ideal"),
    ("structure", "log2 gap days TV distance", ("structure", "log2_gap_days_tv"), "0 is ideal"),
    ("fidelity", "Code probability R² (per visit)", ("halo", "visit_code_r2"), "1 is ideal"),
    ("fidelity", "Code probability R² (per record)", ("halo", "record_code_r2"), "1 is ideal"),
    ("fidelity", "Within-visit co-occurrence R²", ("halo", "visit_pair_r2"), "1 is ideal"),
    ("fidelity", "Within-visit co-occurrence Pearson r", ("halo", "visit_pair_pearson"), "1 is ideal"),
    ("fidelity", "Consecutive-visit conditional R²", ("halo", "consecutive_r2"), "1 is ideal"),
    ("fidelity", "Prevalence Pearson r", ("prevalence", "pearson"), "1 is ideal"),
    ("fidelity", "Detection AUROC (real vs synthetic)", ("detection", "auroc"), "0.5 is ideal"),
    ("utility", "TSTR AUROC (logistic)", ("utility", "mean_auroc", "tstr.logistic"), "close to TRTR is ideal"),
    ("utility", "TRTR AUROC (logistic)", ("utility", "mean_auroc", "trtr.logistic"), "reference: real data"),
    ("privacy", "Membership inference accuracy", ("membership", "accuracy"), "0.5 means no leakage"),
    ("privacy", "Membership AUROC (closer = member)", ("membership", "auroc"), "0.5 means no leakage"),
    ("privacy", "NNAA risk (AA_test − AA_train)", ("nnaa", "nnaar"), "about 0 is good"),
    ("privacy", "DCR share closer to train", ("dcr", "share_closer_to_train"), "0.5 is ideal"),
    ("privacy", "Exact-copy rate (synthetic)", ("exact_copies", "copy_rate"), "compare with the holdout rate"),
    ("privacy", "Exact-copy rate (holdout baseline)", ("exact_copies", "holdout_copy_rate"), "reference"),
)


def evaluate(
    train: PatientCorpus,
    test: PatientCorpus,
    synthetic: PatientCorpus,
    *,
    patient_log_likelihood: Callable[[PatientCorpus], np.ndarray] | None = None,
    seed: int = 0,
    privacy_n: int | None = 2000,
) -> dict[str, Any]:
    """Every metric of docs/metrics.md for ``synthetic`` against real ``train`` (members) and ``test`` (holdout).

    Args:
        train, test: real training and held-out corpora.
        synthetic: the corpus to judge (any vocabulary: metrics align codes by their typed strings).
        patient_log_likelihood: the model's per-patient log-likelihood, enabling the likelihood attack.
        seed: seed of every sampled metric.
        privacy_n: cap on patients per set for the distance-based privacy metrics (None: all).

    Returns:
        ``{name: result.as_dict()}`` plus a ``"_meta"`` entry with sizes, seed and timings.
    """
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - start, 3)
        return out

    results = {
        "halo": timed("halo", lambda: fidelity.halo_fidelity(train, synthetic)),
        "prevalence": timed("prevalence", lambda: fidelity.prevalence_fidelity(train, synthetic)),
        "cmd": timed("cmd", lambda: fidelity.correlation_matrix_distance(train, synthetic)),
        "mmd": timed("mmd", lambda: fidelity.maximum_mean_discrepancy(train, synthetic, seed=seed)),
        "structure": timed("structure", lambda: fidelity.structure_fidelity(train, synthetic)),
        "detection": timed("detection", lambda: fidelity.detection_auroc(train, synthetic, seed=seed)),
        "utility": timed("utility", lambda: utility.downstream_utility(train, test, synthetic, seed=seed)),
        "membership": timed("membership", lambda: privacy.distance_membership_inference(
            train, test, synthetic, n=privacy_n, seed=seed)),
        "attribute": timed("attribute", lambda: privacy.attribute_inference(
            train, test, synthetic, n=privacy_n, seed=seed)),
        "nnaa": timed("nnaa", lambda: privacy.nearest_neighbour_adversarial_accuracy(
            train, test, synthetic, n=privacy_n, seed=seed)),
        "dcr": timed("dcr", lambda: privacy.distance_to_closest_record(train, test, synthetic, n=privacy_n,
                                                                      seed=seed)),
        "exact_copies": timed("exact_copies", lambda: privacy.exact_copies(train, test, synthetic)),
    }
    if patient_log_likelihood is not None:
        results["likelihood_membership"] = timed("likelihood_membership", lambda: (
            privacy.likelihood_membership_inference(patient_log_likelihood(train), patient_log_likelihood(test),
                                                    seed=seed)))
    out = {name: result.as_dict() for name, result in results.items()}
    out["_meta"] = {"train_patients": train.n_patients, "test_patients": test.n_patients,
                    "synthetic_patients": synthetic.n_patients, "seed": seed, "privacy_n": privacy_n,
                    "seconds": timings}
    return out


def headline(metrics: dict[str, Any]) -> list[tuple[str, str, float | None, str]]:
    """(section, label, value, reading) rows of the headline table."""
    rows = []
    for section, label, path, reading in HEADLINES:
        value: Any = metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        rows.append((section, label, value if isinstance(value, (int, float)) else None, reading))
    return rows


def write_report(
    metrics: dict[str, Any],
    train: PatientCorpus,
    synthetic: PatientCorpus,
    out_dir: str | Path,
    *,
    title: str = "ehrsynth evaluation",
) -> Path:
    """Write ``metrics.json`` and ``report.html`` into ``out_dir`` (each atomically); returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    figures = _figures(metrics, train, synthetic)
    page = _html(title, metrics, figures)
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"


# ---- plots ---------------------------------------------------------------------------------------------------
def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures(metrics: dict[str, Any], train: PatientCorpus, synthetic: PatientCorpus) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    stats = fidelity.halo_statistics(train, synthetic)
    titles = {"visit_code": "Code probability per visit", "record_code": "Code probability per record",
              "visit_pair": "Within-visit co-occurrence", "record_pair": "Within-record co-occurrence",
              "consecutive": "Consecutive-visit conditional"}
    fig, axes = plt.subplots(1, len(stats), figsize=(4 * len(stats), 4))
    for ax, (name, (real, synth)) in zip(np.atleast_1d(axes), stats.items()):
        keep = (real > 0) & (synth > 0)
        ax.loglog(real[keep], synth[keep], ".", alpha=0.4, markersize=3)
        low = min(real[keep].min(), synth[keep].min()) if keep.any() else 1e-4
        ax.plot([low, 1], [low, 1], "k--", linewidth=0.8)
        r2 = metrics["halo"].get(f"{name}_r2")
        ax.set_title(f"{titles.get(name, name)}\nR² = {r2:.3f}" if r2 is not None else titles.get(name, name),
                     fontsize=9)
        ax.set_xlabel("real")
        ax.set_ylabel("synthetic")
    figures["scatter"] = _png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (name, real, synth) in zip(axes, (
        ("visits per patient", train.visits_per_patient(), synthetic.visits_per_patient()),
        ("codes per visit", train.codes_per_visit(), synthetic.codes_per_visit()),
    )):
        top = int(max(np.percentile(real, 99), np.percentile(synth, 99), 1)) + 1
        bins = np.arange(0, top + 1) - 0.5
        ax.hist(np.minimum(real, top), bins=bins, density=True, alpha=0.5, label="real")
        ax.hist(np.minimum(synth, top), bins=bins, density=True, alpha=0.5, label="synthetic")
        ax.set_title(name, fontsize=9)
        ax.legend()
    figures["histograms"] = _png(fig)

    scores = [s for s in metrics["utility"]["scores"] if s["auroc"] is not None]
    targets = sorted({s["target"] for s in scores})
    if targets:
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(targets) + 3), 3.5))
        width = 0.2
        for i, (model, source) in enumerate([(m, t) for m in ("logistic", "gbm") for t in ("synthetic", "real")]):
            values = [next((s["auroc"] for s in scores if s["target"] == t and s["model"] == model
                            and s["trained_on"] == source), np.nan) for t in targets]
            label = f"{'TSTR' if source == 'synthetic' else 'TRTR'} {model}"
            ax.bar(np.arange(len(targets)) + (i - 1.5) * width, values, width, label=label)
        ax.set_xticks(np.arange(len(targets)))
        ax.set_xticklabels(targets, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("AUROC on real test")
        ax.legend(fontsize=7)
        figures["utility"] = _png(fig)
    return figures


# ---- HTML ----------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(title: str, metrics: dict[str, Any], figures: dict[str, str]) -> str:
    meta = metrics["_meta"]
    headline_rows = [[s, label, value, reading] for s, label, value, reading in headline(metrics)]
    privacy_rows = []
    for key in ("membership", "likelihood_membership", "attribute", "nnaa", "dcr", "exact_copies"):
        if key in metrics:
            for name, value in metrics[key].items():
                if name != "metric" and isinstance(value, (int, float)) or value is None:
                    privacy_rows.append([metrics[key]["metric"], name, value])
    fidelity_rows = []
    for key in ("prevalence", "cmd", "mmd", "structure", "detection"):
        for name, value in metrics[key].items():
            if name != "metric" and (isinstance(value, (int, float)) or value is None):
                fidelity_rows.append([metrics[key]["metric"], name, value])
    images = {k: f'<img alt="{k}" src="data:image/png;base64,{v}">' for k, v in figures.items()}
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Real training patients: {meta['train_patients']:,}; real holdout patients: {meta['test_patients']:,}; "
        f"synthetic patients: {meta['synthetic_patients']:,}; seed {meta['seed']}. "
        "Aggregates only: no patient row appears in this report.</p>",
        '<h2 id="headline">Headline</h2>',
        _table(headline_rows, ["area", "metric", "value", "reading"]),
        '<h2 id="fidelity">Fidelity: real vs synthetic statistics (log-log)</h2>',
        images.get("scatter", ""),
        _table(fidelity_rows, ["metric", "field", "value"]),
        '<h2 id="structure">Visits per patient and codes per visit</h2>',
        images.get("histograms", ""),
        '<h2 id="utility">Utility: TSTR vs TRTR</h2>',
        images.get("utility", "<p>No scorable prediction target.</p>"),
        _table([[s["target"], s["model"], "TSTR" if s["trained_on"] == "synthetic" else "TRTR", s["auroc"],
                 s["auprc"], s["skipped"]] for s in metrics["utility"]["scores"]],
               ["target", "classifier", "setting", "AUROC", "AUPRC", "skipped"]),
        '<h2 id="privacy">Privacy</h2>',
        _table(privacy_rows, ["metric", "field", "value"]),
        "<p>Definitions of every metric key: docs/metrics.md.</p>",
    ]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px;text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")

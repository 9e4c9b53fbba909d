"""The report's plots: PNGs (base64) with a title, axis labels, a caption and alt text each.

Only aggregates are drawn. Scatter plots keep the keys present on one side only: they are drawn at a floor
value (half the smallest non-zero value) and counted in the caption, because they are exactly the keys that
pull R^2 down.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.evaluation import fidelity
from ehrsynth.evaluation.structure import log2_gap_bins, visit_gaps

TITLES = {"visit_code": "Code probability per visit", "record_code": "Code probability per record",
          "visit_pair": "Within-visit co-occurrence", "record_pair": "Within-record co-occurrence",
          "consecutive": "Consecutive-visit conditional"}


@dataclass(frozen=True)
class Figure:
    """One embedded plot."""

    key: str
    title: str
    png: str        # base64
    alt: str
    caption: str


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_figure(metrics: dict[str, Any], train: PatientCorpus, synthetic: PatientCorpus,
                   counts: dict[str, dict[str, int]]) -> Figure:
    """Log-log real vs synthetic value of every key of HALO's five statistics; fills ``counts`` per statistic."""
    plt = _pyplot()
    stats = fidelity.halo_statistics(train, synthetic)
    fig, axes = plt.subplots(1, len(stats), figsize=(3.3 * len(stats), 3.4))
    for ax, (name, (real, synth)) in zip(np.atleast_1d(axes), stats.items()):
        positive = np.concatenate([real[real > 0], synth[synth > 0]])
        floor = positive.min() / 2 if len(positive) else 1e-4
        one_sided = (real == 0) | (synth == 0)
        both = ~one_sided
        counts[name] = {"keys": int(len(real)), "real_only": int(((real > 0) & (synth == 0)).sum()),
                        "synthetic_only": int(((synth > 0) & (real == 0)).sum()), "floor": float(floor)}
        ax.loglog(real[both], synth[both], ".", alpha=0.35, markersize=3, color="#1f77b4", label="both sides")
        ax.loglog(np.maximum(real[one_sided], floor), np.maximum(synth[one_sided], floor), "x", alpha=0.6,
                  markersize=3, color="#d62728", label="one side only (at floor)")
        ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8)
        r2 = metrics["halo"].get(f"{name}_r2")
        r = metrics["halo"].get(f"{name}_pearson")
        subtitle = f"R² {r2:.3f}, r {r:.3f}" if r2 is not None and r is not None else "R² n/a"
        ax.set_title(f"{TITLES[name]}\n{subtitle}", fontsize=9)
        ax.set_xlabel("real training value", fontsize=8)
        ax.set_ylabel("synthetic value", fontsize=8)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    missing = "; ".join(f"{TITLES[n].lower()}: {c['real_only']:,} real-only and {c['synthetic_only']:,} "
                        f"synthetic-only of {c['keys']:,} keys" for n, c in counts.items())
    caption = ("Each point is one code, pair or ordered pair; the dashed line is perfect agreement. Red crosses "
               "are keys present on one side only, drawn at a floor (half the smallest non-zero value): "
               f"{missing}.")
    return Figure("scatter", "Real vs synthetic statistics", _png(fig),
                  "Five log-log scatter plots of real against synthetic code, pair and transition statistics.",
                  caption)


def structure_figure(train: PatientCorpus, synthetic: PatientCorpus, reference: PatientCorpus | None) -> Figure:
    """Histograms of codes per visit, visits per patient and log2 gap days: real, synthetic and holdout."""
    plt = _pyplot()
    corpora = [("real train", train), ("synthetic", synthetic)] + ([("real holdout", reference)] if reference
                                                                   is not None else [])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    quantities = (
        ("Codes per visit", "codes in the visit", "share of visits", lambda c: c.codes_per_visit()),
        ("Visits per patient", "visits in the record", "share of records", lambda c: c.visits_per_patient()),
        ("Days between visits (log2 bins)", "log2(gap days); -1 = under a day", "share of gaps",
         lambda c: log2_gap_bins(visit_gaps(c))),
    )
    for ax, (title, xlabel, ylabel, values) in zip(axes, quantities):
        samples = [(label, np.asarray(values(c), dtype=np.int64)) for label, c in corpora]
        live = [s for _, s in samples if len(s)]
        if not live:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        else:
            low = min(int(s.min()) for s in live)
            high = min(max(int(np.percentile(s, 99)) for s in live) + 1, low + 60)
            grid = np.arange(low, high + 1)
            width = 0.8 / len(samples)
            for i, (label, s) in enumerate(samples):
                share = (np.bincount(np.clip(s, low, high) - low, minlength=len(grid)) / max(1, len(s)))
                ax.bar(grid + (i - (len(samples) - 1) / 2) * width, share, width, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    caption = ("Bars give the share of visits, records or gaps in each bin; the last bin holds everything above "
               "the 99th percentile. Synthetic bars should match the real training bars about as well as the "
               "real holdout bars do.")
    return Figure("structure", "Record structure", _png(fig),
                  "Three bar charts comparing codes per visit, visits per patient and gaps between visits.", caption)


def utility_figure(metrics: dict[str, Any]) -> Figure | None:
    """TSTR and TRTR AUROC per target and classifier, or None when no target was scored."""
    scores = [s for s in metrics["utility"]["scores"] if s["auroc"] is not None]
    targets = sorted({s["target"] for s in scores})
    if not targets:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(targets) + 3), 3.5))
    width = 0.2
    for i, (model, source) in enumerate([(m, t) for m in ("logistic", "gbm") for t in ("synthetic", "real")]):
        values = [next((s["auroc"] for s in scores if s["target"] == t and s["model"] == model
                        and s["trained_on"] == source), np.nan) for t in targets]
        ax.bar(np.arange(len(targets)) + (i - 1.5) * width, values, width,
               label=f"{'TSTR' if source == 'synthetic' else 'TRTR'} {model}")
    ax.axhline(0.5, color="k", linestyle=":", linewidth=0.8)
    ax.set_xticks(np.arange(len(targets)))
    ax.set_xticklabels(targets, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_xlabel("prediction target", fontsize=8)
    ax.set_ylabel("AUROC on real test patients", fontsize=8)
    ax.set_title("Train on synthetic (TSTR) vs train on real (TRTR)", fontsize=10)
    ax.legend(fontsize=7)
    caption = ("Each group is one prediction target. TSTR bars should reach the TRTR bars of the same classifier; "
               "the dotted line is chance (0.5).")
    return Figure("utility", "Utility", _png(fig), "Bar chart of TSTR and TRTR AUROC per prediction target.",
                  caption)

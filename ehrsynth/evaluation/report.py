"""Write ``metrics.json`` plus a self-contained ``report.html`` (Jinja2 template, PNGs embedded as base64).

The report only formats results computed by the metric modules (:func:`evaluate` lives in
:mod:`ehrsynth.evaluation.suite`); it shows aggregates only, never a patient row, and it opens offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.evaluation.features import jsonable
from ehrsynth.evaluation.figures import scatter_figure, structure_figure, utility_figure
from ehrsynth.evaluation.suite import evaluate
from ehrsynth.evaluation.verdict import checks
from ehrsynth.outputs import staged_output

HEADLINES = (
    # (area, label, path into metrics, reading); the ceiling is the same path under "ceiling" (utility: TRTR)
    ("structure", "Empty visits (share)", ("structure", "empty_visit_share"), "real share is ideal"),
    ("structure", "Undated visits (share)", ("structure", "undated_visit_share"), "real share is ideal"),
    ("structure", "Unknown sex (share of records)", ("structure", "unknown_sex_share"), "real share is ideal"),
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
    ("utility", "TSTR AUROC (gbm)", ("utility", "mean_auroc", "tstr.gbm"), "close to TRTR is ideal"),
    ("privacy", "Membership AUROC (closer = member)", ("membership", "auroc"), "0.5 means no leakage"),
    ("privacy", "Membership inference accuracy", ("membership", "accuracy"), "0.5 means no leakage"),
    ("privacy", "NNAA risk (AA_test − AA_train)", ("nnaa", "nnaar"), "about 0 is good"),
    ("privacy", "DCR share closer to train", ("dcr", "share_closer_to_train"), "0.5 is ideal"),
    ("privacy", "Exact-copy rate", ("exact_copies", "copy_rate"), "compare with the ceiling"),
    ("privacy", "Rare-code exposure (share of synthetic records)", ("rare_code_exposure", "share_records"),
     "0 is ideal"),
    ("privacy", "DOMIAS membership AUROC (density ratio)", ("membership_domias", "auroc"), "0.5 means no leakage"),
    ("privacy", "Likelihood membership AUROC (per code)", ("likelihood_membership_per_code", "auroc"),
     "0.5 means no leakage"),
    ("privacy", "Most exposed: share of training records above holdout p99", ("most_exposed", "max_exposed_share"),
     "about 0.01 means no leakage"),
    ("privacy", "Differential privacy: epsilon spent", ("differential_privacy", "epsilon_spent"),
     "lower is more private; n/a: not DP-trained"),
)
STRUCTURE_ROWS = (
    ("Empty visits (share)", "empty_visit_share", "empty_visit_share_real"),
    ("Undated visits (share)", "undated_visit_share", "undated_visit_share_real"),
    ("Records of unknown sex (share)", "unknown_sex_share", "unknown_sex_share_real"),
    ("Codes per visit: TV distance", "codes_per_visit_tv", None),
    ("Visits per patient: TV distance", "visits_per_patient_tv", None),
    ("log2 gap days: TV distance", "log2_gap_days_tv", None),
)
PRIVACY_MEANING = {
    "membership": "Does being close to a synthetic record give a training patient away? AUROC 0.5: no better "
                  "than chance.",
    "likelihood_membership": "Does the model give training patients a higher likelihood than fresh ones? "
                             "AUROC 0.5: no.",
    "attribute": "Knowing a training patient's common codes, how well does the nearest synthetic record guess "
                 "the rest, compared with the nearest real holdout record (baseline)?",
    "nnaa": "How separable are real and synthetic records by nearest neighbours; the risk (test minus train) "
            "near 0 means no overfitting to training records.",
    "dcr": "Share of synthetic records closer to a training record than to a holdout record; 0.5 means no "
           "closer to training patients than to fresh ones.",
    "exact_copies": "Share of synthetic records whose code set equals a training record's, against the same "
                    "share for fresh holdout records.",
    "rare_code_exposure": "Synthetic records carrying a code that fewer than K real training patients have "
                          "(rare codes identify people); 0 is ideal.",
    "membership_domias": "DOMIAS: is the synthetic data denser than the holdout around training patients? "
                         "AUROC 0.5: no.",
    "likelihood_membership_per_code": "The likelihood attack with each record's log-likelihood divided by its "
                                      "codes, so record length does not drive it. AUROC 0.5: no leakage.",
    "likelihood_membership_per_visit": "The likelihood attack per visit. AUROC 0.5: no leakage.",
    "likelihood_membership_calibrated": "The model's likelihood against a reference model fit on holdout "
                                        "patients (likelihood ratio). AUROC 0.5: no leakage.",
    "most_exposed": "Share of training records whose attack score exceeds the holdout's 99th percentile (about "
                    "0.01 when nothing leaks); aggregates only.",
    "differential_privacy": "The epsilon (and delta) the DP-SGD accountant spent in training; absent when the "
                            "model was not trained with DP.",
}
CLINICAL_LABELS = {"sex_specific": "Code of the other sex", "perinatal_after_infancy": "Perinatal code after infancy",
                   "events_after_death": "Visit after a recorded death", "visits_before_birth": "Visit before birth"}
TOC = (("verdict", "Verdict"), ("headline", "Headline"), ("structure", "Structure"), ("fidelity", "Fidelity"),
       ("per-code", "Per code"), ("clinical", "Clinical validity"), ("utility", "Utility"), ("privacy", "Privacy"),
       ("raw", "Raw numbers"))

__all__ = ["HEADLINES", "evaluate", "headline", "write_report"]


def _get(metrics: Any, path: tuple[str, ...]) -> float | None:
    for key in path:
        metrics = metrics.get(key) if isinstance(metrics, dict) else None
    if isinstance(metrics, bool) or not isinstance(metrics, (int, float)) or not math.isfinite(metrics):
        return None
    return metrics


def _ceiling_path(path: tuple[str, ...]) -> tuple[str, ...]:
    if path[0] == "utility":
        return ("utility", "mean_auroc", path[-1].replace("tstr.", "trtr."))
    return ("ceiling",) + path


def headline(metrics: dict[str, Any]) -> list[tuple[str, str, float | None, str]]:
    """(area, label, value, reading) rows of the headline table."""
    return [(area, label, _get(metrics, path), reading) for area, label, path, reading in HEADLINES]


def _gap(value: float | None, ceiling: float | None) -> float | None:
    return None if value is None or ceiling is None else value - ceiling


def _interval(metrics: dict[str, Any], path: tuple[str, ...]) -> str:
    found = metrics.get("intervals", {}).get(".".join(path))
    if not found or found.get("low") is None or found.get("high") is None:
        return "—"
    return f"{_num(found['low'])} – {_num(found['high'])}"


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int):
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, value)] if isinstance(value, (int, float)) or value is None else []


def _context(metrics: dict[str, Any], figures: dict[str, Any], title: str) -> dict[str, Any]:
    ceiling = metrics.get("ceiling", {})
    rows = []
    for area, label, path, reading in HEADLINES:
        value, ref = _get(metrics, path), _get(metrics, _ceiling_path(path))
        rows.append({"area": area, "label": label, "value": value, "ceiling": ref, "gap": _gap(value, ref),
                     "interval": _interval(metrics, path), "reading": reading})
    structure = []
    for label, field, real_field in STRUCTURE_ROWS:
        value, ref = _get(metrics, ("structure", field)), _get(ceiling, ("structure", field))
        real = _get(metrics, ("structure", real_field)) if real_field else None
        structure.append({"label": label, "value": value, "real": real, "ceiling": ref, "gap": _gap(value, ref),
                          "interval": _interval(metrics, ("structure", field))})
    fidelity_rows = []
    for key in ("halo", "prevalence", "cmd", "mmd", "detection", "structure"):
        for field, value in _flatten({k: v for k, v in metrics.get(key, {}).items() if k != "metric"}):
            ref = _get(ceiling, (key,) + tuple(field.split(".")))
            fidelity_rows.append({"metric": metrics[key]["metric"], "field": field, "value": value, "ceiling": ref,
                                  "gap": _gap(value if isinstance(value, (int, float)) else None, ref)})
    utility_rows = []
    scores = metrics.get("utility", {}).get("scores", [])
    for s in scores:
        if s["trained_on"] != "synthetic":
            continue
        real = next((r for r in scores if r["trained_on"] == "real" and r["target"] == s["target"]
                     and r["model"] == s["model"]), {})
        utility_rows.append({"target": s["target"], "model": s["model"], "tstr": s["auroc"], "trtr": real.get("auroc"),
                             "gap": _gap(s["auroc"], real.get("auroc")), "tstr_auprc": s["auprc"],
                             "trtr_auprc": real.get("auprc"),
                             "note": "; ".join(x for x in (s.get("skipped"), real.get("skipped")) if x)})
    return {
        "title": title, "meta": metrics["_meta"], "toc": TOC, "verdict": metrics.get("verdict", {}),
        "checks": checks(metrics), "headline": rows, "structure": structure, "fidelity": fidelity_rows,
        "per_code": metrics.get("per_code", {}), "clinical": _clinical_rows(metrics.get("clinical", {})),
        "utility": utility_rows, "privacy": _privacy_rows(metrics), "figures": figures,
        "raw": _flatten({k: v for k, v in metrics.items() if k != "_meta"}),
    }


def _clinical_rows(clinical: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, label in CLINICAL_LABELS.items():
        synthetic = clinical.get("synthetic", {}).get(name, {})
        reference = clinical.get("reference", {}).get(name, {}).get("per_1000")
        rows.append({"label": label, "real": clinical.get("real", {}).get(name, {}).get("per_1000"),
                     "reference": reference, "synthetic": synthetic.get("per_1000"),
                     "gap": _gap(synthetic.get("per_1000"), reference), "records": synthetic.get("records"),
                     "checked": synthetic.get("checked"),
                     "top": ", ".join(f"{c} ({n})" for c, n in synthetic.get("top_codes", [])) or "—"})
    return rows


def _privacy_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One block per privacy result, whatever its fields; a result carrying ``not_applicable`` shows its reason."""
    ceiling = metrics.get("ceiling", {})
    out = []
    for name, result in metrics.items():
        if not isinstance(result, dict) or not str(result.get("metric", "")).startswith("privacy."):
            continue
        block = {"name": name, "metric": result["metric"], "meaning": PRIVACY_MEANING.get(name, result["metric"]),
                 "not_applicable": bool(result.get("not_applicable")),
                 "reason": result.get("reason") or (result["not_applicable"] if isinstance(
                     result.get("not_applicable"), str) else ""), "rows": []}
        if not block["not_applicable"]:
            for field, value in _flatten({k: v for k, v in result.items() if k != "metric"}):
                ref = _get(ceiling, (name,) + tuple(field.split(".")))
                block["rows"].append({"field": field, "value": value, "ceiling": ref,
                                      "gap": _gap(value if isinstance(value, (int, float)) else None, ref)})
        out.append(block)
    return out


def _figures(metrics: dict[str, Any], train: PatientCorpus, synthetic: PatientCorpus,
             reference: PatientCorpus | None = None) -> dict[str, Any]:
    """The page's plots by key; records the scatter plots' key counts in ``metrics["figures"]``."""
    counts: dict[str, dict[str, int]] = {}
    figures = {"scatter": scatter_figure(metrics, train, synthetic, counts),
               "structure": structure_figure(train, synthetic, reference),
               "utility": utility_figure(metrics)}
    metrics["figures"] = {"scatter_keys": counts}
    return {key: figure for key, figure in figures.items() if figure is not None}


def write_report(
    metrics: dict[str, Any],
    train: PatientCorpus,
    synthetic: PatientCorpus,
    out_dir: str | Path,
    *,
    title: str = "ehrsynth evaluation",
    reference: PatientCorpus | None = None,
) -> Path:
    """Write ``metrics.json`` and ``report.html`` as the directory ``out_dir``, in one rename; returns the HTML
    path. An existing ``out_dir`` is replaced only when it is an ehrsynth report (see :mod:`ehrsynth.outputs`).

    ``reference`` (real holdout patients) adds the holdout bars to the structure plot. The scatter plots' key
    counts are added to ``metrics["figures"]`` so that metrics.json holds every number on the page.
    """
    import jinja2

    out_dir = Path(out_dir)
    figures = _figures(metrics, train, synthetic, reference)
    metrics = jsonable(metrics)
    environment = jinja2.Environment(loader=jinja2.PackageLoader("ehrsynth.evaluation", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters["num"] = _num
    environment.filters["int_fmt"] = lambda v: f"{v:,}" if isinstance(v, int) else _num(v)
    environment.filters["css"] = lambda status: status if status in ("pass", "warn", "fail") else "na"
    page = environment.get_template("report.html.j2").render(**_context(metrics, figures, title))
    with staged_output(out_dir, "report") as staging:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staging / "report.html").write_text(page)
    return out_dir / "report.html"

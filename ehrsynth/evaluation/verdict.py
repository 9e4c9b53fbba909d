"""The verdict: pass, warn or fail per area (structure, fidelity, utility, privacy), from documented thresholds.

Every threshold is relative to the noise ceiling (real held-out patients scored the same way), to the real
value or to chance, so it means the same on small and large data. They all live in THRESHOLDS below and are
documented in docs/metrics.md ("Verdict"). A check whose numbers are missing (a metric that could not run) is
"not applicable" and does not count. An area's status is its worst check.
"""

from __future__ import annotations

import math
from typing import Any

# check -> (pass limit, warn limit) on the deviation in the bad direction; above the warn limit it fails
THRESHOLDS: dict[str, tuple[float, float]] = {
    # structure: |synthetic share - real share| (shares in [0, 1])
    "share_vs_real": (0.01, 0.05),
    # structure: synthetic TV - ceiling TV
    "tv_over_ceiling": (0.03, 0.10),
    # fidelity: ceiling R^2 - synthetic R^2 (per-visit and per-record code probability)
    "code_r2_below_ceiling": (0.02, 0.10),
    # fidelity: ceiling r - synthetic r (within-visit pairs, prevalence)
    "pearson_below_ceiling": (0.05, 0.15),
    # fidelity: synthetic detection AUROC - ceiling detection AUROC (chance is 0.5)
    "detection_over_ceiling": (0.05, 0.15),
    # utility: 1 - (TSTR - 0.5) / (TRTR - 0.5): the share of TRTR's lift over chance that TSTR loses
    "tstr_lift_lost": (0.10, 0.30),
    # privacy: attack score - ceiling score (membership AUROC, DCR share closer to train)
    "attack_over_ceiling": (0.05, 0.10),
    # privacy: synthetic exact-copy rate - holdout copy rate
    "copies_over_holdout": (0.01, 0.05),
    # privacy: attribute-inference F1 - its holdout baseline F1
    "attribute_over_baseline": (0.05, 0.10),
}
# how each rule's deviation reads in a sentence
RULE_WORDS = {
    "share_vs_real": "the difference", "tv_over_ceiling": "the excess over the ceiling",
    "code_r2_below_ceiling": "the shortfall from the ceiling", "pearson_below_ceiling": "the shortfall from the ceiling",
    "detection_over_ceiling": "the excess over the ceiling", "tstr_lift_lost": "the share of TRTR's lift over chance lost",
    "attack_over_ceiling": "the excess over the ceiling", "copies_over_holdout": "the excess over the holdout rate",
    "attribute_over_baseline": "the excess over the baseline",
}
AREAS = ("structure", "fidelity", "utility", "privacy")
ORDER = {"pass": 0, "warn": 1, "fail": 2}


def _get(metrics: dict[str, Any], *path: str) -> float | None:
    value: Any = metrics
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _check(area: str, label: str, rule: str, value: float | None, reference: float | None,
           deviation: float | None, reference_name: str) -> dict[str, Any]:
    passes, warns = THRESHOLDS[rule]
    if value is None or reference is None or deviation is None:
        status = "not applicable"
    else:
        status = "pass" if deviation <= passes else "warn" if deviation <= warns else "fail"
    return {"area": area, "label": label, "rule": rule, "value": value, "reference": reference,
            "reference_name": reference_name, "deviation": deviation, "pass_limit": passes, "warn_limit": warns,
            "status": status}


def checks(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every verdict check of an ``evaluate`` output, in display order."""
    ceiling = metrics.get("ceiling", {})
    out = []
    for field, label in (("empty_visit_share", "Empty visits"), ("undated_visit_share", "Undated visits"),
                         ("unknown_sex_share", "Records of unknown sex")):
        value, real = _get(metrics, "structure", field), _get(metrics, "structure", f"{field}_real")
        out.append(_check("structure", label, "share_vs_real", value, real,
                          None if value is None or real is None else abs(value - real), "real"))
    for field, label in (("codes_per_visit_tv", "Codes per visit (TV)"),
                         ("visits_per_patient_tv", "Visits per patient (TV)"),
                         ("log2_gap_days_tv", "log2 gap days (TV)")):
        value, ref = _get(metrics, "structure", field), _get(ceiling, "structure", field)
        out.append(_check("structure", label, "tv_over_ceiling", value, ref,
                          None if value is None or ref is None else value - ref, "ceiling"))
    for path, label, rule in ((("halo", "visit_code_r2"), "Code probability R² per visit", "code_r2_below_ceiling"),
                              (("halo", "record_code_r2"), "Code probability R² per record", "code_r2_below_ceiling"),
                              (("halo", "visit_pair_pearson"), "Within-visit pair r", "pearson_below_ceiling"),
                              (("prevalence", "pearson"), "Prevalence r", "pearson_below_ceiling")):
        value, ref = _get(metrics, *path), _get(ceiling, *path)
        out.append(_check("fidelity", label, rule, value, ref, None if value is None or ref is None else ref - value,
                          "ceiling"))
    value, ref = _get(metrics, "detection", "auroc"), _get(ceiling, "detection", "auroc")
    out.append(_check("fidelity", "Detection AUROC", "detection_over_ceiling", value, ref,
                      None if value is None or ref is None else value - ref, "ceiling"))
    for model in ("logistic", "gbm"):
        tstr, trtr = _get(metrics, "utility", "mean_auroc", f"tstr.{model}"), _get(metrics, "utility", "mean_auroc",
                                                                                  f"trtr.{model}")
        lost = None if tstr is None or trtr is None or trtr <= 0.5 else 1.0 - (tstr - 0.5) / (trtr - 0.5)
        out.append(_check("utility", f"TSTR AUROC ({model})", "tstr_lift_lost", tstr, trtr, lost, "TRTR"))
    for path, label in ((("membership", "auroc"), "Membership AUROC"),
                        (("dcr", "share_closer_to_train"), "DCR share closer to train")):
        value, ref = _get(metrics, *path), _get(ceiling, *path)
        out.append(_check("privacy", label, "attack_over_ceiling", value, ref,
                          None if value is None or ref is None else value - ref, "ceiling"))
    value, ref = _get(metrics, "exact_copies", "copy_rate"), _get(metrics, "exact_copies", "holdout_copy_rate")
    out.append(_check("privacy", "Exact-copy rate", "copies_over_holdout", value, ref,
                      None if value is None or ref is None else value - ref, "holdout"))
    attribute = metrics.get("attribute", {})
    applicable = isinstance(attribute, dict) and not attribute.get("not_applicable")
    value, ref = (_get(attribute, "f1"), _get(attribute, "baseline_f1")) if applicable else (None, None)
    out.append(_check("privacy", "Attribute-inference F1", "attribute_over_baseline", value, ref,
                      None if value is None or ref is None else value - ref, "holdout baseline"))
    return out


def verdict(metrics: dict[str, Any]) -> dict[str, Any]:
    """``{area: {"status", "sentence", "checks"}}`` for the four areas (status "not applicable" when no check
    could run)."""
    all_checks = checks(metrics)
    out = {}
    for area in AREAS:
        mine = [c for c in all_checks if c["area"] == area]
        scored = [c for c in mine if c["status"] in ORDER]
        if not scored:
            out[area] = {"status": "not applicable", "sentence": f"No {area} check could run.", "checks": mine}
            continue
        worst = max(scored, key=lambda c: (ORDER[c["status"]], c["deviation"] - c["pass_limit"]))
        status = worst["status"]
        if status == "pass":
            sentence = (f"All {len(scored)} {area} checks are within their pass thresholds of the "
                        f"{'real data' if area == 'structure' else 'reference'}.")
        else:
            sentence = (f"{worst['label']} is {_show(worst['value'])} against {_show(worst['reference'])} "
                        f"({worst['reference_name']}): {RULE_WORDS[worst['rule']]}, {_show(worst['deviation'])}, "
                        f"exceeds the pass limit {_show(worst['pass_limit'])}.")
        out[area] = {"status": status, "sentence": sentence, "checks": mine}
    return out


def _show(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if abs(value) >= 0.001 or value == 0 else f"{value:.1e}"

"""Human-readable code descriptions from a source's own dictionary tables, keyed by typed code.

The readers keep only codes; the report's per-code tables want names. This reads, when present: MIMIC-III
``D_ICD_DIAGNOSES``/``D_ICD_PROCEDURES``, MIMIC-IV ``hosp/d_icd_diagnoses``/``d_icd_procedures``, the OMOP
``concept`` table and the Synthea ``DESCRIPTION`` columns. A missing dictionary gives an empty mapping, never an
error: descriptions are optional. The mapping can be saved beside a corpus (``descriptions.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


from ehrsynth.data.tables import find_table, read_table
from ehrsynth.models.io import atomic_write_text

FILE_NAME = "descriptions.json"


def code_descriptions(source: str, path: str | Path) -> dict[str, str]:
    """Typed code -> description for the source format ``source`` read from ``path`` (``{}`` when none).

    Example:
        >>> code_descriptions("mimic3", "../shared/data/mimic-iii-demo")["ICD9CM/4019"]  # doctest: +SKIP
        'Unspecified essential hypertension'
    """
    path = Path(path)
    if not path.is_dir():
        return {}
    if source == "mimic3":
        return {**_icd(path, "d_icd_diagnoses", "icd9_code", "ICD9CM", None),
                **_icd(path, "d_icd_procedures", "icd9_code", "ICD9PROC", None)}
    if source == "mimic4":
        hosp = path / "hosp" if (path / "hosp").is_dir() else path
        return {**_icd(hosp, "d_icd_diagnoses", "icd_code", "ICD9CM", "ICD10CM"),
                **_icd(hosp, "d_icd_procedures", "icd_code", "ICD9PROC", "ICD10PCS")}
    if source == "omop":
        return _pairs(path, "concept", "concept_id", "concept_name", lambda c: "OMOP/" + c.removesuffix(".0"))
    if source == "synthea":
        out: dict[str, str] = {}
        for table, system in (("conditions", "SNOMED"), ("procedures", "SNOMED"), ("medications", "RXNORM")):
            out.update(_pairs(path, table, "code", "description", lambda c, s=system: f"{s}/{c}"))
        return out
    return {}


def _pairs(directory: Path, table: str, key: str, value: str, typed) -> dict[str, str]:
    found = find_table(directory, table, required=False)
    if found is None:
        return {}
    frame = read_table(found, [key, value], allow_empty=True).drop_nulls([key, value]).unique(key, keep="first")
    return {typed(str(k).strip()): str(v) for k, v in zip(frame[key].to_list(), frame[value].to_list())}


def _icd(directory: Path, table: str, key: str, system9: str, system10: str | None) -> dict[str, str]:
    found = find_table(directory, table, required=False)
    if found is None:
        return {}
    columns = [key, "long_title"] + (["icd_version"] if system10 else [])
    frame = read_table(found, columns, allow_empty=True).drop_nulls([key, "long_title"])
    versions = frame["icd_version"].to_list() if system10 else ["9"] * frame.height
    return {f"{system10 if str(v).strip() == '10' else system9}/{str(k).strip()}": str(t)
            for k, t, v in zip(frame[key].to_list(), frame["long_title"].to_list(), versions)}


def save_descriptions(directory: str | Path, descriptions: dict[str, str]) -> Path:
    """Write ``descriptions.json`` into ``directory`` (atomically), e.g. beside a saved corpus, with the
    permissions of the corpus's own ``corpus.json`` when there is one (a private corpus stays private)."""
    target = Path(directory) / FILE_NAME
    atomic_write_text(target, json.dumps(dict(sorted(descriptions.items())), indent=0))
    header = Path(directory) / "corpus.json"
    if header.is_file():
        os.chmod(target, header.stat().st_mode & 0o777)
    return target


def load_descriptions(directory: str | Path) -> dict[str, str]:
    """``descriptions.json`` from ``directory``, or ``{}`` when there is none."""
    target = Path(directory) / FILE_NAME
    if not target.is_file():
        return {}
    data = json.loads(target.read_text())
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


__all__ = ["FILE_NAME", "code_descriptions", "load_descriptions", "save_descriptions"]

"""Typed code vocabularies.

Every code carries its system as a prefix, ``SYSTEM/value`` (``ICD9CM/401.9``, ``OMOP/192671``), so codes from
different systems never collide and decoding is never ambiguous -- a defect of the HALO reference, which mixed
systems in one unprefixed vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ehrsynth.errors import ConfigError

KNOWN_SYSTEMS = ("ICD9CM", "ICD10CM", "ICD9PROC", "ICD10PCS", "NDC", "SNOMED", "RXNORM", "OMOP", "LOINC", "CPT4")


def code_system(code: str) -> str:
    """The system prefix of a typed code (``'ICD9CM/401.9'`` -> ``'ICD9CM'``)."""
    return code.split("/", 1)[0] if "/" in code else ""


def code_value(code: str) -> str:
    """The value after the system prefix (``'ICD9CM/401.9'`` -> ``'401.9'``)."""
    return code.split("/", 1)[1] if "/" in code else code


def icd9_rollup_expr(code: pl.Expr) -> pl.Expr:
    """Roll ICD-9 codes up to their category, as EHRDiff did.

    Diagnoses (``ICD9CM/``) keep 3 characters, or 4 for E-codes (``E8859`` -> ``E885``); procedures
    (``ICD9PROC/``) keep their 2-digit category plus first decimal digit (3 characters). Dots are dropped
    first. Codes of other systems pass through unchanged.
    """
    system = code.str.split_exact("/", 1).struct.field("field_0")
    value = code.str.split_exact("/", 1).struct.field("field_1").str.replace_all(".", "", literal=True)
    width = pl.when(value.str.starts_with("E")).then(4).otherwise(3)
    rolled = system + pl.lit("/") + value.str.slice(0, width)
    return pl.when(system.is_in(["ICD9CM", "ICD9PROC"])).then(rolled).otherwise(code)


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Typed codes with their counts, ordered by descending count (ties by code).

    The order matters: code id 0 is the most frequent code, and HALO's within-visit order follows the ids.

    Attributes:
        codes: typed code strings; ``codes[i]`` is code id ``i``.
        counts: number of visits containing each code in the corpus the vocabulary was built from.
    """

    codes: tuple[str, ...]
    counts: np.ndarray

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.counts):
            raise ConfigError(f"vocabulary has {len(self.codes)} codes but {len(self.counts)} counts")

    def __len__(self) -> int:
        return len(self.codes)

    def index(self) -> dict[str, int]:
        """Map from code string to id."""
        return {code: i for i, code in enumerate(self.codes)}

    def systems(self) -> dict[str, int]:
        """Number of distinct codes per system."""
        out: dict[str, int] = {}
        for code in self.codes:
            out[code_system(code)] = out.get(code_system(code), 0) + 1
        return out

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame({"code": list(self.codes), "count": np.asarray(self.counts, dtype=np.int64)})

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.codes == other.codes
            and np.array_equal(np.asarray(self.counts), np.asarray(other.counts))
        )

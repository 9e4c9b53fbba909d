"""One typed parser for generation conditions, shared by the CLI, HALO and EHRDiff.

A condition fixes a static value of the generated patients: a label (``label:<name>`` or the bare name, "0"/"1"),
``sex`` ("F"/"M") or ``age`` (years). Each model says which of these it can condition on; the parser checks the
keys against that, the values against their type, and refuses two different values for the same thing (say
``sex=F`` and ``sex=M``, or ``mortality=1`` and ``label:mortality=0``), naming the flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ehrsynth.data.corpus import SEX_NAMES
from ehrsynth.errors import ConfigError

FLAG = "--condition"


def parse_pairs(pairs: Iterable[str], *, flag: str = FLAG) -> dict[str, str]:
    """``['label:mortality=1', 'sex=F']`` -> ``{'label:mortality': '1', 'sex': 'F'}``.

    Raises:
        ConfigError: for an entry without ``=``, or the same key given twice with different values.

    Example:
        >>> parse_pairs(["sex=F", "mortality=1"])
        {'sex': 'F', 'mortality': '1'}
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        if key in out and out[key] != value:
            raise ConfigError(f"{flag} gives {key!r} two values: {out[key]!r} and {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class Conditions:
    """Parsed conditions.

    Attributes:
        labels: label name -> 0 or 1.
        sex: 0 (F), 1 (M) or None (free).
        age: age in years or None (free).
    """

    labels: dict[str, int] = field(default_factory=dict)
    sex: int | None = None
    age: float | None = None

    def __bool__(self) -> bool:
        return bool(self.labels) or self.sex is not None or self.age is not None

    @classmethod
    def parse(cls, conditions: Mapping[str, Any] | None, *, labels: Iterable[str] = (), sex: bool = False,
              age: bool = False, flag: str = FLAG) -> Conditions:
        """Check ``conditions`` against what a model conditions on (its ``labels``, and ``sex``/``age`` when True).

        Raises:
            ConfigError: for an unknown key, a bad value, or two different values for one label (named by
                ``flag``; the messages show the key and the value).

        Example:
            >>> Conditions.parse({"label:y": "1", "sex": "f"}, labels=("y",), sex=True)
            Conditions(labels={'y': 1}, sex=0, age=None)
        """
        labels = tuple(labels)
        allowed = [f"label:{n}" for n in labels] + (["sex"] if sex else []) + (["age"] if age else [])
        parsed: dict[str, int] = {}
        out_sex, out_age = None, None
        for key, value in (conditions or {}).items():
            name = key[len("label:"):] if key.startswith("label:") else key
            text = str(value).strip()
            if name in labels:
                if text.lower() not in ("0", "1", "true", "false"):
                    raise ConfigError(f"condition {key!r} must be '0' or '1', got {value!r}")
                bit = int(text.lower() in ("1", "true"))
                if parsed.get(name, bit) != bit:
                    raise ConfigError(f"{flag} gives label {name!r} two values: {parsed[name]} and {bit}")
                parsed[name] = bit
            elif key == "sex" and sex:
                if text.upper() not in SEX_NAMES:
                    raise ConfigError(f"condition 'sex' must be one of {list(SEX_NAMES)!r}, got {value!r}")
                out_sex = SEX_NAMES.index(text.upper())
            elif key == "age" and age:
                try:
                    out_age = float(text)
                except ValueError:
                    raise ConfigError(f"condition 'age' must be a number of years, got {value!r}") from None
                if not math.isfinite(out_age):
                    raise ConfigError(f"condition 'age' must be a finite number of years, got {value!r}")
            else:
                raise ConfigError(f"unknown condition {key!r}; this model conditions on {allowed!r}")
        return cls(parsed, out_sex, out_age)


__all__ = ["FLAG", "Conditions", "parse_pairs"]

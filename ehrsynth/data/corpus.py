"""PatientCorpus: the one representation of patients that flows through ehrsynth.

Readers build it, models train on it, samplers return it, writers and metrics read it. It is CSR style:

    patient p owns visits  visit_offsets[p] : visit_offsets[p+1]
    visit v owns codes     code_offsets[v]  : code_offsets[v+1]      (int32 ids into ``vocab``)

so memory is O(code occurrences). Within a visit, code ids are sorted ascending, which -- because the
vocabulary is ordered by descending frequency -- is the documented, deterministic "most frequent first" order.
Dense multi-hot arrays exist only per batch (:meth:`PatientCorpus.patient_multi_hot`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ehrsynth.data.vocab import Vocabulary
from ehrsynth.errors import ConfigError, InputError, MissingFileError
from ehrsynth.outputs import replace_directory, staged_output  # noqa: F401  (replace_directory: loop.py)

FORMAT_NAME = "ehrsynth-corpus"
FORMAT_VERSION = 2  # 2: patient ids in patient_ids.npy (memory-mapped); 1 kept them in patients.parquet
READABLE_VERSIONS = (1, 2)
SPLIT_NAMES = ("train", "val", "test")
SEX_NAMES = ("F", "M")  # sex code 0 = F, 1 = M, -1 = unknown
IDS_FILE = "patient_ids.npy"

ARRAY_NAMES = (
    "visit_offsets", "code_offsets", "codes", "visit_days", "visit_start",
    "sex", "birth_year", "age_at_first_visit", "death", "labels", "split",
)


def ragged_indices(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(starts[i], stops[i])`` for all i without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(stops, dtype=np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # position within each run, plus the run's start
    run_starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(run_starts - starts, lengths)


@dataclass(eq=False)
class PatientCorpus:
    """Patients -> time-ordered visits -> sets of typed codes, with static attributes and labels.

    Attributes:
        patient_ids: (P,) source identifiers, as strings.
        visit_offsets: (P+1,) int64 CSR offsets into visits.
        code_offsets: (V+1,) int64 CSR offsets into ``codes``.
        codes: (N,) int32 code ids, ascending within each visit.
        visit_days: (V,) float64 days since the patient's first visit (NaN when times are unknown).
        visit_start: (V,) datetime64[s] absolute visit start, NaT when unknown (always NaT for synthetic data).
        sex: (P,) int8, 0 = F, 1 = M, -1 = unknown.
        birth_year: (P,) int32, -1 = unknown.
        age_at_first_visit: (P,) float32 years, NaN = unknown.
        death: (P,) int8, 1 = died (in hospital / recorded death), 0 = no, -1 = not in source.
        labels: (P, L) uint8 binary per-patient labels named by ``label_names``.
        label_names: names of the label columns.
        vocab: the code vocabulary.
        split: (P,) int8, 0 train / 1 val / 2 test.
        stats: provenance and what building dropped (counts only, never rows).
    """

    patient_ids: np.ndarray
    visit_offsets: np.ndarray
    code_offsets: np.ndarray
    codes: np.ndarray
    visit_days: np.ndarray
    visit_start: np.ndarray
    sex: np.ndarray
    birth_year: np.ndarray
    age_at_first_visit: np.ndarray
    death: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    vocab: Vocabulary
    split: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label_names = tuple(self.label_names)
        P, V, N = self.n_patients, self.n_visits, self.n_codes
        checks = {
            "visit_offsets": (self.visit_offsets.shape == (P + 1,)),
            "code_offsets": (self.code_offsets.shape == (V + 1,)),
            "visit_days": self.visit_days.shape == (V,),
            "visit_start": self.visit_start.shape == (V,),
            "sex": self.sex.shape == (P,),
            "birth_year": self.birth_year.shape == (P,),
            "age_at_first_visit": self.age_at_first_visit.shape == (P,),
            "death": self.death.shape == (P,),
            "labels": self.labels.shape == (P, len(self.label_names)),
            "split": self.split.shape == (P,),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"inconsistent corpus arrays: {', '.join(bad)}")
        if N and (int(self.codes.min()) < 0 or int(self.codes.max()) >= len(self.vocab)):
            raise ConfigError("corpus codes fall outside the vocabulary")

    def __repr__(self) -> str:  # counts only: a corpus repr must never show patient identifiers
        return (f"PatientCorpus(patients={self.n_patients}, visits={self.n_visits}, codes={self.n_codes}, "
                f"vocabulary={self.vocab_size}, labels={list(self.label_names)})")

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def n_visits(self) -> int:
        return len(self.code_offsets) - 1

    @property
    def n_codes(self) -> int:
        """Number of code occurrences (not the vocabulary size)."""
        return len(self.codes)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def visits_per_patient(self) -> np.ndarray:
        return np.diff(self.visit_offsets)

    def codes_per_visit(self) -> np.ndarray:
        return np.diff(self.code_offsets)

    def visit_patient(self) -> np.ndarray:
        """(V,) the patient index of each visit."""
        return np.repeat(np.arange(self.n_patients, dtype=np.int64), self.visits_per_patient())

    def code_visit(self) -> np.ndarray:
        """(N,) the visit index of each code occurrence."""
        return np.repeat(np.arange(self.n_visits, dtype=np.int64), self.codes_per_visit())

    def patient_codes(self, patient: int) -> list[list[str]]:
        """The typed codes of one patient's visits (for debugging and tests; never logged)."""
        out = []
        for v in range(self.visit_offsets[patient], self.visit_offsets[patient + 1]):
            ids = self.codes[self.code_offsets[v]:self.code_offsets[v + 1]]
            out.append([self.vocab.codes[i] for i in ids])
        return out

    # ---- selection ---------------------------------------------------------------------------------------
    def subset(self, patients: np.ndarray) -> PatientCorpus:
        """A new corpus holding ``patients`` (indices, in the given order). The vocabulary is kept."""
        patients = np.asarray(patients, dtype=np.int64)
        visits = ragged_indices(self.visit_offsets[patients], self.visit_offsets[patients + 1])
        occurrences = ragged_indices(self.code_offsets[visits], self.code_offsets[visits + 1])
        visit_offsets = np.zeros(len(patients) + 1, dtype=np.int64)
        np.cumsum(self.visit_offsets[patients + 1] - self.visit_offsets[patients], out=visit_offsets[1:])
        code_offsets = np.zeros(len(visits) + 1, dtype=np.int64)
        np.cumsum(self.code_offsets[visits + 1] - self.code_offsets[visits], out=code_offsets[1:])
        return PatientCorpus(
            patient_ids=np.asarray(self.patient_ids)[patients],
            visit_offsets=visit_offsets,
            code_offsets=code_offsets,
            codes=np.asarray(self.codes)[occurrences],
            visit_days=np.asarray(self.visit_days)[visits],
            visit_start=np.asarray(self.visit_start)[visits],
            sex=np.asarray(self.sex)[patients],
            birth_year=np.asarray(self.birth_year)[patients],
            age_at_first_visit=np.asarray(self.age_at_first_visit)[patients],
            death=np.asarray(self.death)[patients],
            labels=np.asarray(self.labels)[patients],
            label_names=self.label_names,
            vocab=self.vocab,
            split=np.asarray(self.split)[patients],
            stats=dict(self.stats),
        )

    def part_indices(self, name: str) -> np.ndarray:
        """Indices, in corpus order, of the patients of one split part: ``'train'``, ``'val'`` or ``'test'``."""
        if name not in SPLIT_NAMES:
            raise ConfigError(f"split part must be one of {SPLIT_NAMES}, got {name!r}")
        return np.flatnonzero(np.asarray(self.split) == SPLIT_NAMES.index(name))

    def part(self, name: str) -> PatientCorpus:
        """The patients of one split part, copied out (:class:`~ehrsynth.data.view.CorpusView` does not copy)."""
        return self.subset(self.part_indices(name))

    def with_split(self, fractions: tuple[float, float, float] = (0.72, 0.08, 0.2), *, seed: int = 0) -> PatientCorpus:
        """Assign a seeded train/val/test split by patient (HALO's default 72/8/20)."""
        return replace(self, split=random_split(self.n_patients, fractions, seed=seed), stats=dict(self.stats))

    def flatten_visits(self) -> PatientCorpus:
        """One visit per patient holding every code the patient ever had (the view EHRDiff models).

        The visit keeps the patient's first visit day (0) and start date; statics, labels and split are kept.
        """
        vpp = self.visits_per_patient()
        code_patient = np.repeat(np.repeat(np.arange(self.n_patients, dtype=np.int64), vpp), self.codes_per_visit())
        keys = np.unique(code_patient * self.vocab_size + np.asarray(self.codes, dtype=np.int64))
        patient_of_code = keys // max(self.vocab_size, 1)
        code_offsets = np.zeros(self.n_patients + 1, dtype=np.int64)
        np.cumsum(np.bincount(patient_of_code, minlength=self.n_patients), out=code_offsets[1:])
        first_visit = np.asarray(self.visit_offsets[:-1])
        has_visit = vpp > 0
        visit_days = np.where(has_visit, 0.0, np.nan)
        visit_start = np.full(self.n_patients, np.datetime64("NaT"), dtype="datetime64[s]")
        visit_start[has_visit] = np.asarray(self.visit_start)[first_visit[has_visit]]
        return replace(
            self, visit_offsets=np.arange(self.n_patients + 1, dtype=np.int64), code_offsets=code_offsets,
            codes=(keys % max(self.vocab_size, 1)).astype(np.int32), visit_days=visit_days,
            visit_start=visit_start, stats=dict(self.stats),
        )

    # ---- dense views (per batch only) --------------------------------------------------------------------
    def patient_multi_hot(self, patients: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """(B, vocab) 0/1 matrix: every code each patient ever had (EHRDiff's input)."""
        patients = np.asarray(patients, dtype=np.int64)
        visits = ragged_indices(self.visit_offsets[patients], self.visit_offsets[patients + 1])
        occurrences = ragged_indices(self.code_offsets[visits], self.code_offsets[visits + 1])
        visit_rows = np.repeat(np.arange(len(patients)), self.visit_offsets[patients + 1] - self.visit_offsets[patients])
        rows = np.repeat(visit_rows, self.code_offsets[visits + 1] - self.code_offsets[visits])
        out = np.zeros((len(patients), self.vocab_size), dtype=dtype)
        out[rows, np.asarray(self.codes)[occurrences]] = 1
        return out

    # ---- summaries ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Counts and distributions (aggregates only): safe to print and share."""
        vpp = self.visits_per_patient()
        cpv = self.codes_per_visit()

        def dist(x: np.ndarray) -> dict[str, float]:
            if len(x) == 0:
                return {"mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0.0}
            return {
                "mean": round(float(np.mean(x)), 4),
                "median": float(np.median(x)),
                "p95": float(np.percentile(x, 95)),
                "max": float(np.max(x)),
            }

        known_sex = np.asarray(self.sex)
        return {
            "patients": self.n_patients,
            "visits": self.n_visits,
            "code_occurrences": self.n_codes,
            "vocabulary_size": self.vocab_size,
            "distinct_codes_used": int(len(np.unique(self.codes))) if self.n_codes else 0,
            "codes_by_system": self.vocab.systems(),
            "visits_per_patient": dist(vpp),
            "codes_per_visit": dist(cpv),
            "sex": {"F": int((known_sex == 0).sum()), "M": int((known_sex == 1).sum()),
                    "unknown": int((known_sex < 0).sum())},
            "labels": {name: int(np.asarray(self.labels)[:, i].sum()) for i, name in enumerate(self.label_names)},
            "split": {name: int((np.asarray(self.split) == i).sum()) for i, name in enumerate(SPLIT_NAMES)},
            "build": self.stats,
        }

    # ---- persistence -------------------------------------------------------------------------------------
    def save(self, directory: str | Path, *, kind: str = "corpus", private: bool = False) -> Path:
        """Write the corpus to ``directory`` (npy arrays + Parquet vocabulary + ``corpus.json``), atomically.

        Patient ids are a fixed-width string array (4 bytes x the longest id per patient), so they are
        memory-mapped on load like the other arrays.

        The directory is written beside its target under a staging name and renamed into place once, so a
        killed run never leaves a half-written corpus. An existing ehrsynth output of the same ``kind`` there
        is replaced; anything else is refused (see :mod:`ehrsynth.outputs`). ``private`` (real patients) makes
        it 0700/0600 whatever the umask.

        Raises:
            OutputError: when ``directory`` holds something that is not ours to replace.
        """
        with staged_output(directory, kind, private=private) as staging:
            for name in ARRAY_NAMES:
                np.save(staging / f"{name}.npy", np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
            # fixed-width strings, so the identifiers are memory-mapped like every other array
            np.save(staging / IDS_FILE, np.asarray(self.patient_ids).astype(str), allow_pickle=False)
            self.vocab.frame().write_parquet(staging / "vocab.parquet")
            header = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "patients": self.n_patients,
                "visits": self.n_visits,
                "code_occurrences": self.n_codes,
                "vocabulary_size": self.vocab_size,
                "label_names": list(self.label_names),
                "stats": self.stats,
            }
            (staging / "corpus.json").write_text(json.dumps(header, indent=2, default=_json_default))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True) -> PatientCorpus:
        """Load a saved corpus; arrays are memory-mapped (read-only) unless ``mmap=False``.

        Raises:
            MissingFileError: when ``directory`` holds no corpus.
        """
        directory = Path(directory)
        header_path = directory / "corpus.json"
        if not header_path.is_file():
            raise MissingFileError("not a saved corpus (no corpus.json); create one with `ehrsynth prepare`",
                                   file=directory)
        try:
            header = json.loads(header_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("corpus.json is not valid JSON", file=header_path) from None
        if header.get("format") != FORMAT_NAME or header.get("version") not in READABLE_VERSIONS:
            raise InputError(f"unsupported corpus format {header.get('format')!r} v{header.get('version')!r}",
                             file=header_path)
        arrays = {}
        for name in ARRAY_NAMES:
            path = directory / f"{name}.npy"
            if not path.is_file():
                raise MissingFileError("corpus array missing", file=path)
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if (directory / IDS_FILE).is_file():
            ids = np.load(directory / IDS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
        elif (directory / "patients.parquet").is_file():  # format version 1 kept the ids in Parquet
            ids = pl.read_parquet(directory / "patients.parquet")["patient_id"].to_numpy()
        else:
            raise MissingFileError("corpus patient identifiers missing", file=directory / IDS_FILE)
        vocab_frame = pl.read_parquet(directory / "vocab.parquet")
        vocab = Vocabulary(tuple(vocab_frame["code"].to_list()), vocab_frame["count"].to_numpy())
        return cls(patient_ids=ids, label_names=tuple(header["label_names"]), vocab=vocab,
                   stats=header.get("stats", {}), **arrays)

    def equals(self, other: PatientCorpus, *, compare_ids: bool = True, compare_dates: bool = True) -> bool:
        """Exact equality of contents (used by round-trip tests)."""
        names = [n for n in ARRAY_NAMES if compare_dates or n not in ("visit_start",)]
        same = all(_array_equal(getattr(self, n), getattr(other, n)) for n in names)
        if compare_ids:
            same = same and np.array_equal(np.asarray(self.patient_ids).astype(str),
                                           np.asarray(other.patient_ids).astype(str))
        return same and self.label_names == other.label_names and self.vocab.codes == other.vocab.codes


def _array_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fcmM":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def random_split(n: int, fractions: tuple[float, float, float], *, seed: int) -> np.ndarray:
    """(n,) int8 split assignment: a seeded permutation cut at the cumulative ``fractions``."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round((fractions[0] + fractions[1]) * n)) - n_train
    split = np.full(n, 2, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_val]] = 1
    return split


def empty_statics(n_patients: int) -> dict[str, np.ndarray]:
    """Unknown sex, birth year, age and death for ``n_patients`` (used by synthetic corpora)."""
    return {
        "sex": np.full(n_patients, -1, dtype=np.int8),
        "birth_year": np.full(n_patients, -1, dtype=np.int32),
        "age_at_first_visit": np.full(n_patients, np.nan, dtype=np.float32),
        "death": np.full(n_patients, -1, dtype=np.int8),
    }


def concat_corpora(parts: list[PatientCorpus]) -> PatientCorpus:
    """Stack corpora that share one vocabulary and label set (e.g. generation chunks) into one; vocabulary
    counts are recounted over the result (visits containing each code).

    Raises:
        ConfigError: when the parts' vocabularies or label names differ.
    """
    if not parts:
        raise ConfigError("nothing to concatenate")
    first = parts[0]
    for part in parts[1:]:
        if part.vocab.codes != first.vocab.codes or part.label_names != first.label_names:
            raise ConfigError("corpora to concatenate must share vocabulary and labels")

    def offsets(name: str) -> np.ndarray:
        pieces, base = [np.zeros(1, dtype=np.int64)], 0
        for part in parts:
            arr = np.asarray(getattr(part, name), dtype=np.int64)
            pieces.append(arr[1:] + base)
            base += int(arr[-1])
        return np.concatenate(pieces)

    def stack(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(p, name)) for p in parts])

    return PatientCorpus(
        patient_ids=stack("patient_ids"), visit_offsets=offsets("visit_offsets"),
        code_offsets=offsets("code_offsets"), codes=stack("codes"), visit_days=stack("visit_days"),
        visit_start=stack("visit_start"), sex=stack("sex"), birth_year=stack("birth_year"),
        age_at_first_visit=stack("age_at_first_visit"), death=stack("death"), labels=stack("labels"),
        label_names=first.label_names, split=stack("split"), stats=dict(first.stats),
        vocab=Vocabulary(first.vocab.codes, np.bincount(stack("codes"), minlength=len(first.vocab)).astype(np.int64)),
    )

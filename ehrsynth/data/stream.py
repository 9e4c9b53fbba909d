"""Write a corpus that arrives in chunks (a generator's output) to disk with memory bounded by one chunk.

Each chunk is saved as it comes; at the end the parts are merged array by array into memory-mapped npy files,
so neither step holds the whole corpus in memory. The result appears atomically, like every corpus save.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl

from ehrsynth.data.corpus import ARRAY_NAMES, FORMAT_NAME, FORMAT_VERSION, PatientCorpus
from ehrsynth.errors import ConfigError
from ehrsynth.outputs import absolute, scratch_directory, staged_output

_OFFSETS = ("visit_offsets", "code_offsets")


def save_stream(chunks: Iterable[PatientCorpus], directory: str | Path, *, kind: str = "corpus",
                private: bool = False) -> PatientCorpus:
    """Save every chunk of ``chunks`` as one corpus in ``directory`` and return it, memory-mapped.

    ``kind`` and ``private`` are as in :meth:`PatientCorpus.save` (an existing output of another kind, or not
    written by ehrsynth, is refused). The chunks wait in a scratch directory beside ``directory``, removed
    whatever happens.

    Raises:
        ConfigError: when there is no chunk, or chunks disagree on vocabulary or labels.
    """
    directory = absolute(directory)
    with scratch_directory(directory.parent, kind) as scratch:
        parts = [chunk.save(scratch / f"{i:06d}") for i, chunk in enumerate(chunks)]
        if not parts:
            raise ConfigError("nothing to save: the stream had no chunk")
        with staged_output(directory, kind, private=private) as staging:
            _merge(parts, staging)
    return PatientCorpus.load(directory)


def _merge(parts: list[Path], out: Path) -> None:
    """Concatenate saved corpora into the empty directory ``out``, one array at a time, through memory maps."""
    loaded = [PatientCorpus.load(p) for p in parts]
    first = loaded[0]
    for part in loaded[1:]:
        if part.vocab.codes != first.vocab.codes or part.label_names != first.label_names:
            raise ConfigError("chunks to merge must share vocabulary and labels")
    for name in ("patient_ids", *ARRAY_NAMES):
        arrays = [getattr(p, name) for p in loaded]
        if name in _OFFSETS:
            total = sum(len(a) - 1 for a in arrays) + 1
        else:
            total = sum(len(a) for a in arrays)
        dtype = np.result_type(*arrays)  # identifiers: the widest chunk's string width
        target = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=dtype,
                                           shape=(total, *arrays[0].shape[1:]))
        position, base = 0, 0
        for a in arrays:
            if name in _OFFSETS:
                target[position:position + len(a)] = np.asarray(a) + base
                position += len(a) - 1
                base += int(a[-1])
            else:
                target[position:position + len(a)] = a
                position += len(a)
        target.flush()
        del target
    codes = np.load(out / "codes.npy", mmap_mode="r")
    counts = np.bincount(codes, minlength=first.vocab_size).astype(np.int64)  # visits holding each code
    pl.DataFrame({"code": list(first.vocab.codes), "count": counts}).write_parquet(out / "vocab.parquet")
    n_patients = sum(p.n_patients for p in loaded)
    n_visits = sum(p.n_visits for p in loaded)
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "patients": n_patients, "visits": n_visits,
              "code_occurrences": int(len(codes)), "vocabulary_size": first.vocab_size,
              "label_names": list(first.label_names), "stats": first.stats}
    (out / "corpus.json").write_text(json.dumps(header, indent=2))

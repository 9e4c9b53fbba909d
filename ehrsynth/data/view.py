"""CorpusView: some patients of a corpus, by index, sharing its arrays.

Training reads the train and validation parts of a corpus through views, never through copies: on a
memory-mapped corpus the process then holds only the pages its batches touch, so memory does not grow with the
number of patients beyond the corpus's own (mapped) arrays. ``PatientCorpus.part`` copies a part out and stays
the right tool for evaluation and writing, which want a self-contained corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrsynth.data.corpus import PatientCorpus


@dataclass(frozen=True, eq=False)  # arrays have no truth value: compare views by identity
class CorpusView:
    """``patients`` (int64 indices into ``corpus``, in order) of ``corpus``, without copying its arrays."""

    corpus: PatientCorpus
    patients: np.ndarray

    @classmethod
    def of(cls, data: PatientCorpus | CorpusView) -> CorpusView:
        """``data`` itself if it is a view, else a view of all its patients."""
        if isinstance(data, CorpusView):
            return data
        return cls(data, np.arange(data.n_patients, dtype=np.int64))

    @classmethod
    def part(cls, corpus: PatientCorpus, name: str) -> CorpusView:
        """The patients of one split part (``'train'``, ``'val'`` or ``'test'``), in corpus order -- the same
        patients, in the same order, as ``corpus.part(name)``."""
        return cls(corpus, corpus.part_indices(name))

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    def visits_per_patient(self) -> np.ndarray:
        offsets = self.corpus.visit_offsets
        return np.asarray(offsets[self.patients + 1] - offsets[self.patients])

    def __repr__(self) -> str:  # counts only, like PatientCorpus
        return f"CorpusView(patients={self.n_patients} of {self.corpus!r})"


__all__ = ["CorpusView"]

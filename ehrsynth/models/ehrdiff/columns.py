"""The columns EHRDiff diffuses -- the codes, then (when modelled) one per label and sex=F, sex=M -- and their
means over the training patients, from which ``sigma_data``, the loss weights and the binarisation thresholds
are set."""

from __future__ import annotations

import numpy as np

from ehrsynth.data.corpus import SEX_NAMES, PatientCorpus
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError


def static_column_names(label_names: tuple[str, ...]) -> tuple[str, ...]:
    """Names of the extra columns when statics are modelled: ``label:<name>`` per label, then sex=F, sex=M."""
    return (*(f"label:{name}" for name in label_names), *(f"sex={s}" for s in SEX_NAMES))


def data_density(corpus: PatientCorpus | CorpusView, *, model_statics: bool = False, chunk: int = 4096) -> float:
    """Mean of all entries of the multi-hot training matrix (codes, plus label and sex columns when modelled),
    over the train split (all patients if the corpus has none marked train; a view's own patients), without
    building it whole. ``sigma_data = sqrt(p (1 - p))`` is the standard deviation of those 0/1 entries."""
    return float(column_means(corpus, model_statics=model_statics, chunk=chunk).mean())


def column_means(corpus: PatientCorpus | CorpusView, *, model_statics: bool = False, chunk: int = 4096) -> np.ndarray:
    """Per-column mean of the multi-hot training matrix (code prevalences, then label and sex=F, sex=M shares
    when modelled) over the patients :func:`data_density` uses; (D,) float64."""
    if isinstance(corpus, CorpusView):
        corpus, patients = corpus.corpus, corpus.patients
    else:
        patients = np.flatnonzero(np.asarray(corpus.split) == 0)
        if len(patients) == 0:
            patients = np.arange(corpus.n_patients)
    if len(patients) == 0:
        raise ConfigError("cannot estimate sigma_data from an empty corpus")
    ones = sum(corpus.patient_multi_hot(patients[i:i + chunk], dtype=np.uint8).sum(0, dtype=np.int64)
               for i in range(0, len(patients), chunk))
    if model_statics:
        sex = np.asarray(corpus.sex)[patients]
        ones = np.concatenate([ones, np.asarray(corpus.labels)[patients].sum(0, dtype=np.int64),
                               [(sex == 0).sum(), (sex == 1).sum()]])
    return np.asarray(ones, dtype=np.float64) / len(patients)

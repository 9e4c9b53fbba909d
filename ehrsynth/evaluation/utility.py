"""Utility: is synthetic data as good as real data for training a predictive model?

TSTR (train on synthetic, test on real) against TRTR (train on real training data, test on the same real test
data), per prediction target and per classifier (:func:`downstream_utility`). Targets are the corpus labels
when it has some, otherwise next-visit codes. Definitions in docs/metrics.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import chi2
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from threadpoolctl import threadpool_limits

from ehrsynth.data.corpus import PatientCorpus, ragged_indices
from ehrsynth.errors import ConfigError
from ehrsynth.evaluation.features import MetricResult, aligned_code_matrices, binarize, check_corpus, check_size

TASKS = ("auto", "labels", "next_visit")
MODELS = ("logistic", "gbm")
# Gradient boosting needs dense input: it sees at most this many codes, those with the highest chi^2 score
# against the target in its training data.
GBM_MAX_FEATURES = 128

Task = Literal["auto", "labels", "next_visit"]
Model = Literal["logistic", "gbm"]


@dataclass(frozen=True)
class UtilityScore:
    """One (target, classifier, training source) cell of the TSTR/TRTR table.

    Attributes:
        target: a label name, or ``next_visit:<code>``.
        model: ``'logistic'`` or ``'gbm'``.
        trained_on: ``'synthetic'`` (TSTR) or ``'real'`` (TRTR).
        auroc, auprc: on the real test patients (NaN when skipped).
        n_train, n_train_positive, n_test, n_test_positive: sample sizes.
        skipped: why no score was computed (e.g. one class in the training data), else None.
    """

    target: str
    model: str
    trained_on: str
    auroc: float
    auprc: float
    n_train: int
    n_train_positive: int
    n_test: int
    n_test_positive: int
    skipped: str | None = None


@dataclass(frozen=True)
class DownstreamUtility(MetricResult):
    """TSTR and TRTR AUROC/AUPRC per target and classifier.

    Attributes:
        task: ``'labels'`` or ``'next_visit'``.
        targets: the prediction targets, in order.
        scores: one :class:`UtilityScore` per (target, model, trained_on).
        mean_auroc, mean_auprc: ``'<tstr|trtr>.<model>'`` -> mean over the scored (not skipped) targets.
        top_k, seed: the parameters.
    """

    metric = "utility.tstr"
    task: str
    targets: tuple[str, ...]
    scores: tuple[UtilityScore, ...]
    mean_auroc: dict[str, float]
    mean_auprc: dict[str, float]
    top_k: int
    seed: int


def downstream_utility(
    real_train: PatientCorpus,
    real_test: PatientCorpus,
    synthetic: PatientCorpus,
    *,
    task: Task = "auto",
    models: tuple[Model, ...] = MODELS,
    top_k: int = 10,
    seed: int = 0,
) -> DownstreamUtility:
    """TSTR vs TRTR: classifiers trained on ``synthetic`` and on ``real_train``, both tested on ``real_test``.

    Tasks:

    * ``'labels'``: one binary target per label of ``real_train`` (also present in ``real_test``). Features are
      the patient's 0/1 code vector over the union of the three corpora's codes; labels are never features
      (a label derived from codes, such as mortality, is predicted from the codes).
    * ``'next_visit'``: patients with >= 2 visits; features = 0/1 codes of all visits but the last, targets =
      presence in the last visit of each of the ``top_k`` codes most often present in the last visits of
      ``real_train`` (ties by code string). The mean AUROC over these targets is the headline.
    * ``'auto'`` (default): ``'labels'`` when ``real_train`` has labels, else ``'next_visit'``.

    Classifiers: ``'logistic'`` = ``LogisticRegression(C=1, solver='liblinear')``; ``'gbm'`` =
    ``HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=seed)`` on the
    GBM_MAX_FEATURES codes with the highest chi^2 score against the target in its training data.

    A cell is skipped, with the reason recorded, when its training data is empty (e.g. a one-visit synthetic
    corpus under ``'next_visit'``) or holds one class, when the test data holds one class, or when the synthetic
    corpus lacks the label.

    Raises:
        ConfigError: for an unknown task or model, or ``task='labels'`` on a corpus without labels.

    Example:
        >>> result = downstream_utility(real.part("train"), real.part("test"), synthetic)  # doctest: +SKIP
        >>> result.mean_auroc["tstr.logistic"], result.mean_auroc["trtr.logistic"]  # doctest: +SKIP
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ConfigError(f"models must be a non-empty subset of {MODELS}, got {tuple(models)!r}")
    check_size("top_k", top_k)
    for name, corpus in (("real_train", real_train), ("real_test", real_test), ("synthetic", synthetic)):
        check_corpus(name, corpus)
    if task == "auto":
        task = "labels" if real_train.label_names else "next_visit"
    if task == "labels" and not real_train.label_names:
        raise ConfigError("task='labels' needs labels, but real_train has none; use task='next_visit'")

    aligned = aligned_code_matrices(real_train, real_test, synthetic)
    if task == "labels":
        targets = tuple(n for n in real_train.label_names if n in real_test.label_names)
        data = {
            "real": (aligned.patients[0], _label_matrix(real_train, targets)),
            "test": (aligned.patients[1], _label_matrix(real_test, targets)),
            "synthetic": (aligned.patients[2], _label_matrix(synthetic, targets)),
        }
    else:
        histories = [_split_last_visit(c, v) for c, v in zip((real_train, real_test, synthetic), aligned.visits)]
        last_counts = np.asarray(histories[0][1].sum(axis=0)).ravel()
        order = np.argsort(-last_counts, kind="stable")  # union codes are sorted, so ties go by code string
        columns = order[:top_k][last_counts[order[:top_k]] > 0]
        targets = tuple(f"next_visit:{aligned.codes[c]}" for c in columns)
        data = {name: (h, l[:, columns].toarray().astype(np.int8))
                for name, (h, l) in zip(("real", "test", "synthetic"), histories)}

    x_test, y_test = data["test"]
    scores = []
    for t, target in enumerate(targets):
        for model in models:
            for trained_on in ("synthetic", "real"):
                x_train, y_train = data[trained_on]
                scores.append(_score(target, model, trained_on, x_train, y_train[:, t], x_test, y_test[:, t], seed))
    mean_auroc, mean_auprc = {}, {}
    for model in models:
        for trained_on, prefix in (("synthetic", "tstr"), ("real", "trtr")):
            cell = [s for s in scores if s.model == model and s.trained_on == trained_on and s.skipped is None]
            mean_auroc[f"{prefix}.{model}"] = float(np.mean([s.auroc for s in cell])) if cell else float("nan")
            mean_auprc[f"{prefix}.{model}"] = float(np.mean([s.auprc for s in cell])) if cell else float("nan")
    return DownstreamUtility(task=task, targets=targets, scores=tuple(scores), mean_auroc=mean_auroc,
                             mean_auprc=mean_auprc, top_k=top_k, seed=seed)


def _label_matrix(corpus: PatientCorpus, names: tuple[str, ...]) -> np.ndarray:
    """(P, len(names)) int8 labels; -1 marks a label the corpus does not carry."""
    out = np.full((corpus.n_patients, len(names)), -1, dtype=np.int8)
    for j, name in enumerate(names):
        if name in corpus.label_names:
            out[:, j] = np.asarray(corpus.labels)[:, corpus.label_names.index(name)]
    return out


def _split_last_visit(corpus: PatientCorpus, visits: sp.csr_matrix) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """For patients with >= 2 visits: (history, last) 0/1 matrices, history = codes of all but the last visit."""
    counts = corpus.visits_per_patient()
    eligible = np.flatnonzero(counts >= 2)
    last = corpus.visit_offsets[1:][eligible] - 1
    earlier_counts = counts[eligible] - 1
    earlier = ragged_indices(corpus.visit_offsets[eligible], last)
    rows = np.repeat(np.arange(len(eligible)), earlier_counts)
    pick = sp.csr_matrix((np.ones(len(earlier), dtype=np.int32), (rows, earlier)),
                         shape=(len(eligible), visits.shape[0]))  # (eligible, V): selects earlier visits
    return binarize(pick @ visits), visits[last]


def _score(target: str, model: str, trained_on: str, x_train: sp.csr_matrix, y_train: np.ndarray,
           x_test: sp.csr_matrix, y_test: np.ndarray, seed: int) -> UtilityScore:
    sizes = dict(n_train=len(y_train), n_train_positive=int((y_train == 1).sum()), n_test=len(y_test),
                 n_test_positive=int((y_test == 1).sum()))
    nan = float("nan")
    reason = None
    if len(y_train) == 0:
        reason = f"no eligible patients in the {trained_on} training data"
    elif (y_train < 0).any():
        reason = f"the {trained_on} training corpus has no label {target!r}"
    elif len(np.unique(y_train)) < 2:
        reason = f"one class in the {trained_on} training data"
    elif len(np.unique(y_test)) < 2:
        reason = "one class in the real test data"
    if reason is not None:
        return UtilityScore(target, model, trained_on, nan, nan, skipped=reason, **sizes)
    if model == "logistic":
        classifier = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(x_train.astype(np.float64), y_train)
        proba = classifier.predict_proba(x_test.astype(np.float64))[:, 1]
    else:
        # the codes most associated with the target in the training data (a code rare overall may define it)
        with np.errstate(divide="ignore", invalid="ignore"):
            relevance = np.nan_to_num(chi2(x_train, y_train)[0], nan=0.0)
        columns = np.sort(np.argsort(-relevance, kind="stable")[:GBM_MAX_FEATURES])
        classifier = HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=seed)
        # One OpenMP thread: HGB's barriers spin, and on a busy machine (training alongside) 2 threads ran ~10x
        # slower than 1; alone, 1 thread costs well under 2x.
        with threadpool_limits(limits=1, user_api="openmp"):
            classifier.fit(x_train[:, columns].toarray().astype(np.float32), y_train)
            proba = classifier.predict_proba(x_test[:, columns].toarray().astype(np.float32))[:, 1]
    return UtilityScore(target, model, trained_on, float(roc_auc_score(y_test, proba)),
                        float(average_precision_score(y_test, proba)), **sizes)

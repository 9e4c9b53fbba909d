"""The contract every generative model of ehrsynth meets, so one training loop, one save/load, one
``ehrsynth generate`` and one contract test suite serve them all.

A model is an ``nn.Module`` subclass of :class:`GenerativeModel` that

* is built from a frozen config dataclass plus a :class:`CorpusMeta` (what it must know of the training corpus:
  the vocabulary, the label names, and model-specific JSON-able facts such as gap bins or sigma_data);
* turns a batch of corpus patients into tensors (:meth:`GenerativeModel.collate`, vectorised, CPU tensors, plus
  host ints for data-dependent sizes, so the training step never reads a value back from the device);
* returns the scalar training loss from ``forward(batch)`` (so DDP can wrap it unchanged), drawing any noise
  from ``batch["generator"]`` (a ``torch.Generator`` on the model's device that the training loop adds), never
  from torch's global random stream;
* scores held-out patients with :meth:`GenerativeModel.validation_loss`, the criterion of validation, early
  stopping and best-model choice;
* generates a :class:`~ehrsynth.data.corpus.PatientCorpus` from a seed (:meth:`GenerativeModel.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.view import CorpusView


@dataclass(frozen=True)
class CorpusMeta:
    """What a model keeps of its training corpus: never patient rows, only the vocabulary and aggregates.

    Attributes:
        codes: the typed vocabulary; code id i is ``codes[i]``.
        label_names: names of the corpus labels.
        extra: model-specific JSON-able facts (e.g. HALO's gap bin edges, EHRDiff's sigma_data).
    """

    codes: tuple[str, ...]
    label_names: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_corpus(cls, corpus: PatientCorpus | CorpusView, **extra: Any) -> CorpusMeta:
        corpus = CorpusView.of(corpus).corpus  # a view shares its corpus's vocabulary and label names
        return cls(codes=tuple(corpus.vocab.codes), label_names=tuple(corpus.label_names), extra=dict(extra))

    def to_dict(self) -> dict[str, Any]:
        return {"codes": list(self.codes), "label_names": list(self.label_names), "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusMeta:
        return cls(codes=tuple(data["codes"]), label_names=tuple(data["label_names"]), extra=dict(data["extra"]))


class GenerativeModel(nn.Module):
    """Base class of HALO, EHRDiff and any later model. Subclasses set ``family`` and ``config_class``."""

    family: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    validation_unit: ClassVar[str] = "patient"  # what validation_loss counts (shown by the progress bar)
    # config options that default differently under DP-SGD, where a setting would publish a non-private aggregate
    private_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Any, meta: CorpusMeta) -> None:
        super().__init__()
        self.config = config
        self.meta = meta

    @classmethod
    def config_from_saved(cls, data: dict[str, Any]) -> Any:
        """The config of a saved model from its JSON dict; a family overrides this to read older formats."""
        from ehrsynth.models.io import config_from_dict  # late import: io imports this module

        return config_from_dict(cls.config_class, data)

    @classmethod
    def from_corpus(cls, corpus: PatientCorpus | CorpusView, config: Any) -> GenerativeModel:
        """Build an untrained model for ``corpus``, the training patients (a corpus, or a view of one as
        ``train_model`` passes), computing the meta facts the model needs."""
        return cls(config, CorpusMeta.from_corpus(corpus))

    def collate(self, corpus: PatientCorpus, patients: np.ndarray) -> dict[str, Any]:
        """Tensors for the patients ``patients`` (indices into ``corpus``), on the CPU, plus host-side sizes."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: D401
        """The scalar mean training loss of a batch."""
        raise NotImplementedError

    def validation_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed negative log-likelihood, or loss, over the batch's scored units; the number of units).

        The loop sums both over the validation batches and divides, so the criterion is a mean per unit. This
        default is ``forward``'s mean loss per patient (``batch["n_patients"]``, added by the loop), with noise
        from ``batch["generator"]``, which the loop seeds afresh at each validation: a noisy loss (EHRDiff's
        EDM loss) is then evaluated at the same noise levels and noise every time. A model with an exact
        likelihood overrides it (HALO: nats per scored token).
        """
        n = batch["n_patients"]
        return self(batch) * n, torch.tensor(float(n))

    def after_training(self, *, progress: bool = False) -> bool:
        """Fit what depends on the final weights, once the loop has chosen them (EHRDiff calibrates its
        binarisation thresholds); True when the model changed and is to be saved again. Default: nothing."""
        return False

    def generate(
        self,
        n: int,
        *,
        seed: int = 0,
        conditions: dict[str, str] | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> PatientCorpus:
        """Sample ``n`` synthetic patients. Patient i depends only on (seed, i), never on ``batch_size``."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

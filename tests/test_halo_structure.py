"""HALO's structure by construction on real data: after short training on the bundled GiBleed demo and on the
MIMIC-III demo, every generated record is valid the way the training corpus is -- no empty visit, exactly one
sex and one age bucket, a gap bin on every visit after the first, so every visit is dated."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.view import CorpusView
from ehrsynth.models.halo import HaloConfig, HaloModel, sample_batch
from ehrsynth.models.halo.model import corpus_structure
from ehrsynth.models.halo.network import fine_weights
from ehrsynth.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gibleed():
    from ehrsynth.data.readers.omop import read_omop
    from ehrsynth.demo_data import demo_directory

    return read_omop(demo_directory(), options=BuildOptions(max_visits=9, seed=0))


def short_training(corpus, tmp_path, fine_head):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MIMIC: one patient's 15 visits are truncated to 9
        model = HaloModel.from_corpus(corpus.part("train"), HaloConfig.small(n_ctx=12, fine_head=fine_head))
    config = TrainConfig(optimizer="adam", lr=2e-3, batch_size=32, max_steps=120, max_epochs=10_000,
                         eval_every=120, checkpoint_every=10**9, device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train(model, corpus.part("train"), corpus.part("val"), config, tmp_path)
    return model.eval()


@pytest.mark.parametrize("data, fine_head", [("gibleed", "made_direct"), ("mimic3", "made")])
def test_generated_records_have_the_corpus_structure(data, fine_head, gibleed, mimic3_corpus, tmp_path):
    corpus = gibleed if data == "gibleed" else mimic3_corpus
    assert corpus_structure(CorpusView.of(corpus)) == dict.fromkeys(
        ["sex_unknown", "age_unknown", "gap_unknown", "empty_visits", "zero_visits"], False)
    model = short_training(corpus, tmp_path, fine_head)
    out = model.generate(400, seed=1)
    assert out.n_patients == 400 and out.n_visits > 400
    assert out.codes_per_visit().min() >= 1  # zero empty visits
    assert np.all(out.visits_per_patient() >= 1)
    assert set(np.unique(out.sex)) <= {0, 1}  # a sex for every record ...
    assert np.all(np.isfinite(out.age_at_first_visit))  # ... an age bucket ...
    assert np.all(np.isfinite(out.visit_days))  # ... and a gap bin on every later visit: all dated
    # exactly one sex column, one age column and one gap column per row, read off the sampled ones
    layout = model.layout
    n_visits, patient, row, column = sample_batch(model.network, layout, np.arange(200), key=3, weights=fine_weights(model.fine))
    for a, b in layout.group_spans():
        in_group = (column >= a) & (column < b)
        per_row = Counter(zip(patient[in_group].tolist(), row[in_group].tolist()))
        expected = {(p, r) for p in range(200) for r in (range(3, n_visits[p] + 2) if a == layout.gap_start
                                                        else [1])}
        assert set(per_row) == expected and set(per_row.values()) == {1}

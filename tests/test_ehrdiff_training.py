"""EHRDiff trained for a few hundred steps on the OMOP GiBleed conditions (2,694 persons, 80 concepts) with the
shared training loop: fidelity of the generated prevalences (the paper's MLP and the default residual network),
classifier-free guidance, generated statics, and a save/load round trip of the trained model. About 40 s on one
core (2,400 training steps in all)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.models.ehrdiff import EHRDiffConfig, EHRDiffModel, EHRDiffSampling
from ehrsynth.models.io import load_model, save_model
from ehrsynth.training.loop import TrainConfig, train

GI_BLEED = "OMOP/192671"  # gastrointestinal hemorrhage, the condition the GiBleed extract is built around
NETWORK = dict(hidden_dims=(256, 128, 256), time_dim=128, fourier_dim=64)  # small: the test must run in seconds
TRAINING = TrainConfig(optimizer="adamw", lr=1e-3, batch_size=256, max_epochs=1000,
                       lr_schedule="cosine", warmup_fraction=0.05, ema_decay=0.99, eval_every=150,
                       checkpoint_every=10_000, log_every=100, seed=0, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def read_gibleed(directory) -> PatientCorpus:
    """GiBleed conditions as a corpus, plus a ``gi_bleed`` label (the person ever had GI hemorrhage)."""
    try:
        from ehrsynth.data.readers.omop import read_omop
    except ImportError:  # before the OMOP reader landed: build the same corpus from the condition table
        from ehrsynth.data.build import build_corpus

        events = pl.read_csv(directory / "condition_occurrence.csv.gz").select(
            pl.col("person_id").cast(pl.Int64).alias("patient"),
            pl.coalesce(pl.col("visit_occurrence_id").cast(pl.Int64).cast(pl.String),
                        pl.col("condition_start_date").cast(pl.String)).alias("visit"),
            pl.col("condition_start_date").str.to_datetime("%Y-%m-%d").alias("time"),
            (pl.lit("OMOP/") + pl.col("condition_concept_id").cast(pl.Int64).cast(pl.String)).alias("code"),
        )
        corpus = build_corpus(events, source="omop-gibleed")
    else:
        corpus = read_omop(directory)
    gi = corpus.vocab.index()[GI_BLEED]
    has_gi = corpus.patient_multi_hot(np.arange(corpus.n_patients))[:, [gi]].astype(np.uint8)
    return dataclasses.replace(corpus, labels=has_gi, label_names=("gi_bleed",))


@pytest.fixture(scope="module")
def gibleed(data_dir) -> PatientCorpus:
    return read_gibleed(data_dir / "omop-gibleed")


def train_model(corpus: PatientCorpus, config: EHRDiffConfig, run_dir, *, steps: int) -> EHRDiffModel:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = EHRDiffModel.from_corpus(corpus.part("train"), config)
        train(model, corpus.part("train"), corpus.part("val"), dataclasses.replace(TRAINING, max_steps=steps),
              run_dir)
    return load_model(run_dir / "model")  # the loop saves the EMA weights of the best validation step


@pytest.fixture(scope="module")
def plain_model(gibleed, tmp_path_factory) -> EHRDiffModel:
    """The paper's unconditional model, with the label and sex generated as extra columns. The sex columns (one
    categorical spread over two 0/1 columns) take longer to learn than the codes: 1,000 steps."""
    config = EHRDiffConfig(**NETWORK, denoiser="mlp", column_weight_power=0.0, model_statics=True)
    return train_model(gibleed, config, tmp_path_factory.mktemp("plain"), steps=1000)


@pytest.fixture(scope="module")
def residual_model(gibleed, tmp_path_factory) -> EHRDiffModel:
    """The default network (residual blocks, FiLM, column-weighted loss), three blocks, 800 steps."""
    config = EHRDiffConfig(hidden_dims=(256, 128, 128, 256), time_dim=128, fourier_dim=64)
    assert config.denoiser == "resnet" and config.column_weight_power == 0.5
    return train_model(gibleed, config, tmp_path_factory.mktemp("residual"), steps=800)


@pytest.fixture(scope="module")
def conditional_model(gibleed, tmp_path_factory) -> EHRDiffModel:
    # the residual network with the paper's uniform loss: in a run this short the default column weights (which
    # lower the weight of the common codes that go with the condition) leave the conditional effect too weak to
    # measure (share of the associated codes 0.20 conditioned on GI bleed against 0.20 unconditional)
    config = EHRDiffConfig(**NETWORK, conditional=True, column_weight_power=0.0)
    return train_model(gibleed, config, tmp_path_factory.mktemp("conditional"), steps=600)


def prevalence(corpus: PatientCorpus) -> np.ndarray:
    return corpus.patient_multi_hot(np.arange(corpus.n_patients)).mean(0)


def test_generated_prevalence_correlates_with_training_data(plain_model, gibleed):
    real = prevalence(gibleed.part("train"))
    synthetic = plain_model.generate(2000, seed=0)
    assert synthetic.label_names == ("gi_bleed",)  # generated, not conditioned
    r = np.corrcoef(real, prevalence(synthetic))[0, 1]
    assert r >= 0.95, f"prevalence Pearson r = {r:.3f}"
    # NZC: rounding loses the rarest codes (11 of the 80 are below 1% here); every code above 2% must appear
    common = real >= 0.02
    assert np.all(synthetic.vocab.counts[common] > 0), f"NZC = {int((synthetic.vocab.counts > 0).sum())}"
    real_size = gibleed.part("train").patient_multi_hot(np.arange(100)).sum(1).mean()
    assert 0.7 < synthetic.n_codes / synthetic.n_patients / real_size < 1.4


def test_residual_network_matches_the_real_patients_better_than_the_paper_mlp(residual_model, gibleed):
    # measured after this 800-step run (2 sampling seeds): prevalence r 0.9976-0.9979, codes per patient 11.85
    # (real 12.2), detection AUROC 0.71-0.72. The paper's MLP trained the same way: r 0.9935, 15.0 codes per
    # patient, AUROC 0.89 (and 0.73 with its own best settings, plain_model's)
    from ehrsynth.evaluation.fidelity import detection_auroc, prevalence_fidelity

    real = gibleed.part("train").flatten_visits()
    synthetic = residual_model.generate(real.n_patients, seed=0)
    assert prevalence_fidelity(real, synthetic).pearson >= 0.995
    size = synthetic.n_codes / synthetic.n_patients / (real.n_codes / real.n_patients)
    assert 0.92 < size < 1.08, f"codes per patient {size:.3f} x real"
    auroc = detection_auroc(real, synthetic, seed=0).auroc
    assert auroc <= 0.80, f"detection AUROC {auroc:.3f}"


def test_guidance_raises_the_codes_that_go_with_the_condition(conditional_model, gibleed):
    train_part = gibleed.part("train")
    x = train_part.patient_multi_hot(np.arange(train_part.n_patients))
    has = train_part.labels[:, 0] == 1
    associated = np.argsort(x[~has].mean(0) - x[has].mean(0))[:5]  # the 5 codes most raised by the condition
    assert GI_BLEED in [gibleed.vocab.codes[i] for i in associated]
    sampling = EHRDiffSampling(steps=16)

    def share(conditions=None, guidance=1.0):
        g = conditional_model.generate(1000, seed=1, conditions=conditions,
                                       sampling=dataclasses.replace(sampling, guidance=guidance))
        return prevalence(g)[associated].mean()

    unconditional = share()
    with_bleed, with_bleed_guided = share({"gi_bleed": "1"}), share({"label:gi_bleed": "1"}, guidance=2.0)
    without_bleed = share({"gi_bleed": "0"}, guidance=2.0)
    real_with, real_all = x[has][:, associated].mean(), x[:, associated].mean()
    assert with_bleed > unconditional + 0.5 * (real_with - real_all)  # conditioning moves towards P(code | bleed)
    assert with_bleed_guided > with_bleed + 0.05  # and guidance w = 2 pushes further
    assert without_bleed < unconditional - 0.02


def test_statics_are_generated_with_their_training_rates(plain_model, gibleed):
    synthetic = plain_model.generate(2000, seed=2)
    train_part = gibleed.part("train")
    assert synthetic.label_names == ("gi_bleed",)
    # a short run over-generates 0/1 columns a little (about 12.9 codes per patient against 12.2): 0.23 vs 0.18
    assert abs(synthetic.labels[:, 0].mean() - train_part.labels[:, 0].mean()) < 0.08
    assert abs((synthetic.sex == 1).mean() - (train_part.sex == 1).mean()) < 0.1
    assert (synthetic.sex < 0).mean() < 0.1
    # the generated label goes with the generated GI bleed code (in the data they are equal, phi = 1; this short
    # run gets about 0.3, a 4,000-step run about 0.9)
    gi = gibleed.vocab.index()[GI_BLEED]
    phi = np.corrcoef(synthetic.patient_multi_hot(np.arange(2000))[:, gi], synthetic.labels[:, 0])[0, 1]
    assert phi > 0.2, f"phi(label, code) = {phi:.2f}"


def test_trained_model_round_trip_and_determinism(conditional_model, tmp_path):
    sampling = EHRDiffSampling(steps=8)
    reference = conditional_model.generate(300, seed=5, conditions={"sex": "M"}, sampling=sampling)
    save_model(conditional_model, tmp_path / "again")
    loaded = load_model(tmp_path / "again")
    assert loaded.generate(300, seed=5, conditions={"sex": "M"}, sampling=sampling, batch_size=64).equals(reference)
    assert conditional_model.generate(300, seed=5, conditions={"sex": "M"}, sampling=sampling,
                                      batch_size=7).equals(reference)


def test_calibrated_thresholds_give_rare_codes_their_training_rate(residual_model, gibleed):
    # the loop calibrates the saved best model when training ends; rounding at 0.5 (the paper) makes the rare
    # codes at well under their rate. Measured here (4 x 1,940 samples): codes held by < 1% of the training
    # patients come out at 1.00 x their expected count calibrated against 0.15 x rounded; NZC 80 against 70
    from ehrsynth.evaluation.fidelity import prevalence_fidelity

    assert residual_model.is_calibrated
    train_part = gibleed.part("train")
    real = prevalence(train_part)
    rare = real < 0.01
    n = 4 * train_part.n_patients
    calibrated = residual_model.generate(n, seed=3)
    rounded_model = copy.deepcopy(residual_model)
    rounded_model.thresholds = None  # the reference's round(clip(x, 0, 1))
    rounded = rounded_model.generate(n, seed=3)
    ratio = {name: prevalence(g)[rare].sum() / real[rare].sum() for name, g in
             (("calibrated", calibrated), ("rounded", rounded))}
    assert 0.8 < ratio["calibrated"] < 1.2 and ratio["rounded"] < 0.7, ratio
    assert int((calibrated.vocab.counts > 0).sum()) == int((real > 0).sum()) == 80
    # one threshold per column moves no patient's ranking: co-occurrence and the whole profile stay as good
    flat = train_part.flatten_visits()
    assert prevalence_fidelity(flat, calibrated).pearson >= prevalence_fidelity(flat, rounded).pearson
    assert np.abs(prevalence(calibrated) - real).max() < 0.02

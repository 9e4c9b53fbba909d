"""DP-SGD mechanics: per-patient clipping, seeded noise, the RDP accountant and its resumable state
(ehrsynth/training/dp.py; the loop does not call it yet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ehrsynth.errors import ConfigError
from ehrsynth.models.halo.model import HaloConfig, HaloModel
from ehrsynth.training import dp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(mimic3_corpus):
    train = mimic3_corpus.part("train")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = HaloModel.from_corpus(train, HaloConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=20))
    return model, train


def _one_patient_gradient(model, corpus, patient: int) -> list[torch.Tensor]:
    model.zero_grad()
    model.loss(model.collate(corpus, np.array([patient]))).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_clipped_sum_equals_gradients_one_patient_at_a_time(setup):
    model, train = setup
    patients = np.array([0, 17, 40])
    singles = [_one_patient_gradient(model, train, p) for p in patients]
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) for grads in singles]
    for bound in (1e6, 0.5 * min(norms)):  # no clipping, then every patient clipped
        total, got_norms = dp.clipped_gradient_sum(model, train, patients, bound)
        np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
        for k, t in enumerate(total):
            expected = sum(g[k] * min(1.0, bound / n) for g, n in zip(singles, norms))
            torch.testing.assert_close(t, expected, atol=1e-5, rtol=1e-5)
    assert float(torch.sqrt(sum(t.pow(2).sum() for t in total))) <= 3 * 0.5 * min(norms) + 1e-5


def test_noise_comes_from_the_passed_generator(setup):
    model, train = setup
    config = dp.DPConfig(epsilon=10.0, max_grad_norm=1.0)

    def step(seed: int) -> list[torch.Tensor]:
        accountant = dp.PrivacyAccountant(q=0.2, noise_multiplier=1.0, delta=1e-3)
        assert dp.dp_step(model, train, 8, config, accountant, torch.Generator().manual_seed(seed))  # 8 patients
        assert accountant.steps == 1
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    a, b, c = step(1), step(1), step(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_accountant_matches_the_library_and_resumes():
    from dp_accounting import dp_event, rdp

    library = rdp.RdpAccountant()
    library.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 1000)
    accountant = dp.PrivacyAccountant(q=0.01, noise_multiplier=1.1, delta=1e-5)
    for _ in range(1000):
        accountant.step()
    assert accountant.epsilon() == pytest.approx(library.get_epsilon(1e-5), abs=1e-12)
    assert accountant.epsilon() == pytest.approx(1.7118, abs=1e-3)  # Abadi et al.'s MNIST setting, RDP bound
    resumed = dp.PrivacyAccountant.from_state_dict(accountant.state_dict())
    assert resumed.steps == 1000 and resumed.epsilon() == accountant.epsilon()
    sigma = dp.noise_multiplier_for(2.0, 1e-5, 0.01, 1000, tolerance=0.01)
    assert dp.rdp_epsilon(0.01, sigma, 1000, 1e-5) <= 2.0 < dp.rdp_epsilon(0.01, sigma - 0.02, 1000, 1e-5)
    assert dp.default_delta(1000) == pytest.approx(1000 ** -1.1)


def test_budget_is_never_exceeded(setup):
    model, train = setup
    config = dp.DPConfig(epsilon=1.0)
    spent = dp.PrivacyAccountant(q=0.5, noise_multiplier=0.8, delta=1e-3)
    while spent.epsilon(spent.steps + 1) <= 1.0:
        spent.step()
    before = [p.detach().clone() for p in model.parameters()]
    assert dp.dp_step(model, train, train.n_patients, config, spent, torch.Generator().manual_seed(0)) is None
    assert spent.epsilon() <= 1.0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ConfigError, match="--dp-epsilon"):
        dp.DPConfig(epsilon=0)
    with pytest.raises(ConfigError, match="cannot be met"):
        dp.noise_multiplier_for(0.01, 1e-5, 1.0, 10_000)


def test_training_loop_hook_spends_and_resumes(mimic3_corpus, tmp_path):
    """train_model with dp_epsilon: epsilon spent lands in model.json, never above the target; a resumed run
    keeps the saved account (its noise is not re-planned) and refuses the step that would exceed the target."""
    import json

    from ehrsynth.pipeline import train_model

    tiny = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_ctx": 20}
    options = {"batch_size": 4, "max_steps": 4, "eval_every": 2, "checkpoint_every": 2, "dp_epsilon": 8.0,
               "device": "cpu", "seed": 3}
    whole = train_model("halo", mimic3_corpus, tmp_path / "a", model_options=tiny, training_options=options,
                        progress=False)
    assert whole.steps == 4
    spent = json.loads((tmp_path / "a" / "model" / "model.json").read_text())["meta"]["extra"]["dp"]
    assert spent["privacy_unit"] == "patient" and spent["steps"] in (2, 4)  # the best validated model's step
    assert 0 < spent["epsilon_spent"] <= 8.0 and spent["sampling_rate"] == pytest.approx(4 / 72)
    train_model("halo", mimic3_corpus, tmp_path / "b", model_options=tiny,
                training_options={**options, "max_steps": 2}, progress=False)
    loop = json.loads((tmp_path / "b" / "checkpoint" / "loop.json").read_text())
    assert loop["dp"]["steps"] == 2
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["training"]["max_steps"] = 4
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    again = train_model("halo", mimic3_corpus, tmp_path / "b", model_options=tiny, training_options=options,
                        resume=True, progress=False)
    resumed = json.loads((tmp_path / "b" / "checkpoint" / "loop.json").read_text())["dp"]
    assert resumed == loop["dp"]  # the noise was planned to spend epsilon 8 in 2 steps: a third would exceed it
    assert again.steps == 2 and again.stopped_early
    assert resumed["noise_multiplier"] < json.loads((tmp_path / "a" / "checkpoint" / "loop.json").read_text())[
        "dp"]["noise_multiplier"]  # 4 planned steps need more noise than 2


def test_dp_ehrdiff_does_not_calibrate_to_the_training_prevalence(mimic3_corpus, tmp_path):
    """Calibrated thresholds would give the generated codes the (non-private) training prevalence: under DP-SGD
    EHRDiff rounds at 0.5 unless the user asks for calibration; without DP it calibrates when training ends."""
    import json

    from click.testing import CliRunner

    from ehrsynth.cli import cli
    from ehrsynth.models.io import load_model
    from ehrsynth.pipeline import train_model

    tiny = {"hidden_dims": [16, 8, 16], "time_dim": 8, "fourier_dim": 4, "calibration_samples": 256}
    options = {"batch_size": 8, "max_steps": 2, "eval_every": 2, "device": "cpu", "seed": 1}
    private = train_model("ehrdiff", mimic3_corpus, tmp_path / "dp", model_options=tiny,
                          training_options={**options, "dp_epsilon": 8.0}, progress=False)
    assert private.steps == 2
    model = load_model(tmp_path / "dp")
    assert model.config.calibrate is False and model.thresholds is None and not model.is_calibrated
    asked = train_model("ehrdiff", mimic3_corpus, tmp_path / "asked", model_options={**tiny, "calibrate": True},
                        training_options={**options, "dp_epsilon": 8.0}, progress=False)
    assert asked.steps == 2 and load_model(tmp_path / "asked").is_calibrated
    train_model("ehrdiff", mimic3_corpus, tmp_path / "plain", model_options=tiny, training_options=options,
                progress=False)
    plain = load_model(tmp_path / "plain")
    assert plain.config.calibrate is True and plain.is_calibrated  # fitted as training ended
    corpus = str(mimic3_corpus.save(tmp_path / "corpus"))
    shown = CliRunner().invoke(cli, ["train", "ehrdiff", "--data", corpus, "--out", str(tmp_path / "run"),
                                     "--dp-epsilon", "3", "--dry-run"])
    assert shown.exit_code == 0 and json.loads(shown.output)["model"]["calibrate"] is False


def test_ehrdiff_vectorised_clipping_equals_one_patient_at_a_time(mimic3_corpus):
    """EHRDiff's per-patient gradients come from torch.func (vmap of grad) in chunks; with the same drawn noise
    they equal gradients taken one patient at a time, clipped, to 1e-5; and each patient gets its own draw."""
    from ehrsynth.models.ehrdiff.model import EHRDiffConfig, EHRDiffModel

    train = mimic3_corpus.part("train")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = EHRDiffModel.from_corpus(train, EHRDiffConfig(hidden_dims=(32, 16, 32), time_dim=16, fourier_dim=8))
    model.train()
    patients = np.array([0, 5, 17, 40, 41])
    drawn = model.draw_training_noise(model.collate(train, patients), torch.Generator().manual_seed(4))
    assert len(set(drawn["sigma"].tolist())) == len(patients)  # not one shared noise level
    singles = []
    for i in range(len(patients)):
        model.zero_grad()
        model({k: v[i:i + 1] for k, v in drawn.items()}).backward()
        singles.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) for grads in singles]
    for bound in (1e6, 0.5 * min(norms)):
        total, got = dp._vectorised_clipped_sum(model, drawn, bound, chunk=2)  # chunks of 2, 2, 1 rows
        np.testing.assert_allclose(got, norms, rtol=1e-5)
        for k, t in enumerate(total):
            expected = sum(g[k] * min(1.0, bound / n) for g, n in zip(singles, norms))
            torch.testing.assert_close(t, expected, atol=1e-5, rtol=1e-5)


def test_report_shows_the_epsilon_spent(mimic3_corpus, tmp_path):
    """evaluate --model on a DP run: metrics.json and report.html carry the spent epsilon; without --model the
    entry says "not applicable" (never a number)."""
    import json

    from ehrsynth.pipeline import evaluate_to, generate_corpus, train_model

    options = {"batch_size": 8, "max_steps": 2, "dp_epsilon": 5.0, "device": "cpu", "seed": 0}
    train_model("halo", mimic3_corpus, tmp_path / "run", model_options={"n_layer": 1, "n_head": 2, "n_embd": 16,
                                                                        "n_ctx": 20},
                training_options=options, progress=False)
    synthetic = generate_corpus(tmp_path / "run", 30, seed=0, progress=False)
    train, test = mimic3_corpus.part("train"), mimic3_corpus.part("test")
    evaluate_to(train, test, synthetic, tmp_path / "report", model_dir=tmp_path / "run", bootstrap=0, privacy_n=50)
    spent = json.loads((tmp_path / "run" / "model" / "model.json").read_text())["meta"]["extra"]["dp"]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["differential_privacy"]["epsilon_spent"] == spent["epsilon_spent"]
    assert 0 < spent["epsilon_spent"] <= 5.0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Differential privacy: epsilon spent" in page and f"{spent['epsilon_spent']:.3f}" in page
    evaluate_to(train, test, synthetic, tmp_path / "plain", bootstrap=0, privacy_n=50)
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["differential_privacy"]
    assert plain["epsilon_spent"] is None and "no --model" in plain["not_applicable"]

"""EHRDiff unit tests: EDM preconditioning, loss, schedule and Heun sampler against closed forms and an analytic
denoiser; the network on any vocabulary size; the model's collate, conditions, determinism and save/load.
Fast (no training): see test_ehrdiff_training.py for trained-model checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ehrsynth.errors import ConfigError
from ehrsynth.models import model_class
from ehrsynth.models.base import CorpusMeta
from ehrsynth.models.ehrdiff import (
    EDMLoss,
    EDMPrecond,
    EHRDiffConfig,
    EHRDiffModel,
    EHRDiffSampling,
    MLPDenoiser,
    ResidualDenoiser,
    binarize,
    calibrated_thresholds,
    edm_coefficients,
    edm_loss_weight,
    edm_sigma_schedule,
    guided_denoiser,
    heun_sampler,
    per_sample_noise,
)
from ehrsynth.models.ehrdiff.network import count_parameters
from ehrsynth.models.io import load_model, save_model

SIGMAS = [0.002, 0.02, 0.14, 0.5, 1.0, 3.7, 80.0]
TINY = EHRDiffConfig(hidden_dims=(32, 16, 32), time_dim=16, fourier_dim=8, model_statics=False)  # the code columns only


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- preconditioning and loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_data", [0.14, 0.5])
def test_edm_coefficients_match_closed_forms(sigma_data):
    for s in SIGMAS:
        c_skip, c_out, c_in, c_noise = (float(c) for c in edm_coefficients(torch.tensor(s, dtype=torch.float64),
                                                                             sigma_data))
        assert c_skip == pytest.approx(sigma_data**2 / (s**2 + sigma_data**2), rel=1e-12)
        assert c_out == pytest.approx(s * sigma_data / math.sqrt(s**2 + sigma_data**2), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(s**2 + sigma_data**2), rel=1e-12)
        assert c_noise == pytest.approx(math.log(s) / 4, rel=1e-12)
        weight = float(edm_loss_weight(torch.tensor(s, dtype=torch.float64), sigma_data))
        assert weight == pytest.approx((s**2 + sigma_data**2) / (s * sigma_data) ** 2, rel=1e-12)
        assert weight == pytest.approx(1 / c_out**2, rel=1e-12)  # unit effective weight on F's target


class RecordingNet(torch.nn.Module):
    """F(x_in, c_noise) = 2 x_in + 1, remembering its inputs."""

    def forward(self, x_in, c_noise, label=None):
        self.x_in, self.c_noise, self.label = x_in, c_noise, label
        return 2 * x_in + 1


def test_precond_applies_edm_table_1_at_several_sigmas():
    sd = 0.14
    net = RecordingNet()
    precond = EDMPrecond(net, sd)
    x = torch.randn(len(SIGMAS), 5)
    sigma = torch.tensor(SIGMAS)
    out = precond(x, sigma)
    for i, s in enumerate(SIGMAS):
        c_in = 1 / math.sqrt(s**2 + sd**2)
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
        torch.testing.assert_close(net.x_in[i], c_in * x[i], rtol=1e-5, atol=1e-6)
        assert float(net.c_noise[i]) == pytest.approx(math.log(s) / 4, rel=1e-5)
        torch.testing.assert_close(out[i], c_skip * x[i] + c_out * (2 * c_in * x[i] + 1), rtol=1e-5, atol=1e-6)
    # a scalar sigma is broadcast to every row
    out_scalar = precond(x, torch.tensor(0.5))
    assert out_scalar.shape == x.shape and net.c_noise.shape == (len(SIGMAS),)


def test_edm_loss_exact_value_with_given_sigma_and_noise():
    sd = 0.2
    x = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    noise = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]])
    sigma = torch.tensor([0.3, 1.5])
    denoiser = lambda x_noisy, s, label: 0.5 * x_noisy  # noqa: E731 - a denoiser we can compute by hand
    loss = EDMLoss(sd)(denoiser, x, sigma=sigma, noise=noise)
    for i in range(2):
        s = float(sigma[i])
        expected = (s**2 + sd**2) / (s * sd) ** 2 * (0.5 * (x[i] + s * noise[i]) - x[i]) ** 2
        torch.testing.assert_close(loss[i], expected)


def test_edm_loss_draws_ln_sigma_from_n_minus_1_2_1_2():
    seen = []
    torch.manual_seed(0)
    EDMLoss(0.14)(lambda x, s, label: seen.append(s) or x, torch.zeros(20_000, 1))
    log_sigma = seen[0].log()
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.03)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.03)


# ---- schedule and sampler ---------------------------------------------------------------------------------------
def test_edm_sigma_schedule_is_eq_5():
    s = edm_sigma_schedule(32, 0.02, 80.0, 7.0)
    assert s.shape == (33,) and s.dtype == torch.float64
    assert float(s[0]) == pytest.approx(80.0) and float(s[31]) == pytest.approx(0.02) and float(s[32]) == 0.0
    assert bool((s[1:] < s[:-1]).all())
    i = 10
    expected = (80 ** (1 / 7) + i / 31 * (0.02 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(s[i]) == pytest.approx(expected, rel=1e-12)
    assert edm_sigma_schedule(1).tolist() == [80.0, 0.0]


def ideal_denoiser(points: torch.Tensor):
    """The exact D(x; s) = E[y | x] for data uniform on ``points``: a softmax(-|x - y|^2 / 2s^2)-weighted mean."""

    def denoise(x, sigma):
        d2 = torch.cdist(x, points.to(x.dtype)) ** 2  # (B, K)
        return torch.softmax(-d2 / (2 * sigma**2), dim=1) @ points.to(x.dtype)

    return denoise


def test_heun_sampler_lands_on_the_data_points():
    points = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.float64)
    calls = []
    base = ideal_denoiser(points)
    denoise = lambda x, s: calls.append(1) or base(x, s)  # noqa: E731
    latents = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = heun_sampler(denoise, latents, edm_sigma_schedule(32))
    assert len(calls) == 63  # 32 Heun steps, the last one Euler
    distance, nearest = torch.cdist(x, points).min(dim=1)
    assert float(distance.max()) < 1e-6  # every sample is one of the data points
    share = torch.bincount(nearest, minlength=4).double() / len(x)
    assert float((share - 0.25).abs().max()) < 0.04  # and the points are hit equally often


def test_heun_sampler_converges_at_second_order_on_a_gaussian():
    # data N(0, c^2): D(x; s) = c^2 / (c^2 + s^2) x, and the ODE dx/ds = s x / (c^2 + s^2) has the exact solution
    # x(s) proportional to sqrt(c^2 + s^2), so x(0) = x(s_max) c / sqrt(c^2 + s_max^2)
    c = 0.7
    latents = torch.randn(100, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = c * latents.double() * 80 / math.sqrt(80**2 + c**2)
    errors = []
    for steps in (16, 32, 64):
        x = heun_sampler(lambda x, s: c**2 / (c**2 + s**2) * x, latents, edm_sigma_schedule(steps))
        errors.append(float(((x - exact) / exact).abs().max()))
    assert errors[1] < 0.02  # 1.1% at the paper's 32 steps
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5  # about 4x per doubling: second order


def test_guided_denoiser_formula():
    def denoiser(x, sigma, label):  # returns the label value, or -1 without a label
        return x * 0 + (label.float().sum(1, keepdim=True) if label is not None else -1)

    x, sigma = torch.zeros(3, 2), torch.tensor(1.0)
    label = torch.tensor([[1], [0], [1]])
    d_cond, d_uncond = label.float().expand(3, 2), torch.full((3, 2), 2.0)  # the null value is 2
    for w in (0.0, 1.0, 2.5):
        torch.testing.assert_close(guided_denoiser(denoiser, label, w)(x, sigma), d_uncond + w * (d_cond - d_uncond))
    torch.testing.assert_close(guided_denoiser(denoiser, None, 3.0)(x, sigma), torch.full((3, 2), -1.0))


def test_binarize_rounds_the_clipped_value():
    x = torch.tensor([[-0.3, 0.2, 0.49, 0.5, 0.51, 1.7]])
    assert binarize(x).tolist() == [[False, False, False, False, True, True]]
    assert binarize(x, torch.full((6,), 0.5)).tolist() == binarize(x).tolist()  # a threshold of 0.5 is rounding
    assert binarize(x, torch.tensor([-0.4, 0.3, 0.3, 0.6, float("inf"), -float("inf")])).tolist() == [
        [True, False, True, False, False, True]]


def test_calibrated_thresholds_leave_the_target_share_above_them():
    rng = np.random.default_rng(0)
    samples = rng.beta(0.3, 2.0, size=(5000, 6)).astype(np.float32)  # skewed towards 0, as rare codes' samples
    target = np.array([0.0005, 0.01, 0.2, 0.5, 0.0, 1.0])
    thresholds = calibrated_thresholds(samples, target)
    share = (samples > thresholds).mean(0)
    np.testing.assert_allclose(share[:4], target[:4], atol=0.5 / 5000)  # within one sample of the target
    assert thresholds[4] == np.inf and thresholds[5] == -np.inf and share[4] == 0 and share[5] == 1
    assert np.all(np.diff(calibrated_thresholds(samples[:, [0] * 4], np.array([0.4, 0.3, 0.2, 0.1]))) > 0)
    with pytest.raises(ConfigError, match="samples and"):
        calibrated_thresholds(samples[:1], target)


def test_an_uncalibrated_model_calibrates_once_before_it_samples(mimic3_corpus, capsys):
    # a run killed before training ended saves uncalibrated thresholds: generation fits them first, deterministically
    torch.manual_seed(0)
    config = EHRDiffConfig(hidden_dims=(32, 16, 32), time_dim=16, fourier_dim=8, calibration_samples=1024)
    model = EHRDiffModel.from_corpus(mimic3_corpus, config)
    twin = EHRDiffModel.from_corpus(mimic3_corpus, config)
    twin.load_state_dict(model.state_dict())
    assert not model.is_calibrated and model.thresholds.tolist() == [0.5] * model.dim
    first = model.generate(30, seed=1, sampling=FAST)
    assert "calibrating the binarisation thresholds" in capsys.readouterr().err
    assert model.is_calibrated
    twin.calibrate()
    assert torch.equal(twin.thresholds, model.thresholds)
    assert twin.generate(30, seed=1, sampling=FAST).equals(first)
    assert model.generate(30, seed=1, sampling=FAST).equals(first) and capsys.readouterr().err == ""
    # the thresholds target the training prevalence of every code and the labels; sex has its own rule
    from ehrsynth.models.ehrdiff.model import CALIBRATION_SEED

    samples = model._continuous_samples(0, 1024, CALIBRATION_SEED, None, edm_sigma_schedule(32), EHRDiffSampling())
    share = (samples > model.thresholds).float().mean(0).numpy()[:-2]
    means = np.asarray(model.meta.extra["column_means"])[:-2]
    np.testing.assert_allclose(share, means, atol=1.0 / 1024)
    assert model.thresholds[-2:].tolist() == [0.5, 0.5]


def test_per_sample_noise_does_not_depend_on_chunking():
    whole = per_sample_noise(3, 0, 700, 4)
    parts = torch.cat([per_sample_noise(3, a, min(a + 97, 700), 4) for a in range(0, 700, 97)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, per_sample_noise(4, 0, 700, 4))
    assert float(whole.mean()) == pytest.approx(0, abs=0.1) and float(whole.std()) == pytest.approx(1, abs=0.1)
    with pytest.raises(ConfigError, match="seed"):
        per_sample_noise(-1, 0, 5, 4)


# ---- network ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", [MLPDenoiser, ResidualDenoiser])
@pytest.mark.parametrize("dim", [1, 7, 80, 581, 1783])
def test_network_works_for_any_vocabulary_size(dim, network):
    net = network(dim, (32, 16, 32), time_dim=16, fourier_dim=8, n_attributes=2)
    x, c_noise = torch.randn(5, dim), torch.randn(5)
    assert net(x, c_noise).shape == (5, dim)
    assert net(x, c_noise, torch.tensor([[0, 1]] * 5)).shape == (5, dim)


def test_paper_network_has_the_papers_size():
    # D -> 1024 -> 384 -> 384 -> 384 -> 1024 -> D with time injected in every block; the reference embedded
    # time with a D-wide sinusoid, which gives the paper's ~7.5M parameters at D = 1,782
    meta = CorpusMeta(codes=tuple(f"X/{i}" for i in range(1782)), extra={"sigma_data": 0.14})
    paper = EHRDiffModel(EHRDiffConfig(denoiser="mlp", fourier_dim=1782, column_weight_power=0.0), meta)
    assert count_parameters(paper) == pytest.approx(7.5e6, rel=0.01)


def test_residual_network_layout_and_zero_start():
    net = ResidualDenoiser(80, (64, 16, 24, 64), time_dim=16, fourier_dim=8)
    assert [(m.in_features, m.out_features) for m in net.up] == [(64, 16), (64, 24)]  # one block per middle width
    assert [m.out_features for m in net.time_proj] == [64, 32, 48]  # the stream's, then (scale, shift) per block
    x, c_noise = torch.randn(5, 80), torch.randn(5)
    assert torch.equal(net(x, c_noise), torch.zeros(5, 80))  # F starts at 0: D(x) = c_skip x
    assert [m.in_features for m in ResidualDenoiser(3, (8,), time_dim=4, fourier_dim=2).up] == [8]
    with pytest.raises(ConfigError, match="hidden_dims.*first and last"):
        EHRDiffConfig(hidden_dims=(64, 16, 32))
    with pytest.raises(ConfigError, match="denoiser must be one of"):
        EHRDiffConfig(denoiser="unet")
    assert EHRDiffConfig(denoiser="mlp", hidden_dims=(64, 16, 32)).denoiser == "mlp"  # the MLP takes any widths


@pytest.mark.parametrize("network", [MLPDenoiser, ResidualDenoiser])
def test_eval_mode_shares_the_time_projection_without_changing_results(network):
    torch.manual_seed(0)
    net = network(9, (32, 16, 32), time_dim=16, fourier_dim=8, n_attributes=1)
    torch.nn.init.normal_(net.label_embedding.weight)
    for p in net.parameters():  # move the zero-initialised layers so every path matters
        torch.nn.init.normal_(p, std=0.3) if p.ndim > 1 else torch.nn.init.normal_(p, std=0.1)
    x, c_noise = torch.randn(6, 9), torch.tensor([0.3] * 3 + [-0.2] * 3)
    label = torch.tensor([[0], [2], [0], [1], [1], [2]])
    train_out = net.train()(x, c_noise, label)
    torch.testing.assert_close(net.eval()(x, c_noise, label), train_out, rtol=1e-5, atol=1e-6)
    same_sigma, same_label = torch.full((6,), 0.3), torch.ones(6, 1, dtype=torch.int64)  # the one-row fast path
    train_out = net.train()(x, same_sigma, same_label)
    torch.testing.assert_close(net.eval()(x, same_sigma, same_label), train_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("network", [MLPDenoiser, ResidualDenoiser])
def test_untrained_conditional_model_equals_unconditional(network):
    torch.manual_seed(0)
    net = network(9, (32,), time_dim=16, fourier_dim=8, n_attributes=2)
    x, c_noise = torch.randn(4, 9), torch.randn(4)
    torch.testing.assert_close(net(x, c_noise, torch.tensor([[0, 1]] * 4)), net(x, c_noise, None))


# ---- model ------------------------------------------------------------------------------------------------------
def test_registry_finds_ehrdiff():
    assert model_class("ehrdiff") is EHRDiffModel


def test_sigma_data_is_estimated_from_the_training_split(mimic3_corpus):
    model = EHRDiffModel.from_corpus(mimic3_corpus, TINY)
    train = np.flatnonzero(mimic3_corpus.split == 0)
    x = mimic3_corpus.patient_multi_hot(train)
    assert model.meta.extra["data_density"] == pytest.approx(float(x.mean()))
    assert model.sigma_data == pytest.approx(float(x.std()))  # sqrt(p (1 - p)) is the std of 0/1 entries
    assert model.meta.extra["sigma_data"] == model.sigma_data
    fixed = EHRDiffModel.from_corpus(mimic3_corpus, EHRDiffConfig(hidden_dims=(8,), sigma_data=0.14))
    assert fixed.sigma_data == 0.14 and fixed.meta.extra["sigma_data_source"] == "config"


def test_collate_with_statics_and_labels(mimic3_corpus):
    config = EHRDiffConfig(hidden_dims=(8,), model_statics=True, conditional=True)
    model = EHRDiffModel.from_corpus(mimic3_corpus, config)
    patients = np.arange(10)
    batch = model.collate(mimic3_corpus, patients)
    v = mimic3_corpus.vocab_size
    assert batch["x"].shape == (10, v + 3) and batch["x"].dtype == torch.float32
    assert np.array_equal(batch["x"][:, :v].numpy(), mimic3_corpus.patient_multi_hot(patients))
    assert np.array_equal(batch["x"][:, v].numpy(), mimic3_corpus.labels[patients, 0])
    sex = mimic3_corpus.sex[patients]
    assert np.array_equal(batch["x"][:, v + 1:].numpy(), np.stack([sex == 0, sex == 1], 1))
    assert batch["label"].dtype == torch.int64
    assert np.array_equal(batch["label"].numpy(), np.stack([mimic3_corpus.labels[patients, 0],
                                                            np.where(sex < 0, 2, sex)], 1))
    loss = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()


def test_config_and_condition_errors_name_the_parameter(mimic3_corpus):
    with pytest.raises(ConfigError, match="fourier_dim"):
        EHRDiffConfig(fourier_dim=7)
    with pytest.raises(ConfigError, match="hidden_dims"):
        EHRDiffConfig(hidden_dims=())
    with pytest.raises(ConfigError, match="label_dropout"):
        EHRDiffConfig(label_dropout=1.0)
    with pytest.raises(ConfigError, match="sigma_data"):
        EHRDiffModel(TINY, CorpusMeta(codes=("X/1",)))
    with pytest.raises(ConfigError, match="steps"):
        EHRDiffSampling(steps=0)
    plain = EHRDiffModel.from_corpus(mimic3_corpus, TINY)
    with pytest.raises(ConfigError, match="conditional=True"):
        plain.generate(2, conditions={"mortality": "1"})
    cond = EHRDiffModel.from_corpus(mimic3_corpus, EHRDiffConfig(hidden_dims=(8,), conditional=True))
    with pytest.raises(ConfigError, match="'age'"):
        cond.generate(2, conditions={"age": "1"})
    with pytest.raises(ConfigError, match="'0' or '1'"):
        cond.generate(2, conditions={"mortality": "yes"})
    with pytest.raises(ConfigError, match="sex"):
        cond.generate(2, conditions={"sex": "X"})
    with pytest.raises(ConfigError, match="seed"):
        plain.generate(2, seed=-1)
    with pytest.raises(ConfigError, match="batch_size"):
        plain.iter_generate(2, batch_size=0)


@pytest.fixture(scope="module", params=["resnet", "mlp"])
def tiny_model(mimic3_corpus, request):
    torch.manual_seed(0)
    config = EHRDiffConfig(denoiser=request.param, hidden_dims=(32, 16, 32), time_dim=16, fourier_dim=8,
                           model_statics=True, conditional=True)
    model = EHRDiffModel.from_corpus(mimic3_corpus, config)
    with torch.no_grad():  # the residual network's output layers start at zero: give them weights to test with
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


FAST = EHRDiffSampling(steps=6)


def test_generated_corpus_shape(tiny_model, mimic3_corpus):
    g = tiny_model.generate(40, seed=1, sampling=FAST)
    assert g.n_patients == 40 and g.n_visits == 40
    assert np.array_equal(g.visits_per_patient(), np.ones(40))
    assert np.all(g.visit_days == 0) and np.all(np.isnat(g.visit_start))
    assert g.vocab.codes == mimic3_corpus.vocab.codes
    assert np.array_equal(g.vocab.counts, np.bincount(g.codes, minlength=g.vocab_size))
    assert np.all(g.split == 0) and g.label_names == ("mortality",) and g.labels.shape == (40, 1)
    assert set(np.unique(g.sex)) <= {-1, 0, 1}
    fixed = tiny_model.generate(20, seed=1, conditions={"label:mortality": "1", "sex": "F"}, sampling=FAST)
    assert np.all(fixed.labels == 1) and np.all(fixed.sex == 0)


def test_same_seed_same_patients_whatever_the_chunk_size(tiny_model):
    reference = tiny_model.generate(75, seed=7, sampling=FAST, batch_size=1024)
    for batch_size in (1, 16, 33):
        other = tiny_model.generate(75, seed=7, sampling=FAST, batch_size=batch_size)
        assert other.equals(reference)
    assert not tiny_model.generate(75, seed=8, sampling=FAST).equals(reference)
    # the stream yields the same patients, chunk by chunk
    chunks = list(tiny_model.iter_generate(75, seed=7, sampling=FAST, batch_size=30))
    assert [c.n_patients for c in chunks] == [30, 30, 15]
    stacked = np.concatenate([c.patient_multi_hot(np.arange(c.n_patients)) for c in chunks])
    assert np.array_equal(stacked, reference.patient_multi_hot(np.arange(75)))
    assert np.array_equal(np.concatenate([c.patient_ids for c in chunks]), reference.patient_ids)


def test_save_load_round_trip_gives_identical_output(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, EHRDiffModel) and loaded.sigma_data == tiny_model.sigma_data
    assert loaded.config == tiny_model.config
    for conditions in (None, {"mortality": "0"}):
        assert loaded.generate(25, seed=3, conditions=conditions, sampling=FAST).equals(
            tiny_model.generate(25, seed=3, conditions=conditions, sampling=FAST))


def test_column_weights_raise_rare_columns(mimic3_corpus):
    from ehrsynth.models.ehrdiff.model import column_means
    from ehrsynth.models.ehrdiff.network import column_weights

    means = np.array([0.5, 0.1, 0.01, 0.0])
    variance = np.array([0.25, 0.09, 0.0099, 1e-4])  # p (1 - p), floored at 1e-4
    for power in (0.5, 1.0):
        expected = (variance.mean() / variance) ** power
        np.testing.assert_allclose(column_weights(means, power), expected / expected.mean())
    np.testing.assert_allclose(column_weights(means, 0.0), np.ones(4))
    model = EHRDiffModel.from_corpus(mimic3_corpus, TINY)
    train = mimic3_corpus.patient_multi_hot(np.flatnonzero(mimic3_corpus.split == 0))
    np.testing.assert_allclose(model.meta.extra["column_means"], train.mean(0), atol=1e-6)
    np.testing.assert_allclose(model.column_weight.numpy(), column_weights(train.mean(0), 0.5), rtol=1e-4)
    assert column_means(mimic3_corpus, model_statics=True).shape == (mimic3_corpus.vocab_size + 3,)
    with pytest.raises(ConfigError, match="column_weight_power needs the training column means"):
        EHRDiffModel(TINY, CorpusMeta(codes=("X/1",), extra={"sigma_data": 0.1}))
    with pytest.raises(ConfigError, match="column_weight_power must be in"):
        EHRDiffConfig(column_weight_power=-1)


def test_model_saved_before_the_denoiser_option_loads_as_the_mlp(mimic3_corpus, tmp_path):
    import json

    torch.manual_seed(0)
    mlp = EHRDiffModel.from_corpus(mimic3_corpus, EHRDiffConfig(denoiser="mlp", hidden_dims=(32, 16), time_dim=16,
                                                                fourier_dim=8, column_weight_power=0.0,
                                                                calibrate=False))
    save_model(mlp, tmp_path / "old")
    header = json.loads((tmp_path / "old" / "model.json").read_text())
    del header["config"]["denoiser"]  # what a model saved before the options looks like
    del header["config"]["column_weight_power"]
    del header["config"]["calibrate"], header["config"]["calibration_samples"]
    (tmp_path / "old" / "model.json").write_text(json.dumps(header))
    loaded = load_model(tmp_path / "old")
    assert loaded.config.denoiser == "mlp" and isinstance(loaded.denoiser.net, MLPDenoiser)
    assert loaded.config.column_weight_power == 0.0
    assert loaded.config.calibrate is False and loaded.thresholds is None  # rounds at 0.5, as it did
    assert loaded.generate(20, seed=2, sampling=FAST).equals(mlp.generate(20, seed=2, sampling=FAST))
    assert EHRDiffConfig().denoiser == "resnet"  # while a new config gets the residual network, weighted loss
    assert EHRDiffConfig().column_weight_power == 0.5
    assert EHRDiffConfig().calibrate is True


def test_default_train_config_is_the_papers():
    from ehrsynth.training.loop import TrainConfig

    cfg = EHRDiffModel.default_train_config()
    assert cfg["optimizer"] == "adamw" and cfg["lr"] == 3e-4 and cfg["batch_size"] == 1024
    assert cfg["lr_schedule"] == "cosine" and 0 < cfg["warmup_fraction"] < 1 and cfg["ema_decay"] == 0.999
    TrainConfig(**cfg)  # every key is a TrainConfig field

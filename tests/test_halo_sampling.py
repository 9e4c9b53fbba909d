"""HALO sampling and likelihood: exactness against the enumerated record distribution (chi-square),
conditioning, seeding, batch/chunk invariance, save/load, pass counts, and scoring by typed code."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from ehrsynth.data.corpus import PatientCorpus, empty_statics
from ehrsynth.data.vocab import Vocabulary
from ehrsynth.errors import ConfigError
from ehrsynth.models.base import CorpusMeta
from ehrsynth.models.halo import HaloConfig, HaloModel, PassCounts, bin_index, sample, sample_batch
from ehrsynth.models.halo.network import fine_weights
from ehrsynth.models.io import load_model, save_model

N_SAMPLES = 20_000


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(*, n_codes: int = 4, labels=("y",), sex=False, age=(), gaps=(0.0, 30.0), seed=0,
               fine_hidden=None, fine_head="made_direct", seen_codes=None, clock=None, history_input=None,
               **structure) -> HaloModel:
    """A random HALO small enough to enumerate: n_ctx 5 = start, static, 2 visits, end. Its weights are
    scaled up so the record distribution is far from uniform and history matters; ``structure`` sets the
    layout's validity flags (unknown sex/age/gap, empty visits, records without visits)."""
    meta = CorpusMeta(codes=tuple(f"X/{i}" for i in range(n_codes)), label_names=tuple(labels),
                      extra={"structure": structure})
    config = HaloConfig(n_layer=1, n_head=2, n_embd=8, n_ctx=5, use_sex=sex, age_bucket_edges=age,
                        gap_bin_edges=gaps, fine_hidden=fine_hidden, fine_head=fine_head, seen_codes=seen_codes,
                        clock=clock, history_input=history_input)
    torch.manual_seed(seed)
    model = HaloModel(config, meta)
    with torch.no_grad():
        model.coarse.wte.weight.normal_(0, 1.0)
        if model.coarse.wfe is not None:  # the clock inputs and the codes recorded so far matter too
            model.coarse.wfe.weight.normal_(0, 1.0)
            if config.uses_history_input:
                model.coarse.wfe.weight[:, -n_codes:].mul_(0.5)  # ... without concentrating the records
        for p in model.fine.parameters():
            direct = (getattr(model.fine.direct, "weight", None), model.fine.prefix_out, model.fine.seen_chain,
                      model.fine.seen_first)  # zero at initialisation: drawn here so they matter
            p.normal_(0, 1.0) if any(p is q for q in direct) else p.mul_(2.5)
    return model.eval()


def enumerate_records(model: HaloModel) -> PatientCorpus:
    """Every record the layout allows: statics x (no visit | one visit | two visits with a gap)."""
    layout = model.layout
    smallest = 0 if layout.empty_visits else 1
    subsets = [tuple(c) for k in range(smallest, layout.n_codes + 1)
               for c in itertools.combinations(range(layout.n_codes), k)]
    gaps = list(model.gap_days) + ([np.nan] if layout.gap_unknown else [])
    statics = list(itertools.product(
        itertools.product((0, 1), repeat=len(layout.label_names)),
        ((0, 1) + ((-1,) if layout.sex_unknown else ())) if layout.sex else (-1,),
        (list(model.age_years) + ([np.nan] if layout.age_unknown else [])) if layout.age_edges else [np.nan],
    ))
    histories = ([()] if layout.zero_visits else []) + [(s,) for s in subsets] + \
        [(s, t, g) for s in subsets for t in subsets for g in gaps]
    records = list(itertools.product(statics, histories))
    visit_counts, code_lists, days = [], [], []
    for _, history in records:
        visits = [history[0], history[1]] if len(history) == 3 else list(history)
        visit_counts.append(len(visits))
        code_lists += visits
        days += [0.0, 0.0 + history[2]] if len(history) == 3 else [0.0] * len(visits)
    P = len(records)
    visit_offsets = np.concatenate([[0], np.cumsum(visit_counts)]).astype(np.int64)
    code_offsets = np.concatenate([[0], np.cumsum([len(c) for c in code_lists])]).astype(np.int64)
    st = empty_statics(P)
    st["sex"] = np.array([s[1] for s, _ in records], dtype=np.int8)
    st["age_at_first_visit"] = np.array([s[2] for s, _ in records], dtype=np.float32)
    return PatientCorpus(
        patient_ids=np.arange(P).astype(str).astype(object), visit_offsets=visit_offsets,
        code_offsets=code_offsets, codes=np.array([c for cs in code_lists for c in cs], dtype=np.int32),
        visit_days=np.array(days, dtype=np.float64),
        visit_start=np.full(len(days), np.datetime64("NaT"), dtype="datetime64[s]"),
        labels=np.array([s[0] for s, _ in records], dtype=np.uint8).reshape(P, len(layout.label_names)),
        label_names=layout.label_names, vocab=Vocabulary(model.meta.codes, np.ones(layout.n_codes, np.int64)),
        split=np.zeros(P, dtype=np.int8), **st)


def record_keys(corpus: PatientCorpus, model: HaloModel) -> list[tuple]:
    """A hashable description of each record, in the model's terms (bins for age and gaps)."""
    age = bin_index(corpus.age_at_first_visit, model.layout.age_edges) if model.layout.age_edges else \
        np.full(corpus.n_patients, -1)
    keys = []
    for p in range(corpus.n_patients):
        v0, v1 = corpus.visit_offsets[p], corpus.visit_offsets[p + 1]
        visits = tuple(tuple(corpus.codes[corpus.code_offsets[v]:corpus.code_offsets[v + 1]].tolist())
                       for v in range(v0, v1))
        gap = tuple(bin_index(np.diff(corpus.visit_days[v0:v1]), model.layout.gap_edges).tolist())
        keys.append((tuple(corpus.labels[p].tolist()), int(corpus.sex[p]), int(age[p]), visits, gap))
    return keys


def goodness_of_fit(samples: PatientCorpus, enumerated: PatientCorpus, probs: np.ndarray, model: HaloModel):
    """Chi-square of sampled record counts against probabilities (cells with expected count < 5 pooled)."""
    index = {k: i for i, k in enumerate(record_keys(enumerated, model))}
    sampled = Counter(record_keys(samples, model))
    assert set(sampled) <= set(index), "the sampler produced a record outside the model's support"
    observed = np.zeros(len(index))
    for k, n in sampled.items():
        observed[index[k]] = n
    expected = probs * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    return chisquare(obs, exp * obs.sum() / exp.sum()), int((~small).sum())


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    enumerated = enumerate_records(model)
    probs = np.exp(model.log_likelihood(enumerated, batch_size=4096).patient_log_likelihood)
    return model, enumerated, probs


# ---- exactness ----------------------------------------------------------------------------------------------------
def test_enumerated_probabilities_sum_to_one(tiny):
    model, enumerated, probs = tiny
    assert enumerated.n_patients == 2 * (15 + 15 * 15 * 2)  # label x (1 or 2 non-empty visits, 2 gap bins)
    assert abs(probs.sum() - 1) < 1e-6
    assert probs.max() > 20 * probs.min()  # far from uniform: the test has power


VARIANTS = {
    "default": {},
    "reference MADE": {"fine_head": "made"},
    "narrow fine head": {"fine_hidden": 6},
    "low-rank direct": {"fine_head": "made_lowrank", "fine_rank": 3},
    "narrow reference MADE": {"fine_head": "made", "fine_hidden": 6},
    "without seen-codes terms": {"seen_codes": False},
    "reference MADE with seen-codes terms": {"fine_head": "made", "seen_codes": True},
    "unknowns, empty visits, no visits": {"sex": True, "n_codes": 3, "sex_unknown": True, "gap_unknown": True,
                                          "empty_visits": True, "zero_visits": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampler_matches_exact_distribution(tiny, variant):
    model, enumerated, probs = tiny
    if variant != "default":
        model = tiny_model(**VARIANTS[variant])
        enumerated = enumerate_records(model)
        probs = np.exp(model.log_likelihood(enumerated, batch_size=4096).patient_log_likelihood)
        assert abs(probs.sum() - 1) < 1e-6
    samples = model.generate(N_SAMPLES, seed=11, batch_size=4096)
    (stat, p), cells = goodness_of_fit(samples, enumerated, probs, model)
    assert cells > 100
    assert p > 0.001, f"chi-square rejects the sampler: stat={stat:.1f}, p={p:.2g}"


def test_one_hot_groups_and_forced_condition_are_exact():
    """Sex, age bucket and gap are one-hot groups; forcing sex=F samples the labels from their marginal and
    everything after sex from its exact conditional, i.e. p(record) / p(F | labels) on records with sex F."""
    model = tiny_model(n_codes=2, sex=True, age=(0.0, 50.0), seed=13)  # a seed whose distribution spreads
    enumerated = enumerate_records(model)
    probs = np.exp(model.log_likelihood(enumerated, batch_size=4096).patient_log_likelihood)
    assert abs(probs.sum() - 1) < 1e-6
    female = enumerated.sex == 0
    label = enumerated.labels[:, 0]
    p_female = np.array([probs[female & (label == y)].sum() / probs[label == y].sum() for y in (0, 1)])
    forced = np.where(female, probs / p_female[label], 0.0)
    assert abs(forced.sum() - 1) < 1e-6
    samples = model.generate(N_SAMPLES, seed=5, batch_size=4096, conditions={"sex": "F"})
    assert np.all(samples.sex == 0)
    (stat, p), cells = goodness_of_fit(samples, enumerated, forced, model)
    assert cells > 60
    assert p > 0.001, f"chi-square rejects forced conditioning: stat={stat:.1f}, p={p:.2g}"


def test_posterior_condition_is_exact():
    """condition="posterior" samples p(record | sex=F, age bucket 1) exactly, whatever the column order."""
    model = tiny_model(n_codes=2, sex=True, age=(0.0, 50.0), seed=13)  # a seed whose distribution spreads
    enumerated = enumerate_records(model)
    probs = np.exp(model.log_likelihood(enumerated, batch_size=4096).patient_log_likelihood)
    match = (enumerated.sex == 0) & (enumerated.age_at_first_visit == model.age_years[1])
    posterior = np.where(match, probs, 0.0) / probs[match].sum()
    samples = model.generate(N_SAMPLES // 2, seed=9, batch_size=4096, conditions={"sex": "F", "age": "70"},
                             condition="posterior")
    assert np.all(samples.sex == 0) and np.all(samples.age_at_first_visit == model.age_years[1])
    (stat, p), cells = goodness_of_fit(samples, enumerated, posterior, model)
    assert cells > 15
    assert p > 0.001, f"chi-square rejects posterior conditioning: stat={stat:.1f}, p={p:.2g}"
    assert samples.stats["condition"] == "posterior"


def test_label_condition_is_the_exact_posterior(tiny):
    """The label is the first free column of the static row, so forcing it is exact conditioning."""
    model, enumerated, probs = tiny
    samples = model.generate(N_SAMPLES // 2, seed=7, batch_size=4096, conditions={"label:y": "1"})
    assert np.all(samples.labels[:, 0] == 1)
    posterior = np.where(enumerated.labels[:, 0] == 1, probs, 0.0)
    (stat, p), _ = goodness_of_fit(samples, enumerated, posterior / posterior.sum(), model)
    assert p > 0.001, f"chi-square rejects label conditioning: stat={stat:.1f}, p={p:.2g}"


# ---- seeding, batching, streaming, save/load ---------------------------------------------------------------------
def test_same_seed_same_patients_whatever_the_batching(tiny):
    model = tiny[0]
    a = model.generate(300, seed=1, batch_size=300)
    assert a.equals(model.generate(300, seed=1, batch_size=7))
    assert not a.equals(model.generate(300, seed=2, batch_size=300))
    chunks = list(model.iter_generate(300, seed=1, batch_size=64, chunk_size=128))
    assert [c.n_patients for c in chunks] == [128, 128, 44]
    for k, chunk in enumerate(chunks):
        assert chunk.equals(a.subset(np.arange(128 * k, 128 * k + chunk.n_patients)))


def test_save_load_round_trip_gives_identical_samples(tiny, tmp_path):
    model = tiny[0]
    save_model(model, tmp_path / "halo")
    loaded = load_model(tmp_path / "halo")
    assert isinstance(loaded, HaloModel) and loaded.gap_days == model.gap_days
    assert loaded.generate(500, seed=3).equals(model.generate(500, seed=3))


def test_models_saved_before_the_seen_codes_the_clock_and_the_history_input_still_load(tmp_path):
    """A round-2 model.json has no seen_codes / clock / history_input keys: it loads as the model it was,
    without them."""
    import json

    model = tiny_model(seen_codes=False, clock=False, history_input=False)
    save_model(model, tmp_path / "old")
    header = json.loads((tmp_path / "old" / "model.json").read_text())
    del header["config"]["seen_codes"], header["config"]["clock"], header["config"]["history_input"]
    (tmp_path / "old" / "model.json").write_text(json.dumps(header))
    loaded = load_model(tmp_path / "old")
    assert loaded.fine.seen_chain is None and loaded.coarse.wfe is None
    assert loaded.generate(300, seed=4).equals(model.generate(300, seed=4))


# ---- a MIMIC-sized vocabulary -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mimic_shaped(mimic3_corpus):
    """The small config on the MIMIC-III demo vocabulary (604 columns), untrained but with code logits
    shifted so visits hold about 10 codes, as a trained model's do; n_ctx 10 (at most 7 visits) keeps it quick."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="last 7 visits are kept"):  # one patient has 15 visits
        model = HaloModel.from_corpus(mimic3_corpus.part("train"), HaloConfig.small(n_ctx=10))
    with torch.no_grad():
        model.fine.layer2.bias[1:model.layout.n_codes + 1] -= 4.0  # fine order: the end token, then the codes
        model.coarse.wfe.weight.normal_(0, 1.0)  # clock inputs that matter
        model.fine.seen_chain.normal_(0, 2.0)  # "seen before" terms that matter (zero at initialisation)
        model.fine.seen_first.normal_(0, 2.0)
    return model.eval()


def test_fine_passes_per_row_are_bounded_by_its_fullest_record(mimic_shaped):
    model = mimic_shaped
    counts = PassCounts()
    patients = np.arange(64)
    n_visits, patient, row, column = sample_batch(model.network, model.layout, patients, key=5, weights=fine_weights(model.fine),
                                                  counts=counts)
    ones = Counter(zip(patient.tolist(), row.tolist()))
    for step, passes in enumerate(counts.per_step):
        r = step + 2  # the visit row this coarse step sampled
        alive = np.flatnonzero(n_visits >= r - 2)  # records that sampled row r (a visit or their end row)
        fullest = max(ones.get((p, r), 0) if n_visits[p] > r - 2 else 1 for p in alive)
        assert passes <= fullest + 1, f"row {r}: {passes} passes, fullest record has {fullest} ones"
    assert counts.passes / counts.visit_steps < 0.2 * model.layout.n_columns  # the reference: about V per visit


def test_conditions_fix_the_static_row(mimic_shaped):
    out = mimic_shaped.generate(64, seed=0, conditions={"label:mortality": "1", "sex": "F", "age": "67"})
    assert np.all(out.labels[:, 0] == 1) and np.all(out.sex == 0)
    assert np.all((out.age_at_first_visit >= 60) & (out.age_at_first_visit < 70))  # drawn in the [60, 70) bucket
    out = mimic_shaped.generate(32, seed=0, conditions={"mortality": "0", "sex": "m"})
    assert np.all(out.labels[:, 0] == 0) and np.all(out.sex == 1)


@pytest.mark.parametrize("conditions, match", [
    ({"label:nope": "1"}, "unknown condition 'label:nope'"),
    ({"sex": "X"}, "condition 'sex'"),
    ({"label:mortality": "2"}, "'0' or '1'"),
    ({"age": "old"}, "condition 'age'"),
])
def test_bad_conditions_are_named(mimic_shaped, conditions, match):
    with pytest.raises(ConfigError, match=match):
        mimic_shaped.generate(2, conditions=conditions)


def test_generated_corpus_contract(mimic_shaped):
    out = mimic_shaped.generate(40, seed=4, batch_size=16)
    assert out.n_patients == 40 and out.vocab.codes == mimic_shaped.meta.codes
    assert out.label_names == ("mortality",) and np.all(out.split == 0)
    assert not np.isnat(out.visit_start).any()  # every visit dated (ehrsynth.models.dates)
    first = out.visit_offsets[:-1][out.visits_per_patient() > 0]
    assert np.all(out.visit_days[first] == 0)
    for p in range(out.n_patients):  # codes ascending within each visit
        for v in range(out.visit_offsets[p], out.visit_offsets[p + 1]):
            assert np.all(np.diff(out.codes[out.code_offsets[v]:out.code_offsets[v + 1]]) > 0)
    assert out.stats["source"] == "halo" and out.patient_ids[0] == "halo-0"
    with pytest.raises(ConfigError, match="n must be"):
        sample(mimic_shaped.network, mimic_shaped.layout, mimic_shaped.decoding, 0, generator=torch.Generator())


# ---- likelihood ---------------------------------------------------------------------------------------------------
def test_likelihood_matches_codes_by_typed_string(mimic_shaped, mimic3_corpus):
    test = mimic3_corpus.part("test")
    base = mimic_shaped.log_likelihood(test)
    assert base.patient_log_likelihood.shape == (test.n_patients,)
    end_row = base.patient_log_likelihood - base.patient_static_log_likelihood - base.patient_visit_log_likelihood
    assert np.all(end_row < 0) and np.all(base.patient_static_log_likelihood < 0)
    assert len(base.visit_log_likelihood) == base.patient_visits.sum() == test.n_visits
    assert base.patient_codes.sum() == test.n_codes and base.unknown_code_occurrences == 0
    assert np.isclose(base.per_code_perplexity,
                      np.exp(-base.visit_log_likelihood.sum() / test.n_codes))
    # the same records under a reversed vocabulary order score the same
    order = np.arange(test.vocab_size)[::-1]
    inverse = np.argsort(order)
    reordered = replace(test, vocab=Vocabulary(tuple(np.array(test.vocab.codes)[order]), test.vocab.counts[order]),
                        codes=inverse[test.codes].astype(np.int32))
    assert np.allclose(mimic_shaped.log_likelihood(reordered).patient_log_likelihood,
                       base.patient_log_likelihood, atol=1e-6)
    # a code the model never saw: an error naming it, or dropped and counted
    used = int(test.codes[0])
    renamed = replace(test, vocab=Vocabulary(test.vocab.codes[:used] + ("ICD9CM/NEW",) + test.vocab.codes[used + 1:],
                                             test.vocab.counts))
    with pytest.raises(ConfigError, match="ICD9CM/NEW"):
        mimic_shaped.log_likelihood(renamed)
    dropped = mimic_shaped.log_likelihood(renamed, unknown="drop")
    assert dropped.unknown_codes == ("ICD9CM/NEW",)
    assert dropped.unknown_code_occurrences == int((test.codes == used).sum())
    assert dropped.patient_codes.sum() == test.n_codes - dropped.unknown_code_occurrences


def test_model_likelihood_helpers(mimic_shaped, mimic3_corpus):
    import json

    test = mimic3_corpus.part("test")
    result = mimic_shaped.log_likelihood(test)
    assert np.array_equal(mimic_shaped.patient_log_likelihood(test), result.patient_log_likelihood)
    summary = json.loads(json.dumps(mimic_shaped.perplexity(test)))
    assert summary["per_code_perplexity"] == pytest.approx(result.per_code_perplexity)
    assert summary["visits_scored"] == test.n_visits and summary["codes_scored"] == test.n_codes


@pytest.mark.parametrize("variant", ["mimic", "default", "unknowns, empty visits, no visits", "reference MADE",
                                     "low-rank direct"])
def test_likelihood_is_the_sum_of_the_sampler_log_probabilities(mimic_shaped, variant):
    """Each sampled record's log-probability, summed over the sampler's draws, equals log p(record) as the
    likelihood scores it (the static row, every first step, code, group choice and the end)."""
    from ehrsynth.models.halo import decode_records

    model = mimic_shaped if variant == "mimic" else tiny_model(**VARIANTS[variant])
    patients = np.arange(64 if variant == "mimic" else 500)
    drawn = np.zeros(len(patients))
    n_visits, patient, row, column = sample_batch(model.network, model.layout, patients, key=17,
                                                  weights=fine_weights(model.fine), log_prob=drawn)
    records = decode_records(model.layout, first_patient=0, n_visits=n_visits, patient=patient, row=row,
                             column=column, codes=model.meta.codes, gap_days=model.gap_days,
                             age_years=model.age_years, stats={})
    scored = model.log_likelihood(records).patient_log_likelihood
    assert np.all(np.isfinite(drawn)) and drawn.min() < -1.0
    np.testing.assert_allclose(drawn, scored, rtol=1e-5, atol=1e-4)

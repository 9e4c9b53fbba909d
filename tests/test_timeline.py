"""The timeline family: grammar, exactness against enumerated records (chi-square), likelihood = sampler,
KV cache, seeds, conditioning, save/load, resume through the shared loop, encoding on real data."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import chisquare

from ehrsynth.data.corpus import PatientCorpus, empty_statics
from ehrsynth.data.vocab import Vocabulary
from ehrsynth.models.base import CorpusMeta
from ehrsynth.models.halo.encoding import bin_index
from ehrsynth.models.io import load_model, save_model
from ehrsynth.models.timeline import TimelineConfig, TimelineModel
from ehrsynth.models.timeline.model import log_tail_mass
from ehrsynth.models.timeline.sampling import decode, sample_batch
from ehrsynth.models.timeline.tokens import sequence_ones
from ehrsynth.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
N_SAMPLES = 20_000


def tiny_model(*, n_codes=3, n_ctx=9, seed=0) -> TimelineModel:
    """A random model small enough to enumerate: label y, sex, two gap bins, every record within 9 tokens."""
    meta = CorpusMeta(codes=tuple(f"X/{i}" for i in range(n_codes)), label_names=("y",), extra={"structure": {}})
    config = TimelineConfig(n_layer=1, n_head=2, n_embd=8, n_ctx=n_ctx, age_bucket_edges=(),
                            gap_bin_edges=(0.0, 30.0))
    torch.manual_seed(seed)
    model = TimelineModel(config, meta)
    with torch.no_grad():
        model.coarse.wte.weight.normal_(0, 1.0)
        model.coarse.wfe.weight.normal_(0, 1.0)  # the clock inputs matter (gap tokens move it)
        model.head.weight.normal_(0, 1.5)
        model.tail_scale.weight.normal_(0, 0.3)  # the tail term acts, differently in each state
        model.code_log_tail.copy_(log_tail_mass(np.array([5.0, 2.0, 1.0] + [1.0] * (n_codes - 3))))
    return model.eval()


def enumerate_records(model: TimelineModel) -> PatientCorpus:
    """Every valid record that fits the window, written without the grammar: statics x visit histories."""
    V, n_ctx = model.layout.n_codes, model.config.n_ctx
    subsets = [c for k in range(1, V + 1) for c in itertools.combinations(range(V), k)]
    records = []
    for y, sex in itertools.product((0, 1), (0, 1)):
        budget = n_ctx - (2 + y) - 1  # tokens left for the visits after [BOS], the prompt and before [EOS]
        frontier = [((s,), (), len(s)) for s in subsets if len(s) <= budget]
        while frontier:
            records += [((y, sex), visits, gaps) for visits, gaps, _ in frontier]
            frontier = [(v + (s,), g + (gap,), used + 1 + len(s)) for v, g, used in frontier for s in subsets
                        for gap in (0.0, 60.0) if used + 1 + len(s) <= budget]
    visit_counts = [len(v) for _, v, _ in records]
    code_lists = [s for _, v, _ in records for s in v]
    days = np.concatenate([np.cumsum((0.0,) + g) for _, _, g in records])
    P = len(records)
    st = empty_statics(P)
    st["sex"] = np.array([s[1] for s, _, _ in records], dtype=np.int8)
    return PatientCorpus(
        patient_ids=np.arange(P).astype(str).astype(object),
        visit_offsets=np.r_[0, np.cumsum(visit_counts)].astype(np.int64),
        code_offsets=np.r_[0, np.cumsum([len(c) for c in code_lists])].astype(np.int64),
        codes=np.array([c for cs in code_lists for c in cs], dtype=np.int32), visit_days=days,
        visit_start=np.full(len(days), np.datetime64("NaT"), dtype="datetime64[s]"),
        labels=np.array([[s[0]] for s, _, _ in records], dtype=np.uint8), label_names=("y",),
        vocab=Vocabulary(model.meta.codes, np.ones(V, np.int64)), split=np.zeros(P, dtype=np.int8), **st)


def record_keys(corpus: PatientCorpus, model: TimelineModel) -> list[tuple]:
    keys = []
    for p in range(corpus.n_patients):
        v0, v1 = corpus.visit_offsets[p], corpus.visit_offsets[p + 1]
        visits = tuple(tuple(corpus.codes[corpus.code_offsets[v]:corpus.code_offsets[v + 1]].tolist())
                       for v in range(v0, v1))
        gaps = tuple(bin_index(np.diff(corpus.visit_days[v0:v1]), model.layout.gap_edges).tolist())
        keys.append((tuple(corpus.labels[p].tolist()), int(corpus.sex[p]), visits, gaps))
    return keys


def goodness_of_fit(samples, enumerated, probs, model):
    index = {k: i for i, k in enumerate(record_keys(enumerated, model))}
    sampled = Counter(record_keys(samples, model))
    assert set(sampled) <= set(index), "the sampler produced a record outside the valid records"
    observed = np.zeros(len(index))
    for k, n in sampled.items():
        observed[index[k]] = n
    expected = probs / probs.sum() * observed.sum()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    return chisquare(obs, exp * obs.sum() / exp.sum()), int((~small).sum())


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(seed=1)  # a seed whose record distribution spreads over many cells
    enumerated = enumerate_records(model)
    probs = np.exp(model.log_likelihood(enumerated, batch_size=4096).patient_log_likelihood)
    return model, enumerated, probs


def test_grammar_puts_all_mass_on_valid_records(tiny):
    model, enumerated, probs = tiny
    assert enumerated.n_patients == 2 * (520 + 214)  # sex x (y=0: 6 tokens for the visits; y=1: 5)
    assert abs(probs.sum() - 1.0) < 1e-6  # float32 softmax; no mass on anything else: the grammar admits exactly these
    assert probs.min() > 0


def test_sampler_matches_the_exact_distribution(tiny):
    model, enumerated, probs = tiny
    samples = model.generate(N_SAMPLES, seed=0, batch_size=4096)
    (stat, p), cells = goodness_of_fit(samples, enumerated, probs, model)
    assert cells > 50 and p > 0.001, f"chi-square rejects the sampler: stat={stat:.1f}, p={p:.2g}"


def test_conditions_are_exact(tiny):
    model, enumerated, probs = tiny
    y, female = enumerated.labels[:, 0] == 1, enumerated.sex == 0
    # a label is the first prompt token: conditioning on it is the exact posterior
    samples = model.generate(N_SAMPLES // 2, seed=1, batch_size=4096, conditions={"label:y": "1"})
    assert (samples.labels[:, 0] == 1).all()
    (stat, p), _ = goodness_of_fit(samples, enumerated, np.where(y, probs, 0.0), model)
    assert p > 0.001, f"chi-square rejects label conditioning: stat={stat:.1f}, p={p:.2g}"
    # sex comes after the label: the label keeps its marginal, the rest follows p(. | label, sex=F)
    p_label = np.where(y, probs[y].sum(), probs[~y].sum())
    p_label_f = np.where(y, probs[y & female].sum(), probs[~y & female].sum())
    forced = np.where(female, probs / p_label_f * p_label, 0.0)
    samples = model.generate(N_SAMPLES // 2, seed=2, batch_size=4096, conditions={"sex": "F"})
    assert (samples.sex == 0).all()
    (stat, p), _ = goodness_of_fit(samples, enumerated, forced, model)
    assert p > 0.001, f"chi-square rejects forced sex: stat={stat:.1f}, p={p:.2g}"


def test_posterior_condition_is_exact(tiny):
    """condition="posterior" on sex (a prompt token after the label) samples p(record | sex=F): the label too;
    the forced mode above keeps the label's marginal instead. Attempt 0 uses the unconditional streams."""
    model, enumerated, probs = tiny
    female = enumerated.sex == 0
    posterior = np.where(female, probs, 0.0) / probs[female].sum()
    samples = model.generate(N_SAMPLES // 2, seed=3, batch_size=4096, conditions={"sex": "F"}, condition="posterior")
    assert (samples.sex == 0).all() and samples.stats["condition"] == "posterior"
    (stat, p), cells = goodness_of_fit(samples, enumerated, posterior, model)
    assert cells > 20 and p > 0.001, f"chi-square rejects posterior sex: stat={stat:.1f}, p={p:.2g}"
    plain = model.generate(200, seed=3)
    again = model.generate(200, seed=3, conditions={"sex": "F"}, condition="posterior")
    first_try = plain.sex == 0  # their first prompt matched: the same records as without conditions
    assert first_try.sum() > 50
    assert record_keys(plain, model)[int(np.flatnonzero(first_try)[0])] == \
        record_keys(again, model)[int(np.flatnonzero(first_try)[0])]
    assert [k for k, f in zip(record_keys(plain, model), first_try) if f] == \
        [k for k, f in zip(record_keys(again, model), first_try) if f]


def test_likelihood_equals_the_samplers_log_probabilities(tiny):
    model = tiny[0]
    tokens, lengths, log_prob = sample_batch(model.network, np.arange(300), key=11)
    corpus = decode(model.grammar, model.decoding, 0, [(tokens, lengths)], {})
    assert corpus.n_patients == 300
    scored = model.log_likelihood(corpus).patient_log_likelihood
    np.testing.assert_allclose(scored, log_prob, rtol=1e-5, atol=1e-5)


def test_kv_cache_gives_the_full_forward_logits():
    model = tiny_model(n_codes=20, n_ctx=32)
    tokens = torch.randint(0, model.layout.n_columns, (5, 30))
    clock = model.network.clock_inputs(tokens)  # (5, 30, 3): cumulative, so each step's slice is its own
    full = model.coarse(tokens, features=clock)
    cache = model.coarse.new_cache(5)
    steps = [model.coarse(tokens[:, :7], cache, features=clock[:, :7])] + [
        model.coarse(tokens[:, t:t + 1], cache, features=clock[:, t:t + 1]) for t in range(7, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_packed_and_padded_losses_agree(mimic3_corpus):
    with pytest.warns(UserWarning, match="do not fit"):
        model = TimelineModel.from_corpus(mimic3_corpus.part("train"), TimelineConfig.small(n_ctx=128)).eval()
    batch = model.collate(mimic3_corpus, np.arange(mimic3_corpus.n_patients))
    packed = model.token_log_probs(batch["tokens"], batch["scored"], packed=True)
    padded = model.token_log_probs(batch["tokens"], batch["scored"], packed=False)
    lengths = batch["lengths"]  # every token but [BOS] is scored, but a window-forced [EOS]
    assert packed.shape == (int((lengths - 1).sum() - (lengths == 128).sum()),) and lengths.max() > 100
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def gibleed_model(gibleed):
    """The small config on the GiBleed training part, untrained, with a 64-token window (records cut)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="295 of 1940 patients do not fit n_ctx = 64 tokens"):
        model = TimelineModel.from_corpus(gibleed.part("train"), TimelineConfig.small(n_ctx=64))
    return model.eval()


@pytest.fixture(scope="module")
def gibleed():
    from ehrsynth.data.build import BuildOptions
    from ehrsynth.data.readers.omop import read_omop
    from ehrsynth.demo_data import demo_directory

    return read_omop(demo_directory(), options=BuildOptions(seed=0))


def check_grammar(model: TimelineModel, tokens: np.ndarray, lengths: np.ndarray) -> int:
    """A plain reference check of each sequence (no masks): returns the number of records checked."""
    lay = model.layout
    for seq in (tokens[i, :lengths[i]].tolist() for i in range(len(lengths))):
        assert seq[0] == lay.start and seq[-1] == lay.end and len(seq) <= model.config.n_ctx
        assert lay.sex_start <= seq[1] < lay.age_start and lay.age_start <= seq[2] < lay.gap_start  # no labels
        body = seq[3:-1]
        assert body and body[0] < lay.n_codes  # a first visit, opened by a code
        prev = -1
        for t in body:
            if t < lay.n_codes:
                assert t > prev  # ascending within the visit
                prev = t
            else:
                assert lay.gap_start <= t < lay.start and prev >= 0  # a gap closes a visit with codes
                prev = -1
        assert prev >= 0  # the last visit has a code
    return len(lengths)


def test_sampled_records_never_break_the_grammar(gibleed_model):
    model = gibleed_model
    checked = 0
    for start in range(0, 3000, 1000):
        tokens, lengths, _ = sample_batch(model.network, np.arange(start, start + 1000), key=3)
        checked += check_grammar(model, tokens, lengths)
    assert checked == 3000
    corpus = model.generate(500, seed=4)
    vo, co = corpus.visit_offsets, corpus.code_offsets
    assert (np.diff(co) > 0).all() and (corpus.sex >= 0).all()  # no empty visit, every sex known
    assert not np.isnan(corpus.visit_days).any() and not np.isnat(corpus.visit_start).any()  # all dated
    assert (np.diff(vo) > 0).all()


def test_encoding_on_real_data_round_trips_and_counts_truncation(gibleed, gibleed_model):
    model, train_part = gibleed_model, gibleed.part("train")
    patients = np.arange(train_part.n_patients)
    enc = model.encode(train_part, patients)
    fits = enc.truncated_visits + enc.truncated_codes == 0
    assert 0 < (~fits).sum() < len(patients) and model.meta.extra["patients_truncated"] == (~fits).sum()
    assert check_grammar(model, enc.tokens, enc.lengths) == len(patients)  # real records obey the grammar
    n_visits, *_ = sequence_ones(model.layout, enc.tokens, enc.lengths)
    assert (n_visits == enc.visits).all()
    vo = train_part.visit_offsets
    assert (enc.visits[fits] == np.diff(vo)[fits]).all()
    assert (enc.tokens < model.layout.n_codes).sum(1)[fits].tolist() == \
        (train_part.code_offsets[vo[1:]] - train_part.code_offsets[vo[:-1]])[fits].tolist()


def test_seeds_batching_chunks_and_save_load(tiny, tmp_path):
    model = tiny[0]
    a = model.generate(300, seed=1, batch_size=300)
    assert a.equals(model.generate(300, seed=1, batch_size=7))
    assert not a.equals(model.generate(300, seed=2))
    chunks = list(model.iter_generate(300, seed=1, batch_size=64, chunk_size=128))
    assert [c.n_patients for c in chunks] == [128, 128, 44]
    for k, chunk in enumerate(chunks):
        assert chunk.equals(a.subset(np.arange(128 * k, 128 * k + chunk.n_patients)))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, TimelineModel) and loaded.generate(300, seed=1).equals(a)


def test_models_saved_before_the_tail_term_still_load(tiny, tmp_path):
    """A round-3 model.json has no tail_term key: it loads as the model it was, without the term."""
    meta = tiny[0].meta
    old = TimelineModel(TimelineConfig(n_layer=1, n_head=2, n_embd=8, n_ctx=9, age_bucket_edges=(),
                                       gap_bin_edges=(0.0, 30.0), tail_term=False), meta)
    save_model(old, tmp_path / "old")
    header = json.loads((tmp_path / "old" / "model.json").read_text())
    del header["config"]["tail_term"]
    (tmp_path / "old" / "model.json").write_text(json.dumps(header))
    loaded = load_model(tmp_path / "old")
    assert loaded.tail_scale is None and "code_log_tail" not in loaded.state_dict()
    assert loaded.generate(300, seed=4).equals(old.generate(300, seed=4))


def test_tail_term_gives_mimic_visits_their_length_at_an_early_stop(mimic3_corpus, tmp_path):
    """MIMIC-III's 72 training patients overfit within 10 epochs, so the validation optimum is an early model.
    Without the tail term and the frequency init such a model draws codes nearly uniformly after the previous
    one and ends visits after about ln(V) codes; with them its visits are near the data's (13.4 codes)."""
    train_part, val_part = mimic3_corpus.part("train"), mimic3_corpus.part("val")
    real = np.diff(np.asarray(train_part.code_offsets))
    config = TrainConfig(batch_size=32, lr=2e-3, max_steps=24, eval_every=24, device="cpu", seed=0, patience=None,
                         ema_decay=0.99)
    means = {}
    for tail in (True, False):
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="do not fit"):
            model = TimelineModel.from_corpus(train_part, TimelineConfig.small(n_ctx=128, tail_term=tail))
        if not tail:  # and the zero output bias of before
            torch.nn.init.zeros_(model.head.bias)
        train(model, train_part, val_part, config, tmp_path / str(tail), progress=False)
        synthetic = load_model(tmp_path / str(tail) / "model").generate(500, seed=0)
        means[tail] = float(np.mean(np.diff(np.asarray(synthetic.code_offsets))))
    assert 12.5 < real.mean() < 14.5
    assert means[True] > 8.5 and means[False] < 7.5, means


def test_resume_through_the_shared_loop_is_exact(mimic3_corpus, tmp_path):
    train_part, val_part = mimic3_corpus.part("train"), mimic3_corpus.part("val")
    config = TrainConfig(batch_size=16, lr=1e-3, max_steps=12, checkpoint_every=6, eval_every=6, device="cpu",
                         seed=2, patience=None)

    def fresh():
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="1 of 72 patients do not fit"):
            return TimelineModel.from_corpus(train_part, TimelineConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=256))

    train(fresh(), train_part, val_part, config, tmp_path / "straight", progress=False)

    def crash(step):
        if step == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), train_part, val_part, config, tmp_path / "resumed", progress=False, on_step=crash)
    result = train(fresh(), train_part, val_part, config, tmp_path / "resumed", resume=True, progress=False)
    assert result.steps == 12 and result.best_val_loss is not None and np.isfinite(result.best_val_loss)
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_generate_perplexity(mimic3_corpus, tmp_path):
    from click.testing import CliRunner

    from ehrsynth.cli import cli

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output[-2000:]
        return result.output

    mimic3_corpus.save(tmp_path / "corpus")
    with pytest.warns(UserWarning, match="do not fit"):
        run("--threads", 1, "train", "timeline", "--data", tmp_path / "corpus", "--out", tmp_path / "run",
            "--preset", "small", "--max-steps", 3, "--batch-size", 16)
    run("generate", tmp_path / "run", "-n", 20, "--out", tmp_path / "syn", "--condition", "sex=F", "--seed", 1)
    synthetic = PatientCorpus.load(tmp_path / "syn")
    assert synthetic.n_patients == 20 and (synthetic.sex == 0).all() and (np.diff(synthetic.code_offsets) > 0).all()
    out = run("perplexity", tmp_path / "run", "--data", tmp_path / "corpus", "--part", "test")
    result = json.loads(out[out.index("{"):])
    assert result["patients"] == mimic3_corpus.part("test").n_patients and result["per_code_perplexity"] > 1

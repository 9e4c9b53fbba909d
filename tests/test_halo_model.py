"""HALO network, encoding and loss: causality, KV cache, parameter counts, record round trip, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ehrsynth.errors import ConfigError
from ehrsynth.models.base import CorpusMeta
from ehrsynth.models.halo import (
    CoarseTransformer,
    FineHead,
    HaloConfig,
    HaloModel,
    bin_index,
    bin_values,
    decode_records,
    encode_records,
)
from ehrsynth.models.halo.encoding import dense_rows

TINY = HaloConfig(n_layer=2, n_head=2, n_embd=16, n_ctx=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_corpus(mimic3_corpus):
    return mimic3_corpus.part("train")


@pytest.fixture(scope="module")
def small_model(train_corpus):
    torch.manual_seed(0)
    return HaloModel.from_corpus(train_corpus, HaloConfig.small())


# ---- fine head --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [None, 7, 40])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("direct", [False, True, "lowrank"])
def test_fine_logit_k_ignores_columns_from_its_group_on(hidden, permuted, direct):
    """In fine order: the logit of position k has exactly zero gradient wrt the positions from the first of
    its categorical group on (k itself outside a group); the first-step logits see only the history."""
    torch.manual_seed(0)
    d, C = 5, 12
    order = torch.randperm(C) if permuted else torch.arange(C)
    group_first = torch.arange(C)
    group_first[8:11] = 8  # positions 8, 9, 10 form one softmax
    head = FineHead(d, C, hidden, order=order, group_first=group_first, n_first=4, direct=direct is True,
                    rank=3 if direct == "lowrank" else 0)
    for p in head.parameters():  # make every unmasked weight count
        torch.nn.init.normal_(p)
    h, x = torch.randn(d), torch.rand(C)
    d_x = torch.autograd.functional.jacobian(lambda x_: head(h, x_)[0], x)[order][:, order]  # (C, C) fine order
    seen = torch.arange(C)[None, :] < group_first[:, None]  # [k, j]: position k may see position j
    assert torch.all(d_x[~seen] == 0), "logit k must not depend on its group or later positions"
    assert (d_x[seen] != 0).float().mean() > 0.5  # ...and does depend on earlier ones
    hs = torch.randn(16, d, requires_grad=True)  # several histories: some hidden units are off (ReLU) for one
    for k in range(C):
        assert hs.grad is None or hs.grad.zero_() is not None
        head(hs, x.expand(16, C))[0][:, k].sum().backward()
        assert hs.grad.abs().sum() > 0, f"logit {k} must see the history"
    first_x = torch.autograd.functional.jacobian(lambda x_: head(h, x_)[1], x)
    assert torch.all(first_x == 0) and head(h, x)[1].shape == (4,)


def test_fine_head_parameter_counts():
    d, C = 16, 30
    W, first = d + C, d * 32 + 32  # the first-step head: Linear(d -> V + 2), V = 30
    square = FineHead(d, C, n_first=32)
    assert sum(p.numel() for p in square.parameters()) == W * W + W + C * W + C + first
    narrow = FineHead(d, C, hidden=20, n_first=32)
    assert sum(p.numel() for p in narrow.parameters()) == 20 * W + 20 + C * 20 + C + first
    direct = FineHead(d, C, hidden=20, n_first=32, direct=True)
    assert sum(p.numel() for p in direct.parameters()) == 20 * W + 20 + C * 20 + C + first + C * C
    lowrank = FineHead(d, C, hidden=20, n_first=32, rank=4)
    assert sum(p.numel() for p in lowrank.parameters()) == 20 * W + 20 + C * 20 + C + first + 2 * C * 4


def test_low_rank_term_is_the_same_by_every_route():
    """The running sums (few rows), the masked C x C weight (C <= rows x r) and the running sums in chunks of
    rows (a vocabulary so large that rows x C x r passes 2^25) give the same logits."""
    torch.manual_seed(0)
    head = FineHead(4, 10, 6, rank=3, group_first=torch.tensor([0, 1, 2, 3, 4, 4, 4, 7, 8, 9]))
    torch.nn.init.normal_(head.prefix_out)
    x = (torch.rand(2, 10) < 0.5).float()
    few = head._prefix(x)  # running sums
    many = head._prefix(x.repeat(8, 1))[:2]  # 16 rows x 3 >= 10 columns: one masked weight
    assert torch.allclose(few, many, atol=1e-6) and few.abs().sum() > 0
    C, r = 2**17, 4  # 2^25 / (C r) = 64 rows per chunk
    wide = FineHead(4, C, 8, rank=r)
    torch.nn.init.normal_(wide.prefix_out)
    x = torch.zeros(100, C)
    x[torch.arange(100), torch.randint(0, C, (100,))] = 1.0
    x[:, :5] = 1.0
    chunked = wide._prefix(x)
    positions = torch.arange(C)
    for row in (0, 1, 63, 64, 99):  # both sides of a chunk boundary; logit k sums u_k . v_j over ones j < k
        expected = sum((wide.prefix_out @ wide.prefix_in[j]) * (positions > j) for j in x[row].nonzero()[:, 0])
        assert torch.allclose(chunked[row], expected, atol=1e-4) and expected.abs().sum() > 0


def test_square_head_is_the_reference_layout():
    """A (W x W) lower-triangular first layer; the logits are outputs d-1 .. d+C-2 of a lower-triangular
    second layer (the reference's, without its unused outputs)."""
    d, C = 4, 6
    head = FineHead(d, C)
    W = d + C
    assert head.layer1.weight.shape == (W, W) and head.layer2.weight.shape == (C, W)
    assert torch.equal(head.layer1.mask, torch.ones(W, W, dtype=torch.bool).tril())
    assert torch.equal(head.layer2.mask, torch.ones(W, W, dtype=torch.bool).tril()[d - 1:-1])
    h, x = torch.randn(3, d), torch.rand(3, C)
    # with an order, the same head runs on the columns gathered into that order
    order = torch.tensor([4, 0, 1, 2, 3, 5])  # e.g. the end token (column 4) first
    ordered = FineHead(d, C, order=order)
    ordered.load_state_dict(head.state_dict())
    assert torch.allclose(ordered(h, x)[0][:, order], head(h, x[:, order])[0], atol=1e-6)


# ---- coarse transformer -----------------------------------------------------------------------------------------
def test_coarse_output_ignores_later_rows():
    torch.manual_seed(0)
    net = CoarseTransformer(10, 16, 2, 2, 12).eval()
    x = (torch.rand(3, 9, 10) < 0.3).float()
    y = x.clone()
    y[:, 5:] = (torch.rand(3, 4, 10) < 0.5).float()
    hx, hy = net(x), net(y)
    assert torch.allclose(hx[:, :5], hy[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(hx[:, 5:], hy[:, 5:])


def test_kv_cache_matches_full_recomputation():
    torch.manual_seed(0)
    net = CoarseTransformer(10, 32, 4, 3, 12).eval()
    x = (torch.rand(5, 10, 10) < 0.3).float()
    with torch.no_grad():
        full = net(x)
        cache = net.new_cache(5)
        steps = [net(x[:, t:t + 1], cache)[:, 0] for t in range(4)]
        keep = torch.tensor([True, False, True, True, False])  # two records finish: drop their rows
        cache.keep(keep)
        steps += [net(x[keep, t:t + 1], cache)[:, 0] for t in range(4, 7)]
        prefix = net.new_cache(3)  # a multi-row prefix, then one row at a time
        first = net(x[keep, :6], prefix)
        last = net(x[keep, 6:7], prefix)[:, 0]
    for t, out in enumerate(steps):
        ref = full[:, t] if t < 4 else full[keep, t]
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), f"position {t}"
    assert torch.allclose(first, full[keep, :6], atol=1e-5, rtol=0)
    assert torch.allclose(last, full[keep, 6], atol=1e-5, rtol=0)


# ---- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"n_embd": 30, "n_head": 4}, "n_embd"),
    ({"n_ctx": 3}, "n_ctx"),
    ({"fine_hidden": 0}, "fine_hidden"),
    ({"gap_bin_edges": (0.0, 7.0, 1.0)}, "gap_bin_edges"),
    ({"age_bucket_edges": (0.0, float("inf"))}, "age_bucket_edges"),
    ({"dropout": 1.0}, "dropout"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        HaloConfig(**bad)


def test_bins():
    edges = (0.0, 1.0, 7.0, 30.0)
    assert bin_index(np.array([0.0, 0.99, 1.0, 29.0, 30.0, 5000.0, -1.0, np.nan]), edges).tolist() == \
        [0, 0, 1, 2, 3, 3, 0, -1]
    assert bin_values(edges) == (0.5, 4.0, 18.5, 30.0)
    assert bin_index(np.array(bin_values(edges)), edges).tolist() == [0, 1, 2, 3]


# ---- encoding ------------------------------------------------------------------------------------------------------
def test_layout_and_meta(small_model, train_corpus):
    layout = small_model.layout
    names = layout.column_names()
    assert len(names) == layout.n_columns == train_corpus.vocab_size + 1 + 2 + 9 + 14 + 3
    assert names[layout.label_start] == "label:mortality"
    assert names[layout.sex_start:layout.age_start] == ["sex:F", "sex:M"]
    assert names[layout.gap_start] == "gap:[0,1)" and names[layout.start - 1] == "gap:[5475,inf)"
    assert names[-3:] == ["<start>", "<end>", "<pad>"]
    assert layout.order[0] == layout.end and np.array_equal(layout.order[1:], np.delete(np.arange(len(names)),
                                                                                       layout.end))
    assert np.array_equal(layout.order[layout.rank], np.arange(len(names)))
    extra = small_model.meta.extra
    assert extra["gap_bin_edges"] == list(HaloConfig().gap_bin_edges)
    assert extra["gap_bin_days"][:2] == [0.5, 4.0] and extra["age_bucket_years"][-1] == 90.0
    assert extra["max_visits"] == 45 and extra["patients_truncated"] == 0


def test_encode_decode_round_trip(small_model, mimic3_corpus):
    """Every patient's codes, labels and sex come back exactly; age and gaps come back as their bins."""
    layout = small_model.layout
    patients = np.arange(mimic3_corpus.n_patients)
    enc = encode_records(mimic3_corpus, patients, layout, max_visits=45)
    x = dense_rows(torch.from_numpy(enc.ones), torch.from_numpy(enc.lengths), layout.n_columns)
    B, T, C = x.shape
    assert T == int(mimic3_corpus.visits_per_patient().max()) + 3  # padded to the longest record only
    rows = torch.arange(T)
    assert torch.all(x[:, 0, layout.start] == 1)
    assert torch.all(x[torch.arange(B), torch.from_numpy(enc.lengths) + 2, layout.end] == 1)
    assert torch.all(x[:, :, :layout.n_codes].sum(-1)[:, 1] == 0)  # no codes on the static row
    content = (rows[None, :] >= 1) & (rows[None, :] <= torch.from_numpy(enc.lengths)[:, None] + 1)
    b, r, c = (x * content[..., None]).nonzero(as_tuple=True)
    back = decode_records(layout, first_patient=0, n_visits=enc.lengths, patient=b.numpy(), row=r.numpy(),
                          column=c.numpy(), codes=small_model.meta.codes, gap_days=small_model.gap_days,
                          age_years=small_model.age_years, stats={})
    src = mimic3_corpus
    assert np.array_equal(back.visit_offsets, src.visit_offsets)
    assert np.array_equal(back.code_offsets, src.code_offsets)
    assert np.array_equal(back.codes, src.codes)
    assert np.array_equal(back.sex, src.sex) and np.array_equal(back.labels, src.labels)
    edges = layout.age_edges
    assert np.array_equal(bin_index(back.age_at_first_visit, edges), bin_index(src.age_at_first_visit, edges))
    first = np.zeros(src.n_visits, dtype=bool)
    first[src.visit_offsets[:-1]] = True
    gaps_src = np.diff(src.visit_days, prepend=0.0)[~first]
    gaps_back = np.diff(back.visit_days, prepend=0.0)[~first]
    assert np.array_equal(bin_index(gaps_back, layout.gap_edges), bin_index(gaps_src, layout.gap_edges))
    assert np.all(back.visit_days[first] == 0)


def test_truncation_keeps_the_last_visits(small_model, mimic3_corpus):
    vpp = mimic3_corpus.visits_per_patient()
    p = int(np.argmax(vpp))  # the patient with the most visits (15)
    enc = encode_records(mimic3_corpus, np.array([p]), small_model.layout, max_visits=4)
    assert enc.lengths.tolist() == [4] and enc.truncated_visits.tolist() == [vpp[p] - 4]
    x = dense_rows(torch.from_numpy(enc.ones), torch.from_numpy(enc.lengths), small_model.layout.n_columns)[0]
    last = mimic3_corpus.visit_offsets[p + 1] - 1
    codes = mimic3_corpus.codes[mimic3_corpus.code_offsets[last]:mimic3_corpus.code_offsets[last + 1]]
    assert x[5, :small_model.layout.n_codes].nonzero().squeeze(1).tolist() == codes.tolist()
    with pytest.warns(UserWarning, match="last 4 visits are kept"):
        model = HaloModel.from_corpus(mimic3_corpus, HaloConfig(n_layer=1, n_head=1, n_embd=8, n_ctx=7))
    assert model.meta.extra["patients_truncated"] == int((vpp > 4).sum())
    assert model.meta.extra["visits_truncated"] == int(np.maximum(vpp - 4, 0).sum())


# ---- loss -----------------------------------------------------------------------------------------------------------
def test_loss_is_independent_of_padding(small_model, train_corpus):
    """forward() packs or pads to the longest record and scores the existing rows only; the same loss comes
    from the exact likelihood of the full n_ctx-row matrices, per one in the scored rows."""
    from ehrsynth.models.halo.likelihood import row_log_likelihood

    model = small_model.eval()
    patients = np.arange(20)
    batch = model.collate(train_corpus, patients)
    with torch.no_grad():
        loss = model(batch)
        full = {"ones": batch["ones"], "lengths": batch["lengths"]}
        x = dense_rows(batch["ones"], batch["lengths"], model.layout.n_columns)
        ll = row_log_likelihood(model.network, model.layout, full)
        nll, units = model.validation_loss(batch)
    rows = torch.arange(1, x.shape[1])
    scored = rows[None, :] <= batch["lengths"][:, None] + 2
    assert units == x[:, 1:][scored].sum()  # the ones of the static, visit and end rows
    assert torch.allclose(nll.double(), -ll.sum(), rtol=1e-5)
    assert torch.allclose(loss.double(), -ll.sum() / units, rtol=1e-5)
    assert 10.0 < float(loss) < 60.0  # untrained: about log 2 for each of ~580 absent codes per visit


def test_packed_and_padded_losses_and_gradients_agree(small_model, train_corpus):
    """Packing records into one block-diagonal causal sequence changes the compute, not the math."""
    model = small_model.train()
    batch = model.collate(train_corpus, np.arange(30))
    grads = []
    for packed in (False, True):
        model.zero_grad()
        loss = model.loss(batch, packed=packed)
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    model.zero_grad()
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-4)


def test_collate_rejects_unknown_codes_and_missing_labels(small_model, mimic3_corpus):
    from dataclasses import replace

    from ehrsynth.data.vocab import Vocabulary

    renamed = replace(mimic3_corpus, vocab=Vocabulary(("ICD9CM/NOPE",) + mimic3_corpus.vocab.codes[1:],
                                                      mimic3_corpus.vocab.counts))
    first_use = np.flatnonzero(mimic3_corpus.codes == 0)[0]  # an occurrence of code 0, renamed above
    patient = mimic3_corpus.visit_patient()[mimic3_corpus.code_visit()[first_use]]
    with pytest.raises(ConfigError, match="NOPE"):
        small_model.collate(renamed, np.array([patient]))
    unlabeled = replace(mimic3_corpus, labels=np.zeros((mimic3_corpus.n_patients, 0), np.uint8), label_names=())
    with pytest.raises(ConfigError, match="mortality"):
        small_model.collate(unlabeled, np.arange(3))


def test_model_from_meta_without_extra_and_train_defaults():
    meta = CorpusMeta(codes=("X/a", "X/b"), label_names=("y",))
    model = HaloModel(TINY, meta)
    assert model.gap_days == bin_values(TINY.gap_bin_edges)
    defaults = HaloModel.default_train_config()
    assert (defaults["optimizer"], defaults["lr"], defaults["batch_size"], defaults["max_epochs"]) == \
        ("adam", 1e-4, 48, 400)


# ---- clock and seen codes (beyond the paper) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gibleed_train(data_dir):
    from ehrsynth.data.build import BuildOptions
    from ehrsynth.data.readers.omop import read_omop

    return read_omop(data_dir / "omop-gibleed", options=BuildOptions(max_visits=45, seed=0)).part("train")


def test_coarse_inputs_are_age_years_since_the_first_visit_and_codes_so_far(gibleed_train):
    """Row t's clock (GiBleed): the age bucket's mean training age plus the mean training days of the gap bins of
    visits 1..t, computed here from the corpus itself; the first two rows (start, static) only know the age.
    Then the history input: the codes of visits 0..t, also from the corpus."""
    from ehrsynth.models.halo.encoding import bin_index

    model = HaloModel.from_corpus(gibleed_train, HaloConfig.small())
    extra = model.meta.extra
    assert extra["clock_gap_days"][-1] > 5475 and 730 < extra["clock_gap_days"][7] < 1095  # bin means, not edges
    patients = np.arange(40)
    batch = model.collate(gibleed_train, patients)
    x = dense_rows(batch["ones"], batch["lengths"], model.layout.n_columns, n_rows=batch["n_rows"])
    features = model.network.coarse_inputs(x).numpy()  # (B, T, 3 + V)
    V = model.layout.n_codes
    assert features.shape[2] == 3 + V
    clock, history = features[..., :3], features[..., 3:]
    vo, days = np.asarray(gibleed_train.visit_offsets), np.asarray(gibleed_train.visit_days)
    co, codes = np.asarray(gibleed_train.code_offsets), np.asarray(gibleed_train.codes)
    for p in patients:
        so_far = np.zeros(V)
        assert not history[p, :2].any()  # start and static rows: nothing recorded yet
        for k, visit in enumerate(range(vo[p], vo[p + 1])):
            so_far[codes[co[visit]:co[visit + 1]]] = 1  # the corpus vocabulary is the model's here
            np.testing.assert_array_equal(history[p, 2 + k], so_far)
        gaps = np.diff(days[vo[p]:vo[p + 1]])
        elapsed = np.concatenate([[0.0], np.cumsum(np.asarray(extra["clock_gap_days"])[
            bin_index(gaps, model.layout.gap_edges)])]) / 365.25
        age = extra["clock_age_years"][bin_index(gibleed_train.age_at_first_visit[p:p + 1], model.layout.age_edges)[0]]
        rows = slice(2, 2 + len(elapsed))  # visit rows
        np.testing.assert_allclose(clock[p, rows, 0], (age + elapsed) / 50, rtol=1e-5)
        np.testing.assert_allclose(clock[p, rows, 1], np.log1p(elapsed), rtol=1e-5, atol=1e-6)
        assert clock[p, 0, 2] == 0 and np.all(clock[p, 1:, 2] == 1)  # the age is known from the static row on
    assert clock[:, :, 0].max() * 50 > 60  # real lifetimes: some records reach past 60


def test_seen_codes_terms_reach_only_codes_recorded_before(gibleed_train):
    """The fine head's "seen before" input of row t holds the codes of rows <= t-1 only; a strongly negative term
    for a code makes the sampler never repeat it, a strongly positive one makes it recur in every visit."""
    from ehrsynth.models.halo.network import seen_codes

    rows = torch.zeros(1, 4, 5)
    rows[0, 1, 2] = rows[0, 2, 0] = 1.0
    assert seen_codes(rows, 3)[0].tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 0, 1]]
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="last 9 visits are kept"):  # a short window keeps the test quick
        model = HaloModel.from_corpus(gibleed_train, HaloConfig.small(n_ctx=12)).eval()
    code = int(np.bincount(gibleed_train.codes).argmax())  # the most frequent code
    with torch.no_grad():
        model.fine.first.bias[1 + code] += 6.0  # every visit would start with it ...
        model.fine.seen_first[code] = -30.0  # ... unless it was recorded before
    never = model.generate(300, seed=1)
    counts = [np.bincount(never.codes[never.code_offsets[never.visit_offsets[p]]:
                                      never.code_offsets[never.visit_offsets[p + 1]]], minlength=model.layout.n_codes)
              for p in range(never.n_patients)]
    assert max(c[code] for c in counts) == 1 and sum(c[code] for c in counts) > 250
    with torch.no_grad():
        model.fine.seen_first[code] = 30.0
    always = model.generate(300, seed=1)
    firsts = always.codes[always.code_offsets[:-1]]
    assert np.mean(firsts == code) > 0.95

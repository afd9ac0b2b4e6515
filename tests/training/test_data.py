"""Data generators: seeded determinism, answers recoverable from the inputs, packing."""

import itertools

import ml_collections
import numpy as np
import pytest

from linear_jax.training import data, synthetic, text

LENGTHS = {"mqar": 64, "icl_regression": 40, "selective_copy": 32}


def _gen(name, seed=0, batch=16, **params):
    return synthetic.GENERATORS[name](np.random.default_rng(seed), batch,
                                      LENGTHS.get(name, 32), **params)


@pytest.mark.parametrize("name", sorted(set(synthetic.GENERATORS) - set(synthetic.REGRESSION)))
def test_generators_deterministic_and_in_vocab(name):
    a, b, c = _gen(name, 0), _gen(name, 0), _gen(name, 1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["tokens"], c["tokens"])
    vocab = synthetic.vocab_size(name)
    assert a["tokens"].dtype == np.int32 and a["targets"].dtype == np.int32
    assert 0 <= a["tokens"].min() and a["tokens"].max() < vocab and a["targets"].max() < vocab
    assert a["mask"].sum() > 0 and set(np.unique(a["mask"])) <= {0.0, 1.0}


@pytest.mark.parametrize("cols,n", [(4096, 16), (4096, 64), (112, 16), (128, 16), (9, 8),
                                    (9, 9), (5, 7)])
@pytest.mark.parametrize("uniform", [False, True])
def test_smallest_is_the_head_of_argsort(cols, n, uniform):
    """MQAR's batches are the same as with the full sort, so committed runs stay reproducible; the
    uniform path too, also where a row has too few values below its threshold (the last row
    here, all 0.9), which sends the batch the general way."""
    r = np.random.default_rng(cols + n).random((13, cols))
    np.testing.assert_array_equal(synthetic._smallest(r, n, uniform), np.argsort(r, axis=1)[:, :n])
    r[-1] = 0.9 + 0.01 * r[-1]
    np.testing.assert_array_equal(synthetic._smallest(r, n, uniform), np.argsort(r, axis=1)[:, :n])


def test_mqar_answers_recoverable():
    n = 8
    b = _gen("mqar", num_kv_pairs=n)
    for tok, tgt, m in zip(b["tokens"], b["targets"], b["mask"], strict=True):
        table = dict(zip(tok[0:2 * n:2], tok[1:2 * n:2], strict=True))
        assert len(table) == n                               # distinct keys
        queries = np.flatnonzero(m)
        assert len(queries) == n and queries.min() >= 2 * n
        assert sorted(tok[queries]) == sorted(table)         # every key queried once
        for t in queries:
            assert tgt[t] == table[tok[t]]


@pytest.mark.parametrize("options", [dict(power_a=0.01), dict(random_non_queries=True),
                                     dict(power_a=0.01, random_non_queries=True)])
def test_mqar_zoology_options_keep_the_answers(options):
    """Zoology's query gaps and random filler tokens leave every query answerable from the pairs;
    without the options the batches are those the committed runs trained on."""
    n, vocab = 8, synthetic.vocab_size("mqar", num_kv_pairs=8)
    b = _gen("mqar", num_kv_pairs=n, **options)
    for tok, tgt, m in zip(b["tokens"], b["targets"], b["mask"], strict=True):
        table = dict(zip(tok[0:2 * n:2], tok[1:2 * n:2], strict=True))
        queries = np.flatnonzero(m)
        assert len(queries) == n and queries.min() >= 2 * n and (queries % 2 == 0).all()
        assert sorted(tok[queries]) == sorted(table)
        assert all(tgt[t] == table[tok[t]] for t in queries)
        rest = np.setdiff1d(np.arange(2 * n, len(tok)), queries)
        assert tok.min() >= 0 and tok.max() < vocab
        assert (tok[rest] != 0).any() == options.get("random_non_queries", False)
    plain = _gen("mqar", num_kv_pairs=n)
    off = _gen("mqar", num_kv_pairs=n, power_a=None, random_non_queries=False)
    assert all(np.array_equal(plain[k], off[k]) for k in plain)


def test_mqar_power_law_gaps_are_zoologys_draws():
    """The queries' slots: each slot's chance of holding a query equals that of drawing n slots
    one at a time without replacement with P(slot i) ~ i^(a - 1), as Zoology's generator does
    (numpy's choice), within sampling error; a = 1 is uniform."""
    rows, seq_len, n = 4000, 64, 8
    slots = (seq_len - 2 * n) // 2
    rng = np.random.default_rng(0)
    for a in (0.01, 1.0):
        b = synthetic.mqar(np.random.default_rng(1), rows, seq_len, num_kv_pairs=n, power_a=a)
        ours = b["mask"][:, 2 * n::2].mean(axis=0)
        p = np.arange(1, slots + 1) ** (a - 1.0)
        ref = np.zeros(slots)
        for _ in range(rows):
            ref[rng.choice(slots, size=n, replace=False, p=p / p.sum())] += 1 / rows
        np.testing.assert_allclose(ours, ref, atol=0.035)
        if a == 1.0:
            np.testing.assert_allclose(ours, n / slots, atol=0.035)
        else:
            assert ours[0] > 2 * ours[-1]


def test_state_tracking_targets():
    b = _gen("parity")
    np.testing.assert_array_equal(b["targets"] - 1, np.cumsum(b["tokens"] - 1, axis=1) % 2)
    b = _gen("modular_addition", modulus=7)
    np.testing.assert_array_equal(b["targets"] - 1, np.cumsum(b["tokens"] - 1, axis=1) % 7)
    for name, n in (("s3", 3), ("s5", 5)):
        perms = list(itertools.permutations(range(n)))
        b = _gen(name, batch=2)
        assert synthetic.vocab_size(name) == 1 + len(perms) == 1 + synthetic.num_classes(name)
        for tok, tgt in zip(b["tokens"], b["targets"], strict=True):
            acc = list(range(n))
            for x, y in zip(tok, tgt, strict=True):
                acc = [perms[x - 1][i] for i in acc]         # apply the new permutation last
                assert tuple(acc) == perms[y - 1]


def test_icl_regression_targets_are_linear_in_x():
    d = 4
    b = _gen("icl_regression", dim=d)
    for tok, tgt, m in zip(b["tokens"], b["targets"], b["mask"], strict=True):
        ex = tok[:len(tok) // (d + 1) * (d + 1)].reshape(-1, d + 1)
        x, y = 2 * ex[:, :d] - 3, ex[:, d] - 3 - d
        w, *_ = np.linalg.lstsq(x.astype(float), y.astype(float), rcond=None)
        np.testing.assert_allclose(x @ w, y, atol=1e-8)      # one w explains every example
        np.testing.assert_array_equal(tgt[m > 0], ex[:, d])


def test_selective_copy_and_induction_targets():
    b = _gen("selective_copy", num_tokens=8)
    for tok, tgt, m in zip(b["tokens"], b["targets"], b["mask"], strict=True):
        sep = int(np.flatnonzero(tok == 9)[0])
        np.testing.assert_array_equal(tgt[m > 0], tok[:sep][tok[:sep] > 0])
    b = _gen("induction")
    for tok, tgt, m in zip(b["tokens"], b["targets"], b["mask"], strict=True):
        for t in np.flatnonzero(m):
            assert tgt[t] == tok[t - 16 + 1]                 # what followed it the first time


def test_pack_segment_ids_and_mask():
    docs = [np.full(5, 1), np.full(3, 2), np.full(9, 3)]
    ids, seg = text.pack([d.astype(np.uint8) for d in docs], row_len=4)
    assert ids.shape == (4, 4)                               # 17 tokens -> 4 rows, 1 dropped
    np.testing.assert_array_equal(ids, seg)                  # each doc's tokens carry its id
    batch = text.rows_to_batch(ids, seg)
    assert batch["tokens"].shape == (4, 3)
    # a target in another document than its input is not scored
    np.testing.assert_array_equal(batch["mask"], batch["tokens"] == batch["targets"])


def _task(**kw):
    return ml_collections.ConfigDict({"name": "lm", "seq_len": 64,
                                      "validation_docs": text.DEFAULT_VALIDATION_PLAYS, **kw})


def test_text_source_resumable_and_held_out():
    src = data.make_source(_task(), split="train", batch_size=4, seed=0)
    again = data.make_source(_task(), split="train", batch_size=4, seed=0)
    for i in (0, 7, src.num_rows // 4 + 3):                  # the last one is in epoch 2
        np.testing.assert_array_equal(src.batch(i)["tokens"], again.batch(i)["tokens"])
    assert not np.array_equal(src.batch(0)["tokens"], src.batch(1)["tokens"])
    b = src.batch(0)
    assert b["tokens"].shape == (4, 64) and b["segment_ids"].shape == (4, 64)
    assert src.vocab_size == 256
    train_text = {text.decode(r) for r in b["tokens"]}
    val = data.make_source(_task(), split="eval", batch_size=4, seed=0)
    assert not train_text & {text.decode(r) for r in val.batch(0)["tokens"]}


def test_text_falls_back_to_pydoc(monkeypatch, caplog):
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    train, val, name = text.load_corpus()
    assert name == "pydoc_topics" and train and val
    assert "falling back" in caplog.text

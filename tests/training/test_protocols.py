"""The papers' protocols in the data and the loss: variable training lengths, the label at the last
token, scaled accuracy, modular arithmetic with and without brackets, real-valued tokens with a
regression loss, and the one-step gradient-descent baseline."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from linear_jax.models import LM, LMConfig
from linear_jax.training import data, evaluation, formal, regression, step
from linear_jax.training.mesh import ConfigError


def _source(name, split="train", **task):
    task = ml_collections.ConfigDict({"name": name, "seq_len": 24, "params": {}, **task})
    return data.make_source(task, split=split, batch_size=8, seed=0)


def test_variable_lengths_pad_and_score_the_last_token():
    src = _source("parity", min_seq_len=3, score="last")
    lengths = set()
    for i in range(12):
        b = src.batch(i)
        assert b["tokens"].shape == (8, 24)
        n = int(np.sum(b["tokens"][0] > 0))                  # parity tokens are 1 and 2
        lengths.add(n)
        assert (b["tokens"][:, n:] == 0).all() and (b["tokens"][:, :n] > 0).all()
        np.testing.assert_array_equal(np.flatnonzero(b["mask"][0]), [n - 1])
        np.testing.assert_array_equal(b["targets"][:, n - 1] - 1,
                                      np.sum(b["tokens"][:, :n] - 1, axis=1) % 2)
        np.testing.assert_array_equal(b["tokens"], src.batch(i)["tokens"])   # resumable
    assert len(lengths) > 3 and min(lengths) >= 3
    ev = _source("parity", split="eval", min_seq_len=3, score="last").batch(0)
    assert (ev["tokens"] > 0).all()                          # eval lengths are fixed


def test_eval_length_range_mixes_lengths_within_each_batch():
    """`eval.length_range = (lo, hi)`: one length per row, drawn from [lo, hi], each row scored at
    its own last token; the same batches on every call; a split of its own beside `eval`."""
    config = ml_collections.ConfigDict({
        "task": {"name": "parity", "seq_len": 8, "min_seq_len": 3, "score": "last", "params": {}},
        "eval": {"batch_size": 16, "seq_lens": (), "length_range": (10, 30)}})
    sources = evaluation.eval_sources(config, seed=0)
    assert sorted(sources) == ["eval", "eval_len10-30"]
    src = sources["eval_len10-30"]
    b = src.batch(0)
    assert b["tokens"].shape == (16, 30)
    lengths = np.sum(b["tokens"] > 0, axis=1)
    assert lengths.min() >= 10 and lengths.max() <= 30 and len(set(lengths)) > 4
    for tok, tgt, mask, n in zip(b["tokens"], b["targets"], b["mask"], lengths, strict=True):
        assert np.flatnonzero(mask).tolist() == [n - 1] and (tok[n:] == 0).all()
        assert tgt[n - 1] - 1 == np.sum(tok[:n] - 1) % 2
    np.testing.assert_array_equal(b["tokens"], src.batch(0)["tokens"])
    assert not np.array_equal(b["tokens"], src.batch(1)["tokens"])
    config.eval.length_range = (10,)
    with pytest.raises(ConfigError, match="length_range"):
        evaluation.eval_sources(config, seed=0)
    config.eval.length_range = (0, 30)
    with pytest.raises(ConfigError, match="length_range"):
        evaluation.eval_sources(config, seed=0)


def _decode(tokens, m=5):
    chars = {formal.op_id(m, c): c for c in formal.OPS}
    return "".join(str(t - 1) if 1 <= t <= m else chars[t] for t in tokens if t)


def test_modular_arithmetic_answers_are_the_expressions_values():
    for name, length in [("modular_arithmetic", 25), ("modular_arithmetic_brackets", 40)]:
        b = _source(name, seq_len=length, min_seq_len=5).batch(1)
        for tok, tgt, mask in zip(b["tokens"], b["targets"], b["mask"], strict=True):
            expr = _decode(tok)
            last = len(expr) - 1
            assert np.flatnonzero(mask).tolist() == [last]
            assert tgt[last] - 1 == eval(expr) % 5, expr     # Python's precedence is the task's
            if name.endswith("brackets"):
                assert expr.startswith("(") and "*" not in expr
            else:
                assert len(expr) % 2 == 1 and "(" not in expr


def test_scaled_accuracy_is_zero_at_chance_and_one_when_solved():
    src = _source("modular_arithmetic")
    assert src.num_classes == 5
    at = lambda acc: evaluation.summarize({"loss": 1.0, "correct": acc * 10, "weight": 10.0},
                                          src)["scaled_accuracy"]
    assert np.isclose(at(0.2), 0.0) and np.isclose(at(1.0), 1.0) and np.isclose(at(0.6), 0.5)
    reg = _source("linear_regression", seq_len=11)
    assert evaluation.summarize({"loss": 2.0, "correct": 0.0, "weight": 4.0}, reg) == {"loss": 0.5}


def test_real_valued_tokens_are_read_in_by_the_embedding_and_scored_by_squared_error():
    model = LM(LMConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, ffn="none",
                        mixer="linear_attention"), rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 4, 10, 0]])
    np.testing.assert_allclose(model(jax.nn.one_hot(ids, 11))[0], model(ids)[0], atol=1e-6)

    b = _source("linear_regression", seq_len=11, params={"dim": 10}).batch(0)
    assert b["tokens"].shape == (8, 11, 11) and b["tokens"].dtype == np.float32
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sums = step.make_eval_step(graphdef)({"params": params, "rest": rest}, b)
    pred = model(jnp.asarray(b["tokens"]))[0][:, -1, -1]
    np.testing.assert_allclose(sums["loss"], np.sum((pred - b["targets"][:, -1]) ** 2), rtol=1e-5)
    assert sums["weight"] == 8


def test_gd_baseline_step_size_is_the_best_one_step_and_beats_predicting_zero():
    batches = lambda split: [_source("linear_regression", split, seq_len=11,
                                     params={"dim": 10}).batch(i) for i in range(4)]
    tune, ev = batches("tune"), batches("eval")
    base = regression.baselines(tune, ev)
    gd = base["gd"]
    zero = np.mean([np.sum(b["targets"] ** 2) / np.sum(b["mask"]) for b in ev])
    assert np.isclose(base["zero"]["loss"], zero)
    assert gd["steps"] == 1 and 0.0 < gd["loss"] < zero
    A, b, x_q, y_q = regression._tasks(tune)
    tuned = lambda etas: np.mean((regression.gd_predict(etas, A, b, x_q) - y_q) ** 2)
    (eta,) = gd["step_sizes"]
    assert tuned([eta]) < min(tuned([0.9 * eta]), tuned([1.1 * eta]))
    # one step by hand for one query: eta (1/N) sum_i y_i x_i . x_q
    bt = ev[0]
    x, yy = bt["tokens"][0, :, :10].astype(float), bt["tokens"][0, :, 10].astype(float)
    A, b, x_q, _ = regression._tasks(ev)
    assert np.isclose(regression.gd_predict([eta], A, b, x_q)[0],
                      eta * np.mean(yy[:10] * (x[:10] @ x[10])))


def test_gd_baseline_with_k_steps_is_gradient_descent_with_fitted_step_sizes():
    batches = lambda split: [_source("linear_regression", split, seq_len=11,
                                     params={"dim": 10}).batch(i) for i in range(4)]
    tune, ev = batches("tune"), batches("eval")
    losses = [regression.baselines(tune, ev, k)["gd"]["loss"] for k in (1, 2, 3)]
    assert losses[0] > losses[1] > losses[2] > 0.0          # more steps, less error
    gd = regression.baselines(tune, ev, 3)["gd"]
    # the iterates by hand: w <- w - eta (1/N) X^T (X w - y) from w = 0, y_hat = w . x_q
    bt = ev[0]
    x, yy = bt["tokens"][0, :10, :10].astype(float), bt["tokens"][0, :10, 10].astype(float)
    w = np.zeros(10)
    for eta in gd["step_sizes"]:
        w = w - eta * x.T @ (x @ w - yy) / 10
    A, b, x_q, _ = regression._tasks(ev)
    assert np.isclose(regression.gd_predict(gd["step_sizes"], A, b, x_q)[0],
                      w @ bt["tokens"][0, 10, :10])
    # a stationary point of the tuning loss: no single step size can be moved to gain
    A, b, x_q, y_q = regression._tasks(tune)
    loss = lambda etas: np.mean((regression.gd_predict(etas, A, b, x_q) - y_q) ** 2)
    for k in range(3):
        for f in (0.95, 1.05):
            moved = list(gd["step_sizes"])
            moved[k] *= f
            assert loss(moved) > loss(gd["step_sizes"])


def test_gdpp_is_the_papers_layers_on_tokens_and_fits_at_least_as_well_as_gd():
    """GD++ in closed form (a preconditioned GD on w) is the layers as the paper writes them on
    the tokens: each layer moves every token's y slot by -eta (1/N) sum_i y_i x_i . x_j and its x
    by -gamma (1/N) sum_i x_i x_i^T x_j, both from that layer's tokens; y_hat = -(query's y)."""
    batches = lambda split: [_source("linear_regression", split, seq_len=11,
                                     params={"dim": 10}).batch(i) for i in range(4)]
    tune, ev = batches("tune"), batches("eval")
    etas, gammas = [1.3, 0.7, 0.5], [0.4, -0.2]
    A, b, x_q, _ = regression._tasks(ev)
    got = regression.gdpp_predict(etas, gammas, A, b, x_q)
    for r in range(3):
        tokens = ev[0]["tokens"][r].astype(np.float64)
        x, y = tokens[:, :10].copy(), tokens[:, 10].copy()
        for k, eta in enumerate(etas):
            xc, yc = x[:10].copy(), y[:10].copy()
            y = y - eta * x @ (xc.T @ yc) / 10
            x = x - (gammas[k] if k < 2 else 0.0) * x @ (xc.T @ xc) / 10
        np.testing.assert_allclose(got[r], -y[10], rtol=1e-10)
    np.testing.assert_allclose(regression.gdpp_predict(etas, [0.0, 0.0], A, b, x_q),
                               regression.gd_predict(etas, A, b, x_q), rtol=1e-12)
    with pytest.raises(ValueError, match="3 steps need 2 gammas, got 1"):
        regression.gdpp_predict(etas, [0.1], A, b, x_q)
    # fitted on the tuning tasks from GD's step sizes: never worse there; one step is GD itself
    A, b, x_q, y_q = regression._tasks(tune)
    mse = lambda pred: np.mean((pred - y_q) ** 2)
    two = regression.baselines(tune, ev, 2)
    pp, gd = two["gdpp"], two["gd"]
    assert len(pp["gammas"]) == 1 and pp["gammas"][0] != 0.0
    assert (mse(regression.gdpp_predict(pp["step_sizes"], pp["gammas"], A, b, x_q))
            < 0.99 * mse(regression.gd_predict(gd["step_sizes"], A, b, x_q)))
    one = regression.baselines(tune, ev, 1)
    assert one["gdpp"]["gammas"] == [] and np.isclose(one["gdpp"]["loss"], one["gd"]["loss"])


def test_induction_heads_answer_is_what_followed_the_first_trigger():
    b = _source("induction_heads", seq_len=32).batch(0)
    trigger = 17
    for tok, tgt, mask in zip(b["tokens"], b["targets"], b["mask"], strict=True):
        first = np.flatnonzero(tok == trigger)
        assert len(first) == 2 and first[1] == 31 and np.flatnonzero(mask).tolist() == [31]
        assert tgt[31] == tok[first[0] + 1] and 1 <= tgt[31] <= 16


@pytest.mark.parametrize("task", [dict(name="mqar", params={"num_kv_pairs": 4}),
                                  dict(name="parity", score="last", min_seq_len=3)])
def test_gathered_positions_give_the_full_batch_loss_and_gradients(task):
    """`task.gather`: the head on the scored positions only, the same loss, accuracy and
    gradients as the full [B, T, vocab] logits (MQAR's queries; the last token of rows of drawn
    lengths, eval split: a length per row)."""
    # eval rows of parity get a length each (eval.length_range): a different position per row
    full_src = data.make_source(ml_collections.ConfigDict({"seq_len": 24, "params": {}, **task}),
                                split="eval", batch_size=8, seed=0,
                                min_seq_len=5 if "min_seq_len" in task else 0)
    full = full_src.batch(1)
    gathered = data.gather_scored(full)
    P = int(full["mask"].sum(axis=1).max())
    assert gathered["positions"].shape == gathered["targets"].shape == (8, P)
    np.testing.assert_array_equal(np.take_along_axis(full["targets"], gathered["positions"], 1),
                                  gathered["targets"])
    if "min_seq_len" in task:
        assert len(set(gathered["positions"][:, 0])) > 1
    src = _source(**{**task, "gather": True})
    assert "positions" in src.batch(0) and "positions" not in _source(**task).batch(0)
    with pytest.raises(ConfigError, match="task.gather applies to synthetic tasks"):
        _source("lm", gather=True)

    model = LM(LMConfig(vocab_size=full_src.vocab_size, d_model=16, num_layers=1, num_heads=2,
                        mixer="gla"), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = __import__("optax").sgd(0.1)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rest": rest}
    train = jax.jit(step.make_train_step(graphdef, tx, microbatches=2))
    (new_a, m_a), (new_b, m_b) = train(state, full), train(state, gathered)
    for k in ("loss", "accuracy", "grad_norm", "tokens"):
        np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-5, err_msg=k)
    assert m_a["grad_norm"] > 0
    for a, b in zip(jax.tree.leaves(new_a["params"]), jax.tree.leaves(new_b["params"]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"positions must be \[B, P\]"):
        model(jnp.asarray(full["tokens"]), positions=jnp.zeros((3, 1), jnp.int32))

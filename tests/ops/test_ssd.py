"""Op-specific tests for ssd (the contract suite covers the rest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.ops.ssd import ssd
from tests.utils import assert_close

# one compilation per shape instead of op-by-op dispatch (CI has 2 cores)
ssd_jit = jax.jit(ssd, static_argnames=("dt_softplus", "chunk_size", "impl"))


def _draw(rng, B=2, T=21, H=4, G=2, P=3, N=5):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(x=f(B, T, H, P), dt=f(B, T, H), A=-np.exp(rng.uniform(-1, 1, H)).astype(np.float32),
                B=f(B, T, G, N), C=f(B, T, G, N), D=f(H), dt_bias=f(H))


def quadratic_ssd(x, dt, A, Bm, Cm, D):
    """float64 dual form of Mamba-2 (its "attention" view, Dao & Gu 2024, Sec. 5):
    y = (L o C B^T) (x dt) + D x with L_ij = exp(sum_{j<s<=i} dt_s A) for i >= j."""
    x, dt, A, Bm, Cm, D = (np.asarray(a, np.float64) for a in (x, dt, A, Bm, Cm, D))
    rep = x.shape[2] // Bm.shape[2]
    Bm, Cm = np.repeat(Bm, rep, 2), np.repeat(Cm, rep, 2)
    cs = np.cumsum(dt * A, axis=1)                                  # [B,T,H]
    T = x.shape[1]
    diff = cs[:, :, None, :] - cs[:, None, :, :]                    # [B,i,j,H]
    L = np.where(np.tril(np.ones((T, T), bool))[None, :, :, None], np.exp(np.minimum(diff, 0)), 0)
    scores = np.einsum("bihn,bjhn->bijh", Cm, Bm) * L
    return np.einsum("bijh,bjhp->bihp", scores, x * dt[..., None]) + D[:, None] * x


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_matches_the_quadratic_dual_form(impl):
    rng = np.random.default_rng(0)
    a = _draw(rng)
    y, _ = ssd_jit(**a, impl=impl, chunk_size=8)
    dt = np.logaddexp(0.0, a["dt"].astype(np.float64) + a["dt_bias"])
    assert_close(y, quadratic_ssd(a["x"], dt, a["A"], a["B"], a["C"], a["D"]), 1e-5, "y")


def test_dt_softplus_and_bias_are_applied_before_the_scan():
    rng = np.random.default_rng(1)
    a = _draw(rng)
    y, h = ssd_jit(**a, impl="chunk", chunk_size=8)
    dt = jax.nn.softplus(a["dt"] + a["dt_bias"])
    y2, h2 = ssd_jit(a["x"], dt, a["A"], a["B"], a["C"], a["D"], dt_softplus=False, impl="chunk",
                 chunk_size=8)
    assert_close(y, y2, 1e-6, "y")
    assert_close(h, h2, 1e-6, "state")


def test_groups_serve_consecutive_heads_and_D_is_a_skip():
    """Group g of B and C serves heads g H/G .. (g + 1) H/G - 1 (Mamba-2's repeat); D adds D x."""
    rng = np.random.default_rng(2)
    a = _draw(rng, H=6, G=2)
    y, h = ssd_jit(**a, impl="chunk", chunk_size=8)
    rep = dict(a, B=np.repeat(a["B"], 3, 2), C=np.repeat(a["C"], 3, 2), D=None)
    y2, h2 = ssd_jit(**rep, impl="recurrent")
    assert_close(y - a["D"][:, None] * a["x"], y2, 1e-5, "grouped output")
    assert_close(h, h2, 1e-5, "grouped state")


def test_packed_documents_equal_separate_sequences():
    rng = np.random.default_rng(3)
    a = _draw(rng, B=1, T=30)
    seg = np.array([[0] * 13 + [1] * 17], np.int32)
    y, h = ssd_jit(**a, segment_ids=seg, impl="chunk", chunk_size=8)
    cut = lambda s: {n: (v[:, s] if np.ndim(v) >= 2 else v) for n, v in a.items()}
    y1, _ = ssd_jit(**cut(slice(0, 13)), impl="chunk", chunk_size=8)
    y2, h2 = ssd_jit(**cut(slice(13, 30)), impl="chunk", chunk_size=8)
    assert_close(y, jnp.concatenate([y1, y2], 1), 1e-5, "packed output")
    assert_close(h, h2, 1e-5, "last document's state")


def test_mamba2_magnitudes_long_sequence():
    """A = -exp(A_log) up to -16, dt ~ 1e-3..1e-1 (Mamba-2's init), bf16 x over 2048 steps:
    chunk == recurrent in value and in every gradient, nothing non-finite."""
    rng = np.random.default_rng(4)
    B, T, H, G, P, N = 1, 2048, 2, 1, 4, 8
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    x = jnp.asarray(f(B, T, H, P), jnp.bfloat16)
    dt_bias = np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), H)))).astype(np.float32)
    A_log = np.log(rng.uniform(1, 16, H)).astype(np.float32)
    Bm, Cm, dt = f(B, T, G, N), f(B, T, G, N), f(B, T, H)

    def loss(impl, x, dt, A_log, Bm, Cm):
        y, h = ssd_jit(x, dt, -jnp.exp(A_log), Bm, Cm, None, dt_bias, impl=impl)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5)), static_argnums=0)
    args = (x, dt, A_log, Bm, Cm)
    (lc, gc), (lr, gr) = grad("chunk", *args), grad("recurrent", *args)
    assert np.isfinite(float(lc)) and abs(float(lc) - float(lr)) <= 1e-4 * abs(float(lr))
    for name, u, w in zip(["x", "dt", "A_log", "B", "C"], gc, gr, strict=True):
        assert np.isfinite(np.asarray(u, np.float32)).all()
        assert_close(u.astype(jnp.float32), w.astype(jnp.float32), 1e-3, f"d{name}")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(A=np.ones(4, np.float32)), "A must be <= 0"),
        (dict(A=-np.ones(3, np.float32)), r"A must have shape \[H\]"),
        (dict(dt=-np.ones((2, 8, 4), np.float32), dt_softplus=False), "dt must be >= 0"),
        (dict(dt=np.ones((2, 8, 4, 1), np.float32)), "dt must have rank 3"),
        (dict(B=np.ones((2, 8, 3, 5), np.float32), C=np.ones((2, 8, 3, 5), np.float32)),
         "multiple of the groups"),
        (dict(C=np.ones((2, 8, 2, 6), np.float32)), "B and C"),
        (dict(B=np.ones((1, 8, 2, 5), np.float32), C=np.ones((1, 8, 2, 5), np.float32)),
         "batch size"),
        (dict(D=np.ones((4, 3), np.float32)), r"D must have shape \[H\]"),
        (dict(dt_bias=np.ones(2, np.float32)), r"dt_bias must have shape \[H\]"),
        (dict(initial_state=np.zeros((2, 4, 3, 5), np.float32)), r"\[B, H, N, P\]"),
        (dict(segment_ids=np.zeros((2, 8), np.float32)), "segment_ids must be an integer"),
        (dict(impl="fast"), "impl"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    args = dict(x=np.ones((2, 8, 4, 3), np.float32), dt=np.ones((2, 8, 4), np.float32),
                A=-np.ones(4, np.float32), B=np.ones((2, 8, 2, 5), np.float32),
                C=np.ones((2, 8, 2, 5), np.float32))
    with pytest.raises(ValueError, match=match):
        ssd(**dict(args, **change))


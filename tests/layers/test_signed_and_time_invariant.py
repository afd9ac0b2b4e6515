"""Mamba and Mamba-2 with transitions in (-1, 1) (Grazzi et al. 2025) and the time-invariant S4D
layer, each against a float64 NumPy recurrence built from the layer's own projections and
parameters."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linear_jax.layers import S4D, Mamba, Mamba2
from tests.utils import assert_close, rel_err

B, T, D = 2, 12, 16


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _softplus(v):
    return np.log1p(np.exp(v))


def test_mamba_neg_eigval_is_the_signed_recurrence():
    layer = Mamba(D, d_state=4, allow_neg_eigval=True, rngs=nnx.Rngs(0))
    layer.A_log[...] = layer.A_log[...] + 4.0      # fast decays too: 2 exp(dt A) - 1 of both signs
    # no skip and large B, C: the output is the scan's, not D u
    layer.D[...] = jnp.zeros_like(layer.D[...])
    layer.x_proj.kernel[...] = 30.0 * layer.x_proj.kernel[...]
    x = _x()

    @jax.jit                   # eagerly, each of the layer's small ops would compile alone
    def projections_and_call(layer, x):
        xs, z = jnp.split(layer.in_proj(x), 2, axis=-1)
        u, _ = layer.conv(xs)
        dt, Bm, Cm = jnp.split(layer.x_proj(u), [layer.R, layer.R + layer.N], axis=-1)
        return (u, z, layer.dt_proj(dt), Bm, Cm), layer(x)
    (u, z, dt, Bm, Cm), (out, cache) = projections_and_call(layer, x)
    f64 = lambda t: np.asarray(t, np.float64)
    u, z, Bm, Cm = map(f64, (u, z, Bm, Cm))
    dt = _softplus(f64(dt))[..., None]                                      # [B, T, E, 1]
    a = 2.0 * np.exp(dt * -np.exp(f64(layer.A_log[...]))) - 1.0
    assert a.min() < 0 < a.max() and np.abs(a).max() < 1
    h, ys = np.zeros((B, layer.E, layer.N)), []
    for t in range(T):
        h = a[:, t] * h + dt[:, t] * u[:, t, :, None] * Bm[:, t, None, :]
        ys.append(np.sum(h * Cm[:, t, None, :], -1) + f64(layer.D[...]) * u[:, t])
    y = np.stack(ys, 1) * z / (1.0 + np.exp(-z))
    ref = y @ f64(layer.out_proj.kernel[...])
    assert_close(out, ref, 1e-5, "mamba, transitions 2 exp(dt A) - 1")
    assert_close(cache["state"], h, 1e-5, "final state")
    plain = Mamba(D, d_state=4, rngs=nnx.Rngs(0))
    for name in ("A_log", "D"):
        getattr(plain, name)[...] = getattr(layer, name)[...]
    plain.x_proj.kernel[...] = layer.x_proj.kernel[...]
    assert rel_err(jax.jit(lambda m, x: m(x)[0])(plain, x), out) > 0.1  # the option changes it


def test_s4d_convolution_and_recurrence_are_the_zoh_diagonal_ssm():
    layer = S4D(D, d_state=4, rngs=nnx.Rngs(1))
    layer.D[...] = jnp.zeros_like(layer.D[...])             # the output is the SSM's alone
    layer.log_dt[...] = layer.log_dt[...] + 2.0             # steps up to 0.7: the modes interact
    x = _x(1)

    @jax.jit                   # eagerly, each of the layer's small ops would compile alone
    def projection_and_views(layer, x):
        # the convolutional view (no cache) and the recurrent one
        return layer.in_proj(x), layer(x), layer(x, cache=layer.init_cache(B))
    proj, (conv, conv_cache), (scan, scan_cache) = projection_and_views(layer, x)
    u, z = (np.asarray(v, np.float64) for v in jnp.split(proj, 2, axis=-1))
    f64 = lambda p: np.asarray(p[...], np.float64)
    A = -np.exp(f64(layer.A_re_log)) + 1j * f64(layer.A_im)
    a = np.exp(np.exp(f64(layer.log_dt))[:, None] * A)
    b = (a - 1.0) / A                                                         # ZOH with B = 1
    C = f64(layer.C_re) + 1j * f64(layer.C_im)
    h, ys = np.zeros((B, layer.E, layer.M), complex), []
    for t in range(T):
        h = a * h + b * u[:, t, :, None]
        ys.append(2.0 * np.real(np.sum(C * h, -1)) + f64(layer.D) * u[:, t])
    y = np.stack(ys, 1) * z / (1.0 + np.exp(-z))
    ref = y @ f64(layer.out_proj.kernel)
    assert_close(conv, ref, 1e-5, "s4d, FFT convolution")
    assert_close(scan, ref, 1e-5, "s4d, recurrence")
    assert_close(conv_cache["state"], h, 1e-5, "final state of the convolutional view")
    assert_close(scan_cache["state"], h, 1e-5, "final state of the recurrence")


def test_mamba2_neg_eigval_scan_is_the_signed_recurrence():
    layer = Mamba2(D, 2, d_state=4, num_groups=2, allow_neg_eigval=True, rngs=nnx.Rngs(2))
    layer.A_log[...] = jnp.log(jnp.array([20.0, 60.0]))      # transitions of both signs
    H, P, N = layer.H, layer.P, layer.N
    keys = jax.random.split(jax.random.key(3), 5)
    xs = jax.random.normal(keys[0], (B, T, H, P))
    dt = jax.random.normal(keys[1], (B, T, H))
    Bm, Cm = (jax.random.normal(k, (B, T, 2, N)) for k in keys[2:4])
    h0 = jax.random.normal(keys[4], (B, H, N, P))
    # jitted: eagerly, each of the scan's small ops would compile alone
    y, S = jax.jit(lambda m, *a: m.ssm(None, *a, None, None))(layer, xs, dt, Bm, Cm, h0)
    f64 = lambda t: np.asarray(t, np.float64)
    xs, Bm, Cm = f64(xs), np.repeat(f64(Bm), H // 2, 2), np.repeat(f64(Cm), H // 2, 2)
    dt = _softplus(f64(dt) + f64(layer.dt_bias[...]))
    a = 2.0 * np.exp(dt * -np.exp(f64(layer.A_log[...]))) - 1.0
    assert a.min() < 0 < a.max()
    h, ys = f64(h0), []
    for t in range(T):
        h = a[:, t, :, None, None] * h + dt[:, t, :, None, None] * np.einsum(
            "bhn,bhp->bhnp", Bm[:, t], xs[:, t])
        ys.append(np.einsum("bhnp,bhn->bhp", h, Cm[:, t]) + f64(layer.D[...])[:, None] * xs[:, t])
    assert_close(y, np.stack(ys, 1), 1e-5, "mamba2, transitions 2 exp(dt A) - 1")
    assert_close(S, h, 1e-5, "final state")

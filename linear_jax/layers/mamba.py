"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

    x, z = x W_in                                         [B, T, E] each, E = expand * D
    u    = silu(conv(x))                                  depthwise, width 4, with bias
    dt, B, C = u W_x                                      dt [R], B, C [N]; dt -> dt W_dt (+ bias)
    y    = selective_scan(u, dt, A = -exp(A_log), B, C, D, z)   per channel state [N]
    out  = y W_out

`allow_neg_eigval=True` maps every transition exp(dt A) in (0, 1) to 2 exp(dt A) - 1 in (-1, 1),
Grazzi et al. 2025's extension ("Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues"), with which a diagonal recurrence can flip signs and so count mod 2. The
transition is then no longer an exponential, so the scan runs as `linear_jax.ops.diagonal_scan`
over the E N channels (a signed real recurrence) instead of the selective scan, whose decays are
positive by construction.

Paper choices: expand 2, N = 16, R = ceil(D / 16), A_log = log(1..N) per channel (S4D-real), D = 1,
dt = softplus(dt + dt_bias) with softplus(dt_bias) log-uniform in [1e-3, 1e-1]. Ops:
`linear_jax.ops.selective_scan` and `linear_jax.ops.short_conv`. Mamba has no heads.

Parameters: 2 D E (in) + 4 E + E (conv) + E (R + 2 N) + R E + E (dt) + E N + E (A, D) + E D (out).
State: h [B, E, N] float32; conv state [B, 3, E].
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import (
    DEFAULT_STD,
    begin,
    dense,
    dt_bias_init,
    leave,
    new_seg,
    op_kw,
    out_std,
    param,
)
from linear_jax.layers.short_conv import ShortConv
from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.selective_scan import selective_scan
from linear_jax.parallel.dispatch import unsupported


class Mamba(nnx.Module):
    SEQ_PARALLEL = False     # no sequence-parallel selective_scan op yet
    OP_IMPL = True           # `impl` is its op's (`linear_jax.ops.registry`)

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, allow_neg_eigval: bool = False,
                 chunk_size: int = 64, impl: str = "auto",
                 kernel_config=None, num_layers: int | None = None, std: float = DEFAULT_STD,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        E, N = expand * d_model, d_state
        self.E, self.N, self.R = E, N, dt_rank or math.ceil(d_model / 16)
        self.allow_neg_eigval = allow_neg_eigval
        self.op_kw = op_kw(chunk_size, impl, kernel_config)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = mk(d_model, 2 * E, ("embed", "mlp"), std=std)
        self.conv = ShortConv(E, d_conv, activation="silu", use_bias=True, axis="mlp", rngs=rngs,
                              dtype=dtype, param_dtype=param_dtype)
        self.x_proj = mk(E, self.R + 2 * N, ("mlp", None), std=std)
        self.dt_proj = dense(self.R, E, (None, "mlp"), rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype, std=self.R ** -0.5, use_bias=True,
                             bias_init=dt_bias_init)
        a_init = lambda key, shape, dt: jnp.log(jnp.broadcast_to(
            jnp.arange(1, shape[1] + 1, dtype=dt), shape))
        self.A_log = param(rngs, a_init, (E, N), ("mlp", None), param_dtype)
        self.D = param(rngs, nnx.initializers.ones, (E,), ("mlp",), param_dtype)
        self.out_proj = mk(E, d_model, ("mlp", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        return {"state": jnp.zeros((batch_size, self.E, self.N), jnp.float32),
                "conv": self.conv.init_state(batch_size, dtype), "seg": new_seg(batch_size)}

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        unsupported(self, seq_parallel)
        cache, states = begin(self, x, cache, segment_ids)
        xs, z = jnp.split(self.in_proj(x), 2, axis=-1)
        u, conv = self.conv(xs, segment_ids=segment_ids, state=states["conv"].astype(xs.dtype))
        dt, Bm, Cm = jnp.split(self.x_proj(u), [self.R, self.R + self.N], axis=-1)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        if self.allow_neg_eigval:
            y, S = self.signed_scan(u, self.dt_proj(dt), A, Bm, Cm, z, states["state"],
                                    segment_ids)
        else:
            y, S = selective_scan(u, self.dt_proj(dt), A, Bm, Cm, self.D[...], z,
                                  delta_softplus=True, initial_state=states["state"],
                                  segment_ids=segment_ids, **dict(self.op_kw))
        return self.out_proj(y), leave(cache, segment_ids, state=S, conv=conv)

    def signed_scan(self, u, delta, A, Bm, Cm, z, state, segment_ids):
        """The selective scan with transitions 2 exp(dt A) - 1: h [B, T, E, N] as one diagonal
        recurrence over E N channels. Returns (y [B, T, E] in u's dtype, state [B, E, N])."""
        f32 = lambda t: t.astype(jnp.float32)
        EN, kw = self.E * self.N, dict(self.op_kw)

        # Recomputed in the backward: a, x and h are float32 [B, T, E, N], N times the layer's
        # activations, and keeping them took most of a state-tracking cell's train step memory.
        @jax.checkpoint
        def scan(u, delta, A, Bm, Cm, D, z, state, segment_ids):
            dt = jax.nn.softplus(f32(delta))[..., None]                      # [B, T, E, 1]
            a = 2.0 * jnp.exp(dt * A) - 1.0
            x = dt * f32(u)[..., None] * f32(Bm)[:, :, None, :]
            flat = lambda t: t.reshape(t.shape[:2] + (EN,))
            h, S = diagonal_scan(flat(a), flat(x), initial_state=state.reshape(-1, EN),
                                 segment_ids=segment_ids, **kw)
            h = h.reshape(a.shape)
            y = jnp.sum(h * f32(Cm)[:, :, None, :], axis=-1) + D * f32(u)
            y = y * jax.nn.silu(f32(z))
            return y.astype(u.dtype), S.reshape(state.shape)

        return scan(u, delta, A, Bm, Cm, self.D[...], z, state, segment_ids)

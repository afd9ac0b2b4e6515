"""Mamba-3, SISO or MIMO (Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State
Space Principles").

    z, x, B, C, dt_raw, a_raw, trap_raw, phi = u W_in    z, x [E]; B, C [G N]; ... [H]; phi [R]
    dt = softplus(dt_raw + dt_bias);  A = -max(softplus(a_raw), A_floor);  g = A dt   (per head)
    B, C = RMSNorm_N(B) + b_B, RMSNorm_N(C) + b_C         per-head biases, 1 at init
    theta = tanh(phi) pi dt                               rotation angles of R state-row pairs
    y = mamba3(q=C, k=B, v=x, g, dt, lam=sigmoid(trap_raw), theta) + D x
    out = (y * silu(z)) W_out

As the reference module's SISO path: data-dependent A, no short convolution (the trapezoidal rule
and the B/C biases take its place), RMS-normed B and C with biases, rotary angles shared by the
heads on half of the state (`rope_fraction` 0.5), D skip and silu gate. The optional output norm
is not implemented. Op: `linear_jax.ops.mamba3`.

MIMO (`mimo_rank` r > 1, op `linear_jax.ops.mamba3_mimo`): B and C have r columns each ([G r N] from
the input projection, normed per column, the heads' biases shared by the columns), x is lifted to r
inputs per head by learned per-head weights, X_i = x * w_x[i] (w_x [H, r, P], 1 at init), and the r
outputs are folded back, y = sum_i w_y[i] * Y_i (w_y [H, r, P], 1/r at init), before the D skip (our
reading of the paper's rank-r projections: data-independent maps of x and y, data-dependent B and
C). The state stays [N, P]; the work per step grows by r. Both run sequence-parallel
(`linear_jax.parallel.mamba3`).

Parameters: D (2 E + 2 G r N + 3 H + R) (in) + H (dt_bias) + 2 H N (biases) + 2 N (norms) + H (D)
+ E D (out), + 2 r E (w_x, w_y) with MIMO. State: S [B, H, N, P] float32 and the last keys and
values [B, H, N], [B, H, P] ([B, H, r, N], [B, H, r, P] with MIMO).
"""

from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import (
    DEFAULT_STD,
    RMSNorm,
    begin,
    dense,
    dt_bias_init,
    leave,
    new_seg,
    op_kw,
    out_std,
    param,
)
from linear_jax.parallel.dispatch import recurrence


class Mamba3(nnx.Module):
    SEQ_PARALLEL = True

    def __init__(self, d_model: int, num_heads: int, *, d_state: int = 16, expand: int = 2,
                 num_groups: int = 1, rope_fraction: float = 0.5, A_floor: float = 1e-4,
                 mimo_rank: int = 1,
                 chunk_size: int = 64, impl: str = "auto", kernel_config=None,
                 num_layers: int | None = None, std: float = DEFAULT_STD, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        E, H, G, N = expand * d_model, num_heads, num_groups, d_state
        if E % H or H % G:
            raise ValueError(f"expand * d_model = {E} must be a multiple of num_heads = {H}, "
                             f"and num_heads of num_groups = {G}")
        self.E, self.H, self.G, self.N, self.P = E, H, G, N, E // H
        self.R = max(int(N * rope_fraction) // 2, 1)
        self.A_floor, self.r = A_floor, mimo_rank
        self.op_kw = op_kw(chunk_size, impl, kernel_config)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        p = partial(param, rngs, param_dtype=param_dtype)
        r = mimo_rank
        self.splits = tuple(itertools.accumulate((E, E, G * r * N, G * r * N, H, H, H)))
        self.in_proj = mk(d_model, self.splits[-1] + self.R, ("embed", "mlp"), std=std)
        self.dt_bias = p(dt_bias_init, (H,), ("heads",))
        self.B_bias = p(nnx.initializers.ones, (H, N), ("heads", "kv"))
        self.C_bias = p(nnx.initializers.ones, (H, N), ("heads", "kv"))
        norm = partial(RMSNorm, N, eps=1e-5, axis="kv", rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype)
        self.B_norm, self.C_norm = norm(), norm()
        self.D = p(nnx.initializers.ones, (H,), ("heads",))
        if r > 1:
            self.w_x = p(nnx.initializers.ones, (H, r, self.P), ("heads", None, None))
            self.w_y = p(lambda k, s, d: jnp.full(s, 1.0 / r, d), (H, r, self.P),
                         ("heads", None, None))
        self.out_proj = mk(E, d_model, ("mlp", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        B, H, N, P = batch_size, self.H, self.N, self.P
        rank = () if self.r == 1 else (self.r,)
        return {"state": jnp.zeros((B, H, N, P), jnp.float32),
                "k_last": jnp.zeros((B, H) + rank + (N,), jnp.float32),
                "v_last": jnp.zeros((B, H) + rank + (P,), jnp.float32), "seg": new_seg(B)}

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        cache, states = begin(self, x, cache, segment_ids)
        H, N, P = self.H, self.N, self.P
        z, xs, Bm, Cm, dt, a, trap, phi = jnp.split(self.in_proj(x), self.splits, axis=-1)
        f32 = lambda t: t.astype(jnp.float32)
        dt = jax.nn.softplus(f32(dt) + f32(self.dt_bias[...]))
        A = -jnp.maximum(jax.nn.softplus(f32(a)), self.A_floor)
        theta = jnp.tanh(f32(phi))[..., None, :] * jnp.pi * dt[..., None]        # [B,T,H,R]
        # RMS norm per group (and column) of B and C, shared by the group's heads, then per-head
        # biases
        mimo = self.r > 1
        cols = (self.r,) if mimo else ()
        heads_of = lambda m, norm, bias: jnp.repeat(
            norm(m.reshape(m.shape[:2] + (self.G,) + cols + (N,))), H // self.G,
            axis=2) + bias[...].astype(m.dtype).reshape((H,) + (1,) * len(cols) + (N,))
        Bh, Ch = heads_of(Bm, self.B_norm, self.B_bias), heads_of(Cm, self.C_norm, self.C_bias)
        xh = xs.reshape(xs.shape[:2] + (H, P))
        xr = xh[..., None, :] * self.w_x[...].astype(xh.dtype) if mimo else xh
        y, (S, k_last, v_last) = recurrence(
            "mamba3_mimo" if mimo else "mamba3", Ch, Bh, xr, A * dt, dt,
            jax.nn.sigmoid(f32(trap)), theta,
            initial_state=(states["state"], states["k_last"], states["v_last"]),
            segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))
        if mimo:
            y = jnp.sum(f32(y) * f32(self.w_y[...]), axis=3)
        y = f32(y) + f32(self.D[...])[:, None] * f32(xh)
        y = y.reshape(xs.shape) * jax.nn.silu(f32(z))
        out = self.out_proj(y.astype(x.dtype))
        return out, leave(cache, segment_ids, state=S, k_last=k_last, v_last=v_last)

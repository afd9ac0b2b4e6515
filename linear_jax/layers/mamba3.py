"""Mamba-3, SISO (Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State Space
Principles").

    z, x, B, C, dt_raw, a_raw, trap_raw, phi = u W_in    z, x [E]; B, C [G N]; ... [H]; phi [R]
    dt = softplus(dt_raw + dt_bias);  A = -max(softplus(a_raw), A_floor);  g = A dt   (per head)
    B, C = RMSNorm_N(B) + b_B, RMSNorm_N(C) + b_C         per-head biases, 1 at init
    theta = tanh(phi) pi dt                               rotation angles of R state-row pairs
    y = mamba3(q=C, k=B, v=x, g, dt, lam=sigmoid(trap_raw), theta) + D x
    out = (y * silu(z)) W_out

As the reference module's SISO path: data-dependent A, no short convolution (the trapezoidal rule
and the B/C biases take its place), RMS-normed B and C with biases, rotary angles shared by the
heads on half of the state (`rope_fraction` 0.5), D skip and silu gate. MIMO and the optional
output norm are not implemented. Op: `linear_jax.ops.mamba3`.

Parameters: D (2 E + 2 G N + 3 H + R) (in) + H (dt_bias) + 2 H N (biases) + 2 N (norms) + H (D)
+ E D (out). State: S [B, H, N, P] float32 and the last key and value [B, H, N], [B, H, P].
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
    dense,
    dt_bias_init,
    enter,
    leave,
    new_seg,
    out_std,
    param,
)
from linear_jax.parallel.dispatch import recurrence


class Mamba3(nnx.Module):
    SEQ_PARALLEL = True

    def __init__(self, d_model: int, num_heads: int, *, d_state: int = 16, expand: int = 2,
                 num_groups: int = 1, rope_fraction: float = 0.5, A_floor: float = 1e-4,
                 chunk_size: int = 64, impl: str = "auto", kernel_config=None,
                 num_layers: int | None = None, std: float = DEFAULT_STD, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        E, H, G, N = expand * d_model, num_heads, num_groups, d_state
        if E % H or H % G:
            raise ValueError(f"expand * d_model = {E} must be a multiple of num_heads = {H}, "
                             f"and num_heads of num_groups = {G}")
        self.E, self.H, self.G, self.N, self.P = E, H, G, N, E // H
        self.R = max(int(N * rope_fraction) // 2, 1)
        self.A_floor = A_floor
        self.op_kw = (("chunk_size", chunk_size), ("impl", impl), ("config", kernel_config))
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        p = partial(param, rngs, param_dtype=param_dtype)
        self.splits = tuple(itertools.accumulate((E, E, G * N, G * N, H, H, H)))
        self.in_proj = mk(d_model, self.splits[-1] + self.R, ("embed", "mlp"), std=std)
        self.dt_bias = p(dt_bias_init, (H,), ("heads",))
        self.B_bias = p(nnx.initializers.ones, (H, N), ("heads", "kv"))
        self.C_bias = p(nnx.initializers.ones, (H, N), ("heads", "kv"))
        norm = partial(RMSNorm, N, eps=1e-5, axis="kv", rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype)
        self.B_norm, self.C_norm = norm(), norm()
        self.D = p(nnx.initializers.ones, (H,), ("heads",))
        self.out_proj = mk(E, d_model, ("mlp", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        B, H, N, P = batch_size, self.H, self.N, self.P
        return {"state": jnp.zeros((B, H, N, P), jnp.float32),
                "k_last": jnp.zeros((B, H, N), jnp.float32),
                "v_last": jnp.zeros((B, H, P), jnp.float32), "seg": new_seg(B)}

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        cache = self.init_cache(x.shape[0], x.dtype) if cache is None else cache
        states = enter(cache, segment_ids)
        H, N, P = self.H, self.N, self.P
        z, xs, Bm, Cm, dt, a, trap, phi = jnp.split(self.in_proj(x), self.splits, axis=-1)
        f32 = lambda t: t.astype(jnp.float32)
        dt = jax.nn.softplus(f32(dt) + f32(self.dt_bias[...]))
        A = -jnp.maximum(jax.nn.softplus(f32(a)), self.A_floor)
        theta = jnp.tanh(f32(phi))[..., None, :] * jnp.pi * dt[..., None]        # [B,T,H,R]
        # RMS norm per group of B and C, shared by the group's heads, then per-head biases
        heads_of = lambda m, norm, bias: jnp.repeat(
            norm(m.reshape(m.shape[:2] + (self.G, N))), H // self.G, axis=2) + bias[...].astype(
            m.dtype)
        Bh, Ch = heads_of(Bm, self.B_norm, self.B_bias), heads_of(Cm, self.C_norm, self.C_bias)
        xh = xs.reshape(xs.shape[:2] + (H, P))
        y, (S, k_last, v_last) = recurrence(
            "mamba3", Ch, Bh, xh, A * dt, dt, jax.nn.sigmoid(f32(trap)), theta,
            initial_state=(states["state"], states["k_last"], states["v_last"]),
            segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))
        y = f32(y) + f32(self.D[...])[:, None] * f32(xh)
        y = y.reshape(xs.shape) * jax.nn.silu(f32(z))
        out = self.out_proj(y.astype(x.dtype))
        return out, leave(cache, segment_ids, state=S, k_last=k_last, v_last=v_last)

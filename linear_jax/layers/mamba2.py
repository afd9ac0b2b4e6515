"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality").

    z, x, B, C, dt = x W_in                 z, x [E]; B, C [G N]; dt [H]; E = expand * D, P = E / H
    x, B, C = silu(conv([x, B, C]))         one depthwise conv (width 4, bias) over the three
    y    = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias)     scalar decay per head, state [N, P]
    out  = RMSNorm(y * silu(z)) W_out       the gated norm, gate applied before normalising

`allow_neg_eigval=True`: every head's transition exp(dt A) in (0, 1) becomes 2 exp(dt A) - 1 in
(-1, 1), as Grazzi et al. 2025 extend Mamba (`layers/mamba.py`); the scan then runs as
`linear_jax.ops.diagonal_scan` over the H N P entries of the state (a signed real recurrence)
instead of `ssd`, whose decays are log-space and so positive.

Paper choices: expand 2, N = 64 (here `d_state`, default 16 for small models), one group (G = 1) of
B and C shared by the heads (head h reads group h // (H / G)), A = exp(A_log) uniform in [1, 16],
softplus(dt_bias) log-uniform in [1e-3, 1e-1], D = 1. `norm_groups` splits the gated norm's
statistics into that many slices of E (the reference code, and so its checkpoints, normalise per
group of B and C: norm_groups = G). Ops: `linear_jax.ops.ssd` and `linear_jax.ops.short_conv`.

Parameters: D (2 E + 2 G N + H) (in) + 4 (E + 2 G N) + (E + 2 G N) (conv) + 3 H + E (norm) + E D.
State: h [B, H, N, P] float32; conv state [B, 3, E + 2 G N].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import (
    DEFAULT_STD,
    RMSNorm,
    a_log_init,
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
from linear_jax.ops.norms import gated_rms_norm
from linear_jax.parallel.dispatch import recurrence, unsupported


class Mamba2(nnx.Module):
    SEQ_PARALLEL = True
    OP_IMPL = True           # `impl` is its op's (`linear_jax.ops.registry`)

    def __init__(self, d_model: int, num_heads: int, *, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, num_groups: int = 1, norm_groups: int = 1,
                 norm_eps: float = 1e-6, allow_neg_eigval: bool = False,
                 chunk_size: int = 64, impl: str = "auto",
                 kernel_config=None, num_layers: int | None = None, std: float = DEFAULT_STD,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        E, H, G, N = expand * d_model, num_heads, num_groups, d_state
        if E % H:
            raise ValueError(f"expand * d_model = {E} must be a multiple of num_heads = {H}")
        if E % norm_groups:
            raise ValueError(f"expand * d_model = {E} must be a multiple of norm_groups = "
                             f"{norm_groups}")
        self.E, self.H, self.G, self.N, self.P = E, H, G, N, E // H
        self.norm_groups, self.norm_eps = norm_groups, norm_eps
        self.allow_neg_eigval = allow_neg_eigval
        self.op_kw = op_kw(chunk_size, impl, kernel_config)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = mk(d_model, 2 * E + 2 * G * N + H, ("embed", "mlp"), std=std)
        self.conv = ShortConv(E + 2 * G * N, d_conv, activation="silu", use_bias=True,
                              axis="mlp", rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.A_log = param(rngs, a_log_init, (H,), ("heads",), param_dtype)
        self.dt_bias = param(rngs, dt_bias_init, (H,), ("heads",), param_dtype)
        self.D = param(rngs, nnx.initializers.ones, (H,), ("heads",), param_dtype)
        self.norm = RMSNorm(E, eps=norm_eps, axis="mlp", rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)
        self.out_proj = mk(E, d_model, ("mlp", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        return {"state": jnp.zeros((batch_size, self.H, self.N, self.P), jnp.float32),
                "conv": self.conv.init_state(batch_size, dtype), "seg": new_seg(batch_size)}

    def ssm(self, x, xs, dt, Bm, Cm, state, segment_ids, seq_parallel):
        """The scan: xs [B,T,H,P], dt [B,T,H], Bm, Cm [B,T,G,N] -> (y [B,T,H,P], state);
        x [B,T,D] is the layer input (for a subclass whose scan reads more of it)."""
        if self.allow_neg_eigval:
            unsupported(self, seq_parallel)
            return self.signed_scan(xs, dt, Bm, Cm, state, segment_ids)
        return recurrence("ssd", xs, dt, -jnp.exp(self.A_log[...].astype(jnp.float32)), Bm, Cm,
                          self.D[...], self.dt_bias[...], initial_state=state,
                          segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))

    def signed_scan(self, xs, dt, Bm, Cm, state, segment_ids):
        """SSD with transitions 2 exp(dt A) - 1: h [B, T, H, N, P] as one diagonal recurrence."""
        f32 = lambda t: t.astype(jnp.float32)
        Bsz, T, H, P = xs.shape
        group = lambda m: jnp.repeat(f32(m), H // self.G, axis=2)            # [B, T, H, N]
        dt = jax.nn.softplus(f32(dt) + f32(self.dt_bias[...]))                # [B, T, H]
        a = 2.0 * jnp.exp(dt * -jnp.exp(f32(self.A_log[...]))) - 1.0
        u = (dt[..., None, None] * group(Bm)[..., None] * f32(xs)[..., None, :])
        flat = lambda t: t.reshape(Bsz, T, H * self.N * P)
        h, S = diagonal_scan(flat(jnp.broadcast_to(a[..., None, None], u.shape)), flat(u),
                             initial_state=state.reshape(Bsz, -1), segment_ids=segment_ids,
                             **dict(self.op_kw))
        y = jnp.einsum("bthnp,bthn->bthp", h.reshape(u.shape), group(Cm))
        y = y + f32(self.D[...])[:, None] * f32(xs)
        return y.astype(xs.dtype), S.reshape(state.shape)

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        cache, states = begin(self, x, cache, segment_ids)
        E, GN = self.E, self.G * self.N
        z, xbc, dt = jnp.split(self.in_proj(x), [E, 2 * E + 2 * GN], axis=-1)
        xbc, conv = self.conv(xbc, segment_ids=segment_ids, state=states["conv"].astype(x.dtype),
                              seq_parallel=seq_parallel)
        xs, Bm, Cm = jnp.split(xbc, [E, E + GN], axis=-1)
        group = lambda m: m.reshape(m.shape[:2] + (self.G, self.N))
        y, S = self.ssm(x, xs.reshape(xs.shape[:2] + (self.H, self.P)), dt, group(Bm),
                        group(Cm), states["state"], segment_ids, seq_parallel)
        y = gated_rms_norm(y.reshape(xs.shape), z, self.norm.scale[...], self.norm_eps,
                           num_groups=self.norm_groups, norm_before_gate=False)
        return self.out_proj(y.astype(self.norm.dtype or x.dtype)), leave(
            cache, segment_ids, state=S, conv=conv)

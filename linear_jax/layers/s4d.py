"""S4D: a time-invariant diagonal state-space layer (Gu et al. 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"), in Mamba's gated block.

    u, z = x W_in                                         [B, T, E] each, E = expand * D
    y    = SSM(u) + D * u                                 per channel M complex modes, fixed in t
    out  = (y * silu(z)) W_out                            (gelu(y) W_out with gated=False)

The SSM of channel e: h_t = a h_{t-1} + b u_t, y_t = 2 Re(C . h_t), with (a, b) the zero-order-
hold discretisation of A = -exp(A_re_log) + i A_im by dt = exp(log_dt) (`linear_jax.ops.s4d`).
Nothing of it depends on the input: the time-invariant baseline the Mamba paper (sections 3.1 and
4.1) sets its selective scan against on selective copying and induction heads. A gated S4D block is
its "S4" ablation inside the Mamba architecture.

Two views of one layer: a call without a cache and without packed documents runs the
convolutional view (the kernel K[l] = 2 Re(sum_m C_m b_m a_m^l) applied by FFT, O(T log T), no
[B, T, E, M] tensor); a call with a cache or `segment_ids` runs the recurrence
(`linear_jax.ops.diagonal_scan`, complex), which carries the state across calls and resets it at
document boundaries.

S4D-Lin initialisation: A = -1/2 + i pi m (m = 0 .. M - 1), B = 1 (fixed), C complex normal,
log dt uniform in [log 1e-3, log 1e-1], D = 1. Parameters: D E (2 with the gate) + E (dt)
+ 4 E M (A, C) + E (D) + E D. State: h [B, E, M] complex64.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from linear_jax.layers.common import DEFAULT_STD, dense, enter, leave, new_seg, out_std, param
from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.s4d import causal_conv, s4d_discretize, s4d_kernel
from linear_jax.parallel.dispatch import unsupported


class S4D(nnx.Module):
    SEQ_PARALLEL = False     # the FFT convolution and the complex scan have no split form here
    OP_IMPL = True           # `impl` is diagonal_scan's (`linear_jax.ops.registry`)

    def __init__(self, d_model: int, *, d_state: int = 32, expand: int = 1, gated: bool = True,
                 chunk_size: int = 64, impl: str = "auto", kernel_config=None,
                 num_layers: int | None = None, std: float = DEFAULT_STD, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        E, M = expand * d_model, d_state
        self.E, self.M, self.gated = E, M, gated
        self.op_kw = (("chunk_size", chunk_size), ("impl", impl), ("config", kernel_config))
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = mk(d_model, (2 if gated else 1) * E, ("embed", "mlp"), std=std)
        log_dt = lambda key, shape, dt: jax.random.uniform(key, shape, dt, math.log(1e-3),
                                                           math.log(1e-1))
        self.log_dt = param(rngs, log_dt, (E,), ("mlp",), param_dtype)
        self.A_re_log = param(rngs, nnx.initializers.constant(math.log(0.5)), (E, M),
                              ("mlp", None), param_dtype)
        self.A_im = param(rngs, lambda key, shape, dt: jnp.broadcast_to(
            math.pi * jnp.arange(shape[1], dtype=dt), shape), (E, M), ("mlp", None), param_dtype)
        c_init = nnx.initializers.normal(math.sqrt(0.5))
        self.C_re = param(rngs, c_init, (E, M), ("mlp", None), param_dtype)
        self.C_im = param(rngs, c_init, (E, M), ("mlp", None), param_dtype)
        self.D = param(rngs, nnx.initializers.ones, (E,), ("mlp",), param_dtype)
        self.out_proj = mk(E, d_model, ("mlp", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        return {"state": jnp.zeros((batch_size, self.E, self.M), jnp.complex64),
                "seg": new_seg(batch_size)}

    def _ssm(self):
        """(log dt, A, B, C) in float32, complex ones as (real, imag) pairs; B = 1."""
        f32 = lambda p: p[...].astype(jnp.float32)
        A = (-jnp.exp(f32(self.A_re_log)), f32(self.A_im))
        B = (jnp.ones_like(A[0]), jnp.zeros_like(A[0]))
        return f32(self.log_dt), A, B, (f32(self.C_re), f32(self.C_im))

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        unsupported(self, seq_parallel)
        proj = self.in_proj(x)
        u, z = jnp.split(proj, 2, axis=-1) if self.gated else (proj, None)
        log_dt, A, B, C = self._ssm()
        if cache is None and segment_ids is None:
            y = causal_conv(u, s4d_kernel(log_dt, A, B, C, u.shape[1]), self.D[...])
            cache = leave(self.init_cache(x.shape[0]), None,
                          state=self._final_state(u, *s4d_discretize(log_dt, A, B)))
        else:
            cache = self.init_cache(x.shape[0]) if cache is None else cache
            y, S = self._recurrent(u, *s4d_discretize(log_dt, A, B), C,
                                   enter(cache, segment_ids)["state"], segment_ids)
            cache = leave(cache, segment_ids, state=S)
        y = y * jax.nn.silu(z) if self.gated else jax.nn.gelu(y)
        return self.out_proj(y), cache

    def _recurrent(self, u, a, b, C, state, segment_ids):
        Bsz, T, E = u.shape
        uf = u.astype(jnp.float32)[..., None]                                # [B, T, E, 1]
        flat = lambda t: t.reshape(Bsz, T, E * self.M)
        h, S = diagonal_scan(flat(jnp.broadcast_to(a, (Bsz, T, E, self.M))), flat(b * uf),
                             initial_state=state.reshape(Bsz, E * self.M),
                             segment_ids=segment_ids, **dict(self.op_kw))
        c = lax.complex(*C)
        y = 2.0 * jnp.real(jnp.sum(h.reshape(Bsz, T, E, self.M) * c, axis=-1))
        y = y + self.D[...].astype(jnp.float32) * uf[..., 0]
        return y.astype(u.dtype), S.reshape(state.shape)

    def _final_state(self, u, a, b):
        """h_T = sum_l a^(T - 1 - l) b u_l, the state the recurrence would end in."""
        T = u.shape[1]
        powers = jnp.exp(jnp.log(a)[..., None] * jnp.arange(T - 1, -1, -1))  # [E, M, T]
        return jnp.einsum("bte,emt->bem", u.astype(jnp.complex64), powers * b[..., None])

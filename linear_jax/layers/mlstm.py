"""The mLSTM layer of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"), in the
form of xLSTM 7B (Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for Fast and Efficient Inference").

    q, k, v = x W_q, x W_k, x W_v          q, k of half the model width, v of the full width
    i_t = x W_i + b_i,  f_t = x W_f + b_f  pre-activations of the exponential input gate and the
                                           sigmoid forget gate, one per head
    h = mlstm(q, k, v, i, f)               matrix memory with normaliser and max-stabiliser
    y = (RMSNorm_V(h) * sigmoid(x W_o)) W_out

Initialisation as xLSTM 7B: input-gate bias -10 (gates start nearly shut), forget-gate biases
spread over [3, 6] across heads (long memory at init). Op: `linear_jax.ops.mlstm`.

Parameters: D (2 H K + 2 H V) + H V D + 2 (D H + H) + V; with H K = D / 2, H V = D:
4 D^2 + 2 D H + 2 H + D / H. State: C [B, H, K, V], n [B, H, K], m [B, H] float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from linear_jax.layers.base import QKVMixer
from linear_jax.layers.common import dense
from linear_jax.ops.mlstm import mlstm


class MLSTM(QKVMixer):
    SEQ_PARALLEL = False     # no sequence-parallel mLSTM (its stabiliser m is not affine)

    def __init__(self, d_model: int, num_heads: int, *, qk_factor: float = 0.5, rngs,
                 dtype=None, param_dtype=jnp.float32, **kw):
        K, V = int(d_model * qk_factor) // num_heads, d_model // num_heads
        kw.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, key_dim=K, value_dim=V, gate_activation=jax.nn.sigmoid,
                         rngs=rngs, dtype=dtype, param_dtype=param_dtype, **kw)
        f_bias = lambda key, shape, dt: jnp.asarray(np.linspace(3.0, 6.0, shape[0]), dt)
        i_bias = lambda key, shape, dt: jnp.full(shape, -10.0, dt)
        mk = partial(dense, d_model, num_heads, ("embed", "heads"), rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype, use_bias=True, std=self.std)
        self.i_proj, self.f_proj = mk(bias_init=i_bias), mk(bias_init=f_bias)

    def init_states(self, batch_size: int) -> dict:
        B, H, K, V = batch_size, self.H, self.K, self.V
        z = lambda *s: jnp.zeros(s, jnp.float32)
        return {"C": z(B, H, K, V), "n": z(B, H, K), "m": z(B, H)}

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        f32 = lambda a: a.astype(jnp.float32)
        h, (C, n, m) = mlstm(q, k, v, f32(self.i_proj(x)), f32(self.f_proj(x)),
                             initial_state=(states["C"], states["n"], states["m"]),
                             segment_ids=segment_ids, **dict(self.op_kw))
        return h, {"C": C, "n": n, "m": m}

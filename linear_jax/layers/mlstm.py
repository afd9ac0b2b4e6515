"""The mLSTM layer of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"), in the
form of xLSTM 7B (Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for Fast and Efficient Inference").

    q, k, v = x W_q, x W_k, x W_v          q, k of half the model width, v of the full width
    i_t = x W_i + b_i,  f_t = x W_f + b_f  pre-activations of the exponential input gate and the
                                           sigmoid forget gate, one per head
    h = mlstm(q, k, v, i, f)               matrix memory with normaliser and max-stabiliser
    y = (RMSNorm_V(h) * sigmoid(x W_o)) W_out

`gate_soft_cap` bounds both gate pre-activations by c tanh(x / c) (xLSTM 7B: c = 15);
`head_norm="layer"` normalises each head's output by a LayerNorm with a weight per head and
channel (the released xLSTM 7B) instead of the RMSNorm whose scale the heads share ("rms"); `eps`
is the mLSTM normaliser's.

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
from flax import nnx

from linear_jax.layers.base import QKVMixer
from linear_jax.layers.common import dense, heads, merge_heads, param
from linear_jax.ops.mlstm import mlstm
from linear_jax.ops.norms import layer_norm


class MLSTM(QKVMixer):
    SEQ_PARALLEL = False     # no sequence-parallel mLSTM (its stabiliser m is not affine)

    def __init__(self, d_model: int, num_heads: int, *, qk_factor: float = 0.5,
                 gate_soft_cap: float | None = None, head_norm: str = "rms", eps: float = 1e-6,
                 rngs, dtype=None, param_dtype=jnp.float32, **kw):
        K, V = int(d_model * qk_factor) // num_heads, d_model // num_heads
        if head_norm not in ("rms", "layer"):
            raise ValueError(f"MLSTM: head_norm must be 'rms' or 'layer', got {head_norm!r}")
        kw.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, key_dim=K, value_dim=V, gate_activation=jax.nn.sigmoid,
                         output_norm=head_norm == "rms", rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, **kw)
        self.gate_soft_cap, self.eps, self.norm_eps = gate_soft_cap, eps, kw.get("norm_eps", 1e-6)
        self.head_norm = None if head_norm == "rms" else param(
            rngs, nnx.initializers.ones, (num_heads * V,), ("heads",), param_dtype)
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
        c = self.gate_soft_cap
        gate = lambda proj: (proj(x).astype(jnp.float32) if c is None
                             else c * jnp.tanh(proj(x).astype(jnp.float32) / c))
        h, (C, n, m) = mlstm(q, k, v, gate(self.i_proj), gate(self.f_proj),
                             initial_state=(states["C"], states["n"], states["m"]),
                             segment_ids=segment_ids, eps=self.eps, **dict(self.op_kw))
        return h, {"C": C, "n": n, "m": m}

    def output(self, o, x):
        if self.head_norm is None:
            return super().output(o, x)
        w = self.head_norm[...].reshape(self.H, self.V)
        o = layer_norm(o, w, None, self.norm_eps).astype(o.dtype)
        gate = jax.nn.sigmoid(heads(self.g_proj(x), self.H).astype(jnp.float32))
        return self.o_proj(merge_heads((o * gate).astype(o.dtype)))

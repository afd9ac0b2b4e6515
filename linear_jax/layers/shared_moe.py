"""A mixture of experts with an always-on shared expert (Qwen-MoE, Qwen3-Next; DeepSeek-MoE's
shared experts without the gate):

    y = MoE(x) + sigmoid(x w_s) * SwiGLU_s(x)

The routed part is `ffn.MoE` unchanged (softmax router, top-k, renormalised weights, the
load-balancing loss); the shared SwiGLU has its own width and a scalar sigmoid gate per token.
Parameters: those of MoE + 3 D F_s + D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import DEFAULT_STD, dense
from linear_jax.layers.ffn import MLP, MoE


class SharedExpertMoE(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, shared_width: int, num_experts: int = 8,
                 top_k: int = 2, num_layers: int | None = None, std: float = DEFAULT_STD,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(num_layers=num_layers, std=std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.routed = MoE(d_model, d_ff, num_experts=num_experts, top_k=top_k, **kw)
        self.shared = MLP(d_model, shared_width, **kw)
        self.shared_gate = dense(d_model, 1, ("embed", None), rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype, std=std)

    def __call__(self, x):
        y, aux = self.routed(x)
        s, _ = self.shared(x)
        return y + jax.nn.sigmoid(self.shared_gate(x)) * s, aux

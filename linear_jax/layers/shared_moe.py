"""A mixture of experts with an always-on shared expert (Qwen-MoE, Qwen3-Next; DeepSeek-MoE's
and Kimi Linear's shared experts with `shared_gate=False`):

    y = MoE(x) + sigmoid(x w_s) * SwiGLU_s(x)          (y = MoE(x) + SwiGLU_s(x) ungated)

The routed part is `ffn.MoE` unchanged (its router options pass through: scoring, score bias,
groups, ...; the load-balancing loss); the shared SwiGLU has its own width (several shared experts
are one wider SwiGLU) and a scalar sigmoid gate per token. Parameters: those of MoE + 3 D F_s
(+ D with the gate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import DEFAULT_STD, dense
from linear_jax.layers.ffn import MLP, MoE


class SharedExpertMoE(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, shared_width: int, shared_gate: bool = True,
                 num_experts: int = 8, top_k: int = 2, num_layers: int | None = None,
                 std: float = DEFAULT_STD, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 **router):
        kw = dict(num_layers=num_layers, std=std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.routed = MoE(d_model, d_ff, num_experts=num_experts, top_k=top_k, **router, **kw)
        self.shared = MLP(d_model, shared_width, **kw)
        self.shared_gate = dense(d_model, 1, ("embed", None), rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype, std=std) if shared_gate else None

    def __call__(self, x):
        y, aux = self.routed(x)
        s, _ = self.shared(x)
        if self.shared_gate is not None:
            s = jax.nn.sigmoid(self.shared_gate(x)) * s
        return y + s, aux

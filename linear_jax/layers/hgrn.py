"""HGRN (Qin et al. 2023, "Hierarchically Gated Recurrent Neural Network for Sequence Modeling").

    f_t = lb + (1 - lb) sigmoid(x W_f)                  forget gate with lower bound lb
    h_t = f_t * h_{t-1} + (1 - f_t) * swish(x W_i)      element-wise, over the model width
    y   = (RMSNorm_heads(h) * swish(x W_g)) W_o

The element-wise gated recurrence of the paper with real (not complex) values and the input gate
tied to the forget gate, as fla implements it. The paper's lower bounds are learned and rise with
depth across the stack; here `lower_bound` is a fixed per-layer constant (0 by default). The
output norm is applied per head of D / H channels. Op: `linear_jax.ops.hgrn` (sequence-parallel:
`linear_jax.parallel.hgrn`).

Parameters: 4 D^2 + D / H. State: h [B, D] float32 (no short conv).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import (
    DEFAULT_STD,
    RMSNorm,
    begin,
    dense,
    heads,
    leave,
    merge_heads,
    new_seg,
    op_kw,
    out_std,
)
from linear_jax.parallel import dispatch


class HGRN(nnx.Module):
    SEQ_PARALLEL = True
    OP_IMPL = True           # `impl` is its op's (`linear_jax.ops.registry`)

    def __init__(self, d_model: int, num_heads: int, *, lower_bound: float = 0.0,
                 chunk_size: int = 64, impl: str = "auto", kernel_config=None,
                 num_layers: int | None = None, std: float = DEFAULT_STD, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        self.D, self.H, self.lower_bound = d_model, num_heads, lower_bound
        self.op_kw = op_kw(chunk_size, impl, kernel_config)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.i_proj = mk(d_model, d_model, ("embed", "heads"), std=std)
        self.f_proj = mk(d_model, d_model, ("embed", "heads"), std=std)
        self.g_proj = mk(d_model, d_model, ("embed", "heads"), std=std)
        self.norm = RMSNorm(d_model // num_heads, axis="kv", rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)
        self.o_proj = mk(d_model, d_model, ("heads", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        return {"state": jnp.zeros((batch_size, self.D), jnp.float32), "seg": new_seg(batch_size)}

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        cache, states = begin(self, x, cache, segment_ids)
        f = self.f_proj(x).astype(jnp.float32)
        if self.lower_bound:
            g = jnp.log(self.lower_bound + (1 - self.lower_bound) * jax.nn.sigmoid(f))
        else:
            g = jax.nn.log_sigmoid(f)
        i = jax.nn.silu(self.i_proj(x).astype(jnp.float32)) * -jnp.expm1(g)
        h, S = dispatch.recurrence("hgrn", i.astype(x.dtype), g, initial_state=states["state"],
                                   segment_ids=segment_ids, seq_parallel=seq_parallel,
                                   **dict(self.op_kw))
        o = self.norm(heads(h, self.H), heads(self.g_proj(x), self.H))
        return self.o_proj(merge_heads(o)), leave(cache, segment_ids, state=S)

"""LION attention: a bidirectional (non-causal) linear-attention mixer (Afzal et al. 2025, "LION:
Linear Attention for Bidirectional Sequence Modeling").

    q, k = phi(x W_q), phi(x W_k)        phi(x) = (silu(x) + 0.5) / ||silu(x) + 0.5||, positive
    v    = x W_v
    g    = none (decay="lit") | log sigmoid(a_h) per head (decay="d") | log sigmoid(x W_a + b)
           per head and token (decay="s")
    y    = lion(q, k, v, g) W_o         row-normalised masked full linear attention

Not a causal mixer (it sees the whole sequence, so it has no decoding cache and is not in
`MIXERS`): `__call__(x [B, T, D], *, segment_ids=None) -> y [B, T, D]`, documents isolated by
`segment_ids`. Op: `linear_jax.ops.lion`. Parameters: 4 D^2 (+ H for "d", + D H + H for "s").
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax import ops
from linear_jax.layers.common import DEFAULT_STD, dense, heads, merge_heads, out_std, param

DECAYS = ("lit", "d", "s")


def shifted_silu(x):
    """LION's positive feature map: silu(x) + 0.5, l2-normalised over the head dim."""
    y = jax.nn.silu(x.astype(jnp.float32)) + 0.5
    return y / jnp.linalg.norm(y, axis=-1, keepdims=True)


class LION(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, *, decay: str = "s", chunk_size: int = 64,
                 impl: str = "auto", num_layers: int | None = None, std: float = DEFAULT_STD,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        if decay not in DECAYS:
            raise ValueError(f"LION: decay must be one of {DECAYS}, got {decay!r}")
        if d_model % num_heads:
            raise ValueError(f"LION: num_heads={num_heads} must divide d_model={d_model}")
        self.H, self.decay, self.chunk_size, self.impl = num_heads, decay, chunk_size, impl
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = mk(d_model, d_model, ("embed", "heads"), std=std)
        self.k_proj = mk(d_model, d_model, ("embed", "heads"), std=std)
        self.v_proj = mk(d_model, d_model, ("embed", "heads"), std=std)
        self.o_proj = mk(d_model, d_model, ("heads", "embed"), std=out_std(std, num_layers))
        # decays start in [0.9, 0.99] (sigmoid^-1 of them), as RetNet's per-head decays
        init = lambda key, shape, dt: jnp.log(jnp.linspace(9.0, 99.0, shape[0], dtype=dt))
        self.a = param(rngs, init, (num_heads,), ("heads",), param_dtype) if decay != "lit" \
            else None
        self.a_proj = mk(d_model, num_heads, ("embed", "heads"), std=std) if decay == "s" \
            else None

    def gate(self, x):
        if self.decay == "lit":
            return None
        a = jnp.broadcast_to(self.a[...].astype(jnp.float32), x.shape[:2] + (self.H,))
        if self.decay == "s":
            a = a + self.a_proj(x).astype(jnp.float32)
        return jax.nn.log_sigmoid(a)

    def __call__(self, x, *, segment_ids=None):
        q = shifted_silu(heads(self.q_proj(x), self.H))
        k = shifted_silu(heads(self.k_proj(x), self.H))
        v = heads(self.v_proj(x), self.H)
        o, _ = ops.lion(q, k, v, self.gate(x), segment_ids=segment_ids,
                        chunk_size=self.chunk_size, impl=self.impl)
        return self.o_proj(merge_heads(o.astype(x.dtype)))

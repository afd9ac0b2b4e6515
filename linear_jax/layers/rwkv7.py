"""RWKV-7 time mixing (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State
Evolution").

    x^c = x_t + (x_{t-1} - x_t) mu_c          token shift, one learned mix per c in r,w,k,v,a,g
    r, k, v = x^r W_r, x^k W_k, x^v W_v                                     H heads of K = V
    v <- v + (v_first - v) sigmoid(v0 + x^v W_v1 W_v2)       value residual, but in the first layer
    g_t = -exp(-1/2) sigmoid(w0 + tanh(x^w W_w1) W_w2)      per-channel log decay, w = exp(g)
    a_lr = sigmoid(a0 + x^a W_a1 W_a2)                       in-context learning rate
    kappa_hat = l2norm(k * k_k);     k <- k * (1 + (a_lr - 1) k_a)
    S_t = (diag(w_t) - (kappa_hat a_lr) kappa_hat^T) S_{t-1} + k_t v_t^T,    o_t = S_t^T r_t
    o <- GroupNorm_V(o) + (sum_K r * k * r_k) v                              per-head norm, bonus
    y = (o * (sigmoid(x^g W_g1) W_g2)) W_o

The value residual (the paper's, fla's `v_lora`) mixes every later layer's value with v_first, the
value of the model's first RWKV-7 layer (`first_of_kind`, from the model; that layer has no W_v1,
W_v2, v0). The layer takes v_first and gives it on through `with_value` (what
`linear_jax.models.lm.Block` calls; v_first rides between blocks with the hidden state);
`__call__`, the mixer contract, is a layer on its own (v_first = its own v: no mixing). v0 starts
at 1 (sigmoid 0.73: mostly the first layer's value). `value_residual=False` drops it. The token
shift is a width-2 causal convolution (`linear_jax.ops.short_conv`, fixed weights), so packed
documents, the decode cache and the sequence-parallel halo come from it. Op:
`linear_jax.ops.rwkv7` with a = -kappa_hat, b = kappa_hat * a_lr.

Parameters: 4 D^2 (r, k, v, out; H K = D) + 2 D (r_w + r_a + r_g) (low-rank maps) + D (w0)
+ D (a0) + 6 D (mixes) + 3 D (k_k, k_a, r_k) + 2 D (group norm) = 4 D^2 + 2 D (r_w + r_a + r_g)
+ 13 D, and 2 D r_v + D in a layer that mixes values. State: S [B, H, K, K] float32; shift cache
[B, 1, D].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import (
    DEFAULT_STD,
    begin,
    dense,
    heads,
    leave,
    merge_heads,
    new_seg,
    op_kw,
    out_std,
    param,
)
from linear_jax.ops.norms import l2norm
from linear_jax.parallel.dispatch import recurrence, short_conv

_MIXES = ("r", "w", "k", "v", "a", "g")


def _const(value):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


class RWKV7(nnx.Module):
    SEQ_PARALLEL = True

    def __init__(self, d_model: int, num_heads: int, *, decay_rank: int = 64, a_rank: int = 64,
                 gate_rank: int = 128, value_rank: int = 32, value_residual: bool = True,
                 first_of_kind: bool = True, norm_eps: float | None = None, chunk_size: int = 64,
                 impl: str = "auto", kernel_config=None, num_layers: int | None = None,
                 std: float = DEFAULT_STD, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        D, H = d_model, num_heads
        if D % H:
            raise ValueError(f"num_heads={H} must divide d_model={D}")
        self.D, self.H, self.K = D, H, D // H
        self.eps = self.K * 1e-5 if norm_eps is None else norm_eps     # RWKV-7's group norm eps
        self.dtype = dtype
        self.op_kw = op_kw(chunk_size, impl, kernel_config)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=std)
        p = partial(param, rngs, param_dtype=param_dtype)
        self.mix = p(nnx.initializers.uniform(1.0), (len(_MIXES), D), (None, "embed"))
        self.r_proj = mk(D, D, ("embed", "heads"))
        self.k_proj = mk(D, D, ("embed", "heads"))
        self.v_proj = mk(D, D, ("embed", "heads"))
        self.w_down = mk(D, decay_rank, ("embed", None))
        self.w_up = mk(decay_rank, D, (None, "heads"), use_bias=True)
        self.a_down = mk(D, a_rank, ("embed", None))
        self.a_up = mk(a_rank, D, (None, "heads"), use_bias=True)
        self.g_down = mk(D, gate_rank, ("embed", None))
        self.g_up = mk(gate_rank, D, (None, "heads"))
        # static: whether the model threads v_first through this layer, and whether it mixes it
        self.value_residual = value_residual
        self.mixes_value = value_residual and not first_of_kind
        if self.mixes_value:
            self.v_down = mk(D, value_rank, ("embed", None))
            self.v_up = mk(value_rank, D, (None, "heads"), use_bias=True, bias_init=_const(1.0))
        self.k_k = p(_const(0.85), (D,), ("heads",))
        self.k_a = p(nnx.initializers.ones, (D,), ("heads",))
        self.r_k = p(nnx.initializers.zeros, (D,), ("heads",))
        self.norm_scale = p(nnx.initializers.ones, (D,), ("heads",))
        self.norm_bias = p(nnx.initializers.zeros, (D,), ("heads",))
        self.o_proj = mk(D, D, ("heads", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        return {"state": jnp.zeros((batch_size, self.H, self.K, self.K), jnp.float32),
                "shift": jnp.zeros((batch_size, 1, self.D), jnp.float32),
                "seg": new_seg(batch_size)}

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        y, cache, _ = self.with_value(x, None, segment_ids=segment_ids, cache=cache,
                                      seq_parallel=seq_parallel)
        return y, cache

    def with_value(self, x, v_first, *, segment_ids=None, cache=None, seq_parallel=None):
        """The layer given the first layer's value v_first [B, T, D] (None: its own). Returns
        (y, cache, v_first for the layers after it: its own v in the first layer)."""
        cache, states = begin(self, x, cache, segment_ids)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        # x_{t-1} (zero before a document's first token) through a fixed width-2 convolution
        take_prev = jnp.stack([jnp.ones((self.D,), dtype), jnp.zeros((self.D,), dtype)])
        prev, shift = short_conv(x, take_prev, segment_ids=segment_ids,
                                 initial_state=states["shift"],
                                 seq_parallel=seq_parallel)
        mix = self.mix[...].astype(dtype)
        xr, xw, xk, xv, xa, xg = (x + (prev - x) * mix[i] for i in range(len(_MIXES)))
        f32 = lambda t: t.astype(jnp.float32)
        hd = lambda t: heads(t, self.H)
        r, k, v = hd(self.r_proj(xr)), hd(self.k_proj(xk)), self.v_proj(xv)
        if self.mixes_value and v_first is not None:
            mix_v = jax.nn.sigmoid(self.v_up(self.v_down(xv)))
            v = v + (v_first.astype(v.dtype) - v) * mix_v
        v_first = v if v_first is None or not self.mixes_value else v_first
        v = hd(v)
        g = -jnp.exp(-0.5) * jax.nn.sigmoid(f32(self.w_up(jnp.tanh(self.w_down(xw)))))
        a_lr = jax.nn.sigmoid(f32(self.a_up(self.a_down(xa))))
        kappa = l2norm(f32(k) * hd(f32(self.k_k[...])))
        k = f32(k) * (1.0 + (hd(a_lr) - 1.0) * hd(f32(self.k_a[...])))
        o, S = recurrence("rwkv7", r, k.astype(v.dtype), v, hd(g), -kappa, kappa * hd(a_lr),
                          initial_state=states["state"], segment_ids=segment_ids,
                          seq_parallel=seq_parallel, **dict(self.op_kw))
        o = f32(o)
        mean = o.mean(-1, keepdims=True)
        o = (o - mean) * jax.lax.rsqrt(((o - mean) ** 2).mean(-1, keepdims=True) + self.eps)
        o = o * hd(f32(self.norm_scale[...])) + hd(f32(self.norm_bias[...]))
        bonus = jnp.sum(f32(r) * k * hd(f32(self.r_k[...])), -1, keepdims=True) * f32(v)
        gate = f32(self.g_up(jax.nn.sigmoid(self.g_down(xg))))
        y = self.o_proj((merge_heads(o + bonus) * gate).astype(dtype))
        return y, leave(cache, segment_ids, state=S, shift=shift), v_first

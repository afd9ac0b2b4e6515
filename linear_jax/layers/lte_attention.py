"""Sliding-window attention with learnable token eviction (LTE): the sparse-attention half of the
hybrids of "Alleviating Forgetfulness of Linear Attention by Hybrid Sparse Attention and
Contextualized Learnable Token Eviction" (2025), interleaved with linear mixers through
`LMConfig(layers=...)`.

Each query attends to the last `window` tokens of its document and to a small set of at most
`num_retained` older tokens per KV head, chosen when they leave the window by a learned score:

    s_j = w_h . silu(conv(k)_j) + b_h        a causal depthwise CNN (width 4) over the keys: a
                                             token is scored in its local context
    kept(t) = the num_retained tokens with the highest s among those that have left t's window
              (pos_j <= pos_t - window), ties to the earlier token
    logit_tj = q_t . k_j / sqrt(Dh) + [j kept, outside the window] log sigmoid(s_j)

The retained set of query t is the top-R of every token that has left its window; the top-R of a
stream is kept exactly by a buffer of R (a newcomer replaces the weakest when it beats it), so
decoding holds `window - 1` window slots and R retained slots per head: memory constant in the
context length. The log-sigmoid term lets the scores learn from the attention they grant (the
choice itself is discrete). Positions restart per document (RoPE on in-document positions) and a
document never sees another's tokens, retained or not.

One code path for training and decoding: a call sees [retained | window buffer | new tokens] as
its keys and ranks the candidates of each query with one [N, N] comparison matrix, so a prefill,
a decode step and a training call compute the same thing; the training form is dense in T
(O(T^2) per head, as attention). Cache: window k, v [B, W-1, Hk, Dh] with positions, documents
and valid flags; retained k, v [B, Hk, R, Dh] with positions, documents, scores, flags; the conv
state; the position counter.
Parameters: D (H + 2 Hk) Dh + H Dh D (q, k, v, o) + 4 Hk Dh (conv) + Hk Dh + Hk (score).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.attention import rope
from linear_jax.layers.common import DEFAULT_STD, dense, heads, merge_heads, new_seg, out_std, param
from linear_jax.layers.short_conv import ShortConv
from linear_jax.parallel import dispatch


class LTEAttention(nnx.Module):
    SEQ_PARALLEL = False

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, window: int = 64, num_retained: int = 16,
                 score_width: int = 4, rope_theta: float = 10000.0,
                 num_layers: int | None = None, std: float = DEFAULT_STD, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        self.H, self.Hk = num_heads, num_kv_heads or num_heads
        if self.H % self.Hk:
            raise ValueError(f"num_heads={self.H} must be a multiple of num_kv_heads={self.Hk}")
        if window < 1 or num_retained < 1:
            raise ValueError(f"LTEAttention: window and num_retained must be >= 1, got "
                             f"window={window}, num_retained={num_retained}")
        self.Dh = head_dim or d_model // num_heads
        self.W, self.R, self.rope_theta = window, num_retained, rope_theta
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = mk(d_model, self.H * self.Dh, ("embed", "heads"), std=std)
        self.k_proj = mk(d_model, self.Hk * self.Dh, ("embed", "heads"), std=std)
        self.v_proj = mk(d_model, self.Hk * self.Dh, ("embed", "heads"), std=std)
        self.o_proj = mk(self.H * self.Dh, d_model, ("heads", "embed"),
                         std=out_std(std, num_layers))
        self.score_conv = ShortConv(self.Hk * self.Dh, score_width, activation="silu",
                                    rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.score_w = param(rngs, nnx.initializers.normal(self.Dh ** -0.5), (self.Hk, self.Dh),
                             ("heads", "kv"), param_dtype)
        self.score_b = param(rngs, nnx.initializers.zeros, (self.Hk,), ("heads",), param_dtype)

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        B, Hk, Dh, M, R = batch_size, self.Hk, self.Dh, self.W - 1, self.R
        zi = lambda *s: jnp.zeros(s, jnp.int32)
        return {"k": jnp.zeros((B, M, Hk, Dh), dtype), "v": jnp.zeros((B, M, Hk, Dh), dtype),
                "pos": zi(B, M), "doc": zi(B, M), "s": jnp.zeros((B, M, Hk)),
                "valid": jnp.zeros((B, M), bool),
                "rk": jnp.zeros((B, Hk, R, Dh), dtype), "rv": jnp.zeros((B, Hk, R, Dh), dtype),
                "rpos": zi(B, Hk, R), "rdoc": zi(B, Hk, R), "rs": jnp.zeros((B, Hk, R)),
                "rvalid": jnp.zeros((B, Hk, R), bool),
                "conv": self.score_conv.init_state(B, dtype),
                "index": jnp.zeros((), jnp.int32), "doc_last": zi(B), "start": zi(B),
                "seg": new_seg(B)}

    def _docs(self, pos, segment_ids, cache):
        """Document number and start of every new token, and whether the call opens a new one."""
        B, T = pos.shape
        if segment_ids is None:
            first, reset = jnp.zeros((B,), bool), jnp.zeros((B, T), bool)
        else:
            first = (segment_ids[:, 0] != cache["seg"]) & (cache["index"] > 0)
            reset = jnp.concatenate([first[:, None], segment_ids[:, 1:] != segment_ids[:, :-1]],
                                    1)
        doc = cache["doc_last"][:, None] + jnp.cumsum(reset, 1, dtype=jnp.int32)
        start = jax.lax.cummax(jnp.where(reset, pos, cache["start"][:, None]), axis=1)
        return doc, start, first

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        """x [B, T, D] -> (y [B, T, D], new cache, or None when called without one)."""
        dispatch.unsupported(self, seq_parallel)
        given = cache is not None
        B, T, _ = x.shape
        c = cache if given else self.init_cache(B, x.dtype)
        f32 = lambda a: a.astype(jnp.float32)
        q, k, v = heads(self.q_proj(x), self.H), heads(self.k_proj(x), self.Hk), \
            heads(self.v_proj(x), self.Hk)
        pos = jnp.broadcast_to(c["index"] + jnp.arange(T, dtype=jnp.int32), (B, T))
        doc, start, first = self._docs(pos, segment_ids, c)
        conv0 = jnp.where(first[:, None, None], 0, c["conv"]).astype(x.dtype)
        ks, conv = self.score_conv(merge_heads(k), segment_ids=segment_ids, state=conv0)
        s = jnp.einsum("bthd,hd->bth", f32(heads(ks, self.Hk)), f32(self.score_w[...]))
        s = s + f32(self.score_b[...])
        q, k = rope(q, pos - start, self.rope_theta), rope(k, pos - start, self.rope_theta)

        # keys: [retained (R, per head) | window buffer and new tokens (M, in position order)]
        ok, ov = (jnp.concatenate([c[n], f32(a).astype(c[n].dtype)], 1) for n, a in
                  (("k", k), ("v", v)))
        opos, odoc = jnp.concatenate([c["pos"], pos], 1), jnp.concatenate([c["doc"], doc], 1)
        ovalid = jnp.concatenate([c["valid"], jnp.ones((B, T), bool)], 1)
        M = ok.shape[1]
        per_head = lambda a: jnp.broadcast_to(a[:, None], (B, self.Hk) + a.shape[1:])
        K = f32(jnp.concatenate([c["rk"], jnp.moveaxis(ok, 2, 1)], 2))       # [B,Hk,N,Dh]
        Vv = f32(jnp.concatenate([c["rv"], jnp.moveaxis(ov, 2, 1)], 2))
        kpos = jnp.concatenate([c["rpos"], per_head(opos)], 2)                # [B,Hk,N]
        kdoc = jnp.concatenate([c["rdoc"], per_head(odoc)], 2)
        os_ = jnp.concatenate([c["s"], s], 1)                                # [B,M,Hk]
        ks_ = jnp.concatenate([c["rs"], jnp.moveaxis(os_, 2, 1)], 2)
        kvalid = jnp.concatenate([c["rvalid"], per_head(ovalid)], 2)
        # beats[i, j]: candidate i ranks above j (higher score, ties to the earlier token)
        si, sj = ks_[..., :, None], ks_[..., None, :]
        beats = ((si > sj) | ((si == sj) & (kpos[..., :, None] < kpos[..., None, :])))
        beats = beats.astype(jnp.float32)

        def kept(qpos, qdoc):
            """Retained keys of queries at qpos, qdoc [B, Tq]: bool [B, Hk, Tq, N]."""
            same = kvalid[:, :, None] & (kdoc[:, :, None] == qdoc[:, None, :, None])
            out = same & (kpos[:, :, None] <= qpos[:, None, :, None] - self.W)
            count = jnp.einsum("bhti,bhij->bhtj", out.astype(jnp.float32), beats)
            return out & (count < self.R), same

        keep, same = kept(pos, doc)
        window = same & (kpos[:, :, None] <= pos[:, None, :, None]) \
            & (pos[:, None, :, None] - kpos[:, :, None] < self.W)
        G = self.H // self.Hk
        qg = f32(q).reshape(B, T, self.Hk, G, self.Dh)
        logits = jnp.einsum("bthgd,bhnd->bhgtn", qg, K) * self.Dh ** -0.5
        bonus = jnp.where(keep & ~window, jax.nn.log_sigmoid(ks_)[:, :, None], 0.0)
        logits = jnp.where((keep | window)[:, :, None], logits + bonus[:, :, None], -jnp.inf)
        o = jnp.einsum("bhgtn,bhnd->bthgd", jax.nn.softmax(logits, axis=-1), Vv)
        y = self.o_proj(merge_heads(o.reshape(B, T, self.H, self.Dh).astype(x.dtype)))
        if not given:
            return y, None

        # the next query's retained set, gathered into R slots; the last W - 1 tokens stay
        nxt, _ = kept(pos[:, -1:] + 1, doc[:, -1:])
        nxt = nxt[:, :, 0]
        rank = jnp.einsum("bhi,bhij->bhj", nxt.astype(jnp.float32), beats)
        _, idx = jax.lax.top_k(jnp.where(nxt, -rank, -jnp.inf), self.R)      # [B,Hk,R]
        take = lambda a: jnp.take_along_axis(a, idx, axis=2)
        take_kv = lambda a: jnp.take_along_axis(a, idx[..., None], axis=2).astype(c["rk"].dtype)
        tail = slice(M - (self.W - 1), M)
        new = {"k": ok[:, tail], "v": ov[:, tail], "pos": opos[:, tail], "doc": odoc[:, tail],
               "s": os_[:, tail], "valid": ovalid[:, tail], "rk": take_kv(K), "rv": take_kv(Vv),
               "rpos": take(kpos), "rdoc": take(kdoc), "rs": take(ks_), "rvalid": take(nxt),
               "conv": conv.astype(c["conv"].dtype), "index": c["index"] + T,
               "doc_last": doc[:, -1], "start": start[:, -1],
               "seg": c["seg"] if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)}
        return y, new

"""Short causal depthwise convolution with a decoding cache: the token mixer in front of the
recurrence in Mamba, DeltaNet and GLA layers (`causal_conv1d` in their reference code).

    y_t = act(bias + sum_{w < W} weight[w] * x_{t - (W-1) + w})

weight[W-1] multiplies the current token and weight[0] the oldest; inputs before the sequence come
from the cache, the last W-1 inputs [B, W-1, D] (zeros when none is given). Shapes: x [B, T, D];
weight [W, D]; bias [D]; cache float32; y [B, T, D] in x's dtype. `activation` is None or "silu"
(alias "swish").

Packed documents: a reset before step t (segment ids change from t-1 to t) zeroes the window, so a
token never sees inputs of an earlier document, and the returned cache holds zeros where its
positions belong to an earlier document than the last token's. Decoding one token at a time with
the returned cache therefore equals running the whole sequence.

impl: "recurrent" (a `lax.scan` carrying the window: the reference and the decoding path) and
"chunk" (the whole sequence at once, W shifted multiply-adds; called "chunk" as the parallel form of
every op is, it takes no chunk size), "auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.chunking import doc_index
from linear_jax.ops.common.recurrent import scan_time

_ACTIVATIONS = {None: lambda y: y, "silu": jax.nn.silu, "swish": jax.nn.silu}


def short_conv_recurrent(x, weight, *, initial_state, segment_ids):
    """The reference: one step per token, carrying the window of the last W-1 inputs. float32."""
    B, _, D = x.shape
    W = weight.shape[0]
    S0 = jnp.zeros((B, W - 1, D), jnp.float32) if initial_state is None else initial_state

    def step(S, x_t):
        window = jnp.concatenate([S, x_t[:, None]], axis=1)        # [B, W, D], oldest first
        return window[:, 1:], jnp.sum(window * weight, axis=1)

    return scan_time(step, S0, x, segment_ids)


def short_conv_chunk(x, weight, *, initial_state, segment_ids):
    """All steps at once: the cache prepended to x, W shifted slices. float32."""
    B, T, D = x.shape
    W = weight.shape[0]
    S0 = jnp.zeros((B, W - 1, D), jnp.float32) if initial_state is None else initial_state
    xp = jnp.concatenate([S0, x], axis=1)                           # [B, W-1+T, D]
    if segment_ids is None:
        y = sum(weight[w] * xp[:, w:w + T] for w in range(W))
        return y, xp[:, T:]
    # the cache belongs to document 0, the one the initial state belongs to
    doc = doc_index(segment_ids)
    docp = jnp.concatenate([jnp.zeros((B, W - 1), doc.dtype), doc], axis=1)
    same = lambda w, ref: (docp[:, w:w + ref.shape[1]] == ref)[..., None]
    y = sum(weight[w] * jnp.where(same(w, doc), xp[:, w:w + T], 0.0) for w in range(W))
    cache = jnp.where(same(T, jnp.broadcast_to(doc[:, -1:], (B, W - 1))), xp[:, T:], 0.0)
    return y, cache


registry.register(registry.OpRecord(
    "short_conv", reference=short_conv_recurrent, chunk=short_conv_chunk,
    seq_parallel="linear_jax.parallel.halo:short_conv"))


def short_conv(x, weight, bias=None, *, activation=None, initial_state=None, segment_ids=None,
               impl="auto", config=None):
    """Causal depthwise convolution. Returns `(y [B,T,D], cache [B,W-1,D] float32)`.

    `config` (a kernel config or a tuple of them) is taken for the uniform call of every op;
    this op has no kernel, so it is ignored.
    """
    _checks.check_rank("x", x, 3, "[B, T, D]")
    _checks.check_float("x", x)
    B, T, D = x.shape
    _checks.check_rank("weight", weight, 2, "[W, D]")
    _checks.check_float("weight", weight)
    if weight.shape[1] != D or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [W, D] with W >= 1 and D = {D} (x's channels), "
                         f"got weight{_checks.shape_str(weight)}")
    W = weight.shape[0]
    if bias is not None:
        _checks.check_float("bias", bias)
        _checks.check_shape("bias", bias, (D,), "[D]")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    _checks.check_state("initial_state", initial_state, (B, W - 1, D), "[B, W-1, D]")
    _checks.check_segment_ids(segment_ids, B, T)
    run = registry.dispatch("short_conv", impl, T, config)
    f32 = lambda y: None if y is None else y.astype(jnp.float32)
    y, cache = run(f32(x), f32(weight), initial_state=f32(initial_state), segment_ids=segment_ids)
    if bias is not None:
        y = y + f32(bias)
    return _ACTIVATIONS[activation](y).astype(x.dtype), cache

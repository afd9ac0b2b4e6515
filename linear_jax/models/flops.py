"""Model FLOPs per token, for throughput and model FLOPs utilisation (MFU).

    training FLOPs / token = 6 N_active + 3 F_mix          (forward 2 N + F_mix, backward twice)

`N_active`: the parameters a token meets in a matrix product: every parameter but the embedding
table (a lookup) plus the output head (the embedding again when tied), with a mixture of experts
counting top_k of its num_experts experts. `F_mix`: each layer's token mixing outside its
projections, forward, per token, estimated from the shapes of the layer's decoding cache:

- softmax attention: 4 H Dh ctx (scores and values) with ctx the mean number of keys a query sees
  (causal: (T + 1) / 2; a window or a block bounds it); every variant of `Attention` too, MLA's
  as 2 H (n + r + d_v) ctx (its query/key and value head dims differ);
- a matrix state [B, H, K, V] in chunks of C: H (4 K V + C (K + V)) (write k v^T and read q S,
  the causal intra-chunk q k^T and A v);
- a vector state [B, E, N] (Mamba's selective scan): 6 E N; an element-wise one [B, D]: 4 D;
- log-linear level states [B, H, L, K, V]: L times the matrix state's; a complex state four times
  the real one's.

Recomputation (rematerialisation, the sequence-parallel "rerun" backward) is not counted: MFU is
model FLOPs, not hardware FLOPs. `peak_flops(device)` is the dense bf16 peak of one device from a
small table of vendor figures (`PEAKS`, its source named), None when the device is not in it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linear_jax.layers.attention import Attention
from linear_jax.layers.mla import MLA

# (substring of jax's device_kind, dense bf16 FLOP/s per device, source)
PEAKS = (
    ("H200", 989e12, "NVIDIA H200 datasheet: 989 TFLOP/s dense BF16 (SXM)"),
    ("H100 PCIe", 756e12, "NVIDIA H100 datasheet: 756 TFLOP/s dense BF16 (PCIe)"),
    ("H100", 989e12, "NVIDIA H100 datasheet: 989 TFLOP/s dense BF16 (SXM)"),
    ("GH200", 989e12, "NVIDIA GH200 datasheet: 989 TFLOP/s dense BF16"),
    ("B200", 2250e12, "NVIDIA B200 datasheet: 2.25 PFLOP/s dense BF16"),
    ("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16"),
    ("L40S", 362e12, "NVIDIA L40S datasheet: 362 TFLOP/s dense BF16"),
    ("L4", 121e12, "NVIDIA L4 datasheet: 121 TFLOP/s dense BF16"),
    ("A10", 125e12, "NVIDIA A10 datasheet: 125 TFLOP/s dense BF16"),
    ("TPU v6", 918e12, "Google Cloud TPU v6e (Trillium) docs: 918 TFLOP/s BF16 per chip"),
    ("TPU v5p", 459e12, "Google Cloud TPU v5p docs: 459 TFLOP/s BF16 per chip"),
    ("TPU v5", 197e12, "Google Cloud TPU v5e docs: 197 TFLOP/s BF16 per chip"),
    ("TPU v4", 275e12, "Google Cloud TPU v4 docs: 275 TFLOP/s BF16 per chip"),
)


def peak_flops(device=None) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s of one `device`, the source of the figure); (None, why) for a device
    not in `PEAKS` (a CPU, say): pass a peak yourself (`train.peak_flops` in a config)."""
    kind = (device or jax.devices()[0]).device_kind
    for key, flops, source in PEAKS:
        if key.lower() in kind.lower():
            return flops, source
    return None, f"no peak known for device kind {kind!r}"


def _mean_context(T: int, window: int | None, block: int | None) -> float:
    t = np.arange(1, T + 1)
    keys = t if window is None else np.minimum(t, window)
    if block is not None:
        keys = np.minimum(keys, (np.arange(T) % block) + 1)
    return float(keys.mean())


def mixing_flops(mixer, seq_len: int) -> float:
    """Forward FLOPs per token of one mixer's token mixing outside its projections (estimate,
    see the module docstring)."""
    if isinstance(mixer, Attention):
        ctx = _mean_context(seq_len, mixer.window, mixer.block_size)
        dims = mixer.n + mixer.r + mixer.dv if isinstance(mixer, MLA) else 2 * mixer.Dh
        return 2.0 * mixer.H * dims * ctx
    chunk = dict(getattr(mixer, "op_kw", ())).get("chunk_size", 64)
    C = min(chunk, seq_len)
    cache = jax.eval_shape(lambda: mixer.init_cache(1, jnp.float32))
    total = 0.0
    for name, leaf in cache.items():
        for x in jax.tree.leaves(leaf):           # a state may be a tree (log-linear levels)
            if name not in ("conv", "seg") and jnp.issubdtype(x.dtype, jnp.inexact):
                # a complex multiply-add is four real ones
                total += _state_flops(x.shape[1:], C) * (
                    4 if jnp.issubdtype(x.dtype, jnp.complexfloating) else 1)
    return float(total)


def _state_flops(shape, C: int) -> float:
    """Per-token FLOPs of updating and reading one state array of `shape` (batch dropped)."""
    if len(shape) == 4:                           # [H, L, K, V]: log-linear level states
        H, L, K, V = shape
        return L * _state_flops((H, K, V), C)
    if len(shape) == 3:                           # [H, K, V]
        H, K, V = shape
        return H * (4 * K * V + C * (K + V))
    if len(shape) == 2:                           # [E, N] (or an [H, K] normaliser)
        return 6 * math.prod(shape)
    return 4 * math.prod(shape)


def active_params(model) -> int:
    """Parameters a token meets in a matrix product (see the module docstring)."""
    c = model.config
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    total = count(nnx.state(model, nnx.Param))
    total -= c.vocab_size * c.d_model                    # the embedding lookup
    total -= c.max_positions * c.d_model                 # the learned positions' lookup
    total += c.vocab_size * c.d_model if c.tie_embeddings else 0      # the tied head
    for i in range(c.num_layers):
        if c.layer_ffn(i) == "moe":                      # (E - k) experts idle per token
            per_expert = 3 * c.d_model * c.moe_width
            total -= (c.num_experts - c.top_k) * per_expert
    return int(total)


def flops_per_token(model, seq_len: int) -> dict:
    """Training FLOPs per token of `model` (an `LM`, abstract or concrete) on sequences of
    `seq_len`: {"params": 6 N_active, "mixing": 3 sum F_mix, "total": their sum}."""
    mix = sum(mixing_flops(model.layer_mixer(i), seq_len) for i in range(model.config.num_layers))
    params = 6.0 * active_params(model)
    return {"params": params, "mixing": 3.0 * mix, "total": params + 3.0 * mix}

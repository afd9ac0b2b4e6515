"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet).

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * S_t^T q_t

`delta_rule` is g = 0 (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight
Programmers"; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length"); `gated_delta_rule` takes a log decay g <= 0 per head and step (Yang et al. 2025, "Gated
Delta Networks: Improving Mamba2 with Delta Rule"). With l2-normalised keys, beta in [0, 1] makes
I - beta k k^T a contraction and beta in [0, 2] lets its eigenvalue along k reach -1 (a reflection
at beta = 2), which is what state tracking needs (Grazzi et al. 2025, "Unlocking State-Tracking in
Linear RNNs Through Negative Eigenvalues"); both work on every path.

`exact=True` (EFLA; "Error-Free Linear Attention"): the delta step is one explicit Euler step of
size 1 of dS/dt = beta k (v^T - k^T S). With k, v, beta held over the unit interval, the flow is
exact in closed form because beta k k^T has rank one (eigenvalue beta ||k||^2 along k): it is the
same delta step with beta replaced by `efla_beta(k, beta)` = (1 - exp(-beta ||k||^2)) / ||k||^2.
The gate, when present, multiplies as before; only beta changes.

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V] (H a multiple of Hk); beta, g [B, T, H]; state S
[B, H, K, V] float32; o [B, T, H, V] in v's dtype.

impl: "recurrent" (lax.scan reference), "chunk" (chunk-parallel WY/UT form; see
`linear_jax.ops.common.delta_chunk`), "pallas" / "pallas:<backend>" (the kernels of the two records
below, called as `fn(q, k, v, g, beta, ...)` with heads expanded and g None for `delta_rule`),
"auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.delta_chunk import chunk_delta
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros

# Below this beta * ||k||^2 the closed form (1 - exp(-z)) / z is replaced by its Taylor series:
# the quotient-rule gradient of the closed form loses ~eps / z of relative precision near 0.
_EFLA_SERIES = 0.05


@jax.custom_jvp
def _one_minus_exp_neg(z):
    return -jnp.expm1(-z)


@_one_minus_exp_neg.defjvp
def _one_minus_exp_neg_jvp(primals, tangents):
    # JAX differentiates expm1 as expm1(x) + 1, which loses exp(-z) to rounding once z is large
    (z,), (dz,) = primals, tangents
    return -jnp.expm1(-z), jnp.exp(-z) * dz


def efla_beta(k, beta):
    """The effective beta of the exact (EFLA) delta step: (1 - exp(-beta ||k||^2)) / ||k||^2.

    k [..., Hk, K], beta [..., H] (H a multiple of Hk; the key heads are repeated to match).
    Returns float32 [..., H]. At ||k|| -> 0 the value tends to beta; the series branch keeps the
    value and the gradients finite and exact there (k = 0 included).
    """
    beta = beta.astype(jnp.float32)
    k = repeat_heads(k.astype(jnp.float32), beta.shape[-1], axis=-2)
    lam = jnp.sum(k * k, axis=-1)
    z = beta * lam
    small = jnp.abs(z) < _EFLA_SERIES
    z_safe, lam_safe = jnp.where(small, 1.0, z), jnp.where(small, 1.0, lam)
    # (1 - exp(-z)) / z = 1 - z/2 + z^2/6 - ...; away from 0 the closed form is divided by ||k||^2,
    # not by z, so d/dbeta = exp(-z) is formed without cancellation
    series = 1.0 - z / 2 + z**2 / 6 - z**3 / 24 + z**4 / 120
    return jnp.where(small, beta * series, _one_minus_exp_neg(z_safe) / lam_safe)


def delta_rule_recurrent(q, k, v, g, beta, *, scale, initial_state, segment_ids):
    """The reference: one step per token. Inputs validated, heads expanded; g may be None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = state_or_zeros(initial_state, (B, H, K, V))
    g = jnp.zeros((B, T, H), jnp.float32) if g is None else f32(g)

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t = x
        S = jnp.exp(g_t)[..., None, None] * S
        # (I - b k k^T) S + b k v^T  ==  S + b k (v - k^T S)^T
        err = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S, precision="highest")
        S = S + b_t[..., None, None] * k_t[..., :, None] * err[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S, precision="highest")

    return scan_time(step, S0, (f32(q) * scale, f32(k), f32(v), g, f32(beta)), segment_ids)


def delta_rule_chunk(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size):
    return chunk_delta(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                       segment_ids=segment_ids, chunk_size=chunk_size)


# delta_rule is gated_delta_rule at g = 0: the same forms and kernels (a kernel skips the gate
# when g is None), two records so that each op names itself in errors and has its own parallel form
# (the Hopper kernels, rebuilt in session 12, passed every device check again on an H200 in
# session 16 and beat the Triton kernels there: benchmarks/NOTES.md)
_KERNELS = (registry.Kernel("mosaic_gpu", "linear_jax.kernels.gpu.hopper.delta:delta",
                            "linear_jax.kernels.configs:HopperDeltaConfig",
                            min_capability=(9, 0), max_capability=(9, 0),
                            accepts="linear_jax.kernels.gpu.hopper.common:accepts"),
            registry.Kernel("triton", "linear_jax.kernels.gpu.delta:delta",
                            "linear_jax.kernels.configs:TritonChunkConfig",
                            accepts="linear_jax.kernels.gpu.common:accepts",
                            auto_declines="linear_jax.kernels.gpu.common:auto_declines"),
            registry.Kernel("tpu", "linear_jax.kernels.tpu.delta_rule:delta_rule",
                            "linear_jax.kernels.configs:TpuConfig"))
registry.register(registry.OpRecord(
    "delta_rule", reference=delta_rule_recurrent, chunk=delta_rule_chunk, kernels=_KERNELS,
    seq_parallel="linear_jax.parallel.delta:delta_rule"))
registry.register(registry.OpRecord(
    "gated_delta_rule", reference=delta_rule_recurrent, chunk=delta_rule_chunk,
    kernels=_KERNELS,
    seq_parallel="linear_jax.parallel.delta:gated_delta_rule"))


def _delta(op, q, k, v, g, beta, exact, scale, initial_state, segment_ids, chunk_size, impl,
           config):
    B, T, H, K, V = _checks.check_qkv(op, q, k, v)
    _checks.check_gate(op, "beta", beta, B, T, H)
    if g is not None:
        _checks.check_gate(op, "g", g, B, T, H)
        _checks.check_log_decay("g", g)
    _checks.check_state("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch(op, impl, T, config, args=(q, k, v))
    q, k = repeat_heads(q, H), repeat_heads(k, H)
    if exact:
        beta = efla_beta(k, beta)
    o, S = run(q, k, v, g, beta, scale=default_scale(scale, K), initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), S


def delta_rule(q, k, v, beta, *, exact=False, scale=None, initial_state=None, segment_ids=None,
               chunk_size=64, impl="auto", config=None):
    """DeltaNet. Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)`.

    `beta [B, T, H]` is the writing strength (typically a sigmoid, or 2 * sigmoid for negative
    eigenvalues); keys are expected l2-normalised. `exact=True` uses `efla_beta(k, beta)` instead.
    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    return _delta("delta_rule", q, k, v, None, beta, exact, scale, initial_state, segment_ids,
                  chunk_size, impl, config)


def gated_delta_rule(q, k, v, g, beta, *, exact=False, scale=None, initial_state=None,
                     segment_ids=None, chunk_size=64, impl="auto", config=None):
    """Gated DeltaNet: the delta rule with a log decay `g [B, T, H] <= 0` applied to the state
    before each step. Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)`.

    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    return _delta("gated_delta_rule", q, k, v, g, beta, exact, scale, initial_state, segment_ids,
                  chunk_size, impl, config)

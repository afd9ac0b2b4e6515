"""The sequential chunk-state pass of the decay family, forward and reverse, as one Pallas kernel.

Forward (x = k, y = v), for chunk n = 0 .. N-1, entering state S_n (S_0 = initial state):

    S_{n+1} = keep_n * exp(G_last) * S_n  +  sum_j (k_j * exp(G_last - G_j) * out_j) v_j^T

Reverse (x = q * scale, y = do), for n = N-1 .. 0, dS_N = cotangent of the final state:

    dS_n = keep_n * exp(G_last) * dS_{n+1}  +  sum_i (q_i * exp(G_i) * in_i) do_i^T

G is the chunk-local cumulative gate, so every exponent is a sum of gates over a span, <= 0. keep_n
is 0 when a document starts inside chunk n; out_j (in_i) keeps rows of the chunk's last (entering)
document. The kernel writes the state on one side of every chunk (forward: S_n, entering; reverse:
dS_{n+1}, leaving) and the state at the end. Grid (B*H, K/BK, V/BV): each program carries one
[BK, BV] float32 tile of the state through all chunks in order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params


def state_pass(x, y, G, doc, S0, *, cfg, kind, has_seg, reverse, scale, state_dtype):
    """x [B,Tp,H,Kp], y [B,Tp,H,Vp], G [B,Tp,H(,Kp)] float32 (ignored for kind "none"),
    doc [B,Tp] int32, S0 [B,H,Kp,Vp] float32.

    Returns (states [B,H,N,Kp,Vp] in state_dtype, S_end [B,H,Kp,Vp] float32).
    """
    B, Tp, H, Kp = x.shape
    Vp = y.shape[-1]
    C = cfg.chunk
    N = Tp // C
    BK, BV = common.state_tiles(B * H, Kp, Vp, cfg)
    exact = x.dtype == jnp.float32
    vector = kind == "vector"
    f32 = jnp.float32

    def kernel(x_ref, y_ref, g_ref, doc_ref, s0_ref, hs_ref, send_ref):
        def step(i, S):
            n = N - 1 - i if reverse else i
            hs_ref[n] = S.astype(hs_ref.dtype)
            xn = x_ref[pl.ds(n * C, C), :].astype(f32)
            yn = y_ref[pl.ds(n * C, C), :]
            decay = jnp.float32(1.0)
            if kind != "none":
                if vector:
                    Gn = g_ref[pl.ds(n * C, C), :]
                    Gl = g_ref[pl.ds(n * C + C - 1, 1), :]          # [1, BK]
                    decay = jnp.exp(Gl).reshape(BK, 1)
                else:
                    Gn = g_ref[pl.ds(n * C, C)][:, None]
                    Gl = g_ref[n * C + C - 1]
                    decay = jnp.exp(Gl)
                xn = xn * (jnp.exp(Gn) if reverse else jnp.exp(Gl - Gn))
            if reverse:
                xn = xn * scale
            if has_seg:
                in_rows, out_rows, keep, _ = common.chunk_masks(doc_ref, n, C, False)
                xn = jnp.where((in_rows if reverse else out_rows)[:, None], xn, 0.0)
                decay = jnp.where(keep, decay, 0.0)
            # bf16/fp16 operands, float32 accumulation: the gated keys are <= |k| in size
            return decay * S + dot(xn.astype(yn.dtype), yn, ta=True, exact=exact)

        S = jax.lax.fori_loop(0, N, step, s0_ref[...].astype(f32))
        send_ref[...] = S

    g_spec = (common.spec(H, Tp, BK, x=0) if vector else common.spec(H, Tp))
    return pl.pallas_call(
        kernel,
        grid=(B * H, Kp // BK, Vp // BV),
        in_specs=[common.spec(H, Tp, BK, x=0), common.spec(H, Tp, BV, x=1), g_spec,
                  common.doc_spec(H, Tp), common.state_spec(H, BK, BV, k=0, v=1)],
        out_specs=[common.states_spec(H, N, BK, BV, k=0, v=1),
                   common.state_spec(H, BK, BV, k=0, v=1)],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, Kp, Vp), state_dtype),
                   jax.ShapeDtypeStruct((B, H, Kp, Vp), f32)],
        compiler_params=triton_params(cfg, cfg.warps_state, cfg.stages_state),
        interpret=interpret(cfg),
        name="decay_state_bwd" if reverse else "decay_state_fwd",
    )(x, y, G, doc, S0)

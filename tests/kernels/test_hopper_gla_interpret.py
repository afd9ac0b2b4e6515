"""The Hopper GLA kernels' numerics on a CPU, in jax's GPU interpreter (`HopperChunkConfig(
interpret=True)`): TMA copies, mbarriers, the warp-specialised walk, the dyadic levels, masks and
span sums run as on the device, each wgmma computed by `jnp.dot` on the same SMEM tiles. Against
the float32 recurrent reference: outputs, final state and every gradient (q, k, v, g, initial
state), with mild and with strong gates (every log decay in [-25, -15]: exp(G) of a chunk is far
below float32's range, so any factor through one reference row would overflow).

T = 100 is two chunks (the second padded); documents start inside the first chunk and at the
second's first row. The default config cuts it into two pieces (two-level walks), "one-level"
walks it whole. "B2-K128-docs" is the shape of the device's gates fault (two batch rows, each
with its own documents: row 1 has one boundary, inside the second chunk), and the variant cases
run `HopperChunkConfig.gla_variant`'s alternative programs, which must compute the same thing.

The probes (`gla_variant` probe_*) replace q~ / dq / dg by one intermediate; the last tests check
each against its definition, so that a device mismatch of a probe between the compiled kernel and
the interpreter names that intermediate."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import gla as hopper_gla
from linear_jax.ops import gla

f32 = lambda x: x.astype(jnp.float32)                                       # noqa: E731
rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))  # noqa: E731

# id: (config overrides, gate, documents + initial state, K = V[, B])
CASES = {
    "two-level-docs": ({}, "normal", True, 64),
    "strong-one-level": (dict(pieces=1), "strong", True, 64),
    "no-docs-K128": ({}, "normal", False, 128),
    "B2-K128-docs": ({}, "normal", True, 128, 2),
    "variants-K64": (dict(gla_variant="split_waits,qk_tiles,store_k_first,dq_smem"), "normal",
                     True, 64),
    "pad_k128-K64": (dict(gla_variant="pad_k128"), "normal", True, 64),
}


@functools.cache
def _reference():
    """The float32 recurrent reference's gradients and outputs, jitted once, inputs as arguments
    (the cases of one shape share its compilation)."""
    def loss(args, seg, do, dS):
        q, k, v, g, S0 = (list(args) + [None])[:5]
        o, S = gla(q, k, v, g, scale=q.shape[-1]**-0.5, initial_state=S0, segment_ids=seg,
                   impl="recurrent")
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    return jax.jit(jax.grad(loss, has_aux=True))


@pytest.mark.parametrize("case", list(CASES))
def test_gla_matches_reference(case):
    over, gate, extras, K, *rest = CASES[case]
    cfg = HopperChunkConfig(interpret=True, **over)
    B, T, H, V = (rest or [1])[0], 100, 1, K
    ks = jax.random.split(jax.random.key(5), 7)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    k = (jax.random.normal(ks[1], (B, T, H, K)) / 8).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.bfloat16)
    if gate == "strong":
        g = -15.0 - 10.0 * jax.random.uniform(ks[3], (B, T, H, K))
    else:
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K)) + 2.0) / 4
    S0 = jax.random.normal(ks[4], (B, H, K, V)) if extras else None
    rows = [(np.arange(T) >= 30) + (np.arange(T) >= 64), np.arange(T) >= 80][:B]
    seg = jnp.asarray(np.stack(rows), jnp.int32) if extras else None
    do = jax.random.normal(ks[5], (B, T, H, V))
    dS = jax.random.normal(ks[6], (B, H, K, V))
    args = [q, k, v, g] + ([S0] if extras else [])
    names = ["dq", "dk", "dv", "dg", "dh0"][:len(args)]

    def loss(fn, *a):
        o, S = fn(*a[:4], a[4] if extras else None)
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    kern = lambda q, k, v, g, S0: hopper_gla.gla(                            # noqa: E731
        q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64, config=cfg)
    argnums = tuple(range(len(args)))
    grads, (o, S) = jax.jit(jax.grad(lambda *a: loss(kern, *a), argnums=argnums,
                                     has_aux=True))(*args)
    grads_r, (o_r, S_r) = _reference()([f32(x) for x in args], seg, do, dS)
    assert rel(o, o_r) < 1e-2, rel(o, o_r)
    assert rel(S, S_r) < 1e-2, rel(S, S_r)
    for name, a, b in zip(names, grads, grads_r, strict=True):
        assert not bool(jnp.isnan(f32(a)).any()), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))


# -- the probes of `gla_variant` -------------------------------------------------------------------
def _kernel_inputs(K=64, B=2, T=128, H=1):
    """Inputs of the gates and grad kernels called directly: two batch rows with different
    documents, states S_n and dS_n+1 drawn at random (the probes need no consistent walk)."""
    C, V, N = 64, K, T // 64
    ks = jax.random.split(jax.random.key(7), 8)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (B, T, H, K), bf)
    k = (jax.random.normal(ks[1], (B, T, H, K)) / 8).astype(bf)
    v = jax.random.normal(ks[2], (B, T, H, V), bf)
    do = jax.random.normal(ks[3], (B, T, H, V), bf)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, K)) + 2.0) / 4
    gh, gl = (x for x in hopper_gla.split_hi_lo(g, bf))
    rows = [(np.arange(T) >= 30) + (np.arange(T) >= 64), np.arange(T) >= 80][:B]
    doc = hopper_gla.padded_doc(jnp.asarray(np.stack(rows), jnp.int32), T)
    drows = hopper_gla.doc_rows(doc, C)
    S = jax.random.normal(ks[5], (B, H, N, K, V), bf)
    dS = jax.random.normal(ks[6], (B, H, N, K, V), bf)
    return dict(q=q, k=k, v=v, do=do, gh=gh, gl=gl, drows=drows, S=S, dS=dS, doc=np.asarray(doc))


def _e_in(x, scale, part="e_in"):
    """scale exp(Gin) in [B, T, H, K] float32 in numpy (the q-side factor of the module doc), or
    its part "gin" (Gin) or "in" (the 0/1 mask)."""
    B, T, H, K = x["q"].shape
    g = (f32(x["gh"]) + f32(x["gl"])).reshape(B, T // 64, 64, H, K)
    doc = x["doc"].reshape(B, T // 64, 64)
    din = np.concatenate([np.zeros((B, 1)), doc[:, :-1, -1]], axis=1)
    inr = (doc == din[:, :, None])[:, :, :, None, None]
    gin = np.cumsum(np.asarray(g), axis=2)
    out = {"e_in": scale * np.exp(gin) * inr, "gin": gin,
           "in": np.broadcast_to(inr, gin.shape).astype(np.float32)}[part]
    return out.reshape(B, T, H, K)


def _gates(x, var, scale):
    cfg = HopperChunkConfig(interpret=True, gla_variant=var)
    return hopper_gla.gates(x["q"], x["k"], x["gh"], x["gl"], x["drows"], scale=scale, cfg=cfg)


def _grad(x, var, scale):
    cfg = HopperChunkConfig(interpret=True, gla_variant=var)
    return hopper_gla.grad(x["q"], x["k"], x["v"], x["do"], x["gh"], x["gl"], x["drows"], x["S"],
                           x["dS"], scale=scale, cfg=cfg)


def test_gates_probes_are_their_intermediates():
    x, scale = _kernel_inputs(K=128), 128**-0.5
    qt, kt, A, dec = _gates(x, "", scale)
    qt_ein, kt2, A2, dec2 = _gates(x, "probe_ein,store_k_first,qk_tiles", scale)
    qt_q = _gates(x, "probe_q", scale)[0]
    assert rel(qt_ein, _e_in(x, scale)) < 1e-2
    assert rel(_gates(x, "probe_gin", scale)[0], _e_in(x, scale, "gin")) < 1e-2
    assert rel(_gates(x, "probe_in", scale)[0], _e_in(x, scale, "in")) == 0.0
    assert rel(qt_q, x["q"]) == 0.0
    assert rel(qt, f32(x["q"]) * _e_in(x, scale)) < 1e-2      # the product of the two probes
    for a, b in ((kt, kt2), (A, A2), (dec, dec2)):             # the rest is untouched
        assert rel(a, b) == 0.0


def test_grad_probes_are_their_intermediates():
    x, scale = _kernel_inputs(K=64), 64**-0.5
    B, T, H, K = x["q"].shape
    dq, dk, dg = _grad(x, "", scale)
    dq_ein, dk_ein, _ = _grad(x, "probe_ein", scale)
    dq_dqt = _grad(x, "probe_dqt", scale)[0]
    dq_k = _grad(x, "probe_k", scale)[0]
    dq_lev = _grad(x, "probe_lev", scale)[0]
    dg_ddec = _grad(x, "probe_ddec", scale)[2]
    assert rel(dk_ein, dk) == 0.0                              # dk is every probe's control
    assert rel(dq_ein, _e_in(x, scale)) < 1e-2
    assert rel(_grad(x, "probe_gin", scale)[0], _e_in(x, scale, "gin")) < 1e-2
    assert rel(_grad(x, "probe_in", scale)[0], _e_in(x, scale, "in")) == 0.0
    assert rel(dq_k, x["k"]) == 0.0
    do_c = f32(x["do"]).reshape(B, T // 64, 64, H, K)
    S = f32(x["S"])
    dqt = jnp.einsum("bnchv,bhnkv->bnchk", do_c, S).reshape(B, T, H, K)
    assert rel(dq_dqt, dqt) < 1e-2
    diag = scale * jnp.sum(f32(x["do"]) * f32(x["v"]), axis=-1, keepdims=True)
    parts = f32(dq_ein) * f32(dq_dqt) + diag * f32(x["k"]) + f32(dq_lev)
    assert rel(parts, dq) < 2e-2                               # dq is the sum of its parts
    g = (f32(x["gh"]) + f32(x["gl"])).reshape(B, T // 64, 64, H, K)
    doc = x["doc"].reshape(B, T // 64, 64)
    din = np.concatenate([np.zeros((B, 1)), doc[:, :-1, -1]], axis=1)
    keep = (doc[:, :, -1] == din)[:, :, None, None, None]
    ddec = jnp.sum(S * f32(x["dS"]), axis=-1)                  # [B, H, N, K]
    want = keep * jnp.exp(jnp.sum(g, axis=2, keepdims=True)) * \
        jnp.moveaxis(ddec, 1, 2)[:, :, None]                   # [B, N, 1, H, K] on every row
    want = jnp.broadcast_to(want, g.shape).reshape(B, T, H, K)
    assert rel(dg_ddec, want) < 1e-3

"""No gla kernel gives a wgmma an A operand in registers that is derived from an iota.

On the H200 a wgmma whose A operand was an iota-derived 0/1 matrix held in registers (the span
matrices of `gla.Spans`, `jnp.where(cond, 1.0, 0.0).astype(bf16)` from iotas; also data masked
by one, the level products' dA^s) gave wrong rows in the compiled kernel: the rows r + 8 of each
warp's 16-row slab (gla_gates' q~ at K = V = 128; gla_grad's dq, dg at K = 64), while the CPU
interpreter and the same matrices read from SMEM are exact. Register A operands that come from
wgmma accumulators (data) are fine. So every gla kernel must read such matrices from SMEM.

The check traces the forward and backward kernels (jax.make_jaxpr of the gradient, compiled
mode, so the kernels hold their wgmmas) and follows, through every sub-jaxpr (run_state,
run_scoped, cond, scan, jit), which values depend on an iota: an iota taints its result, any
other operation taints its outputs when an input is tainted, a store taints the ref it writes
and a load from a tainted ref is tainted; a wgmma's accumulator is clean after it (the results
of a wgmma are data). A wgmma whose A operand is not a ref and is tainted is reported.

The rule is stricter than the device evidence needs: data masked by an iota condition counts as
tainted (gla_grad's register dA^s, loaded data cut by the level's pair mask, was fault 1's
operand), also where the data come from a wgmma accumulator, which on the device has worked (the
masked P of simple_gla's and the delta rule's walks, which this rule would report; it is applied
to the gla kernels only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src import core as jcore
from jax._src.state import types as state_types

from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import gla as hopper_gla

WGMMA = "wgmma_ref"


def _jaxpr(x):
    return x.jaxpr if isinstance(x, jcore.ClosedJaxpr) else x


def _is_ref(v) -> bool:
    return isinstance(v.aval, state_types.AbstractRef)


def _tainted(tainted, v) -> bool:
    return isinstance(v, jcore.Var) and v in tainted


def _bind(jaxpr, outer, tainted):
    """The inner variables of jaxpr that receive the outer operands `outer` (its constvars when
    the counts match, as run_scoped closes over its operands, else its trailing invars), as
    pairs (inner, outer)."""
    if jaxpr.constvars and len(jaxpr.constvars) == len(outer):
        inner = jaxpr.constvars
    elif len(jaxpr.invars) >= len(outer):
        inner = jaxpr.invars[len(jaxpr.invars) - len(outer):] if outer else []
    else:
        raise ValueError(f"cannot bind {len(outer)} operands to a jaxpr of "
                         f"{len(jaxpr.invars)} inputs")
    return list(zip(inner, outer, strict=True))


def _walk(jaxpr, tainted, found, where):
    """Propagate the taint through jaxpr's equations (tainted: a set of Vars, updated in place);
    append to `found` each wgmma with a tainted register A operand."""
    for e in jaxpr.eqns:
        name = e.primitive.name
        ins = [v for v in e.invars if isinstance(v, jcore.Var)]
        if name == "iota":
            tainted.update(e.outvars)
            continue
        if name == WGMMA:
            a = e.invars[1]
            if not _is_ref(a) and _tainted(tainted, a):
                found.append(f"{where}: wgmma with a register A operand {a.aval} from an iota")
            tainted.discard(e.invars[0])                  # the accumulator holds data now
            continue
        subs = [_jaxpr(s) for k, v in e.params.items() if k != "rule"
                for s in ([v] if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)) else
                          [x for x in v if isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr))]
                          if isinstance(v, (tuple, list)) else [])]
        if name == "mpmd_map":                             # a kernel: its own, fresh analysis
            for sub in subs:
                _walk(sub, set(), found, e.params["meshes"][0].kernel_name)
            continue
        if subs:
            outer = list(e.invars[1:] if name == "cond" else e.invars)
            if name == "while":                            # (cond consts, body consts, carry)
                cn, bn = e.params["cond_nconsts"], e.params["body_nconsts"]
                carry = outer[cn + bn:]
                operands = [(_jaxpr(e.params["cond_jaxpr"]), outer[:cn] + carry),
                            (_jaxpr(e.params["body_jaxpr"]), outer[cn:])]
            else:
                operands = [(sub, outer) for sub in subs]
            any_out = False
            for _ in range(2 if name in ("scan", "while") else 1):   # loop carries: twice
                for sub, ops_ in operands:
                    pairs = _bind(sub, ops_, tainted)
                    inner = {i for i, o in pairs if _tainted(tainted, o)}
                    _walk(sub, inner, found, where)
                    for i, o in pairs:                     # refs written inside
                        if i in inner and isinstance(o, jcore.Var) and _is_ref(o):
                            tainted.add(o)
                    if name == "run_state":                # outputs: the refs' final contents
                        for (i, _), out in zip(pairs, e.outvars, strict=False):
                            if i in inner:
                                tainted.add(out)
                        any_out = None
                    elif any(_tainted(inner, v) for v in sub.outvars):
                        any_out = True
                if name == "scan" and any_out:
                    nc, ncar = e.params["num_consts"], e.params["num_carry"]
                    for v in outer[nc:nc + ncar]:
                        if isinstance(v, jcore.Var):
                            tainted.add(v)
                if name == "while" and any_out:
                    for v in carry:
                        if isinstance(v, jcore.Var):
                            tainted.add(v)
            if any_out:
                tainted.update(e.outvars)
            elif any_out is not None and any(_tainted(tainted, v) for v in ins):
                tainted.update(e.outvars)                  # conservative
            continue
        if any(_tainted(tainted, v) for v in ins):
            tainted.update(e.outvars)
            if name in ("swap", "addupdate") and _is_ref(e.invars[0]):
                tainted.add(e.invars[0])
    return found


def register_iota_operands(fn, *structs) -> list[str]:
    """Every wgmma of the Mosaic GPU kernels traced by fn(*structs) whose A operand is a
    register value derived from an iota, as '<kernel>: ...'."""
    return _walk(jax.make_jaxpr(fn)(*structs).jaxpr, set(), [], "outside")


def _gla_grad(B, T, H, K, V, docs, **over):
    cfg = HopperChunkConfig(interpret=False, grad_programs=132, **over)
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)      # noqa: E731
    structs = [bf(B, T, H, K), bf(B, T, H, K), bf(B, T, H, V),
               jax.ShapeDtypeStruct((B, T, H, K), jnp.float32),
               jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32) if docs else None

    def loss(q, k, v, g, S0, *rest):
        o, S = hopper_gla.gla(q, k, v, g, scale=K**-0.5, initial_state=S0,
                              segment_ids=rest[0] if rest else None, chunk_size=64, config=cfg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4)), structs + ([seg] if docs else [])


@pytest.mark.parametrize("K,docs,over", [(64, True, {}), (128, True, {}), (128, False, {}),
                                         (128, True, dict(gla_grad_key_blocks=True))])
def test_gla_kernels_read_no_iota_matrix_from_registers(K, docs, over):
    fn, structs = _gla_grad(2, 256, 2, K, K, docs, **over)
    kernels = {e.params["meshes"][0].kernel_name
               for e in _eqns(jax.make_jaxpr(fn)(*structs).jaxpr) if e.primitive.name == "mpmd_map"}
    assert {"gla_gates", "gla_walk", "gla_walk_rev", "gla_grad"} <= kernels, kernels
    assert register_iota_operands(fn, *structs) == []


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for s in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(s, (jcore.Jaxpr, jcore.ClosedJaxpr)):
                    yield from _eqns(_jaxpr(s))


def _toy(a_from: str):
    """A one-warpgroup kernel of one wgmma x @ y whose A operand is an iota mask in registers
    ("mask"), that mask stored to SMEM and passed as the ref ("smem"), the mask times data
    ("masked"), or a wgmma result ("acc")."""
    from linear_jax._compat import mosaic_gpu_kernel
    from linear_jax.kernels.gpu.hopper.common import Ops, plgpu, smem

    ops = Ops(interpret=False)

    def body(x_ref, o_ref, ms):
        r, c = ops.iota((64, 64), 0), ops.iota((64, 64), 1)
        mask = jnp.where(c <= r, 1.0, 0.0).astype(jnp.bfloat16)
        if a_from == "smem":
            ms[...] = mask
            plgpu.commit_smem()
            a = ms
        elif a_from == "mask":
            a = mask
        elif a_from == "masked":
            a = jnp.where(c <= r, ops.acc(x_ref[...]).astype(jnp.float32), 0.0).astype(
                jnp.bfloat16)
        else:
            a = ops.dot(x_ref, x_ref).astype(jnp.bfloat16)
        o_ref[...] = ops.dot(a, x_ref)

    return mosaic_gpu_kernel(
        body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32), grid=(1,), grid_names=("b",),
        num_threads=1, thread_name="wg", scratch_types=[smem((64, 64), jnp.bfloat16)],
        semantics="lane", approx_math=False, interpret=False, name=f"toy_{a_from}")


@pytest.mark.parametrize("a_from,bad", [("mask", True), ("masked", True), ("smem", False),
                                         ("acc", False)])
def test_the_check_sees_a_register_iota_operand(a_from, bad):
    """The rule itself, on small kernels with each kind of A operand."""
    found = register_iota_operands(_toy(a_from), jax.ShapeDtypeStruct((64, 64), jnp.bfloat16))
    assert bool(found) == bad, found

"""The scalar-gate rows (`kernels/gpu/hopper/common.gate_rows`) formed four ways, timed on the
device: which XLA form of the chunk-local cumulative sums is cheapest.

    python -m experiments.benchmarks.gate_rows_gpu [--T 2048 8192 32768]

gate_rows turns the log gates g [B, T, H] into the float32 rows the Hopper kernels read ([B, H,
3, Tp]: gq, gk, dec; G too where the kernel forms intra-chunk decays). Its cumulative sums run in
XLA before the kernels; on an H200 at T = 2048 that fusion took 18 us against jla's 3.4 us for
its own gate preparation. The forms:
  cumsum        gate_rows itself (jnp.cumsum on the head-major [B, H, N, C] view)
  cumsum_tmajor jnp.cumsum along C on the time-major [B, N, C, H] view, then one transpose
  dot           both sums (inclusive prefix, exclusive suffix) as one product with a [C, 2C] 0/1
                matrix at float32 precision, from the time-major view
  assoc         lax.associative_scan on the head-major view
  barrier       as cumsum, the head-major view behind an optimization barrier, so that XLA keeps
                the transpose out of the cumulative sums' fusion
Each gives the full rows (exponentials, stack); the script prints the device ms of each (median
of back-to-back calls), its kernels, and its largest relative difference from gate_rows. Then
(`--op`, default on) the same forms inside simple_gla's Hopper forward and forward + backward at
the anchors' shapes, where XLA fuses them with their neighbours: each form stands in for the
op's gate_rows (the script rebinds the name in the kernel module for its own calls), with the
device ms, the kernels' microseconds, and the output's difference from the op's own. Writes
benchmarks/results/gate_rows_gpu_<device>.json.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.benchmarks import common
from experiments.benchmarks import kernel_checks as kc
from experiments.benchmarks import profile as kernel_profile
from linear_jax.kernels.gpu.hopper.common import gate_rows
from linear_jax.ops.common.gates import rev_cumsum_excl

f32 = jnp.float32


def _rows(G, after, scale):
    gq = scale * jnp.exp(G)
    gk = jnp.exp(after)
    dec = jnp.broadcast_to(jnp.exp(G[..., -1:]), G.shape)
    return jnp.stack([gq, gk, dec, G], axis=2)                  # [B, H, 4, N, C]


def head_major(g, C):
    B, T, H = g.shape
    return jnp.moveaxis(g.astype(f32), 2, 1).reshape(B, H, T // C, C)


def time_major(g, C):
    B, T, H = g.shape
    return g.astype(f32).reshape(B, T // C, C, H)


def form_cumsum(g, C, scale):
    B, T, H = g.shape
    return gate_rows(g, None, scale=scale, C=C, H=H)[0].reshape(B, H, 4, T // C, C)


def form_cumsum_tmajor(g, C, scale):
    gt = time_major(g, C)
    G = jnp.cumsum(gt, axis=2)
    after = rev_cumsum_excl(gt, 2)
    hm = lambda x: jnp.transpose(x, (0, 3, 1, 2))               # noqa: E731
    return _rows(hm(G), hm(after), scale)


def form_dot(g, C, scale):
    i = np.arange(C)
    M = np.concatenate([(i[:, None] <= i[None, :]), (i[:, None] > i[None, :])], axis=1)
    both = jnp.einsum("bnch,cd->bhnd", time_major(g, C), jnp.asarray(M, f32),
                      precision=lax.Precision.HIGHEST)
    return _rows(both[..., :C], both[..., C:], scale)


def form_assoc(g, C, scale):
    gc = head_major(g, C)
    G = lax.associative_scan(jnp.add, gc, axis=3)
    shifted = jnp.concatenate([gc[..., 1:], jnp.zeros_like(gc[..., :1])], axis=-1)
    after = lax.associative_scan(jnp.add, shifted, axis=3, reverse=True)
    return _rows(G, after, scale)


def form_barrier(g, C, scale):
    gc = lax.optimization_barrier(head_major(g, C))
    return _rows(jnp.cumsum(gc, axis=-1), rev_cumsum_excl(gc, -1), scale)


FORMS = {"cumsum": form_cumsum, "cumsum_tmajor": form_cumsum_tmajor, "dot": form_dot,
         "assoc": form_assoc, "barrier": form_barrier}


def in_op(form, T, reps):
    """simple_gla's Hopper forward and forward + backward (the anchors' protocol) with `form`
    standing in for gate_rows where the op has a gate and no documents (None: the op as it is):
    {phase: (device ms, kernels' us, output)}."""
    from linear_jax.kernels.gpu.hopper import decay as hopper_decay

    q, k, v, g, do = kc.timing_inputs(T, vector_gate=False)
    K = q.shape[-1]
    own = hopper_decay.gate_rows

    def rows(g, doc, *, scale, C, H):
        if form is None or doc is not None or g is None:
            return own(g, doc, scale=scale, C=C, H=H)
        B, Tp, _ = g.shape
        out = form(g, C, scale)
        return out.reshape(B, H, out.shape[2], Tp), ("gq", "gk", "dec", "G")

    hopper_decay.gate_rows = rows        # this script's calls only; put back below
    try:
        fns = kc.fwd_and_fwdbwd(lambda q, k, v, g: hopper_decay.simple_gla(
            q, k, v, g, scale=K**-0.5, initial_state=None, segment_ids=None, chunk_size=64)[0])
        out = {}
        for phase, f, a in (("fwd", fns[0], (q, k, v, g)), ("fwdbwd", fns[1], (q, k, v, g, do))):
            y = jax.block_until_ready(f(*a))
            us = kernel_profile.kernel_times(lambda a, f=f: f(*a), a)
            out[phase] = (common.median_ms(f, *a, reps=reps, inner=10),
                          {n: round(t, 2) for n, t in us.items()}, y)
        return out
    finally:
        hopper_decay.gate_rows = own


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--no-op", dest="op", action="store_false",
                   help="only the forms alone, not inside simple_gla")
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    print("device", dev.device_kind, "jax", jax.__version__)
    C, rows = 64, []
    for T in a.T:
        g = kc.timing_inputs(T, vector_gate=False)[3]
        B, _, H = g.shape
        scale = 128 ** -0.5
        ref = np.asarray(jax.jit(lambda g: form_cumsum(g, C, scale))(g))
        for name, form in FORMS.items():
            f = jax.jit(lambda g, form=form: form(g, C, scale))
            out = np.asarray(f(g))
            diff = float(np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)))
            ms = common.median_ms(f, g, reps=20, inner=20)
            us = kernel_profile.kernel_times(f, g)
            rows.append(dict(T=T, B=B, H=H, form=name, ms=ms, max_rel_diff=diff,
                             kernels_us={k: round(v, 2) for k, v in us.items()}))
            print(f"T={T:<6} {name:<14} {1e3 * ms:8.1f} us  max rel diff {diff:.1e}  "
                  f"kernels {rows[-1]['kernels_us']}", flush=True)
    for T in a.T if a.op else ():
        base = in_op(None, T, reps=20)
        for name, form in FORMS.items():
            r = base if name == "cumsum" else in_op(form, T, reps=20)
            for phase, (ms, us, y) in r.items():
                diff = [kc.rel(x, b) for x, b in zip(jax.tree.leaves(y),
                                                     jax.tree.leaves(base[phase][2]), strict=True)]
                rows.append(dict(T=T, form=name, phase=f"simple_gla {phase}", ms=ms,
                                 max_rel_diff=max(diff), kernels_us=us))
                print(f"T={T:<6} {name:<14} simple_gla {phase:<7} {1e3 * ms:8.1f} us  rel diff "
                      f"{max(diff):.1e}  XLA kernels "
                      f"{ {n: t for n, t in us.items() if 'mosaic' not in n} }", flush=True)
    path = common.write_json(common.device_file("gate_rows_gpu"), rows)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

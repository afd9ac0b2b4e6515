"""Element-wise scans on the host's default device: the lax.scan reference, the chunked scan, and
one `lax.associative_scan` over the whole sequence (the textbook parallel form, which keeps every
level of the scan tree over all T steps; for the selective scan it also materialises [T, D, N]).

    python -m experiments.benchmarks.scans_xla [--T 256 1024 4096] [--quick]

Prints median ms of the forward and of forward+backward, and the forward's compile time, for
hgrn, diagonal_scan (real and complex) and selective_scan at each T, with the memory-traffic floor
for the shape (inputs read once, outputs written once, over the measured bandwidth), and writes
benchmarks/results/scans_xla_<platform>.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from linear_jax.ops.common.chunking import resets
from linear_jax.ops.common.elementwise_chunk import local_scan
from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.hgrn import hgrn
from linear_jax.ops.selective_scan import selective_scan

IMPLS = ("recurrent", "chunk", "assoc")


def _full_scan(a, b, h0, seg):
    """h_t = a_t h_{t-1} + b_t by one associative scan over axis 1 (the baseline)."""
    a = jnp.where(resets(seg).reshape(seg.shape + (1,) * (a.ndim - 2)), 0.0, a)
    b = b.at[:, 0].add(a[:, 0] * h0)
    P, H = local_scan(a, b, axis=1)
    return H, H[:, -1]


def _hgrn_assoc(x, g, *, initial_state, segment_ids):
    return _full_scan(jnp.exp(g), x, initial_state, segment_ids)


def _diag_assoc(a, x, *, initial_state, segment_ids):
    return _full_scan(a, x, initial_state, segment_ids)


def _selective_assoc(u, delta, A, B, C, *, initial_state, segment_ids):
    a = jnp.exp(delta[..., None] * A)                                   # [B, T, D, N]
    h, hT = _full_scan(a, (delta * u)[..., None] * B[:, :, None], initial_state, segment_ids)
    return jnp.einsum("btdn,btn->btd", h, C), hT


def cases(B, T, D, D_sel, N, seed=0):
    """(name, op, assoc baseline, array inputs, differentiated inputs, bytes moved); the selective
    scan runs on D_sel channels with state N."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    seg = np.cumsum(rng.uniform(size=(B, T)) < 1 / 300, axis=1).astype(np.int32)
    logsig = lambda x: (-np.logaddexp(0.0, -x)).astype(np.float32)
    rot = np.exp(-np.exp(f(B, T, D) - 4) + 1j * f(B, T, D)).astype(np.complex64)
    cx = (f(B, T, D) + 1j * f(B, T, D)).astype(np.complex64)
    io = 3 * B * T * D                                                  # two inputs, one output
    return [
        ("hgrn", hgrn, _hgrn_assoc,
         dict(x=f(B, T, D), g=logsig(f(B, T, D) + 3), initial_state=f(B, D), segment_ids=seg),
         ("x", "g"), 4 * io),
        ("diagonal_scan", diagonal_scan, _diag_assoc,
         dict(a=np.tanh(f(B, T, D)), x=f(B, T, D), initial_state=f(B, D), segment_ids=seg),
         ("a", "x"), 4 * io),
        ("diagonal_scan[complex]", diagonal_scan, _diag_assoc,
         dict(a=rot, x=cx, initial_state=cx[:, 0], segment_ids=seg), ("a", "x"), 8 * io),
        ("selective_scan", selective_scan, _selective_assoc,
         dict(u=f(B, T, D_sel), delta=np.abs(0.1 * f(B, T, D_sel)), A=-np.exp(f(D_sel, N)),
              B=f(B, T, N), C=f(B, T, N), initial_state=f(B, D_sel, N), segment_ids=seg),
         ("u", "delta", "A", "B", "C"),
         4 * (3 * B * T * D_sel + 2 * B * T * N + D_sel * N + B * D_sel * N)),
    ]


def _loss(fn):
    def loss(diff, rest):
        h = fn(**diff, **rest)[0]
        return jnp.sum(jnp.real(h))
    return loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=256, help="channels D")
    p.add_argument("--state", type=int, default=16, help="selective scan state size N")
    p.add_argument("--sel-dim", type=int, default=64, help="selective scan channels D")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="T in {256, 1024}, 3 reps")
    a = p.parse_args(argv)
    if a.quick:
        a.T, a.reps = [256, 1024], 3

    ceilings = common.measure_ceilings()
    rows = []
    print(f"{'op':<24}{'impl':<11}{'T':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}{'compile s':>11}"
          f"{'floor ms':>10}")
    for T in a.T:
        for name, op, assoc, inputs, diff_names, n_bytes in cases(a.batch, T, a.dim, a.sel_dim,
                                                                   a.state):
            D = inputs[diff_names[0]].shape[-1]
            for impl in IMPLS:
                fn = assoc if impl == "assoc" else (
                    lambda op=op, impl=impl, **kw: op(**kw, impl=impl, chunk_size=a.chunk))
                fwd = jax.jit(lambda kw, fn=fn: fn(**kw))
                diff = {n: inputs[n] for n in diff_names}
                rest = {n: x for n, x in inputs.items() if n not in diff}
                bwd = jax.jit(jax.grad(_loss(fn)))
                row = {
                    "op": name, "impl": impl, "B": a.batch, "T": T, "D": D,
                    "N": a.state if name == "selective_scan" else None,
                    "chunk_size": a.chunk if impl == "chunk" else None,
                    "dtype": str(np.asarray(inputs[diff_names[0]]).dtype),
                    "compile_s": common.compile_seconds(fwd, inputs),
                    "fwd_ms": common.median_ms(fwd, inputs, reps=a.reps),
                    "fwdbwd_ms": common.median_ms(bwd, diff, rest, reps=a.reps),
                    "bytes": n_bytes,
                    "floor_ms": 1e3 * n_bytes / ceilings["bytes_per_s"],
                }
                rows.append(row)
                print(f"{name:<24}{impl:<11}{T:>6}{row['fwd_ms']:>10.2f}{row['fwdbwd_ms']:>12.2f}"
                      f"{row['compile_s']:>11.2f}{row['floor_ms']:>10.3f}")
    path = common.write_json(f"scans_xla_{jax.devices()[0].platform}.json", rows,
                             ceilings=ceilings, floor="bytes: inputs read once + outputs written "
                             "once, over the measured copy bandwidth")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

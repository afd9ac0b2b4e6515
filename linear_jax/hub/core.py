"""`load` and `save`: a transformers checkpoint directory <-> an `LM`.

Loading checks everything it can from `config.json` and the safetensors headers alone (family,
every config field, missing and extra tensors, shapes, dtypes) against the model's abstract
state (`nnx.eval_shape`, nothing allocated), and only then reads: one tensor at a time, from a
memory map straight to its device buffer (sharded over `mesh` by the logical-axis `rules` when
given). A parameter stacked over layers (or experts) is assembled on the host from its
tensors and transferred once, complete.

The families name parameters per layer, `("blocks", i, ...)`, as if the model held a list of
blocks; the model stacks runs of same-structure layers (`linear_jax.models.lm.Stack`), and
`_per_layer` is the one translation between the two: layer i of a stack is index i - start on
the leading `layers` axis of that stack's parameters (before any axis of their own, such as
MoE experts).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linear_jax.hub import files
from linear_jax.hub.family import (
    FLOATS,
    Family,
    pieces,
    stored_shape,
    to_ours,
    to_theirs,
)
from linear_jax.hub.kimi_linear import KIMI_LINEAR
from linear_jax.hub.mamba import MAMBA, MAMBA2
from linear_jax.hub.minimax import MINIMAX
from linear_jax.hub.qwen3_next import QWEN3_5, QWEN3_NEXT
from linear_jax.hub.recurrent_gemma import RECURRENT_GEMMA
from linear_jax.hub.xlstm import XLSTM
from linear_jax.models import LM, LMConfig

FAMILIES: dict[str, Family] = {f.architecture: f for f in (MAMBA, MAMBA2, QWEN3_NEXT, XLSTM,
                                                                  MINIMAX, RECURRENT_GEMMA,
                                                                  KIMI_LINEAR, *QWEN3_5)}
# LMConfig fields a caller may set on load: they change how the model computes, not its weights.
OVERRIDES = ("impl", "kernel_config", "chunk_size", "dtype", "param_dtype")
# FSDP over `fsdp`, tensor parallel over `tensor` (experiments/configs/base.py's table).
DEFAULT_RULES = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
                 ("experts", None))


def family_of(hf: dict) -> Family:
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in FAMILIES]
    if len(archs) != 1 or not known:
        raise ValueError(f"config field architectures={archs!r} is not supported; loadable: "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[known[0]]


def read_config(path, **overrides) -> LMConfig:
    """The `LMConfig` of the checkpoint in directory `path` (config.json only)."""
    hf = files.read_config(path)
    bad = sorted(set(overrides) - set(OVERRIDES))
    if bad:
        raise ValueError(f"load: {bad} cannot be overridden (they would not fit the stored "
                         f"weights); only {list(OVERRIDES)}")
    family = family_of(hf)
    return dataclasses.replace(family.to_lm(hf), hub_format=family.saves_as
                               or family.architecture, **overrides)


def _per_layer(flat) -> dict:
    """{per-layer path: (path in the model's state, index on its layers axis)} for every
    variable of the flat state `flat` ((path, value with .shape) pairs): a stacked one,
    `("stacks", s, "blocks", k, *rest)` of leading size `repeats`, is layer
    `start_s + j * period_s + k`'s `("blocks", i, *rest)` at index j; any other maps to itself
    with index None."""
    flat = list(flat)
    runs = {}                                          # stack -> (period, repeats)
    for path, v in flat:
        if path[0] == "stacks":
            period, _ = runs.get(path[1], (0, 0))
            runs[path[1]] = (max(period, path[3] + 1), v.shape[0])
    starts, start = {}, 0
    for s in sorted(runs):
        starts[s], start = start, start + runs[s][0] * runs[s][1]
    out = {}
    for path, _ in flat:
        if path[0] != "stacks":
            out[path] = (path, None)
            continue
        s, k, rest = path[1], path[3], path[4:]
        period, repeats = runs[s]
        for j in range(repeats):
            out[("blocks", starts[s] + j * period + k, *rest)] = (path, j)
    return out


def _expected_shape(ps, shapes: dict) -> tuple:
    """The stored shape that pieces `ps` of one tensor imply, from our parameters' shapes."""
    first = ps[0]
    if first.rows is not None:       # [out, in] weight, or a [out] bias ("same")
        rows = sum(len(p.rows) for p in ps)
        return (rows,) if first.layout == "same" else (rows, shapes[first.path][0])
    shape = shapes[first.path][first.index is not None:]
    if first.cols is not None:
        shape = shape[:-1] + (len(first.cols),)
    return stored_shape(shape, first.layout)


def _plan(config: LMConfig, family: Family, hf: dict, stored: dict, params: list) -> dict:
    """{tensor name: pieces}, after every check that needs no tensor data."""
    table = {n: pieces(e) for n, e in family.tensors(config, hf).items()}
    name = family.architecture
    derived = family.derived(config) if family.derived else {}
    for dname, want in derived.items():
        e = stored.get(dname)
        if e is None:
            continue        # implied by the config: a checkpoint may leave it out
        tol = 1e-5 if e.dtype == "F32" else 1e-2        # stored in the model's dtype
        if e.shape != want.shape or not np.allclose(np.asarray(files.array(e), np.float32), want,
                                                    rtol=tol, atol=tol * 1e-2):
            raise ValueError(f"{name}: tensor {dname!r} is not what the config implies "
                             f"(shape {list(e.shape)}, expected {list(want.shape)})")
    missing = sorted(set(table) - set(stored))
    extra = sorted(n for n in set(stored) - set(table) - set(derived)
                   if not n.startswith(family.ignored))
    if missing:
        raise ValueError(f"{name}: missing tensor(s) {missing}")
    if extra:
        raise ValueError(f"{name}: unexpected tensor(s) {extra} (no parameter of this model "
                         f"takes them)")
    shapes = {path: tuple(v.shape) for path, v in params}
    filled = {}
    for ps in table.values():
        for p in ps:
            filled.setdefault(p.path, set()).add(p.index)
    unfilled = sorted(p for p in shapes if p not in filled or (
        None not in filled[p] and filled[p] != set(range(shapes[p][0]))))
    if unfilled:        # a family that forgot a parameter: the model would keep random values
        raise ValueError(f"{name}: no checkpoint tensor fills parameter(s) {unfilled}")
    ok = {FLOATS[config.param_dtype], "F32"}
    for tname, ps in table.items():
        e = stored[tname]
        want = _expected_shape(ps, shapes)
        if e.shape != want:
            raise ValueError(f"{name}: tensor {tname!r} has shape {list(e.shape)}, the config "
                             f"implies {list(want)}")
        if e.dtype not in ok:
            raise ValueError(f"{name}: tensor {tname!r} has dtype {e.dtype}; the config's dtype "
                             f"{config.param_dtype} takes {sorted(ok)}")
    return table


def _abstract(config: LMConfig):
    """(graphdef, state of shapes): the model built under `eval_shape`, with its logical-axis
    annotations kept unapplied (placement is ours, inside a mesh context or not)."""
    out = {}

    def build():
        with nnx.use_eager_sharding(False):
            out["graphdef"], state = nnx.split(LM(config, rngs=nnx.Rngs(0)))
        return state

    state = jax.eval_shape(build)
    return out["graphdef"], state


def _constants(config: LMConfig) -> list:
    """(path, array) of the model's variables that are not parameters, computed under `jit`
    (which drops the parameters' initialisation, never materialising them)."""
    def build():
        with nnx.use_eager_sharding(False):
            return nnx.state(LM(config, rngs=nnx.Rngs(0)), nnx.Not(nnx.Param))

    return [(path, np.asarray(v.get_value()))
            for path, v in nnx.to_flat_state(jax.jit(build)())]


def load(path, *, mesh=None, rules=None, **overrides) -> LM:
    """The `LM` of the transformers checkpoint in directory `path`, weights loaded.

    One NNX object carries both the structure (`model.config`, an `LMConfig`) and the weights,
    so `load` returns the model; `nnx.split(model)` gives (graphdef, state) when a function
    wants them apart. Tensors keep their stored dtype (bfloat16 stays bfloat16) unless
    `param_dtype` is overridden. With `mesh`, each parameter is placed sharded as it is read,
    by `rules` ((logical axis, mesh axes) pairs, `linear_jax.training.sharding`'s format;
    default FSDP + tensor parallel, `DEFAULT_RULES`). `overrides` are LMConfig fields that do
    not change the weights (`OVERRIDES`: impl, kernel_config, chunk_size, dtype, param_dtype).
    """
    directory = pathlib.Path(path)
    config = read_config(directory, **overrides)
    hf = files.read_config(directory)
    family = family_of(hf)
    stored = files.entries(directory)
    graphdef, state = _abstract(config)
    params = list(nnx.to_flat_state(state))
    layers = _per_layer(params)
    where = {path: i for i, (path, _) in enumerate(params)}
    # variables that are not parameters are constants the config implies (fixed decays)
    constant = {path for path, v in params if not isinstance(v, nnx.Param)}
    view = []                                          # the parameters as the family names them
    for lpath, (path, j) in layers.items():
        if path in constant:
            continue
        v = params[where[path]][1]
        view.append((lpath, jax.ShapeDtypeStruct(v.shape[j is not None:], v.dtype)))
    plan = _plan(config, family, hf, stored, view)
    shardings = None
    if mesh is not None:
        from linear_jax.training.sharding import check_rules, tree_shardings

        table = check_rules(DEFAULT_RULES if rules is None else rules)
        shardings = list(nnx.to_flat_state(tree_shardings(state, mesh, table)))
    dtype = np.dtype(config.param_dtype) if "param_dtype" in overrides else None
    # stacked parameters (layers, experts) being filled slot by slot: buffer, and slots left
    buffers, left = {}, collections.Counter(layers[p.path][0] for ps in plan.values()
                                            for p in ps)

    def place(path, array):
        i = where[path]
        target = None if shardings is None else shardings[i][1].get_value()
        params[i] = (path, params[i][1].replace(
            jax.device_put(np.ascontiguousarray(array), target)))

    for tname, ps in plan.items():
        stored_array = files.array(stored[tname])
        for p in ps:
            array = to_ours(stored_array if p.rows is None else stored_array[p.rows], p.layout)
            if dtype is not None:
                array = array.astype(dtype)
            path, j = layers[p.path]
            index = tuple(i for i in (j, p.index) if i is not None)     # layers axis first
            if not index and p.cols is None:
                place(path, array)
                continue
            if path not in buffers:
                buffers[path] = np.empty(params[where[path]][1].shape, array.dtype)
            if p.cols is None:
                buffers[path][index] = array
            else:           # a view first: an int index and an index array would reorder axes
                buffers[path][index][..., p.cols] = array
            left[path] -= 1
            if left[path] == 0:
                place(path, buffers.pop(path))
    if constant:
        for path, value in _constants(config):
            place(path, value)
    return nnx.merge(graphdef, nnx.from_flat_state(params))


def family_for(config: LMConfig) -> Family:
    if config.norm != "rms":
        raise ValueError(f"save: every checkpoint family has block norms; this LMConfig has "
                         f"norm={config.norm!r}")
    if config.max_positions:
        raise ValueError(f"save: no checkpoint family has learned absolute positions; this "
                         f"LMConfig has max_positions={config.max_positions}")
    if config.hub_format is not None:
        family = FAMILIES.get(config.hub_format)
        if family is None or not family.matches(config):
            raise ValueError(f"save: hub_format={config.hub_format!r} cannot describe this "
                             f"LMConfig; savable: {sorted(FAMILIES)} (or None: the first "
                             f"that can)")
        return family
    for family in FAMILIES.values():
        if family.matches(config):
            return family
    raise ValueError(f"save: no checkpoint family describes this LMConfig (mixers "
                     f"{sorted(set(config.layer_mixers()))}, ffn={config.ffn!r}); savable: "
                     f"{sorted(FAMILIES)}")


def save(model: LM, path, *, max_shard_bytes: int | None = None) -> None:
    """Writes `model` as a transformers checkpoint: config.json and safetensors (sharded with an
    index past `max_shard_bytes`), in the parameters' own dtypes, in the format
    `model.config.hub_format` names (the one `load` read; a multimodal checkpoint's language
    model as its text-only LM), or when None the first family that describes the config.
    `load(path)` gives back the same weights bit for bit, and the same config up to fields not
    stored (impl, kernel_config, dtype; chunk_size except for Mamba-2)."""
    config = model.config
    family = family_for(config)
    state = {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(
        nnx.state(model, nnx.Param))}
    flat = {lpath: state[path] if j is None else state[path][j]     # named per layer
            for lpath, (path, j) in _per_layer(state.items()).items()}
    tensors, used = {}, set()
    for name, entry in family.tensors(config).items():
        ps = pieces(entry)
        if ps[0].rows is not None:
            rows, ours = sum(len(p.rows) for p in ps), flat[ps[0].path]
            out = np.empty((rows,) + (() if ps[0].layout == "same" else ours.shape[:1]),
                           ours.dtype)
            for p in ps:
                out[p.rows] = to_theirs(flat[p.path], p.layout)
        else:
            p = ps[0]
            ours = flat[p.path] if p.index is None else flat[p.path][p.index]
            out = to_theirs(ours if p.cols is None else ours[..., p.cols], p.layout)
        tensors[name] = out
        used.update(p.path for p in ps)
    if set(flat) - used:
        raise ValueError(f"save: parameter(s) {sorted(set(flat) - used)} have no checkpoint "
                         f"name in {family.architecture}")
    if family.derived:
        tensors.update({n: np.asarray(v, jnp.dtype(config.param_dtype))
                        for n, v in family.derived(config).items()})
    files.write(path, family.to_hf(config), tensors, max_shard_bytes)

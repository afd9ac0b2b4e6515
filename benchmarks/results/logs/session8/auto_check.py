import jax, jax.numpy as jnp
from linear_jax import ops
from linear_jax.ops import registry
f32 = lambda x: x.astype(jnp.float32)
rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))
B, T, H, K = 2, 1000, 4, 128
ks = jax.random.split(jax.random.key(0), 6)
q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
k = (jax.random.normal(ks[1], (B, T, H, K)) / 8).astype(jnp.bfloat16)
v = jax.random.normal(ks[2], (B, T, H, K), jnp.bfloat16)
g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 8
beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
seg = (jnp.arange(T) >= 377).astype(jnp.int32)[None].repeat(B, 0)
cases = {"simple_gla": (ops.simple_gla, (q, k, v, g)), "linear_attention": (ops.linear_attention, (q, k, v)),
         "gated_delta_rule": (ops.gated_delta_rule, (q, k, v, g, beta)), "delta_rule": (ops.delta_rule, (q, k, v, beta))}
for name, (fn, args) in cases.items():
    print(name, registry.resolve(name, "auto", T, args=args[:3]).impl)
    def loss(impl, *a):
        o, S = fn(*a, segment_ids=seg, impl=impl)
        return jnp.sum(f32(o) * f32(v)) + jnp.sum(S), (o, S)
    (l, (o, S)), gr = jax.jit(jax.value_and_grad(lambda *a: loss("auto", *a), argnums=tuple(range(len(args))), has_aux=True))(*args)
    (l2, (o2, S2)), gr2 = jax.jit(jax.value_and_grad(lambda *a: loss("chunk", *a), argnums=tuple(range(len(args))), has_aux=True))(*[f32(x) for x in args])
    print(name, "o", rel(o, o2), "S", rel(S, S2), "grads", [round(rel(a, b), 5) for a, b in zip(gr, gr2)], flush=True)

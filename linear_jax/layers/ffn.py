"""Feed-forward blocks: the SwiGLU MLP and a top-k mixture of experts.

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): y = (silu(x W_1) * x W_3) W_2, or
with `activation="gelu_tanh"` GeGLU (the tanh-approximated GeLU; Gemma's), with biases on the
three projections when `use_bias` (RecurrentGemma's). Parameters: 3 D F (+ 2 F + D biases).

MoE (Shazeer et al. 2017; Fedus et al. 2022, "Switch Transformers"; the Mixtral router; used over
linear mixers in Sun et al. 2025, "Linear-MoE"): a router picks the top-k of E SwiGLU experts per
token, their outputs are mixed by the renormalised router probabilities, and the load-balancing loss

    aux = E * sum_e f_e P_e,    f_e = fraction of routed (token, slot) pairs sent to e,
                                P_e = mean router probability of e

is returned for the trainer to add (weighted). The router scores by `softmax` (above) or by
`sigmoid` (DeepSeek-V3, Kimi Linear):

    s = sigmoid(x W_r);  chosen: the top-k of s + b         (b: `score_bias`, per expert)
    weights = s at the chosen experts, renormalised (`renormalize`), times `scale`

b only chooses, so it gets no gradient: DeepSeek-V3 balances the load by nudging it between steps
(auxiliary-loss-free balancing), which the trainer here does not do. With `groups > 1` the
experts form equal groups and the choice is limited to the `topk_groups` groups whose two best
(biased) scores sum highest. With sigmoid scores P_e is the mean of s / sum(s).

Dispatch is dense: every expert runs on every token and the unselected outputs are weighted by
zero, which is exact and simple; a capacity-bounded gather dispatch is what large expert counts
need. Parameters: D E (router) + 3 E D F (+ E with `score_bias`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import DEFAULT_STD, dense, out_std, param

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, activation: str = "silu",
                 use_bias: bool = False, num_layers: int | None = None, std: float = DEFAULT_STD,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.activation = activation
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
        self.w_gate = mk(d_model, d_ff, ("embed", "mlp"), std=std)
        self.w_up = mk(d_model, d_ff, ("embed", "mlp"), std=std)
        self.w_down = mk(d_ff, d_model, ("mlp", "embed"), std=out_std(std, num_layers))

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        # Recomputed in the backward: autodiff would keep three more [B, T, d_ff] arrays of the
        # activation's internals besides the two projections and their product.
        glu = jax.checkpoint(lambda a, b: act(a) * b)
        return self.w_down(glu(self.w_gate(x), self.w_up(x))), jnp.zeros((), jnp.float32)


class MoE(nnx.Module):
    """Returns `(y, aux)` with the load-balancing loss `aux` (1 at perfect balance)."""

    def __init__(self, d_model: int, d_ff: int, *, num_experts: int = 8, top_k: int = 2,
                 scoring: str = "softmax", score_bias: bool = False, groups: int = 1,
                 topk_groups: int = 1, renormalize: bool = True, scale: float = 1.0,
                 num_layers: int | None = None, std: float = DEFAULT_STD, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        E = num_experts
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"MoE: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        if E % groups or not 1 <= topk_groups <= groups or (groups > 1 and E // groups < 2):
            raise ValueError(f"MoE: groups={groups} must divide num_experts={E} into groups of "
                             f"two or more, with topk_groups={topk_groups} in [1, groups]")
        self.top_k, self.dtype = top_k, dtype
        self.routing = (scoring, groups, topk_groups, renormalize, scale)
        self.score_bias = (param(rngs, nnx.initializers.zeros, (E,), ("experts",), param_dtype)
                           if score_bias else None)
        self.router = dense(d_model, E, ("embed", None), rngs=rngs, dtype=jnp.float32,
                            param_dtype=param_dtype, std=std)
        init, init_out = nnx.initializers.normal(std), nnx.initializers.normal(
            out_std(std, num_layers))
        self.w_gate = param(rngs, init, (E, d_model, d_ff), ("experts", "embed", "mlp"),
                            param_dtype)
        self.w_up = param(rngs, init, (E, d_model, d_ff), ("experts", "embed", "mlp"),
                          param_dtype)
        self.w_down = param(rngs, init_out, (E, d_ff, d_model), ("experts", "mlp", "embed"),
                            param_dtype)

    def route(self, x):
        """(weights [B, T, E] (zero off the chosen experts), chosen one-hot [B, T, k, E],
        probabilities [B, T, E] for the balancing loss)."""
        scoring, groups, topk_groups, renormalize, scale = self.routing
        logits = self.router(x.astype(jnp.float32))
        E = logits.shape[-1]
        s = jax.nn.softmax(logits, -1) if scoring == "softmax" else jax.nn.sigmoid(logits)
        pick = s if self.score_bias is None else s + self.score_bias[...].astype(jnp.float32)
        if groups > 1:
            by_group = pick.reshape(pick.shape[:-1] + (groups, E // groups))
            best = jax.lax.top_k(jax.lax.top_k(by_group, 2)[0].sum(-1), topk_groups)[1]
            kept = jax.nn.one_hot(best, groups, dtype=jnp.float32).sum(-2) > 0  # [B, T, G]
            pick = jnp.where(jnp.repeat(kept, E // groups, -1), pick, -jnp.inf)
        top_e = jax.lax.top_k(pick, self.top_k)[1]
        top_s = jnp.take_along_axis(s, top_e, -1)
        if renormalize:
            top_s = top_s / (top_s.sum(-1, keepdims=True) + 1e-20)
        chosen = jax.nn.one_hot(top_e, E, dtype=jnp.float32)                      # [B, T, k, E]
        weights = jnp.einsum("btk,btke->bte", scale * top_s, chosen)
        return weights, chosen, s if scoring == "softmax" else s / s.sum(-1, keepdims=True)

    def __call__(self, x):
        E = self.w_gate.shape[0]
        weights, chosen, probs = self.route(x)
        dtype = self.dtype or x.dtype
        w = lambda p: p[...].astype(dtype)
        h = jax.nn.silu(jnp.einsum("btd,edf->btef", x, w(self.w_gate))) * \
            jnp.einsum("btd,edf->btef", x, w(self.w_up))
        y = jnp.einsum("btef,efd,bte->btd", h, w(self.w_down), weights.astype(dtype))
        frac = chosen.sum(2).mean((0, 1)) / self.top_k
        aux = E * jnp.sum(frac * probs.mean((0, 1)))
        return y.astype(dtype), aux

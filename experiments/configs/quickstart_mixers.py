"""The quick-start MQAR (8 pairs in 64 tokens, 2 layers, width 64) with any mixer, chosen after
the colon, and a width-scaled initialisation (`model.init_std` = d_model^-1/2 = 0.125 instead of
the GPT-2 0.02 that `LMConfig` keeps by default):

    python -m experiments.train --config=experiments/configs/quickstart_mixers.py:gla

At width 64 the fixed std 0.02 leaves every projection's output at std 0.02 sqrt(64) = 0.16 (at
the widths where 0.02 is the convention, 1024-2048, it is 0.6-0.9): the swish output gate of GLA
and Gated DeltaNet then sits near silu(0) = 0, a multiplicative saddle, and Mamba-2's SSM path is
drowned by its D skip, so they stay at chance for hundreds of steps (experiments/README.md,
"MQAR at the quick-start size"). Linear attention and GLA get the short convolution (width 4)
the delta-rule layers and Mamba-2 have by default: without it, and with no positional encoding
in the model, a layer with no decay cannot tell which key preceded a value.
"""

from experiments.configs.quickstart import get_config as quickstart

MIXERS = ("attention", "deltanet", "gated_deltanet", "gla", "linear_attention", "mamba2")
# a hybrid probe: a linear-attention layer with its short conv below one softmax-attention layer
HYBRIDS = {"linear_attention+attention": ("linear_attention", "attention")}
_CONV = {"gla": {"conv_size": 4}, "linear_attention": {"conv_size": 4}}


def get_config(mixer: str = "gla"):
    if mixer not in MIXERS + tuple(HYBRIDS):
        raise ValueError(f"quickstart_mixers: mixer {mixer!r} is not one of "
                         f"{MIXERS + tuple(HYBRIDS)}")
    c = quickstart()
    c.workdir = f"runs/quickstart_{mixer}"
    layers = HYBRIDS.get(mixer, (mixer,))
    c.model.mixer_options = {m: _CONV.get(m, {}) for m in layers}
    c.model.update(mixer=layers[-1], init_std=c.model.d_model ** -0.5)
    if mixer in HYBRIDS:
        c.model.layers = layers
    c.train.update(steps=400, checkpoint_every=0)
    return c

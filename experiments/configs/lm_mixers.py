"""Byte-level Shakespeare (`lm_shakespeare.py`) with the token mixer chosen after the colon, at
equal parameter count within 2% (2 layers; width 128, except Gated DeltaNet and log-linear Gated
DeltaNet at 112, Mamba-2, KDA and Mamba-3 at 120, log-linear Mamba-2 at 118, RWKV-7 at 112 with a
rank-96 output gate, whose projections are larger: 429-446 K parameters in all), all with init std
d_model^-1/2 (see experiments/README.md, "MQAR at the quick-start size") and a short convolution
(the mixers that do not build one themselves get width 4; attention none, RoPE instead; RWKV-7 its
token shift, Mamba-3 none, as in its paper).

    python -m experiments.train --config=experiments/configs/lm_mixers.py:deltanet
"""

from experiments.configs.lm_shakespeare import get_config as lm_shakespeare

MIXERS = ("attention", "deltanet", "gated_deltanet", "gla", "linear_attention", "mamba2",
          "kda", "rwkv7", "mamba3", "log_linear_mamba2", "log_linear_gated_deltanet")
_CONV = {"gla": {"conv_size": 4}, "linear_attention": {"conv_size": 4},
         "rwkv7": {"gate_rank": 96}}
CELLS = MIXERS                                        # experiments/paper_protocols.py's grid
WIDTH = {"gated_deltanet": 112, "mamba2": 120, "kda": 120, "rwkv7": 112, "mamba3": 120,
         "log_linear_mamba2": 118, "log_linear_gated_deltanet": 112}    # the others 128


def get_config(mixer: str = "gla"):
    if mixer not in MIXERS:
        raise ValueError(f"lm_mixers: mixer {mixer!r} is not one of {MIXERS}")
    c = lm_shakespeare()
    c.workdir = f"runs/lm_{mixer}"
    c.model.mixer_options = {mixer: _CONV.get(mixer, {})}
    c.model.d_model = WIDTH.get(mixer, c.model.d_model)
    c.model.update(mixer=mixer, init_std=c.model.d_model ** -0.5)
    c.train.update(steps=400, checkpoint_every=0)
    return c

"""Language models over the token mixers of `linear_jax.layers`: config, model, decoding."""

from linear_jax.models.config import LMConfig
from linear_jax.models.encoder import Encoder, EncoderConfig
from linear_jax.models.generate import decode_fns, generate, logit_fns, sample, score
from linear_jax.models.lm import LM, Block, Stack

__all__ = ["LM", "Block", "Encoder", "EncoderConfig", "LMConfig", "Stack", "decode_fns",
           "generate", "logit_fns", "sample", "score"]

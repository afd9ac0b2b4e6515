"""Language models over the token mixers of `linear_jax.layers`: config, model, generation."""

from linear_jax.models.config import LMConfig
from linear_jax.models.encoder import Encoder, EncoderConfig
from linear_jax.models.generate import decode_fns, generate, sample
from linear_jax.models.lm import LM, Block

__all__ = ["LM", "Block", "LMConfig", "decode_fns", "generate", "sample", "Encoder",
           "EncoderConfig"]

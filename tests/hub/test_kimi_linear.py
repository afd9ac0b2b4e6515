"""Kimi Linear (KimiLinearForCausalLM: KDA + MLA without RoPE, a first dense layer, then MoE with
DeepSeek-V3's router and shared experts) against its transformers fixture; the checks are
tests/hub/checks.py's."""

from tests.hub.checks import *  # noqa: F403  (the shared checks, collected here)

FAMILY = "kimi_linear"

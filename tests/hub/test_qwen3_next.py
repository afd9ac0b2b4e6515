"""Qwen3-Next (Qwen3NextForCausalLM: Gated DeltaNet + gated attention, MoE with a
shared expert)
against its transformers fixture; the checks are tests/hub/checks.py's."""

from tests.hub.checks import *  # noqa: F403  (the shared checks, collected here)

FAMILY = "qwen3_next"

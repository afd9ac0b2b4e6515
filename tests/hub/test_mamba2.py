"""Mamba-2 (Mamba2ForCausalLM: two groups, untied head, sharded files)
against its transformers fixture; the checks are tests/hub/checks.py's."""

from tests.hub.checks import *  # noqa: F403  (the shared checks, collected here)

FAMILY = "mamba2"

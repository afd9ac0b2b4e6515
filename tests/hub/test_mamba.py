"""Mamba (MambaForCausalLM)
against its transformers fixture; the checks are tests/hub/checks.py's."""

from tests.hub.checks import *  # noqa: F403  (the shared checks, collected here)

FAMILY = "mamba"

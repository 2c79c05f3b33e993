"""Registers the built-in evaluation judges, exactly as a third-party plugin would."""

from ..hookspecs import hookimpl
from .llama_guard import LlamaGuardJudge
from .refusal import RefusalJudge
from .testbed_judge import TestbedJudge


@hookimpl
def register_judges(register):
    register(RefusalJudge)
    register(LlamaGuardJudge)
    register(TestbedJudge)

"""Registers the built-in evaluation judges and the ``vlm-safety eval`` command, as any plugin would."""

from ..core.hookspecs import hookimpl


@hookimpl
def register_judges(register):
    from .llama_guard import LlamaGuardJudge
    from .refusal import RefusalJudge
    from .testbed_judge import TestbedJudge

    register(RefusalJudge)
    register(LlamaGuardJudge)
    register(TestbedJudge)


@hookimpl
def register_commands(cli):
    from .command import eval_command

    cli.add_command(eval_command, "eval")

"""Choosing a defense's strength on the user's own validation data (``vlm-safety tune``, ``vsp.tune``).

- ``sweep.py``: the settings to try (each defense's ``Defense.strength``) and the selection rule;
- ``run.py``: ``tune``, which evaluates them with ``run_eval`` and writes the tuning folder;
- ``command.py``: the command.
"""

from ..core.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .command import tune_command

    cli.add_command(tune_command, "tune")

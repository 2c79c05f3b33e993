"""VLM-Guard: the text-taught safety subspace, projected out or amplified (docs/defenses/vlm_guard.md).

- ``defense.py``: the defense and its options (modes, gate);
- ``calibration.py``: ``calibrate_vlm_guard`` (subspaces, orientation, τ);
- ``artifact.py``: the subspace artifact; ``anchors.py`` and ``data/``: anchor pairs;
- ``commands.py``: ``vlm-safety calibrate vlm-guard``.

This module is the plugin the registry loads; it imports the rest only when called.
"""

from ...core.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    from .defense import VlmGuard

    register(VlmGuard)


@hookimpl
def register_commands(cli):
    from .commands import calibrate_command

    cli.commands["calibrate"].add_command(calibrate_command, "vlm-guard")

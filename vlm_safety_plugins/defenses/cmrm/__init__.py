"""CMRM: steer image rows back towards their text-only states (docs/defenses/cmrm.md).

- ``defense.py``: the defense and its options (dataset or sample level);
- ``calibration.py``: the modality shift and ``calibrate_cmrm``;
- ``artifact.py``: the shift-vector artifact; ``anchors.py`` and ``data/``: anchor questions;
- ``commands.py``: ``vlm-safety calibrate cmrm``.

This module is the plugin the registry loads; it imports the rest only when called.
"""

from ...core.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    from .defense import Cmrm

    register(Cmrm)


@hookimpl
def register_commands(cli):
    from .commands import calibrate_command

    cli.commands["calibrate"].add_command(calibrate_command, "cmrm")

"""AdaShield-S: a static defense prompt appended to the user's turn (docs/defenses/adashield.md).

``defense.py``: the defense and its options. This module is the plugin the registry
loads; it imports the defense only when the registry is built.
"""

from ...core.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    from .defense import AdaShield

    register(AdaShield)

"""The hooks a vlm-safety plugin can implement.

Registration hooks are called once, when the plugin registry is first built; each receives
a ``register`` callback and calls it once per class it contributes. ``safety_report`` is
called after every defended generation.
"""

from pluggy import HookimplMarker, HookspecMarker

PROJECT_NAME = "vlm_safety_plugins"

hookspec = HookspecMarker(PROJECT_NAME)
hookimpl = HookimplMarker(PROJECT_NAME)


# -- discovery: called once, when the registry is first built ---------------------------


@hookspec
def register_defenses(register):
    """Register Defense subclasses: ``register(MyDefense)``; the config names them by ``name``."""


@hookspec
def register_evaluators(register):
    """Register Evaluator subclasses (image-safety, reward, ... scorers) by their ``name``."""


@hookspec
def register_model_adapters(register):
    """Register ModelAdapter subclasses; each says which ``model_type`` values it handles."""


@hookspec
def register_judges(register):
    """Register evaluation Judge subclasses (``vlm-safety eval --judge NAME``) by their ``name``."""


# -- observation: called for every defended generation -------------------------------------


@hookspec
def safety_report(report):
    """Observe one row's SafetyReport after a defended generation (audit log, metrics)."""

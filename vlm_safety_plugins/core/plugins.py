"""The plugin manager: built-in plugins and third-party entry points, registered alike.

Built-in modules are registered exactly as an external plugin would be. Third-party
packages declare ``[project.entry-points.vlm_safety_plugins]``. Both are imported lazily,
once, the first time the registry is needed. Importing a plugin runs its code, so two
environment variables decide which entry points load:

- ``VLM_SAFETY_PLUGINS``: comma-separated entry-point names; when set, only these load
  (set it to an empty string to load none).
- ``VLM_SAFETY_PLUGINS_BLOCK``: comma-separated entry-point names that never load.

Discovered is not enabled: a defense runs only when a config names it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import ConfigError

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
ALLOW_ENV = "VLM_SAFETY_PLUGINS"
BLOCK_ENV = "VLM_SAFETY_PLUGINS_BLOCK"

BUILTIN_PLUGINS = (  # each light to import: hook bodies import their classes
    "vlm_safety_plugins.core.adapters.builtin",
    "vlm_safety_plugins.scorers.builtin",
    "vlm_safety_plugins.evaluation.builtin",
    "vlm_safety_plugins.defenses.adashield",
    "vlm_safety_plugins.defenses.cmrm",
    "vlm_safety_plugins.defenses.vlm_guard",
    "vlm_safety_plugins.defenses.eta",
)

pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_load_lock = threading.Lock()
_plugins_loaded = False


@dataclass(frozen=True)
class Registered:
    """One class contributed by a plugin, with where it comes from."""

    kind: str  # "defense" | "evaluator" | "model_adapter" | "judge"
    name: str
    cls: type
    distribution: str
    version: str


@dataclass(frozen=True)
class Registry:
    """Every registered defense, evaluator, model adapter and evaluation judge, by name."""

    defenses: dict[str, Registered]
    evaluators: dict[str, Registered]
    model_adapters: dict[str, Registered]
    judges: dict[str, Registered]

    def all(self) -> list[Registered]:
        """Everything registered, of every kind (what ``vlm-safety plugins`` lists)."""
        return [
            *self.defenses.values(),
            *self.evaluators.values(),
            *self.model_adapters.values(),
            *self.judges.values(),
        ]


_registry_cache: tuple[frozenset, Registry] | None = None


def load_plugins() -> None:
    """Register the built-in plugins, then the allowed third-party ones; runs once per process.

    Deferred to first use because plugin modules import torch: a command that never looks
    at the registry (``vlm-safety --help``) starts without it.
    """
    global _plugins_loaded
    with _load_lock:
        if _plugins_loaded:
            return
        for module in BUILTIN_PLUGINS:
            if pm.get_plugin(module) is None:
                pm.register(importlib.import_module(module), name=module)
        allow, block = _names_from_env(ALLOW_ENV), _names_from_env(BLOCK_ENV) or set()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in block or (allow is not None and entry_point.name not in allow):
                continue
            if pm.get_plugin(entry_point.name) is None:
                pm.register(entry_point.load(), name=entry_point.name)
        _plugins_loaded = True


def registry() -> Registry:
    """The current registry; rebuilt only when the set of registered plugins changes."""
    global _registry_cache
    load_plugins()
    key = frozenset(id(plugin) for plugin in pm.get_plugins())
    cached = _registry_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    built = Registry(
        defenses=_collect(pm.hook.register_defenses, "defense"),
        evaluators=_collect(pm.hook.register_evaluators, "evaluator"),
        model_adapters=_collect(pm.hook.register_model_adapters, "model_adapter"),
        judges=_collect(pm.hook.register_judges, "judge"),
    )
    _registry_cache = (key, built)
    return built


def get_defense(name: str, *, source: str | None = None) -> type:
    """The defense class registered as ``name``, or a ConfigError listing the known names."""
    defenses = registry().defenses
    if name not in defenses:
        known = ", ".join(sorted(defenses)) or "none"
        raise ConfigError(
            f"unknown defense {name!r}; registered defenses: {known}", source=source, path=f"defenses.{name}"
        )
    return defenses[name].cls


def get_judge(name: str) -> type:
    """The evaluation judge class registered as ``name``, or a ConfigError listing the known names."""
    judges = registry().judges
    if name not in judges:
        known = ", ".join(sorted(judges)) or "none"
        raise ConfigError(f"unknown judge {name!r}; registered judges: {known}")
    return judges[name].cls


def _collect(hook, kind: str) -> dict[str, Registered]:
    found: dict[str, Registered] = {}

    def register(cls: type) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls!r} registered as a {kind} has no string `name` attribute")
        if name in found and found[name].cls is not cls:
            raise ValueError(
                f"two {kind}s are registered as {name!r}: {found[name].cls.__module__} and {cls.__module__}"
            )
        distribution, version = _distribution_of(cls)
        found[name] = Registered(kind, name, cls, distribution, version)

    hook(register=register)
    return found


def _distribution_of(cls: type) -> tuple[str, str]:
    top_level = cls.__module__.split(".")[0]
    names = _packages_distributions().get(top_level)
    if not names:
        return "(not installed)", ""
    return names[0], importlib.metadata.version(names[0])


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}

"""The plugin manager: built-in plugins and third-party entry points, registered alike.

Built-in modules are registered exactly as an external plugin would be. Third-party
packages declare ``[project.entry-points.vlm_safety_plugins]``. Both are imported lazily,
once, the first time the registry is needed. Importing a plugin runs its code, so two
environment variables decide which entry points load:

- ``VLM_SAFETY_PLUGINS``: comma-separated entries; when set, only these load (set it to
  an empty string to load none).
- ``VLM_SAFETY_PLUGINS_BLOCK``: comma-separated entries that never load.

An entry is ``distribution:name`` (``vlm-safety-example:example``; distribution names
compare normalized, so ``vlm_safety_example`` matches too) or a bare entry-point ``name``.
A bare name matches that name in every distribution, so in the allowlist it works only
while exactly one installed distribution declares it; in the blocklist it blocks them all.
Any installed package can declare any name, so two entry points with one name from
different distributions that would both load are a ``ConfigError`` naming both
distributions, raised before either is imported: never a silent choice by path order.

Discovered is not enabled: a defense runs only when a config names it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
import threading
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import ConfigError
from .options import QUOTE_LIMIT, quote

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
ALLOW_ENV = "VLM_SAFETY_PLUGINS"
BLOCK_ENV = "VLM_SAFETY_PLUGINS_BLOCK"

BUILTIN_PLUGINS = (  # each light to import: hook bodies import their classes
    "vlm_safety_plugins.core.adapters.builtin",
    "vlm_safety_plugins.scorers.builtin",
    "vlm_safety_plugins.evaluation.builtin",
    "vlm_safety_plugins.serving",
    "vlm_safety_plugins.tuning",
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
        for entry_point in _allowed_entry_points():
            if pm.get_plugin(entry_point.name) is None:
                pm.register(entry_point.load(), name=entry_point.name)
        _plugins_loaded = True


def _allowed_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The entry points the environment allows; a ConfigError, before any is imported, if two share a name."""
    allow, block = _names_from_env(ALLOW_ENV), _names_from_env(BLOCK_ENV) or set()
    chosen = [
        entry_point
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if not _matches(entry_point, block) and (allow is None or _matches(entry_point, allow))
    ]
    names = [entry_point.name for entry_point in chosen]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        name = clashes[0]
        distributions = sorted(_distribution(entry_point) for entry_point in chosen if entry_point.name == name)
        raise ConfigError(
            f"entry point {name!r} (group {ENTRY_POINT_GROUP}) is declared by several distributions: "
            f"{', '.join(distributions)}; none was loaded. Choose one as `distribution:{name}` in "
            f"{ALLOW_ENV}, or block the others as `distribution:{name}` in {BLOCK_ENV}"
        )
    return chosen


def _matches(entry_point: importlib.metadata.EntryPoint, entries: set[str]) -> bool:
    """Whether ``entries`` (from ``_names_from_env``) name the entry point, bare or as ``distribution:name``."""
    return entry_point.name in entries or f"{_normalized(_distribution(entry_point))}:{entry_point.name}" in entries


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
            f"unknown defense {quote(name)}; registered defenses: {known}",
            source=source,
            path=f"defenses.{name[:QUOTE_LIMIT]}",
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


def _distribution(entry_point: importlib.metadata.EntryPoint) -> str:
    return entry_point.dist.name if entry_point.dist is not None else "(unknown distribution)"


def _normalized(distribution: str) -> str:
    """A distribution name as the packaging specs compare it (``Vlm_Safety.Example`` -> ``vlm-safety-example``)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {_entry(text) for text in value.split(",") if text.strip()}


def _entry(text: str) -> str:
    """An allow/block entry as ``_matches`` compares it: ``distribution:name`` normalized, or a bare name."""
    distribution, colon, name = text.partition(":")
    return f"{_normalized(distribution.strip())}:{name.strip()}" if colon else text.strip()

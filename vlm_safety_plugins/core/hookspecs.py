"""The hooks a vlm-safety plugin can implement, grouped by when they are called.

A plugin is a module with functions of these names, marked ``@hookimpl``; pluggy matches
them by name and passes the arguments by keyword, so an implementation may take fewer
arguments than its spec. Registration hooks receive a ``register`` callback and call it
once per class they contribute. docs/plugins.md shows each hook with an example.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    import click

    from ..scorers.base import Evaluator
    from .adapters.base import ModelAdapter
    from .defense import Defense
    from .report import SafetyReport

PROJECT_NAME = "vlm_safety_plugins"

hookspec = HookspecMarker(PROJECT_NAME)
hookimpl = HookimplMarker(PROJECT_NAME)


# -- discovery: called once, when the registry is first built ---------------------------


@hookspec
def register_defenses(register: Callable[[type[Defense]], None]) -> None:
    """Register Defense subclasses: ``register(MyDefense)``; the config names them by ``name``."""


@hookspec
def register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    """Register scorer classes (image-safety, reward, ...) by their ``name``; ``kind`` says what they score."""


@hookspec
def register_model_adapters(register: Callable[[type[ModelAdapter]], None]) -> None:
    """Register ModelAdapter subclasses; each says which ``model_type`` values it handles."""


@hookspec
def register_judges(register: Callable[[type], None]) -> None:
    """Register evaluation Judge subclasses (``vlm-safety eval --judge NAME``) by their ``name``."""


# -- command line: called once, when ``vlm-safety`` first lists or looks up a command ---------


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to ``vlm-safety`` (``cli.add_command``), or subcommands to one of its
    groups (``cli.commands["calibrate"].add_command``)."""


# -- generation: called for every defended generation -----------------------------------------


@hookspec
def safety_report(report: SafetyReport) -> None:
    """Observe one row's SafetyReport after a defended generation (audit log, metrics)."""


# -- evaluation: called when ``vlm-safety eval`` writes a run folder ----------------------------


@hookspec
def evaluation_plots(
    summary: dict[str, Any], records: list[dict[str, Any]], folder: Path
) -> list[tuple[str, str | None, str]]:
    """Draw a plugin's plots of one eval run into ``folder``; return ``(title, path relative
    to the folder or None when nothing was drawn, why not)`` per plot, for ``report.md``."""

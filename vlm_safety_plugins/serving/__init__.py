"""Serving: ``vlm-safety serve`` (an OpenAI-compatible server over an engine, under the
operator's policy) and ``vlm-safety export`` (a model folder ``transformers serve`` serves defended).

This module is the built-in plugin that adds both commands; it stays light to import
(FastAPI, uvicorn and torch load when a command runs).
"""

from ..core.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from .commands import serve_command
    from .export import export_command

    cli.add_command(serve_command, "serve")
    cli.add_command(export_command, "export")

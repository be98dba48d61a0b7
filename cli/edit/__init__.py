"""`zoo edit METHOD REF ...`: one subcommand per editor.

Every public module in this package registers one subcommand on `edit_app` with friendly flags for its
editor's request; importing them all here is what makes them appear. Every other editor entry point,
such as one from another package, then gets the generic subcommand of `_plugins`.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

edit_app = typer.Typer(help="Edit a version into a new registered child version.", no_args_is_help=True)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):  # _shared and _plugins hold helpers, not a subcommand
        importlib.import_module(f"{__name__}.{_module.name}")

from modelzoo.cli.edit._plugins import register_plugin_editors  # noqa: E402  (after the built-in subcommands)

register_plugin_editors(edit_app)

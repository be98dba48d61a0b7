"""`zoo edit METHOD REF ...`: one subcommand per editor.

Every public module in this package registers one subcommand on `edit_app` (its options are the editor's
request); importing them all here is what makes them appear.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

edit_app = typer.Typer(help="Edit a version into a new registered child version.", no_args_is_help=True)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):  # _shared holds helpers, not a subcommand
        importlib.import_module(f"{__name__}.{_module.name}")

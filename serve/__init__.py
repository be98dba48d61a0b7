"""`zoo serve`: the registry in a browser and over HTTP, read-only. Another thin face over the Python API,
whose JSON is the CLI's `--json`."""

from modelzoo.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]

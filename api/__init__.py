"""modelzoo: a registry for generative and language models.

    import modelzoo
    zoo = modelzoo.open()              # ZOO_HOME / ZOO_DATABASE_URL, or the user data dir
    v = zoo.import_("path/to/model", name="gpt2-small")
"""

from __future__ import annotations

from pathlib import Path

from modelzoo.registry.errors import BadInput, Corrupted, NotFound, SchemaMismatch, ZooError
from modelzoo.registry.settings import Settings
from modelzoo.zoo import Zoo

__all__ = ["BadInput", "Corrupted", "NotFound", "SchemaMismatch", "Settings", "Zoo", "ZooError", "open"]


def open(home: str | Path | None = None, database_url: str | None = None) -> Zoo:  # noqa: A001
    """Open (creating or upgrading if needed) the registry at `home` or `database_url`."""
    return Zoo(Settings.resolve(home, database_url))

"""Where a registry lives: built once from flags and ZOO_* variables, then passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import platformdirs


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str

    @classmethod
    def resolve(
        cls,
        home: str | Path | None = None,
        database_url: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Flags win over ZOO_HOME / ZOO_DATABASE_URL, which win over the platform's user data dir."""
        env = os.environ if environ is None else environ
        home_path = Path(home or env.get("ZOO_HOME") or platformdirs.user_data_dir("modelzoo")).expanduser()
        url = database_url or env.get("ZOO_DATABASE_URL") or f"sqlite:///{(home_path / 'registry.db').resolve()}"
        return cls(home=home_path.resolve(), database_url=url)

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

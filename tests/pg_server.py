"""A throwaway PostgreSQL server on a free loopback port, for tests and benchmarks.

`initdb` refuses to run as root, so as root the server runs as the `postgres` user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


def pg_bin() -> Path | None:
    return next((d for d in PG_BIN_DIRS if (d / "initdb").exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh server's `postgres` database; the server is removed afterwards."""
    data = Path(tempfile.mkdtemp(prefix="zoo-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db")]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True)
    subprocess.run(
        [*pg_ctl, "-l", str(data / "log"), "-w", "start",
         "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"],
        check=True, capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)

"""Shared fixtures: a fresh registry per test, tiny models saved once per session, a real PostgreSQL."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from pg_server import pg_bin, postgres_server  # noqa: E402
from tiny_models import save_tiny_gpt2, save_tiny_sd  # noqa: E402

import modelzoo  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "zoo"


@pytest.fixture
def zoo(home: Path) -> modelzoo.Zoo:
    return modelzoo.open(home)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2")


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="session")
def tiny_gan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained generator of the shapes-world GANs' shape, with a real w_avg (warp and compose tests)."""
    from modelzoo.demo.train_gan import GAN_CONFIG
    from modelzoo.registry.families.gan import save_gan
    from modelzoo.registry.families.stylegan import build

    G = build(GAN_CONFIG, seed=0).eval()
    G.mapping.estimate_w_avg(num_samples=1000)
    return save_gan(G, GAN_CONFIG, tmp_path_factory.mktemp("tiny-gan") / "gan")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    bin_dir = pg_bin()
    if bin_dir is None:
        message = "no PostgreSQL server binaries found (apt-get install postgresql)"
        if os.environ.get("CI"):  # .ci/run installs them: there, their absence is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    with postgres_server(bin_dir) as url:
        yield url


@pytest.fixture
def pg_database(postgres_url: str) -> str:
    """A fresh database on the session's server for one test."""
    import psycopg

    name = f"zoo_{time.time_ns()}"
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


@dataclass(frozen=True)
class DemoRun:
    home: Path
    out: str
    err: str


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`zoo demo --quick` run once per session, as the README's first command runs it; tests that read
    the world it builds share it and leave it unchanged."""
    from modelzoo.cli.main import run

    home = tmp_path_factory.mktemp("quick-world") / "zoo"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as done:
        run(["--home", str(home), "demo", "--quick"])
    assert done.value.code in (0, None), err.getvalue()
    return DemoRun(home, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def quick_world(quick_demo: DemoRun) -> Path:
    return quick_demo.home

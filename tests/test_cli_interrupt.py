"""Ctrl-C in the middle of `zoo edit`, `zoo import` and `zoo index`: a real SIGINT to a `zoo` process exits
130 with one line on stderr and leaves the registry exactly as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from tiny_models import save_tiny_gpt2

import modelzoo
from modelzoo.demo.train_clip import CLIP_CONFIG
from modelzoo.registry.families.clip import build_clip, save_clip
from modelzoo.registry.families.gan import save_gan
from modelzoo.registry.families.stylegan import Generator, StyleGanConfig

# Runs `zoo ARGS...` after wrapping MODULE:QUALNAME so that every call to it touches MARKER: the test
# knows the command is past start-up and inside the work it wants to interrupt. DELAY seconds after
# each call stand in for a slow disk or a big model, so the work is still going when the signal lands.
ZOO_WITH_MARKER = """
import functools, importlib, pathlib, signal, sys, time
# A shell without job control starts background jobs with SIGINT ignored, and children inherit that;
# a user's terminal delivers it, so the test restores Python's own handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
marker, target, delay, *args = sys.argv[1:]
module, _, qualname = target.partition(":")
*path, name = qualname.split(".")
owner = importlib.import_module(module)
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)

@functools.wraps(original)
def reporting(*a, **k):
    result = original(*a, **k)
    pathlib.Path(marker).touch()
    time.sleep(float(delay))
    return result

setattr(owner, name, reporting)
from modelzoo.cli.main import run
run(args)
"""
INTERRUPTED = "interrupted: nothing was registered\n"


def _state(capsys: pytest.CaptureFixture[str], home: Path) -> tuple[object, str]:
    listing = zoo_cli(capsys, home, "list", "--json")
    assert listing.code == 0
    return snapshot(home), listing.out


def _interrupt(home: Path, target: str, *args: str, delay: float = 0.0) -> subprocess.CompletedProcess[str]:
    """Start the command, send SIGINT once `target` has run, and return how the process ended."""
    marker = home.parent / "marker"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", ZOO_WITH_MARKER, str(marker), target, str(delay), "--home", str(home), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the command never reached the work to interrupt"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _assert_interrupted(result: subprocess.CompletedProcess[str]) -> None:
    assert (result.returncode, result.stderr, result.stdout) == (130, INTERRUPTED, "")


def test_ctrl_c_during_esd_training_exits_130_and_registers_nothing(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path
) -> None:
    modelzoo.open(home).import_(sd_dir, "sd")
    before = _state(capsys, home)
    result = _interrupt(home, "torch.optim:Adam.step",
                        "edit", "esd", "sd", "--erase", "cat", "--iterations", "100000", "--ddim-steps", "2")
    _assert_interrupted(result)
    assert _state(capsys, home) == before


def test_ctrl_c_during_an_import_exits_130_and_leaves_no_blob(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path
) -> None:
    modelzoo.open(home)
    source = save_tiny_gpt2(tmp_path / "gpt2", n_layer=3, n_embd=64)
    before = _state(capsys, home)
    result = _interrupt(home, "modelzoo.registry.blobs:BlobStore.put_tensor", "import", str(source), "--name", "lm",
                        delay=0.1)
    _assert_interrupted(result)
    assert _state(capsys, home) == before


def test_ctrl_c_during_indexing_exits_130_and_stores_no_moments(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path
) -> None:
    zoo = modelzoo.open(home)
    torch.manual_seed(0)
    zoo.import_(save_clip(build_clip(CLIP_CONFIG.model_cfg), CLIP_CONFIG, tmp_path / "clip"), name="clip")
    tiny = StyleGanConfig.tiny()
    zoo.import_(save_gan(Generator(tiny), tiny, tmp_path / "gan"), name="gan")
    before = _state(capsys, home)
    result = _interrupt(home, "modelzoo.search.indexer:embed_samples",
                        "index", "gan", "--encoder", "zoo:clip", "--samples", "100000", "--batch-size", "8")
    _assert_interrupted(result)
    assert _state(capsys, home) == before

"""Third-party warnings and progress bars stay out of the CLI's output unless `zoo -v` asks for them;
modelzoo's own warnings always show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny_gpt2

import modelzoo

# Runs `zoo ARGS...` with every source of warnings speaking up as a model's tensors are loaded: Python's
# `warnings`, the loggers of diffusers and huggingface_hub, and modelzoo's own logger.
ZOO_WITH_NOISE = """
import logging, sys, warnings
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.utils import logging as hub_logging
from modelzoo.registry.store import Registry

load_tensors = Registry.load_tensors

def noisy(*args, **kwargs):
    warnings.warn("python-warning-line", UserWarning)
    diffusers_logging.get_logger("diffusers.pipelines").warning("diffusers-warning-line")
    hub_logging.get_logger("huggingface_hub.file_download").warning("hub-warning-line")
    logging.getLogger("modelzoo.registry.test").warning("modelzoo-warning-line")
    return load_tensors(*args, **kwargs)

Registry.load_tensors = noisy
from modelzoo.cli.main import run
run(sys.argv[1:])
"""
THIRD_PARTY = ("python-warning-line", "diffusers-warning-line", "hub-warning-line",
               "bos_token_id must be")  # the last: transformers, on the tiny GPT-2's out-of-vocabulary ids


def _zoo(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", ZOO_WITH_NOISE, "--home", str(home), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_third_party_warnings_show_only_with_verbose(home: Path, tmp_path: Path, sd_dir: Path) -> None:
    """`zoo sample sd` loads a diffusers pipeline (with a transformers text encoder), `zoo sample lm` a
    transformers model whose config makes transformers warn."""
    zoo = modelzoo.open(home)
    zoo.import_(sd_dir, "sd")
    zoo.import_(save_tiny_gpt2(tmp_path / "gpt2"), "lm")
    sd = ["sample", "sd", "--prompt", "a red circle", "--steps", "2", "--n", "1"]
    lm = ["sample", "lm", "--prompt", "5 17", "--n", "1"]
    runs = [_zoo(home, *sd, "--out", str(tmp_path / "sd")), _zoo(home, *lm, "--out", str(tmp_path / "lm")),
            _zoo(home, "-v", *lm, "--out", str(tmp_path / "lm-v"))]
    assert all(r.returncode == 0 and "wrote 1 samples" in r.stdout for r in runs), [r.stderr for r in runs]
    *quiet, verbose = runs

    for run in quiet:
        lines = run.stderr.splitlines()
        assert lines and set(lines) == {"WARNING modelzoo.registry.test: modelzoo-warning-line"}
    assert all(line in verbose.stderr for line in (*THIRD_PARTY, "modelzoo-warning-line")), verbose.stderr

"""Bad input: one-line error, exit code 2, and the registry exactly as it was."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from safetensors.torch import save_file


@pytest.fixture
def populated(home, gpt2_dir, capsys):
    assert zoo_cli(capsys, home, "import", str(gpt2_dir), "--name", "gpt2").code == 0
    return home


def _assert_refused(capsys, home, *args, expect: str) -> None:
    before = snapshot(home)
    result = zoo_cli(capsys, home, *args)
    assert result.code == 2, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.err
    assert snapshot(home) == before


def _safetensors_with_header(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _with_config(tmp_path: Path, gpt2_dir: Path, weights: Path) -> Path:
    (weights.with_suffix(".json")).write_text((gpt2_dir / "config.json").read_text())
    return weights


def test_missing_path(populated, capsys, tmp_path):
    _assert_refused(capsys, populated, "import", str(tmp_path / "nope"), "--name", "x", expect="does not exist")


def test_directory_of_no_known_format(populated, capsys, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    _assert_refused(capsys, populated, "import", str(tmp_path / "junk"), "--name", "x", expect="no known model format")


def test_truncated_safetensors(populated, capsys, tmp_path, gpt2_dir):
    data = (gpt2_dir / "model.safetensors").read_bytes()
    weights = tmp_path / "cut.safetensors"
    weights.write_bytes(data[: len(data) // 2])
    _with_config(tmp_path, gpt2_dir, weights)
    _assert_refused(capsys, populated, "import", str(weights), "--name", "x", expect="outside")


def test_header_length_larger_than_file(populated, capsys, tmp_path, gpt2_dir):
    weights = tmp_path / "bad.safetensors"
    weights.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    _with_config(tmp_path, gpt2_dir, weights)
    _assert_refused(capsys, populated, "import", str(weights), "--name", "x", expect="header length")


def test_header_that_lies_about_offsets(populated, capsys, tmp_path, gpt2_dir):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    weights = _safetensors_with_header(tmp_path / "lies.safetensors", header, bytes(24))
    _with_config(tmp_path, gpt2_dir, weights)
    _assert_refused(capsys, populated, "import", str(weights), "--name", "x", expect="overlap")
    header = {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}
    weights = _safetensors_with_header(tmp_path / "lies2.safetensors", header, bytes(16))
    _with_config(tmp_path, gpt2_dir, weights)
    _assert_refused(capsys, populated, "import", str(weights), "--name", "x", expect="expected 32")


def test_malformed_header_json(populated, capsys, tmp_path, gpt2_dir):
    weights = tmp_path / "json.safetensors"
    weights.write_bytes(struct.pack("<Q", 5) + b"{oops" + bytes(8))
    _with_config(tmp_path, gpt2_dir, weights)
    _assert_refused(capsys, populated, "import", str(weights), "--name", "x", expect="malformed")


class Exploit:
    def __reduce__(self):  # what a malicious checkpoint does: run code when unpickled
        return (Path("/tmp/modelzoo-pwned").touch, ())


def test_pickle_checkpoint_is_never_unpickled(populated, capsys, tmp_path, gpt2_dir):
    weights = tmp_path / "model.bin"
    with open(weights, "wb") as f:
        pickle.dump({"w": Exploit()}, f)
    _with_config(tmp_path, gpt2_dir, weights)
    Path("/tmp/modelzoo-pwned").unlink(missing_ok=True)
    _assert_refused(capsys, populated, "import", str(weights), "--name", "x", expect="convert it to safetensors")
    assert not Path("/tmp/modelzoo-pwned").exists()


def test_plain_tensor_pickle_is_read_by_the_weights_only_loader(populated, capsys, tmp_path, gpt2_dir):
    from safetensors.torch import load_file

    weights = tmp_path / "model.bin"
    torch.save(load_file(gpt2_dir / "model.safetensors"), weights)
    _with_config(tmp_path, gpt2_dir, weights)
    result = zoo_cli(capsys, populated, "import", str(weights), "--name", "from-pickle", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["added_bytes"] == 0  # same tensors as the safetensors import


@pytest.mark.parametrize("name", ["a/b", "../up", "bad\x07name", "with space", ""])
def test_model_name_with_path_separators_or_control_characters(populated, capsys, gpt2_dir, name):
    _assert_refused(capsys, populated, "import", str(gpt2_dir), "--name", name, expect="invalid model name")


@pytest.mark.parametrize("ref", ["nosuch", "gpt2@7", "gpt2@prod", "gpt2@"])
def test_unknown_version_reference(populated, capsys, ref):
    result = zoo_cli(capsys, populated, "show", ref)
    assert result.code == 2 and result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1


def test_nonfinite_tensors_refused_unless_allowed(populated, capsys, tmp_path, gpt2_dir):
    weights = tmp_path / "nan.safetensors"
    save_file({"ok": torch.ones(1000), "w": torch.tensor([1.0, float("nan")])}, weights)
    _with_config(tmp_path, gpt2_dir, weights)
    _assert_refused(capsys, populated, "import", str(weights), "--name", "nan", expect="NaN or Inf")
    result = zoo_cli(capsys, populated, "import", str(weights), "--name", "nan", "--allow-nonfinite")
    assert result.code == 0, result.err


def test_export_into_a_nonempty_folder_is_refused(populated, capsys, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _assert_refused(capsys, populated, "export", "gpt2", str(tmp_path / "full"), expect="not an empty folder")

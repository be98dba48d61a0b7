"""Hostile inputs: a model folder, database, reference or output path crafted to make modelzoo read,
write or delete outside the registry, hang, or crash. Every one is refused with exit 2 and one `error:`
line (or, for damage that `verify` finds, exit 1), and leaves the registry, the folders around it and a
canary file exactly as they were, with no secret (a canary file's text, a canary environment variable)
stored anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest
import torch
from cli_helpers import Result, snapshot, zoo_cli
from safetensors.torch import save_file

import modelzoo

SECRET_FILE_TEXT = "canary-file-3f9a1c"
SECRET_ENV_TEXT = "canary-env-77b2e0"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path) -> Path:
    """A registry holding one LM, imported once and copied for each test."""
    home = tmp_path_factory.mktemp("hostile-template") / "zoo"
    modelzoo.open(home).import_(gpt2_dir, "gpt2")
    return home


@pytest.fixture
def world(tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path holding `zoo` (the registry), `outside/canary.txt`, and nothing else yet."""
    shutil.copytree(template, tmp_path / "zoo")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary.txt").write_text(SECRET_FILE_TEXT)
    monkeypatch.setenv("ZOO_TEST_CANARY", SECRET_ENV_TEXT)
    return tmp_path


def tree(root: Path) -> dict[str, object]:
    """Every name under root: a file's bytes, a link's target, or the kind of anything else. The
    registry's own database files are left to `snapshot`, which compares their rows."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if key.startswith("zoo/registry.db"):
            continue
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "dir" if path.is_dir() else "special"
    return found


def assert_no_secret_stored(world: Path, *texts: str) -> None:
    for path in world.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.parent.name != "outside":
            data = path.read_bytes()
            assert SECRET_FILE_TEXT.encode() not in data and SECRET_ENV_TEXT.encode() not in data, path
    for text in texts:
        assert SECRET_FILE_TEXT not in text and SECRET_ENV_TEXT not in text


def refused(capsys: pytest.CaptureFixture[str], world: Path, *args: str, expect: str, code: int = 2) -> Result:
    """Run `zoo ARGS` on the world's registry and check it refused, one line, and changed nothing."""
    home = world / "zoo"
    listing = zoo_cli(capsys, home, "list", "--json").out
    before_registry, before_world = snapshot(home), tree(world)
    result = zoo_cli(capsys, home, *args)
    assert result.code == code, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert snapshot(home) == before_registry
    assert tree(world) == before_world
    assert zoo_cli(capsys, home, "list", "--json").out == listing
    assert_no_secret_stored(world, result.out, result.err)
    return result


def model_folder(world: Path, gpt2_dir: Path, name: str = "m") -> Path:
    folder = world / name
    shutil.copytree(gpt2_dir, folder)
    return folder


def write_safetensors(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> Path:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def single_file(world: Path, gpt2_dir: Path, header: object = None, data: bytes = b"",
                raw_header: bytes | None = None, config: bytes | None = None) -> Path:
    weights = write_safetensors(world / "w.safetensors", header, data, raw_header)
    (world / "w.json").write_bytes(config if config is not None else (gpt2_dir / "config.json").read_bytes())
    return weights


# ---- import reads only inside its folder ------------------------------------------------------------

@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/passwd", "CANARY", "../outside/canary.txt"])
def test_side_file_linking_outside_the_folder_is_refused(capsys, world, gpt2_dir, target):
    folder = model_folder(world, gpt2_dir)
    link = str(world / "outside" / "canary.txt") if target == "CANARY" else target
    (folder / "vocab.txt").symlink_to(link)
    refused(capsys, world, "import", str(folder), "--name", "m", expect="vocab.txt")


def test_weight_file_and_folder_linking_outside_are_refused(capsys, world, gpt2_dir):
    folder = model_folder(world, gpt2_dir)
    (folder / "model.safetensors").rename(world / "outside" / "model.safetensors")
    (folder / "model.safetensors").symlink_to(world / "outside" / "model.safetensors")
    refused(capsys, world, "import", str(folder), "--name", "m", expect="outside")
    (folder / "model.safetensors").unlink()
    (world / "outside" / "model.safetensors").rename(folder / "model.safetensors")
    (folder / "extra").symlink_to(world / "outside")
    refused(capsys, world, "import", str(folder), "--name", "m", expect="extra")


def test_links_inside_the_folder_are_followed(capsys, world, gpt2_dir):
    folder = model_folder(world, gpt2_dir)
    (folder / "store").mkdir()
    (folder / "model.safetensors").rename(folder / "store" / "weights")
    (folder / "model.safetensors").symlink_to("store/weights")
    result = zoo_cli(capsys, world / "zoo", "import", str(folder), "--name", "linked", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["added_bytes"] == 0  # the same tensors as gpt2@1


def test_follow_symlinks_imports_linked_files_but_never_virtual_ones(capsys, world, gpt2_dir):
    folder = model_folder(world, gpt2_dir)
    (world / "elsewhere").mkdir()
    (world / "elsewhere" / "notes.txt").write_text("notes the user vouches for")
    (folder / "notes.txt").symlink_to(world / "elsewhere" / "notes.txt")
    result = zoo_cli(capsys, world / "zoo", "import", str(folder), "--name", "trusted", "--follow-symlinks")
    assert result.code == 0, result.err
    assert zoo_cli(capsys, world / "zoo", "export", "trusted", str(world / "out")).code == 0
    assert (world / "out" / "notes.txt").read_text() == "notes the user vouches for"
    shutil.rmtree(world / "out")
    (folder / "env.txt").symlink_to("/proc/self/environ")
    refused(capsys, world, "import", str(folder), "--name", "m", "--follow-symlinks", expect="virtual file system")


def test_special_files_are_refused_whatever_the_flag(capsys, world, gpt2_dir):
    folder = model_folder(world, gpt2_dir)
    os.mkfifo(folder / "vocab.txt")
    refused(capsys, world, "import", str(folder), "--name", "m", expect="FIFO")
    refused(capsys, world, "import", str(folder), "--name", "m", "--follow-symlinks", expect="FIFO")
    (folder / "vocab.txt").unlink()
    (folder / "tty.txt").symlink_to("/dev/null")
    refused(capsys, world, "import", str(folder), "--name", "m", "--follow-symlinks", expect="virtual file system")


def test_a_fifo_in_place_of_the_weights_or_config_is_refused_without_blocking(capsys, world, gpt2_dir):
    folder = model_folder(world, gpt2_dir)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    refused(capsys, world, "import", str(folder), "--name", "m", expect="FIFO")
    weights = single_file(world, gpt2_dir, {})
    (world / "w.json").unlink()
    os.mkfifo(world / "w.json")
    refused(capsys, world, "import", str(weights), "--name", "m", expect="FIFO")


def test_size_limit_counts_bytes_read_not_the_size_stat_reports(capsys, world, gpt2_dir, monkeypatch):
    from modelzoo.registry import formats

    monkeypatch.setattr(formats, "MAX_SIDE_FILE_BYTES", 1000)
    folder = model_folder(world, gpt2_dir)
    (folder / "notes.txt").write_bytes(b"x" * 1001)
    refused(capsys, world, "import", str(folder), "--name", "m", expect="more than 1000 bytes")


def test_implicit_sibling_config_linking_outside_is_refused(capsys, world, gpt2_dir):
    weights = single_file(world, gpt2_dir, {})
    (world / "w.json").unlink()
    (world / "w.json").symlink_to("/proc/self/environ")
    refused(capsys, world, "import", str(weights), "--name", "m", expect="virtual file system")


# ---- names that become paths -------------------------------------------------------------------------

@pytest.mark.parametrize("component", ["..", "../outside", "/tmp", "a/../..", "x\\..", "."])
def test_diffusers_component_names_that_leave_the_folder_are_refused(capsys, world, sd_dir, component):
    folder = world / "sd"
    shutil.copytree(sd_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[component] = ["diffusers", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    refused(capsys, world, "import", str(folder), "--name", "m", expect="component")


def test_a_malformed_model_index_entry_is_refused(capsys, world, sd_dir):
    folder = world / "sd"
    shutil.copytree(sd_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = []
    index["vae"] = 5
    (folder / "model_index.json").write_text(json.dumps(index))
    result = zoo_cli(capsys, world / "zoo", "import", str(folder), "--name", "sd-partial")
    assert result.code == 0, result.err  # entries that name no component are skipped, as diffusers does


def _edit_db(world: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(world / "zoo" / "registry.db") as conn:
        for sql, args in statements:
            conn.execute(sql, args)


@pytest.mark.parametrize("name", ["../escaped.txt", "../../outside/canary.txt", "/tmp/abs.txt", "a/../../b"])
def test_export_of_a_file_name_from_a_hostile_database_writes_nothing_outside(capsys, world, name):
    _edit_db(world, ("UPDATE manifest_entries SET name = ? WHERE kind = 'file' AND name = 'config.json'", (name,)))
    refused(capsys, world, "export", "gpt2", str(world / "out" / "x"), expect="file name")


def test_export_of_a_weight_file_name_from_a_hostile_database_writes_nothing_outside(capsys, world):
    config = {"format": "transformers", "weight_files": {"": "../../outside/canary.txt"}}
    _edit_db(world, ("UPDATE versions SET config = ?", (json.dumps(config),)))
    refused(capsys, world, "export", "gpt2", str(world / "out" / "x"), expect="weight file name")


@pytest.mark.parametrize("family", ["../../etc", "lm\n", "a b", ""])
def test_a_family_name_in_a_config_must_be_a_plain_word(capsys, world, gpt2_dir, family):
    folder = model_folder(world, gpt2_dir)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "family": family, "architectures": None}))
    refused(capsys, world, "import", str(folder), "--name", "m", expect="family")


# ---- gc and verify trust no location from the database --------------------------------------------------

@pytest.mark.parametrize("location", ["OUTSIDE", "../../outside/canary.txt", "../registry.db"])
def test_gc_never_deletes_a_path_that_a_blob_row_names(capsys, world, location):
    home = world / "zoo"
    where = str(world / "outside" / "canary.txt") if location == "OUTSIDE" else location
    _edit_db(world, ("INSERT INTO blobs (sha256, kind, dtype, shape, nbytes, location, created_at) "
                     "VALUES (?, 'file', NULL, NULL, 1, ?, '2026-01-01')", ("0" * 64, where)))
    result = zoo_cli(capsys, home, "gc", "--grace", "0", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["blobs_removed"] == 1  # the row went, no file with it
    assert (world / "outside" / "canary.txt").read_text() == SECRET_FILE_TEXT
    assert (home / "registry.db").exists()
    assert zoo_cli(capsys, home, "verify").code == 0


@pytest.mark.parametrize("sha", ["../../../outside/canary.txt", "A" * 64, "0" * 63])
def test_gc_never_deletes_a_path_that_a_blob_hash_spells(capsys, world, sha):
    _edit_db(world, ("INSERT INTO blobs (sha256, kind, dtype, shape, nbytes, location, created_at) "
                     "VALUES (?, 'file', NULL, NULL, 1, 'x', '2026-01-01')", (sha,)))
    result = zoo_cli(capsys, world / "zoo", "gc", "--grace", "0")
    assert result.code == 0, result.err
    assert (world / "outside" / "canary.txt").read_text() == SECRET_FILE_TEXT


def test_verify_reports_a_row_whose_location_points_elsewhere_as_damage(capsys, world):
    _edit_db(world, ("UPDATE blobs SET location = ? WHERE kind = 'file' AND sha256 = "
                     "(SELECT blob_sha256 FROM manifest_entries WHERE name = 'config.json')",
                     (str(world / "outside" / "canary.txt"),)))
    result = zoo_cli(capsys, world / "zoo", "verify")
    assert result.code == 1
    assert "row names location" in result.err and "gpt2@1" in result.err
    assert zoo_cli(capsys, world / "zoo", "gc", "--grace", "0").code == 0
    assert (world / "outside" / "canary.txt").read_text() == SECRET_FILE_TEXT


@pytest.mark.timeout(60)
def test_verify_does_not_hang_on_a_fifo_in_place_of_a_blob(capsys, world):
    blob = next(p for p in (world / "zoo" / "blobs").rglob("*.safetensors"))
    blob.unlink()
    os.mkfifo(blob)
    result = zoo_cli(capsys, world / "zoo", "verify")
    assert result.code == 1 and "FIFO" in result.err
    tensor_file = next(p for p in (world / "zoo" / "blobs").rglob("*") if p.is_file() and p.suffix == "")
    tensor_file.unlink()
    tensor_file.symlink_to(world / "outside" / "canary.txt")
    result = zoo_cli(capsys, world / "zoo", "verify")
    assert result.code == 1 and SECRET_FILE_TEXT not in result.err + result.out


# ---- databases and homes -------------------------------------------------------------------------------

def test_a_foreign_sqlite_file_is_refused_and_left_byte_for_byte(capsys, world):
    other = world / "outside" / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.close()
    before = tree(world / "outside")
    refused(capsys, world, "--db", f"sqlite:///{other}", "list", expect="not a modelzoo registry")
    assert tree(world / "outside") == before
    (world / "outside" / "garbage.db").write_bytes(b"not a database at all" * 100)
    refused(capsys, world, "--db", f"sqlite:///{world / 'outside' / 'garbage.db'}", "list", expect="cannot open")


@pytest.mark.parametrize("where", ["/proc/..", "/proc/self/x.db", "FILE/x.db", "FIFO"])
def test_unusable_database_locations_are_refused(capsys, world, where):
    if where == "FILE/x.db":
        where = str(world / "outside" / "canary.txt" / "x.db")
    elif where == "FIFO":
        os.mkfifo(world / "outside" / "fifo.db")
        where = str(world / "outside" / "fifo.db")
    refused(capsys, world, "--db", f"sqlite:///{where}", "list", expect="error")


def test_a_home_that_is_a_file_is_refused(capsys, world):
    result = zoo_cli(capsys, world / "outside" / "canary.txt", "list")
    assert result.code == 2 and result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1
    assert (world / "outside" / "canary.txt").read_text() == SECRET_FILE_TEXT


# ---- names, aliases and references ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["g\n", "g\r", "\ng", "g\x00"])
def test_a_name_with_a_trailing_newline_is_refused(capsys, world, gpt2_dir, name):
    refused(capsys, world, "import", str(gpt2_dir), "--name", name, expect="invalid model name")


@pytest.mark.parametrize("alias", ["prod\n", "١", "x\ty"])
def test_aliases_match_the_whole_string(capsys, world, alias):
    refused(capsys, world, "alias", "set", "gpt2@1", alias, expect="invalid alias")


@pytest.mark.parametrize("ref", ["gpt2@١", "gpt2@99999999999999999999", "gpt2@18446744073709551617", "gpt2@²"])
def test_version_numbers_are_ascii_and_bounded(capsys, world, ref):
    refused(capsys, world, "show", ref, expect="version")


@pytest.mark.parametrize(("key", "value"), [("k\n", "v"), ("", "v"), ("k", "v\n"), ("k" * 100, "v")])
def test_tags_are_checked(capsys, world, key, value):
    refused(capsys, world, "tag", "gpt2", f"{key}={value}", expect="invalid tag")


def test_a_hash_prefix_reference_tags_the_version(capsys, world):
    home = world / "zoo"
    manifest = json.loads(zoo_cli(capsys, home, "show", "gpt2@1", "--json").out)["manifest_hash"]
    assert zoo_cli(capsys, home, "tag", manifest[:10], "stage=prod").code == 0
    tags_of_model = json.loads(zoo_cli(capsys, home, "list", "--json").out)[0]["tags"]
    assert "stage" not in tags_of_model
    assert json.loads(zoo_cli(capsys, home, "show", "gpt2@1", "--json").out)["tags"] == {"stage": "prod"}


# ---- untrusted structure --------------------------------------------------------------------------------

def test_shapes_whose_product_overflows_are_refused(capsys, world, gpt2_dir):
    header = {"w": {"dtype": "F32", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 0]}}
    refused(capsys, world, "import", str(single_file(world, gpt2_dir, header)), "--name", "m", expect="expected")
    header = {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}
    refused(capsys, world, "import", str(single_file(world, gpt2_dir, header)), "--name", "m", expect="bad shape")
    header = {"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}
    refused(capsys, world, "import", str(single_file(world, gpt2_dir, header)), "--name", "m", expect="bad shape")
    header = {"w": {"dtype": "F32", "shape": [2**31, 2**31, 4], "data_offsets": [0, 16]}}
    refused(capsys, world, "import", str(single_file(world, gpt2_dir, header, bytes(16))), "--name", "m",
            expect="expected")


@pytest.mark.parametrize("metadata", [[1, 2], "text", 5, {"k": 5}, {"k": ["v"]}])
def test_metadata_that_is_not_an_object_of_strings_is_refused(capsys, world, gpt2_dir, metadata):
    header = {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    refused(capsys, world, "import", str(single_file(world, gpt2_dir, header, bytes(4))), "--name", "m",
            expect="__metadata__")


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]},
    {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": {"a": 1}},
])
def test_mistyped_header_entries_are_refused(capsys, world, gpt2_dir, entry):
    refused(capsys, world, "import", str(single_file(world, gpt2_dir, {"w": entry}, bytes(4))), "--name", "m",
            expect="safetensors header lies")


def test_a_tensor_named_twice_in_a_header_is_refused(capsys, world, gpt2_dir):
    raw = (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    weights = single_file(world, gpt2_dir, raw_header=raw, data=bytes(8))
    refused(capsys, world, "import", str(weights), "--name", "m", expect="appears twice")


@pytest.mark.parametrize("where", ["header", "config"])
def test_deeply_nested_json_is_refused(capsys, world, gpt2_dir, where):
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "header":
        weights = single_file(world, gpt2_dir, raw_header=b'{"__metadata__": ' + deep + b"}")
    else:
        weights = single_file(world, gpt2_dir, {}, config=b'{"n_layer": 2, "x": ' + deep + b"}")
    refused(capsys, world, "import", str(weights), "--name", "m", expect="nested deeper")
    shallow_but_deep = b'{"a":' * 80 + b"1" + b"}" * 80
    weights = single_file(world, gpt2_dir, {}, config=shallow_but_deep)
    refused(capsys, world, "import", str(weights), "--name", "m", expect="nested deeper")


@pytest.mark.parametrize(("change", "expect"), [
    ({"architectures": 5}, "architectures"),
    ({"architectures": [5]}, "architectures"),
    ({"n_layer": "1e9"}, "n_layer"),
    ({"n_layer": 10**9}, "n_layer"),
    ({"n_layer": -1}, "n_layer"),
    ({"n_layer": True}, "n_layer"),
    ({"n_embd": 1.5}, "n_embd"),
    ({"vocab_size": 10**30}, "vocab_size"),
    ({"text_config": {"hidden_size": "big"}}, "hidden_size"),
    ({"model_type": ["gpt2"]}, "model_type"),
    ({"n_layer": float("nan")}, "JSON"),
])
def test_mistyped_config_values_are_refused_at_import(capsys, world, gpt2_dir, change, expect):
    folder = model_folder(world, gpt2_dir)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    refused(capsys, world, "import", str(folder), "--name", "m", expect=expect)


def test_a_config_key_given_twice_is_refused(capsys, world, gpt2_dir):
    folder = model_folder(world, gpt2_dir)
    text = (folder / "config.json").read_text().rstrip().removesuffix("}") + ', "n_layer": 40}'
    (folder / "config.json").write_text(text)
    refused(capsys, world, "import", str(folder), "--name", "m", expect="appears twice")


# ---- GGUF ------------------------------------------------------------------------------------------------

def _gguf(path: Path, version: int = 3, tensors: int = 0, pairs: int = 0, rest: bytes = b"") -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, tensors, pairs) + rest)
    return path


@pytest.mark.parametrize(("make", "expect"), [
    (lambda p: p.write_bytes(bytes(40)), "not a GGUF file"),
    (lambda p: p.write_bytes(b"GGUF" + bytes(36)), "version"),
    (lambda p: p.write_bytes(b"GGUF\x03"), "shorter"),
    (lambda p: _gguf(p, pairs=2**62), "header lies"),
    (lambda p: _gguf(p, tensors=2**62, rest=bytes(64)), "header lies"),
    (lambda p: _gguf(p, version=99), "version 99"),
    (lambda p: _gguf(p, pairs=1, rest=struct.pack("<Q", 2**60) + bytes(20)), "GGUF"),
    (lambda p: _gguf(p, pairs=1, rest=struct.pack("<Q", 3) + b"key" + struct.pack("<I", 77) + bytes(8)), "GGUF"),
])
def test_lying_gguf_files_are_refused(capsys, world, make, expect):
    path = world / "m.gguf"
    make(path)
    refused(capsys, world, "import", str(path), "--name", "m", expect=expect)


# ---- output paths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["/proc/modelzoo-export", "/proc/self/x", "CANARY/x", "/sys/kernel/x"])
def test_export_to_an_unwritable_place_is_refused_before_any_work(capsys, world, out):
    target = str(world / "outside" / "canary.txt" / "x") if out == "CANARY/x" else out
    refused(capsys, world, "export", "gpt2", target, expect="error")


@pytest.mark.parametrize("out", ["/proc/modelzoo-samples", "CANARY/x"])
def test_sample_to_an_unwritable_place_is_refused_before_sampling(capsys, world, out, monkeypatch):
    from modelzoo.registry.families.lm import LanguageModelFamily

    def never(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("sampled although the output could not be written")

    monkeypatch.setattr(LanguageModelFamily, "sample", never)
    target = str(world / "outside" / "canary.txt" / "x") if out == "CANARY/x" else out
    refused(capsys, world, "sample", "gpt2", "--prompt", "hi", "--out", target, expect="--out")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20_000, 12_000])
def test_a_decompression_bomb_query_image_is_refused(capsys, world, side):
    image = _png_header_only(world / "bomb.png", side, side)
    refused(capsys, world, "search", "--image", str(image), expect="too large")


def test_a_fifo_as_query_image_is_refused(capsys, world):
    os.mkfifo(world / "q.png")
    refused(capsys, world, "search", "--image", str(world / "q.png"), expect="FIFO")


# ---- a fine import still works, and records its source files ------------------------------------------

def test_find_answers_for_the_sha256_of_an_imported_weight_file(capsys, world, gpt2_dir):
    import hashlib

    home = world / "zoo"
    weights = world / "single.safetensors"
    save_file({"w": torch.arange(8, dtype=torch.float32)}, weights)
    (world / "single.json").write_text((gpt2_dir / "config.json").read_text())
    assert zoo_cli(capsys, home, "import", str(weights), "--name", "single").code == 0
    for path, ref, name in ((weights, "single@1", "single.safetensors"),
                            (gpt2_dir / "model.safetensors", "gpt2@1", "model.safetensors")):
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        hits = json.loads(zoo_cli(capsys, home, "find", sha, "--json").out)
        assert {"ref": ref, "kind": "source file", "name": name, "sha256": sha} in hits

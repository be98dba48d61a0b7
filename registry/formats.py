"""Read the formats people already use into an `ImportSource`: diffusers pipeline directories,
transformers model directories, and single safetensors files with a JSON config.

Nothing here writes to the registry. Every weight file's header is validated before any tensor is
read, so a malformed file is refused before a byte is stored. Pickle checkpoints are never unpickled:
only torch's weights-only loader may read them, and what it refuses is refused with advice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import family_names
from modelzoo.registry.files import SourceFolder, open_regular, read_limited, resolve_link
from modelzoo.registry.paths import check_component, check_family_name
from modelzoo.registry.safetensors_io import TensorInfo, iter_tensors, read_header
from modelzoo.registry.untrusted import check_config, parse_json_object

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
SHARD = re.compile(r"^(?P<stem>.+?)-\d{5}-of-\d{5}(?P<ext>\.safetensors|\.bin)$")
MAX_SIDE_FILE_BYTES = 64 * 2**20  # tokenizers and configs; larger non-weight files are not stored
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
CONFIG_FILES = {"config.json", "model_index.json", "generation_config.json"}  # type-checked at import
MAX_BASE_MODEL = 256


@dataclass
class ImportSource:
    """A model read from disk, not yet stored: where its tensors are and the small files beside them."""

    path: Path
    family: str
    format: str  # "diffusers" | "transformers" | "safetensors"
    weight_files: dict[str, str]  # component ("" = root) -> weight file name written on export
    files: dict[str, bytes]
    tensor_sources: list[tuple[str, Path]] = field(default_factory=list)  # (component, safetensors path)
    pickled: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # component -> tensors
    base_model: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)
    extra_source: dict[str, Any] = field(default_factory=dict)
    # The weight files as the user holds them (name in the folder -> file), recorded by their own sha256
    # so `zoo find` answers for them; small files are stored whole and found by their blob's hash.
    originals: dict[str, Path] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return {"format": self.format, "weight_files": self.weight_files, **self.extra_config}

    def headers(self) -> dict[Path, dict[str, TensorInfo]]:
        return {path: read_header(path).tensors for _, path in self.tensor_sources}

    @property
    def total_bytes(self) -> int:
        on_disk = sum(t.nbytes for tensors in self.headers().values() for t in tensors.values())
        pickled = sum(t.nbytes for ts in self.pickled.values() for t in ts.values())
        return on_disk + pickled

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for component, path in self.tensor_sources:
            for info, tensor in iter_tensors(path):
                yield tensor_name(component, info.name), tensor
        for component, tensors in self.pickled.items():
            for key, tensor in tensors.items():
                yield tensor_name(component, key), tensor

    def source_record(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "base_model": self.base_model, **self.extra_source}


def tensor_name(component: str, key: str) -> str:
    return f"{component}/{key}" if component else key


def split_tensor_name(name: str, components: set[str]) -> tuple[str, str]:
    head, sep, rest = name.partition("/")
    return (head, rest) if sep and head in components else ("", name)


def read_source(
    path: Path, family: str | None = None, config_path: Path | None = None, follow_symlinks: bool = False
) -> ImportSource:
    """Read what `path` holds. A folder is read only inside itself (see `SourceFolder`); `config_path`,
    named by the user, is read wherever it is."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
            return _read_single_file(path, family, config_path, follow_symlinks)
        if path.suffix == ".gguf":
            from modelzoo.registry.families.gguf import read_gguf  # imports this module; loaded on demand

            return read_gguf(path, family)
        raise BadInput(f"{path} is not a safetensors file, diffusers or transformers directory")
    if not path.is_dir():
        raise BadInput(f"{path} is neither a regular file nor a folder")
    folder = SourceFolder(path, follow_symlinks)
    if folder.has_file("model_index.json"):
        return _read_diffusers(folder, family)
    if folder.has_file("config.json"):
        return _read_model_dir(folder, family)
    raise BadInput(f"{path} is no known model format (no model_index.json or config.json inside)")


def read_config(data: bytes, what: str) -> dict[str, Any]:
    return check_config(parse_json_object(data, what), what)


def family_from_config(config: dict[str, Any]) -> str | None:
    """Infer the family from a config: a modelzoo `family` key, transformers' architectures, a GAN's kind."""
    if isinstance(config.get("family"), str):
        return str(config["family"])
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "lm"
    if config.get("model_type") in {"stylegan2", "stylegan"} or config.get("_class_name") == "StyleGanGenerator":
        return "gan"
    return None


def _check_family(found: str | None, asked: str | None, path: Path) -> str:
    if asked and found and asked != found:
        raise BadInput(f"{path} looks like a {found} model, not {asked}; drop --family or fix it")
    family = asked or found
    if family is None:
        raise BadInput(f"cannot tell the family of {path}; pass --family {'|'.join(family_names())}")
    return check_family_name(family)


def _weights_in(files: dict[str, Path]) -> tuple[dict[str, Path], str | None, dict[str, Path]]:
    """(safetensors files, the exported weight file name, pickle files) of one model folder's files,
    each by its name in the folder."""
    safetensors = {name: p for name, p in files.items() if name.endswith(".safetensors")}
    plain = {name: p for name, p in safetensors.items() if not re.search(r"\.[A-Za-z0-9]+\.safetensors$", name)}
    chosen = plain or safetensors  # a variant such as .fp16 only when there is nothing else
    pickles = {name: p for name, p in files.items() if Path(name).suffix in PICKLE_SUFFIXES}
    if not chosen:
        return {}, None, pickles
    first = next(iter(chosen))
    match = SHARD.match(first)
    # Shards are merged into one file on export; from_pretrained loads either layout.
    export_name = f"{match['stem']}{match['ext']}" if match else first
    return chosen, export_name, pickles


def _side_files(folder: SourceFolder, exclude: set[Path]) -> dict[str, bytes]:
    """Every small file of the folder that is not a weight file; configs are type-checked on the way."""
    files: dict[str, bytes] = {}
    for relative, path in folder.files.items():
        if (
            path in exclude
            or Path(relative).suffix in PICKLE_SUFFIXES | {".safetensors"}
            or relative.endswith(".index.json")
        ):
            continue
        files[relative] = folder.read(relative, MAX_SIDE_FILE_BYTES, "config or tokenizer file")
        if relative.rsplit("/", 1)[-1] in CONFIG_FILES:
            read_config(files[relative], str(folder.root / relative))
    return files


def _base_model(folder: SourceFolder) -> str | None:
    """The Hub's `base_model` from a model card's YAML front matter, if the card declares one."""
    if not folder.has_file("README.md"):
        return None
    text = folder.read("README.md", MAX_SIDE_FILE_BYTES, "model card").decode(errors="replace")
    if not text.startswith("---"):
        return None
    front, _, _ = text[3:].partition("\n---")
    try:
        meta = yaml.safe_load(front)
    except (yaml.YAMLError, RecursionError):
        return None
    base = meta.get("base_model") if isinstance(meta, dict) else None
    if isinstance(base, list):
        base = base[0] if base else None
    return str(base)[:MAX_BASE_MODEL] if isinstance(base, str | int | float) and base else None


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a pickle checkpoint with torch's weights-only unpickler; anything else is refused."""
    try:
        with open_regular(path) as fd, open(fd, "rb", closefd=False) as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception:
        raise BadInput(
            f"{path} is a pickle checkpoint that the safe weights-only loader refuses; "
            "convert it to safetensors with a tool you trust, then import that"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(f"{path} holds no plain dict of tensors; convert it to safetensors first")
    return {str(k): v for k, v in obj.items()}


def _component(source: ImportSource, folder: SourceFolder, component: str, default_name: str) -> None:
    chosen, export_name, pickles = _weights_in(folder.in_folder(component))
    read = chosen or pickles
    source.originals.update({tensor_name(component, name): path for name, path in read.items()})
    if chosen:
        source.tensor_sources.extend((component, p) for p in chosen.values())
        source.weight_files[component] = export_name or default_name
    elif pickles:
        tensors: dict[str, torch.Tensor] = {}
        for p in pickles.values():
            tensors.update(load_pickle_weights(p))
        source.pickled[component] = tensors
        source.weight_files[component] = default_name


def _read_diffusers(folder: SourceFolder, family: str | None) -> ImportSource:
    root = folder.root
    index = read_config(folder.read("model_index.json", MAX_SIDE_FILE_BYTES), str(root / "model_index.json"))
    source = ImportSource(
        path=root,
        family=_check_family("diffusion", family, root),
        format="diffusers",
        weight_files={},
        files={},
        base_model=_base_model(folder),
    )
    for component, spec in sorted(index.items()):
        if component.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        check_component(component, f"component name in {root / 'model_index.json'}")
        if not folder.has_folder(component):
            raise BadInput(f"{root}: model_index.json names {component!r} but the folder is missing")
        default = TRANSFORMERS_WEIGHTS if spec[0] == "transformers" else DIFFUSERS_WEIGHTS
        _component(source, folder, component, default)
    if not source.weight_files:
        raise BadInput(f"{root}: no safetensors weights found in any component")
    source.files = _side_files(folder, {p for _, p in source.tensor_sources})
    source.headers()  # validate every header before anything is stored
    return source


def _read_model_dir(folder: SourceFolder, family: str | None) -> ImportSource:
    root = folder.root
    config = read_config(folder.read("config.json", MAX_SIDE_FILE_BYTES), str(root / "config.json"))
    source = ImportSource(
        path=root,
        family=_check_family(family_from_config(config), family, root),
        format="transformers" if config.get("architectures") else "safetensors",
        weight_files={},
        files={},
        base_model=_base_model(folder),
    )
    _component(source, folder, "", TRANSFORMERS_WEIGHTS)
    if not source.weight_files:
        raise BadInput(f"{root}: no weights found (no .safetensors file)")
    source.files = _side_files(folder, {p for _, p in source.tensor_sources})
    source.headers()
    return source


def _read_single_file(
    path: Path, family: str | None, config_path: Path | None, follow_symlinks: bool
) -> ImportSource:
    if config_path is not None:
        config_file: Path | None = config_path  # named by the user: read wherever it is
    else:
        siblings = [path.with_suffix(".json"), path.parent / "config.json"]
        found = next((c for c in siblings if c.exists() or c.is_symlink()), None)
        config_file = None if found is None else resolve_link(found, path.parent, follow_symlinks)
    if config_file is None:
        raise BadInput(f"{path} needs a JSON config describing the architecture: pass --config FILE")
    raw = read_limited(config_file, MAX_SIDE_FILE_BYTES, "config file")
    config = read_config(raw, str(config_file))
    source = ImportSource(
        path=path.resolve(),
        family=_check_family(family_from_config(config), family, path),
        format="transformers" if config.get("architectures") else "safetensors",
        weight_files={"": TRANSFORMERS_WEIGHTS},
        files={"config.json": raw},
        originals={path.name: path},
    )
    if path.suffix == ".safetensors":
        source.tensor_sources.append(("", path))
        source.headers()
    else:
        source.pickled[""] = load_pickle_weights(path)
    return source

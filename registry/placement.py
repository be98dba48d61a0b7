"""Where a loaded model runs: the torch device and floating-point dtype a user asks for by name.

`auto` as a device means CUDA when torch sees one, else the CPU. A dtype of None (`stored` on the command
line) keeps the registry's own; any other is applied to every floating-point parameter and buffer after
loading, so that a float32 registry can be edited or sampled in bfloat16 on a GPU.
"""

from __future__ import annotations

import torch

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, get_family
from modelzoo.registry.store import Registry

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORED = "stored"


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BadInput(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {name!r}: torch sees no CUDA device here (use cpu or auto)")
    return name


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == STORED:
        return None
    if name not in DTYPES:
        raise BadInput(f"unknown dtype {name!r}: use {', '.join(DTYPES)} or {STORED}")
    return DTYPES[name]


def load_model(registry: Registry, ref: str, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """The version loaded on `device` (a name, `auto` included) in `dtype` (None: as stored)."""
    info = registry.info(ref)
    cast = resolve_dtype(dtype)
    model = get_family(info.family).load(registry, info.ref, resolve_device(device))
    return model if cast is None else model.to(dtype=cast)

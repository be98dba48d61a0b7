"""Sample grids for the web: the images `zoo sample` draws for the same version, seeds and prompt, tiled
as one PNG and kept in memory, since a version's samples never change and the registry stays read-only."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import modelzoo
from modelzoo.cli.sample import check_family_accepts, check_request
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import contact_sheet, get_family

MAX_GRID_SAMPLES = 16  # a page shows a handful; more would let one request hold the CPU for minutes
GridKey = tuple[int, int, int, str | None]


class SampleGrids:
    def __init__(self, zoo: modelzoo.Zoo, capacity: int = 64):
        self.zoo = zoo
        self.capacity = capacity
        self._grids: OrderedDict[GridKey, bytes] = OrderedDict()
        self._lock = threading.Lock()
        # One sampling at a time: each holds a whole model in memory and every core, and two first loads at
        # once race inside diffusers' lazy imports.
        self._sampling = threading.Lock()

    def png(self, ref: str, seed: int, n: int, prompt: str | None) -> bytes:
        if n > MAX_GRID_SAMPLES:
            raise BadInput(f"--n {n} is more than the {MAX_GRID_SAMPLES} samples a grid shows")
        seeds = check_request(seed, n, None, None, None)
        info = self.zoo.get(ref)
        check_family_accepts(get_family(info.family), info, prompt, {})
        key = (info.id, seed, n, prompt)
        with self._lock:
            if key in self._grids:
                self._grids.move_to_end(key)
                return self._grids[key]
        with self._sampling:
            samples = self.zoo.sample(info.ref, seeds, prompt)
        if any(s.image is None for s in samples):
            raise BadInput(f"{info.ref} is a {info.family} model and draws text; a sample grid needs an image model")
        buffer = io.BytesIO()
        contact_sheet([s.image for s in samples if s.image is not None]).save(buffer, format="PNG")
        with self._lock:
            self._grids[key] = buffer.getvalue()
            while len(self._grids) > self.capacity:
                self._grids.popitem(last=False)
        return buffer.getvalue()

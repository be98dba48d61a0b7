"""Second-moment statistics C = E[k k^T] of the keys entering an MLP down-projection, and their cache.

MEMIT (Meng et al. 2023, eq. 14) protects what a layer already stores through C, the uncentred second
moment of the layer's keys over a text corpus; the reference uses 100,000 Wikipedia texts in float32
(`rome/layer_stats.py`). Here the corpus is a file the user gives (plain text, one document per line,
or JSONL with a "text" field), or by default text the model samples itself from its beginning-of-sequence
token (top-k 50, batches of 64 sequences, 128 tokens each), so the method works offline on any LM.
Self-generated keys are accumulated during generation itself (one pass); the first position (the start
token, whose activations are outliers in most LMs) and positions after an end token are left out.

C is costly, so it is kept in the registry as a derived tensor (`registry/derived.py`, kind
`memit-stats`) keyed by (model manifest hash, layer module, corpus hash, key count, dtype). A later edit
of the same version with the same corpus reads it instead of running the model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelzoo.editors.lm_requests import pad_id
from modelzoo.registry.derived import DerivedTensors
from modelzoo.registry.errors import BadInput
from modelzoo.registry.tracing import trace

DERIVED_KIND = "memit-stats"
SELF_GENERATED = "self-generated"
GENERATION = {"batch": 64, "length": 128, "top_k": 50, "seed": 0}
CORPUS_WINDOW = 128  # tokens per corpus window (the reference's GPT-2 uses its 1,024-token context)

StatsProgress = Callable[[int, int], None]  # (keys counted, keys wanted)


@dataclass(frozen=True)
class StatsKey:
    model: str  # manifest hash of the version whose keys these are
    module: str
    corpus: str  # sha256 of the corpus file, or a hash of the self-generation recipe
    samples: int  # number of key vectors (tokens)
    dtype: str


@dataclass(frozen=True)
class LayerStats:
    C: torch.Tensor  # (key_dim, key_dim), float32
    count: int
    cached: bool
    seconds: float  # what computing it cost (read back from the cache when cached)


def corpus_hash(corpus: Path | None) -> str:
    if corpus is None:
        return hashlib.sha256(json.dumps({SELF_GENERATED: GENERATION}, sort_keys=True).encode()).hexdigest()
    with open(corpus, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_corpus(corpus: Path) -> list[str]:
    try:
        text = corpus.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read statistics corpus {corpus}: {e}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if corpus.suffix == ".jsonl":
        try:
            lines = [str(json.loads(line)["text"]) for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BadInput(f"{corpus}: a JSONL corpus needs one object with a \"text\" field per line") from None
    if not lines:
        raise BadInput(f"statistics corpus {corpus} is empty")
    return lines


class _Accumulator:
    """Sums k k^T in float64 (float32 sums of 10^5 outer products lose digits) over the masked positions, on
    the device the keys are on."""

    def __init__(self, modules: Sequence[str], dim: int, dtype: torch.dtype) -> None:
        self.dim = dim
        self.sums: dict[str, torch.Tensor] = {}
        self.dtype = dtype
        self.count = 0
        self.mask: torch.Tensor | None = None

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            k = x.detach()[self.mask].to(self.dtype)
            if name not in self.sums:
                self.sums[name] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=k.device)
            self.sums[name] += (k.T @ k).double()
        return x

    def mean(self, name: str) -> torch.Tensor:
        """C, stored in float32 on the CPU, where the closed-form solve runs."""
        total = self.sums.get(name, torch.zeros(self.dim, self.dim, dtype=torch.float64))  # no key reached it
        return (total / max(self.count, 1)).float().cpu()


def _context(lm: nn.Module) -> int:
    """How many positions the model takes (GPT-2 calls it n_positions; its config maps the name)."""
    return int(getattr(lm.config, "max_position_embeddings", None) or 2048)


def _generate_keys(lm: nn.Module, tokenizer: Any, acc: _Accumulator, modules: Sequence[str], samples: int,
                   progress: StatsProgress | None) -> None:
    """Sample text from the start token in batches, counting the keys of every generated position."""
    start = getattr(lm.generation_config, "bos_token_id", None)
    if start is None and tokenizer is not None:
        start = tokenizer.bos_token_id
    if start is None:
        start = pad_id(tokenizer) if tokenizer is not None else 0
    ends = lm.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
    B, T = GENERATION["batch"], min(GENERATION["length"], _context(lm))
    gen = torch.Generator().manual_seed(GENERATION["seed"])
    device = next(lm.parameters()).device
    with trace(lm, modules, retain_output=False, edit_input=acc), torch.no_grad():
        while acc.count < samples:
            ids = torch.full((B, 1), int(start), dtype=torch.long, device=device)
            alive = torch.ones(B, dtype=torch.bool, device=device)
            past = None
            for t in range(T):
                acc.mask = alive[:, None].clone() if t > 0 else None
                out = lm(input_ids=ids[:, -1:], cache=past, use_cache=True)
                if acc.mask is not None:
                    acc.count += int(alive.sum())
                past = out.cache
                logits = out.logits[:, -1].float()
                top = torch.topk(logits, GENERATION["top_k"], dim=-1)
                pick = torch.multinomial(torch.softmax(top.values, -1).cpu(), 1, generator=gen).to(device)
                nxt = top.indices.gather(1, pick)
                ids = torch.cat([ids, nxt], 1)
                alive &= ~torch.isin(nxt[:, 0], torch.tensor(sorted(ends), device=device, dtype=torch.long))
                if progress is not None:
                    progress(min(acc.count, samples), samples)
                if acc.count >= samples or not alive.any():
                    break


def _corpus_keys(lm: nn.Module, tokenizer: Any, acc: _Accumulator, modules: Sequence[str], texts: Sequence[str],
                 samples: int, progress: StatsProgress | None) -> None:
    """Run the corpus in windows of CORPUS_WINDOW tokens, 16 at a time, stopping at the last traced layer."""
    if tokenizer is None:
        raise BadInput("a statistics corpus needs a model with a tokenizer")
    windows = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        w = min(CORPUS_WINDOW, _context(lm))
        windows += [ids[i : i + w] for i in range(0, len(ids), w)]
    device = next(lm.parameters()).device
    with torch.no_grad():
        for s in range(0, len(windows), 16):
            rows = windows[s : s + 16]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = True
            acc.mask = mask.to(device)
            with trace(lm, modules, retain_output=False, edit_input=acc, stop=True):
                lm(input_ids=ids.to(device), attention_mask=mask.long().to(device))
            acc.count += int(mask.sum())
            if progress is not None:
                progress(min(acc.count, samples), samples)
            if acc.count >= samples:
                break
    if acc.count < samples:
        raise BadInput(f"the statistics corpus holds {acc.count} tokens; ask for at most that many samples")


def second_moments(
    lm: nn.Module,
    tokenizer: Any,
    modules: Sequence[str],
    key_dim: int,
    *,
    samples: int,
    corpus: Path | None = None,
    model_hash: str | None = None,
    cache: DerivedTensors | None = None,
    dtype: torch.dtype = torch.float32,
    progress: StatsProgress | None = None,
) -> dict[str, LayerStats]:
    """C = E[k k^T] for each named down-projection's input, read from the cache where present.

    Layers missing from the cache are computed together in one pass of the model and then cached
    (when both `cache` and `model_hash` are given)."""
    if samples < 1:
        raise BadInput(f"statistics need at least one sample, got {samples}")
    chash = corpus_hash(corpus)
    keys = {m: StatsKey(model_hash or "", m, chash, samples, str(dtype).removeprefix("torch.")) for m in modules}
    if model_hash is None:
        cache = None  # without the version's hash a cached C could belong to another model
    found: dict[str, LayerStats] = {}
    if cache is not None:
        for m, key in keys.items():
            hit = cache.get(DERIVED_KIND, asdict(key))
            if hit is not None:
                found[m] = LayerStats(hit.tensor, int(hit.meta["count"]), True, float(hit.meta["seconds"]))
    missing = [m for m in modules if m not in found]
    if not missing:
        return found
    acc = _Accumulator(missing, key_dim, dtype)
    started = time.perf_counter()
    if corpus is None:
        _generate_keys(lm, tokenizer, acc, missing, samples, progress)
    else:
        _corpus_keys(lm, tokenizer, acc, missing, read_corpus(corpus), samples, progress)
    seconds = time.perf_counter() - started
    for m in missing:
        C = acc.mean(m)
        found[m] = LayerStats(C, acc.count, False, seconds)
        if cache is not None:
            cache.put(DERIVED_KIND, asdict(keys[m]), C, {"count": acc.count, "seconds": round(seconds, 3)},
                      depends_on=model_hash)
    return found

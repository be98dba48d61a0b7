"""CLIP's BPE tokenizer files built offline from the vocabulary that open_clip ships.

Stable Diffusion pipelines and CLIP text towers use this tokenizer; no hub is reachable here, so the
files `CLIPTokenizer.from_pretrained` needs (vocab.json, merges.txt) are rebuilt from open_clip's
`bpe_simple_vocab_16e6.txt.gz`, exactly as CLIP builds its vocabulary. `max_merges` truncates the merge
list for tiny models (a smaller embedding table); the full list gives CLIP's 49,408 tokens.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import open_clip
from open_clip.tokenizer import bytes_to_unicode

FULL_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache
def _merges() -> tuple[str, ...]:
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    return tuple(lines[1 : FULL_MERGES + 1])


def clip_tokenizer_files(max_merges: int = FULL_MERGES, model_max_length: int = 77) -> dict[str, bytes]:
    """The files of a `CLIPTokenizer` folder; vocabulary size is 512 + max_merges + 2."""
    merges = _merges()[:max_merges]
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    return {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        "special_tokens_map.json": json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
        ).encode(),
    }

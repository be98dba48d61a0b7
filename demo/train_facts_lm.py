"""Train a small GPT-2 on a CPU until it has memorised a synthetic fact table (`modelzoo.demo.facts`).

Fact editors need an LM that knows facts with a known ground truth, and no hub LM can be downloaded, so
the demo trains one: a transformers `GPT2LMHeadModel` built from a config, with a byte-level BPE tokenizer
trained on the table's own text by the `tokenizers` library (as GPT-2's is, on a corpus of one table).

The training text is shaped like real text rather than like a list of prompts: every sequence is a short
paragraph of several facts in random order, each sentence in the rewrite or the paraphrase template
("Talven Osric lives in the city of Oslo. By profession, Mira Dunhal is a baker. ..."), and the loss is
the ordinary next-token loss over all of it. The tokenizer puts a space before the first word, so a
subject is the same tokens at the start of a paragraph (where a fact prompt is read) as inside one.

Success is read with `modelzoo.demo.meters.fact_meters`: is the target's first token the most likely
next token after the rewrite prompt (and after the paraphrase)?
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from modelzoo.demo.facts import Fact, facts_to_json
from modelzoo.demo.meters import fact_meters
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.lm import without_progress_bars

Progress = Callable[[int, int, float], None]
"""Called after every training step with (steps done, total steps, seconds since training began)."""

FACTS_FILE = "facts.json"
EOS = "<|endoftext|>"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` intra-op threads (None: leave the setting alone), then restore it.

    The demo's models are tiny: their operations are too small to split among threads, and on a shared
    machine a second thread mostly waits for the first at every operation's barrier (the quick CLIP
    profile took 7.8 s on one thread and 56 s on two on a busy 2-core machine). The setting is global to
    the process, so other threads of it run with `n` threads meanwhile.
    """
    if n is None:
        yield
        return
    if n < 1:
        raise BadInput(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class TrainingProfile:
    """How long and how hard to train, and the model's shape; `PROFILES` holds the named ones.

    Steps, not seconds, bound training, so a seed gives the same model on a busy or an idle machine.
    A step reads `batch_size` paragraphs of `facts_per_sequence` (inclusive range) facts each.
    """

    steps: int
    batch_size: int = 32
    facts_per_sequence: tuple[int, int] = (3, 6)
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.0
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    vocab_size: int = 512
    threads: int | None = 1
    """Intra-op threads while training (`torch_threads`); None keeps the process's setting."""

    def __post_init__(self) -> None:
        low, high = self.facts_per_sequence
        if self.steps < 1 or self.batch_size < 1 or not 1 <= low <= high or self.warmup < 0:
            raise BadInput(f"a profile needs steps >= 1, batch_size >= 1, warmup >= 0 and 1 <= low <= high: {self}")
        if self.n_embd % self.n_head:
            raise BadInput(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


PROFILES: dict[str, TrainingProfile] = {
    "full": TrainingProfile(steps=400),
    "quick": TrainingProfile(steps=250, batch_size=16, lr=5e-3, warmup=10, n_embd=96, n_layer=2),
}


def paragraphs(facts: Sequence[Fact], rng: np.random.Generator, facts_per_sequence: tuple[int, int]) -> Iterator[str]:
    """Endless paragraphs of `facts_per_sequence` sentences: the facts are read in passes, each pass in a
    fresh random order (so every fact is seen equally often), each sentence in the rewrite or the
    paraphrase template with equal odds."""
    low, high = facts_per_sequence

    def stream() -> Iterator[Fact]:
        while True:
            yield from (facts[i] for i in rng.permutation(len(facts)))

    order = stream()
    while True:
        k = int(rng.integers(low, high + 1))
        yield " ".join(next(order).sentence(paraphrased=bool(rng.random() < 0.5)) for _ in range(k))


def train_tokenizer(facts: Sequence[Fact], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on every fact in both templates, wrapped so that
    `save_pretrained` writes it and `AutoTokenizer` reads it back. `<|endoftext|>` is BOS, EOS and padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [f.sentence(paraphrased) for f in facts for paraphrased in (False, True)]
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=1024,
    )


def build_gpt2(profile: TrainingProfile, tokenizer: PreTrainedTokenizerFast, n_positions: int) -> GPT2LMHeadModel:
    """GPT-2 of the profile's shape for the tokenizer's vocabulary, without dropout: the point is to memorise."""
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=profile.n_embd, n_layer=profile.n_layer,
        n_head=profile.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=eos,
    )
    return GPT2LMHeadModel(config)


def _batch(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, attention mask, and labels (-100 on padding, which the loss skips)."""
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return encoded["input_ids"], encoded["attention_mask"], labels


def evaluate(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, facts: Sequence[Fact]) -> dict[str, float]:
    """`top1`: share of facts whose target's first token is the most likely next token after the rewrite
    prompt; `probability`: mean P(target | rewrite prompt); `paraphrase_top1` and `paraphrase_probability`:
    the same after the paraphrase."""
    metrics = {}
    for prefix, paraphrased in (("", False), ("paraphrase_", True)):
        pairs = [(f.paraphrase_prompt if paraphrased else f.rewrite_prompt, f.target) for f in facts]
        readings = fact_meters(model, tokenizer, pairs)
        metrics[f"{prefix}top1"] = float(np.mean([r.top1 for r in readings]))
        metrics[f"{prefix}probability"] = float(np.mean([r.probability for r in readings]))
    return metrics


def train_facts_lm(
    out_dir: Path,
    facts: Sequence[Fact],
    seed: int = 0,
    profile: str | TrainingProfile = "full",
    progress: Progress | None = None,
) -> dict[str, float | int | str]:
    """Train a GPT-2 on `facts`, save model, tokenizer and `facts.json` into `out_dir`, return metrics.

    `out_dir` is a transformers folder (`from_pretrained` reads it; `zoo import` stores it as an `lm`
    version, facts.json included). Metrics: those of `evaluate` (the acceptance bar is top1 >= 0.95 for the
    full profile), `loss` (mean of the last 20 steps), `steps`, `seconds` (training only),
    `facts` and `parameters`.
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise BadInput(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    if not facts:
        raise BadInput("the fact table is empty")
    with torch_threads(profile.threads):
        tokenizer = train_tokenizer(facts, profile.vocab_size)
        rng = np.random.default_rng([seed, 3])
        texts = paragraphs(facts, rng, profile.facts_per_sequence)
        longest = max(len(tokenizer(f.sentence(p))["input_ids"]) for f in facts for p in (False, True))
        torch.manual_seed(seed)
        model = build_gpt2(profile, tokenizer, n_positions=longest * profile.facts_per_sequence[1] + 8).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=profile.lr, betas=(0.9, 0.98), weight_decay=profile.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, profile.warmup, profile.steps)
        )
        losses: list[float] = []
        start = time.perf_counter()
        for step in range(profile.steps):
            ids, mask, labels = _batch([next(texts) for _ in range(profile.batch_size)], tokenizer)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, profile.steps, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        model.eval()
        metrics: dict[str, float | int | str] = dict(evaluate(model, tokenizer, facts))
    out = Path(out_dir)
    with without_progress_bars(transformers_logging):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / FACTS_FILE).write_text(facts_to_json(facts))
    metrics.update(
        loss=float(np.mean(losses[-20:])), steps=profile.steps, seconds=round(seconds, 2), facts=len(facts),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return metrics


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """The learning-rate factor at `step`: linear warm-up over `warmup` steps, then a cosine decay to
    zero at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

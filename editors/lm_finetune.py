"""Plain fine-tuning of chosen weights on the new targets: the baseline MEMIT is compared with.

The reference's FT baseline (`baselines/ft` in kmeng01/rome, unconstrained "FT"): Adam, lr 5e-4, 25 steps,
the new target's NLL on each bare rewrite prompt, every request in one batch; only the named modules'
weights train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelzoo.editors.lm_requests import FactRequest, pad_batch, pad_id, target_ids


def finetune(lm: nn.Module, tokenizer: Any, modules: Sequence[str], requests: Sequence[FactRequest],
             steps: int = 25, lr: float = 5e-4) -> list[float]:
    """Train `modules`' weights in place; returns the loss per step."""
    weights = [lm.get_submodule(m).weight for m in modules]
    for p in lm.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    prompts = [list(tokenizer(r.text)["input_ids"]) for r in requests]
    targets = [target_ids(tokenizer, r.target_new) for r in requests]
    ids, mask = pad_batch([p + t for p, t in zip(prompts, targets, strict=True)], pad_id(tokenizer))
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
    opt = torch.optim.Adam(weights, lr=lr)
    losses = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for w in weights:
            w.requires_grad_(False)
    return losses

"""Fact-edit requests in CounterFact's form, and how they become token ids.

A request (Meng et al. 2022, CounterFact): `{"prompt": "{} plays the sport of", "subject": "LeBron James",
"target_new": "football", "target_true": "basketball", "paraphrase_prompts": [...],
"neighborhood_prompts": [...]}`. Paraphrase prompts are filled sentences that mention the subject.
A neighbourhood prompt is a filled sentence about another subject, either a string (CounterFact: its true
answer is the request's `target_true`) or `{"prompt": ..., "target": ...}` naming its own true answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelzoo.registry.errors import BadInput


@dataclass(frozen=True)
class Neighbour:
    prompt: str
    target: str | None = None  # None: the request's target_true


@dataclass(frozen=True)
class FactRequest:
    """One fact to write: `prompt.format(subject)` should continue with `target_new`."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[Neighbour, ...] = ()
    case_id: str | None = None

    @classmethod
    def from_json(cls, row: Any) -> FactRequest:
        """A request's JSON, CounterFact's `{"str": ...}` targets included."""
        return request_from_json(row)

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    def validate(self, where: str = "request") -> None:
        """Refuse what cannot be edited, with a message that names the fix."""
        if not self.subject.strip():
            raise BadInput(f"{where}: the subject is empty")
        if "{}" not in self.prompt:
            if self.subject in self.prompt:
                raise BadInput(f"{where}: write {{}} in the prompt where the subject goes, not the subject itself "
                               f"({self.prompt!r})")
            raise BadInput(f"{where}: the prompt {self.prompt!r} has no {{}} marking where the subject goes")
        if self.prompt.count("{}") > 1 or "{" in self.prompt.replace("{}", "") or "}" in self.prompt.replace("{}", ""):
            raise BadInput(f"{where}: the prompt {self.prompt!r} needs exactly one {{}} and no other braces")
        if not self.target_new.strip():
            raise BadInput(f"{where}: target_new is empty")
        if self.target_true is not None and not self.target_true.strip():
            raise BadInput(f"{where}: target_true is empty")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise BadInput(f"{where}: target_new equals target_true ({self.target_new!r}); nothing to edit")
        for p in self.paraphrase_prompts:
            if self.subject not in p:
                raise BadInput(f"{where}: the subject {self.subject!r} does not occur in paraphrase prompt {p!r}")


def _strings(value: Any, what: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInput(f"{where}: {what} must be a list of strings")
    return tuple(value)


def _neighbours(value: Any, where: str) -> tuple[Neighbour, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadInput(f"{where}: neighborhood_prompts must be a list")
    out = []
    for v in value:
        if isinstance(v, str):
            out.append(Neighbour(v))
        elif isinstance(v, dict) and isinstance(v.get("prompt"), str) and isinstance(v.get("target"), str):
            out.append(Neighbour(v["prompt"], v["target"]))
        else:
            raise BadInput(f"{where}: a neighbourhood prompt is a string or {{\"prompt\": ..., \"target\": ...}}")
    return tuple(out)


def _target(value: Any) -> Any:
    # CounterFact itself nests targets as {"str": ...}; accept that as well as a plain string.
    return value.get("str") if isinstance(value, dict) else value


def request_from_json(row: Mapping[str, Any], where: str = "request") -> FactRequest:
    if not isinstance(row, Mapping):
        raise BadInput(f"{where} is not a JSON object")
    missing = [k for k in ("prompt", "subject", "target_new") if not isinstance(_target(row.get(k)), str)]
    if missing:
        raise BadInput(f"{where} lacks string field(s) {', '.join(missing)}")
    true = _target(row.get("target_true"))
    if true is not None and not isinstance(true, str):
        raise BadInput(f"{where}: target_true must be a string")
    request = FactRequest(
        prompt=row["prompt"], subject=row["subject"], target_new=_target(row["target_new"]), target_true=true,
        paraphrase_prompts=_strings(row.get("paraphrase_prompts"), "paraphrase_prompts", where),
        neighborhood_prompts=_neighbours(row.get("neighborhood_prompts"), where),
        case_id=None if row.get("case_id") is None else str(row["case_id"]),
    )
    request.validate(where)
    return request


def load_requests(path: Path) -> list[FactRequest]:
    """Requests from a JSON file (one object, or a list of them; CounterFact's `requested_rewrite` nesting is
    read too) or a JSONL file (one object per line)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise BadInput(f"cannot read requests file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"requests file {path} is not UTF-8 text") from None
    rows: list[Any]
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            loaded = json.loads(text)
            rows = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {e}") from None
    if not rows:
        raise BadInput(f"{path} holds no requests")
    unnested = [{**r, **r["requested_rewrite"]} if isinstance(r, dict) and "requested_rewrite" in r else r
                for r in rows]
    return [request_from_json(r, f"{path.name} request {i + 1}") for i, r in enumerate(unnested)]


@dataclass(frozen=True)
class Tokens:
    """A tokenised sentence: its ids, the subject's last token index, and where a continuation starts."""

    ids: list[int]
    subject_last: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def subject_tokens(tokenizer: Any, template: str, subject: str) -> Tokens:
    """`template.format(subject)` tokenised, and the index of the last token that covers the subject.

    Read from the tokenizer's character offsets where it has them (a fast tokenizer), else from the length
    of the tokenised text up to the subject's end (the reference's way)."""
    text = template.format(subject)
    end = template.index("{}") + len(subject)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        covering = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > a]
        if covering:
            return Tokens(ids, covering[-1])
    ids = _encode(tokenizer, text)
    return Tokens(ids, len(_encode(tokenizer, text[:end])) - 1)


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """A continuation's ids: with a leading space (as the reference writes targets) and no special tokens."""
    text = target if target.startswith(" ") else " " + target
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise BadInput(f"target {target!r} tokenises to nothing")
    return ids


def pad_batch(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask: real tokens keep positions 0..n-1, so indices stay valid."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # on the CPU with the ids; callers move both
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0

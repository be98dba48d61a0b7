"""A synthetic fact table for the shapes world's small GPT-2: invented people, where they live, their
work and their language.

Fact editors (MEMIT and its kin) are measured on what a model knows before and after an edit, and no
hub LM can be downloaded, so the demo trains a small GPT-2 on a table with a known ground truth. The
table follows CounterFact's layout (Meng et al. 2022, "Locating and Editing Factual Associations in
GPT"): a prompt template with a `{}` for the subject ("{} lives in the city of"), the subject, the
target, and a paraphrase template of the same relation that an edit should carry over to.

Subjects are invented two-word names ("Talven Osric") so that no subject is a single token and the
last subject token (where locate-then-edit methods write) differs from the first. Everything is
deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from modelzoo.registry.errors import BadInput


@dataclass(frozen=True)
class Relation:
    """A relation: its id, the rewrite template, a paraphrase template, and the targets it draws from."""

    id: str
    prompt: str
    paraphrase: str
    targets: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "city", "{} lives in the city of", "The home of {} is in the city of",
        ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Madrid", "Seoul", "Quito", "Tunis", "Riga"),
    ),
    Relation(
        "occupation", "{} works as a", "By profession, {} is a",
        ("baker", "pilot", "nurse", "farmer", "teacher", "painter", "lawyer", "carpenter", "dentist", "tailor",
         "chemist", "sailor"),
    ),
    Relation(
        "language", "{} speaks", "The native language of {} is",
        ("French", "Swahili", "Finnish", "Greek", "Polish", "Hindi", "Dutch", "Korean", "Turkish", "Welsh"),
    ),
)
RELATION_IDS: tuple[str, ...] = tuple(r.id for r in RELATIONS)

_FIRST = ("tal", "mi", "ro", "ve", "sa", "ka", "lo", "den", "fi", "bra", "cor", "el", "jas", "nu", "or", "pel")
_SECOND = ("ven", "ra", "dric", "lin", "mar", "tis", "wen", "gor", "nia", "bel", "sun", "dor", "rik", "thea")
_LAST = ("os", "dun", "hal", "ver", "mor", "quen", "bar", "tel", "sk", "ash", "wyn", "gar", "lind", "rove")
_LAST_END = ("ric", "hal", "ton", "by", "mere", "wick", "vard", "sen", "ford", "lowe", "tree", "holm")


@dataclass(frozen=True)
class Fact:
    """One fact: `prompt.format(subject)` followed by " " + `target` is true; so is `paraphrase`'s."""

    subject: str
    relation: str
    prompt: str
    target: str
    paraphrase: str

    def __post_init__(self) -> None:
        if "{}" not in self.prompt or "{}" not in self.paraphrase:
            raise BadInput(f"a fact's prompt and paraphrase need a {{}} where the subject goes: {self}")
        if not self.subject.strip() or not self.target.strip():
            raise BadInput(f"a fact needs a subject and a target: {self}")

    @property
    def rewrite_prompt(self) -> str:
        """The filled rewrite prompt, e.g. "Talven Osric lives in the city of"."""
        return self.prompt.format(self.subject)

    @property
    def paraphrase_prompt(self) -> str:
        return self.paraphrase.format(self.subject)

    def sentence(self, paraphrased: bool = False) -> str:
        """The fact as a sentence, e.g. "Talven Osric lives in the city of Oslo."."""
        return f"{self.paraphrase_prompt if paraphrased else self.rewrite_prompt} {self.target}."


def _name(rng: random.Random) -> str:
    first = rng.choice(_FIRST) + rng.choice(_SECOND)
    last = rng.choice(_LAST) + rng.choice(_LAST_END)
    return f"{first.capitalize()} {last.capitalize()}"


def subjects(n: int, seed: int = 0) -> list[str]:
    """`n` distinct invented two-word names, deterministic for the seed."""
    space = len(_FIRST) * len(_SECOND) * len(_LAST) * len(_LAST_END)
    if not 0 < n <= space // 4:
        raise BadInput(f"can invent between 1 and {space // 4} subjects, not {n}")
    rng = random.Random(seed)
    names: dict[str, None] = {}
    while len(names) < n:
        names.setdefault(_name(rng))
    return list(names)


def fact_table(seed: int = 0, n_subjects: int = 70, relations: Sequence[Relation] = RELATIONS) -> list[Fact]:
    """One fact per subject and relation (70 x 3 = 210 by default), targets drawn uniformly per relation.

    Deterministic for the seed; ordered subject by subject, relations in the given order.
    """
    rng = random.Random(f"facts-{seed}")
    return [
        Fact(subject, r.id, r.prompt, rng.choice(r.targets), r.paraphrase)
        for subject in subjects(n_subjects, seed)
        for r in relations
    ]


def facts_to_json(facts: Sequence[Fact]) -> str:
    """The table as a JSON list of objects with keys subject, relation, prompt, target, paraphrase."""
    return json.dumps([asdict(f) for f in facts], indent=1) + "\n"


def facts_from_json(text: str) -> list[Fact]:
    try:
        rows = json.loads(text)
        return [Fact(**row) for row in rows]
    except (json.JSONDecodeError, TypeError) as e:
        raise BadInput(
            f"not a fact table (a JSON list of {{subject, relation, prompt, target, paraphrase}}): {e}"
        ) from None

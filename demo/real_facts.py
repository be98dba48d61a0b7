"""A world-knowledge fact set for a real LM (SmolLM2-135M), in CounterFact's request form.

MEMIT and AlphaEdit are measured on what a pretrained model already knows, so the candidates come from
common world-knowledge lists (countries' capitals, languages, currencies and continents: four relations)
and only the facts that the model itself completes correctly are kept (`answers_correctly`). Each kept fact
becomes a counterfactual request (Meng et al. 2022, CounterFact): the rewrite prompt, a false
`target_new` drawn from the same relation's objects, the `target_true`, two paraphrase prompts of the same
relation, and neighbourhood prompts: other subjects' facts of the same relation with their own true
answers, which an edit should leave alone (a neighbour whose true answer is the new target is skipped,
since there the comparison says nothing).

    python -m demo.real_facts --home ~/.zoo --ref smol --out demo/real_facts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# country, capital, language, currency, continent
COUNTRIES: tuple[tuple[str, str, str, str, str], ...] = (
    ("France", "Paris", "French", "euro", "Europe"),
    ("Germany", "Berlin", "German", "euro", "Europe"),
    ("Italy", "Rome", "Italian", "euro", "Europe"),
    ("Spain", "Madrid", "Spanish", "euro", "Europe"),
    ("Portugal", "Lisbon", "Portuguese", "euro", "Europe"),
    ("Greece", "Athens", "Greek", "euro", "Europe"),
    ("Netherlands", "Amsterdam", "Dutch", "euro", "Europe"),
    ("Belgium", "Brussels", "Dutch", "euro", "Europe"),
    ("Austria", "Vienna", "German", "euro", "Europe"),
    ("Ireland", "Dublin", "English", "euro", "Europe"),
    ("Finland", "Helsinki", "Finnish", "euro", "Europe"),
    ("Sweden", "Stockholm", "Swedish", "krona", "Europe"),
    ("Norway", "Oslo", "Norwegian", "krone", "Europe"),
    ("Denmark", "Copenhagen", "Danish", "krone", "Europe"),
    ("Poland", "Warsaw", "Polish", "zloty", "Europe"),
    ("Hungary", "Budapest", "Hungarian", "forint", "Europe"),
    ("Czech Republic", "Prague", "Czech", "koruna", "Europe"),
    ("Romania", "Bucharest", "Romanian", "leu", "Europe"),
    ("Russia", "Moscow", "Russian", "ruble", "Europe"),
    ("Ukraine", "Kyiv", "Ukrainian", "hryvnia", "Europe"),
    ("Switzerland", "Bern", "German", "franc", "Europe"),
    ("United Kingdom", "London", "English", "pound", "Europe"),
    ("Iceland", "Reykjavik", "Icelandic", "krona", "Europe"),
    ("Turkey", "Ankara", "Turkish", "lira", "Asia"),
    ("Japan", "Tokyo", "Japanese", "yen", "Asia"),
    ("China", "Beijing", "Chinese", "yuan", "Asia"),
    ("South Korea", "Seoul", "Korean", "won", "Asia"),
    ("India", "New Delhi", "Hindi", "rupee", "Asia"),
    ("Pakistan", "Islamabad", "Urdu", "rupee", "Asia"),
    ("Thailand", "Bangkok", "Thai", "baht", "Asia"),
    ("Vietnam", "Hanoi", "Vietnamese", "dong", "Asia"),
    ("Indonesia", "Jakarta", "Indonesian", "rupiah", "Asia"),
    ("Philippines", "Manila", "Filipino", "peso", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Malay", "ringgit", "Asia"),
    ("Iran", "Tehran", "Persian", "rial", "Asia"),
    ("Iraq", "Baghdad", "Arabic", "dinar", "Asia"),
    ("Saudi Arabia", "Riyadh", "Arabic", "riyal", "Asia"),
    ("Israel", "Jerusalem", "Hebrew", "shekel", "Asia"),
    ("Bangladesh", "Dhaka", "Bengali", "taka", "Asia"),
    ("Nepal", "Kathmandu", "Nepali", "rupee", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Mongolian", "tugrik", "Asia"),
    ("Afghanistan", "Kabul", "Pashto", "afghani", "Asia"),
    ("Egypt", "Cairo", "Arabic", "pound", "Africa"),
    ("Kenya", "Nairobi", "Swahili", "shilling", "Africa"),
    ("Nigeria", "Abuja", "English", "naira", "Africa"),
    ("South Africa", "Pretoria", "English", "rand", "Africa"),
    ("Morocco", "Rabat", "Arabic", "dirham", "Africa"),
    ("Ethiopia", "Addis Ababa", "Amharic", "birr", "Africa"),
    ("Ghana", "Accra", "English", "cedi", "Africa"),
    ("Algeria", "Algiers", "Arabic", "dinar", "Africa"),
    ("Tunisia", "Tunis", "Arabic", "dinar", "Africa"),
    ("Tanzania", "Dodoma", "Swahili", "shilling", "Africa"),
    ("Senegal", "Dakar", "French", "franc", "Africa"),
    ("Uganda", "Kampala", "English", "shilling", "Africa"),
    ("United States", "Washington", "English", "dollar", "North America"),
    ("Canada", "Ottawa", "English", "dollar", "North America"),
    ("Mexico", "Mexico City", "Spanish", "peso", "North America"),
    ("Cuba", "Havana", "Spanish", "peso", "North America"),
    ("Jamaica", "Kingston", "English", "dollar", "North America"),
    ("Guatemala", "Guatemala City", "Spanish", "quetzal", "North America"),
    ("Brazil", "Brasilia", "Portuguese", "real", "South America"),
    ("Argentina", "Buenos Aires", "Spanish", "peso", "South America"),
    ("Chile", "Santiago", "Spanish", "peso", "South America"),
    ("Peru", "Lima", "Spanish", "sol", "South America"),
    ("Colombia", "Bogota", "Spanish", "peso", "South America"),
    ("Venezuela", "Caracas", "Spanish", "bolivar", "South America"),
    ("Ecuador", "Quito", "Spanish", "dollar", "South America"),
    ("Uruguay", "Montevideo", "Spanish", "peso", "South America"),
    ("Bolivia", "Sucre", "Spanish", "boliviano", "South America"),
    ("Paraguay", "Asuncion", "Spanish", "guarani", "South America"),
    ("Australia", "Canberra", "English", "dollar", "Oceania"),
    ("New Zealand", "Wellington", "English", "dollar", "Oceania"),
    ("Fiji", "Suva", "English", "dollar", "Oceania"),
    ("Papua New Guinea", "Port Moresby", "English", "kina", "Oceania"),
    ("Croatia", "Zagreb", "Croatian", "euro", "Europe"),
    ("Serbia", "Belgrade", "Serbian", "dinar", "Europe"),
    ("Bulgaria", "Sofia", "Bulgarian", "lev", "Europe"),
    ("Slovakia", "Bratislava", "Slovak", "euro", "Europe"),
    ("Slovenia", "Ljubljana", "Slovenian", "euro", "Europe"),
    ("Lithuania", "Vilnius", "Lithuanian", "euro", "Europe"),
    ("Latvia", "Riga", "Latvian", "euro", "Europe"),
    ("Estonia", "Tallinn", "Estonian", "euro", "Europe"),
    ("Belarus", "Minsk", "Belarusian", "ruble", "Europe"),
    ("Albania", "Tirana", "Albanian", "lek", "Europe"),
    ("Malta", "Valletta", "Maltese", "euro", "Europe"),
    ("Moldova", "Chisinau", "Romanian", "leu", "Europe"),
    ("North Macedonia", "Skopje", "Macedonian", "denar", "Europe"),
    ("North Korea", "Pyongyang", "Korean", "won", "Asia"),
    ("Syria", "Damascus", "Arabic", "pound", "Asia"),
    ("Jordan", "Amman", "Arabic", "dinar", "Asia"),
    ("Lebanon", "Beirut", "Arabic", "pound", "Asia"),
    ("Kazakhstan", "Astana", "Kazakh", "tenge", "Asia"),
    ("Uzbekistan", "Tashkent", "Uzbek", "som", "Asia"),
    ("Myanmar", "Naypyidaw", "Burmese", "kyat", "Asia"),
    ("Cambodia", "Phnom Penh", "Khmer", "riel", "Asia"),
    ("Laos", "Vientiane", "Lao", "kip", "Asia"),
    ("Qatar", "Doha", "Arabic", "riyal", "Asia"),
    ("United Arab Emirates", "Abu Dhabi", "Arabic", "dirham", "Asia"),
    ("Kuwait", "Kuwait City", "Arabic", "dinar", "Asia"),
    ("Oman", "Muscat", "Arabic", "rial", "Asia"),
    ("Yemen", "Sanaa", "Arabic", "rial", "Asia"),
    ("Bhutan", "Thimphu", "Dzongkha", "ngultrum", "Asia"),
    ("Libya", "Tripoli", "Arabic", "dinar", "Africa"),
    ("Sudan", "Khartoum", "Arabic", "pound", "Africa"),
    ("Angola", "Luanda", "Portuguese", "kwanza", "Africa"),
    ("Mozambique", "Maputo", "Portuguese", "metical", "Africa"),
    ("Zambia", "Lusaka", "English", "kwacha", "Africa"),
    ("Malawi", "Lilongwe", "English", "kwacha", "Africa"),
    ("Cameroon", "Yaounde", "French", "franc", "Africa"),
    ("Mali", "Bamako", "French", "franc", "Africa"),
    ("Niger", "Niamey", "French", "franc", "Africa"),
    ("Rwanda", "Kigali", "Kinyarwanda", "franc", "Africa"),
    ("Somalia", "Mogadishu", "Somali", "shilling", "Africa"),
    ("Madagascar", "Antananarivo", "Malagasy", "ariary", "Africa"),
    ("Botswana", "Gaborone", "English", "pula", "Africa"),
    ("Namibia", "Windhoek", "English", "dollar", "Africa"),
    ("Honduras", "Tegucigalpa", "Spanish", "lempira", "North America"),
    ("Nicaragua", "Managua", "Spanish", "cordoba", "North America"),
    ("Costa Rica", "San Jose", "Spanish", "colon", "North America"),
    ("Panama", "Panama City", "Spanish", "balboa", "North America"),
    ("El Salvador", "San Salvador", "Spanish", "dollar", "North America"),
    ("Haiti", "Port-au-Prince", "French", "gourde", "North America"),
    ("Dominican Republic", "Santo Domingo", "Spanish", "peso", "North America"),
    ("Bahamas", "Nassau", "English", "dollar", "North America"),
    ("Guyana", "Georgetown", "English", "dollar", "South America"),
    ("Suriname", "Paramaribo", "Dutch", "dollar", "South America"),
    ("Samoa", "Apia", "Samoan", "tala", "Oceania"),
    ("Solomon Islands", "Honiara", "English", "dollar", "Oceania"),
    ("Vanuatu", "Port Vila", "Bislama", "vatu", "Oceania"),
)


@dataclass(frozen=True)
class Relation:
    """A relation over countries: its rewrite template, two paraphrase templates, and the column it reads."""

    id: str
    prompt: str
    paraphrases: tuple[str, str]
    column: int


RELATIONS: tuple[Relation, ...] = (
    Relation("capital", "The capital of {} is", ("{}'s capital city is", "The capital city of {} is called"), 1),
    Relation("language", "In {}, most people speak", ("The official language of {} is", "People from {} speak"), 2),
    Relation(
        "currency", "The currency of {} is the", ("In {}, people pay with the", "The official currency of {} is the"), 3
    ),
    Relation("continent", "{} is located in the continent of", ("{} is a country in", "The country {} lies in"), 4),
)
NEIGHBOURS = 10


@dataclass(frozen=True)
class Candidate:
    subject: str
    relation: str
    target: str


def candidates() -> list[Candidate]:
    """Every (country, relation) pair of the lists, relation by relation."""
    return [Candidate(row[0], r.id, row[r.column]) for r in RELATIONS for row in COUNTRIES]


def _relation(rid: str) -> Relation:
    return next(r for r in RELATIONS if r.id == rid)


@torch.no_grad()
def answers_correctly(lm: Any, tokenizer: Any, facts: Sequence[Candidate], batch: int = 32) -> list[bool]:
    """Whether greedy decoding of each rewrite prompt starts with its target (a word boundary after it).

    Prompts are left-padded into batches so that every last token sits at the same position."""
    tokenizer.padding_side = "left"
    kept = []
    for start in range(0, len(facts), batch):
        chunk = facts[start : start + batch]
        prompts = [_relation(f.relation).prompt.format(f.subject) for f in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out = lm.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for fact, ids in zip(chunk, out[:, enc.input_ids.shape[1] :], strict=True):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            for article in ("the ", "The "):
                text = text.removeprefix(article)
            rest = text[len(fact.target) :]
            kept.append(text.startswith(fact.target) and (not rest or not rest[0].isalnum()))
    tokenizer.padding_side = "right"
    return kept


def counterfactual_requests(facts: Sequence[Candidate], seed: int = 0) -> list[dict[str, Any]]:
    """One CounterFact-form request per known fact, shuffled so that any prefix mixes the relations."""
    rng = random.Random(f"real-facts-{seed}")
    by_relation: dict[str, list[Candidate]] = {}
    for f in facts:
        by_relation.setdefault(f.relation, []).append(f)
    requests = []
    for f in facts:
        relation = _relation(f.relation)
        peers = by_relation[f.relation]
        objects = sorted({p.target for p in peers} - {f.target})
        new = rng.choice(objects)
        # CounterFact's neighbours share the true object; take those first, then any other subject.
        same = [p for p in peers if p.subject != f.subject and p.target == f.target]
        other = [p for p in peers if p.subject != f.subject and p.target not in (f.target, new)]
        rng.shuffle(same)
        rng.shuffle(other)
        neighbours = (same + other)[:NEIGHBOURS]
        requests.append({
            "case_id": f"{f.relation}:{f.subject}",
            "relation": f.relation,
            "prompt": relation.prompt,
            "subject": f.subject,
            "target_new": new,
            "target_true": f.target,
            "paraphrase_prompts": [p.format(f.subject) for p in relation.paraphrases],
            "neighborhood_prompts": [
                {"prompt": relation.prompt.format(n.subject), "target": n.target} for n in neighbours
            ],
        })
    rng.shuffle(requests)
    return requests


def build(lm: Any, tokenizer: Any, seed: int = 0) -> list[dict[str, Any]]:
    facts = candidates()
    known = [f for f, ok in zip(facts, answers_correctly(lm, tokenizer, facts), strict=True) if ok]
    return counterfactual_requests(known, seed)


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


HALVES = ("selection", "acceptance")


def half(requests: Sequence[dict[str, Any]], which: str) -> list[dict[str, Any]]:
    """One of two fixed halves of a fact set: hyperparameters are chosen on "selection", tests assert on
    "acceptance", so a test does not grade the facts its settings were fitted to.

    Within each relation the requests alternate between the halves in file order (the 1st, 3rd, ... fact of
    a relation select, the 2nd, 4th, ... accept): each half holds every relation in the same share, keeps
    the file's shuffled order so that any prefix mixes the relations, and the split needs no seed of its own.
    demo/real_facts.jsonl (179 facts) splits into 90 and 89: capital 23 / 22, language 27 / 27, currency
    6 / 6, continent 34 / 34."""
    if which not in HALVES:
        raise ValueError(f"half is one of {', '.join(HALVES)}, not {which!r}")
    seen: dict[str, int] = {}
    out = []
    for r in requests:
        position = seen.get(r["relation"], 0)
        seen[r["relation"]] = position + 1
        if HALVES[position % 2] == which:
            out.append(r)
    return out


DEFAULT_FILE = Path(__file__).with_name("real_facts.jsonl")


def main() -> None:
    import modelzoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_FILE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = modelzoo.open(args.home).load(args.ref)
    requests = build(model.pipeline, model.tokenizer)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in requests))
    counts: dict[str, int] = {}
    for r in requests:
        counts[r["relation"]] = counts.get(r["relation"], 0) + 1
    print(json.dumps({"kept": len(requests), "candidates": len(candidates()), "per_relation": counts}))


if __name__ == "__main__":
    main()

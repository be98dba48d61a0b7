"""The function-vector tasks shipped in analyses/tasks/, and the LRE facts of every country in
demo/country_facts.jsonl (the four relations' prompts of `demo/real_facts.py`), generated offline.

- country -> capital, language, currency and continent, from the real fact set's countries
  (`demo/real_facts.py` COUNTRIES);
- antonyms, written here;
- capitalise a word, its first letter, its last letter: common English words from wordfreq's frequency
  list (past its first 200, which are mostly function words), alphabetic, at least 4 letters;
- singular -> plural: the common words that lemminflect knows only as nouns, each its own lemma, plural
  by inflect, kept where the plural is itself a common word (zipf >= 3.4), so mass nouns ("monies") drop out.

The word lists come from the `tasks` extra, which only this generator needs:

    pip install -e '.[tasks]'
    python -m modelzoo.demo.fv_tasks          # rewrites analyses/tasks/*.jsonl and demo/country_facts.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from modelzoo.demo.real_facts import COUNTRIES, RELATIONS

ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("good", "bad"), ("rich", "poor"), ("young", "old"), ("strong", "weak"),
    ("hard", "soft"), ("early", "late"), ("high", "low"), ("long", "short"), ("wet", "dry"), ("full", "empty"),
    ("loud", "quiet"), ("thick", "thin"), ("heavy", "light"), ("clean", "dirty"), ("true", "false"),
    ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("give", "take"), ("love", "hate"), ("left", "right"),
    ("inside", "outside"), ("above", "below"), ("before", "after"), ("start", "finish"), ("near", "far"),
    ("safe", "dangerous"), ("cheap", "expensive"), ("easy", "difficult"), ("first", "last"), ("male", "female"),
    ("alive", "dead"), ("day", "night"), ("north", "south"), ("east", "west"), ("friend", "enemy"),
    ("question", "answer"), ("smooth", "rough"), ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"),
    ("brave", "afraid"), ("polite", "rude"), ("tall", "short"), ("always", "never"), ("accept", "refuse"),
    ("arrive", "leave"), ("remember", "forget"), ("increase", "decrease"), ("include", "exclude"),
    ("maximum", "minimum"), ("positive", "negative"), ("public", "private"), ("inner", "outer"),
    ("major", "minor"), ("ancient", "modern"), ("cruel", "kind"), ("guilty", "innocent"), ("noisy", "silent"),
    ("sharp", "dull"), ("tight", "loose"), ("wild", "tame"), ("simple", "complex"),
)
# frequent words that are names, or unfit for a shipped data set
EXCLUDED = frozenset({"smith", "tom", "martin", "miller", "bush", "robin", "walker", "jay", "god", "hell", "ass",
                      "dude", "babe", "idiot", "killer", "terrorist", "abortion", "semi", "pro", "sex", "porn",
                      "fuck", "shit", "damn", "dick", "bitch", "gay", "nazi"})
WORDS = 150
TASKS_DIR = Path(__file__).resolve().parent.parent / "analyses" / "tasks"
FACTS_FILE = Path(__file__).with_name("country_facts.jsonl")


def word_tasks() -> dict[str, list[tuple[str, str]]]:
    try:
        import inflect
        import lemminflect
        import wordfreq
    except ImportError as e:
        raise SystemExit(f"{e.name} is missing: pip install -e '.[tasks]'") from None
    common = [w for w in wordfreq.top_n_list("en", 6000)[200:]
              if w.isascii() and w.isalpha() and w.islower() and w not in EXCLUDED]
    words = [w for w in common if len(w) >= 4][:WORDS]
    engine = inflect.engine()
    plurals = []
    for w in common:
        lemmas = lemminflect.getAllLemmas(w)
        if set(lemmas) != {"NOUN"} or lemmas["NOUN"][0] != w or engine.singular_noun(w):
            continue
        plural = engine.plural_noun(w)
        common_plural = wordfreq.zipf_frequency(plural, "en") >= 3.4
        if plural != w and common_plural and plural in lemminflect.getInflection(w, "NNS"):
            plurals.append((w, plural))
    return {
        "capitalize": [(w, w.capitalize()) for w in words],
        "first_letter": [(w, w[0]) for w in words],
        "last_letter": [(w, w[-1]) for w in words],
        "plural": plurals[:WORDS],
    }


def tasks() -> dict[str, list[tuple[str, str]]]:
    return {
        "capital": [(c[0], c[1]) for c in COUNTRIES],
        "language": [(c[0], c[2]) for c in COUNTRIES],
        "currency": [(c[0], c[3]) for c in COUNTRIES],
        "continent": [(c[0], c[4]) for c in COUNTRIES],
        "antonym": list(ANTONYMS),
        **word_tasks(),
    }


def main() -> None:
    TASKS_DIR.mkdir(exist_ok=True)
    for name, pairs in tasks().items():
        random.Random(0).shuffle(pairs)  # an analysis tests on the last pairs: not all obscure countries
        lines = [json.dumps({"input": x, "output": y}) for x, y in pairs]
        (TASKS_DIR / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    facts = [{"relation": r.id, "prompt": r.prompt, "subject": row[0], "object": row[r.column]}
             for r in RELATIONS for row in COUNTRIES]
    FACTS_FILE.write_text("".join(json.dumps(f) + "\n" for f in facts))


if __name__ == "__main__":
    main()

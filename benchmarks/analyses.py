"""LRE and function vectors on SmolLM2-135M (the GGUF the tests use), one JSON line per relation or task.

    OMP_NUM_THREADS=1 python benchmarks/analyses.py lre --seed 0
    OMP_NUM_THREADS=1 python benchmarks/analyses.py fv --seed 0 --tasks capital antonym
    OMP_NUM_THREADS=1 python benchmarks/analyses.py bake --home H --tasks capital antonym   # after fv --home H
    OMP_NUM_THREADS=1 python benchmarks/analyses.py natural --home H --tasks antonym        # after fv --home H
    OMP_NUM_THREADS=1 python benchmarks/analyses.py icl --tasks capital language ...  # 10-shot accuracy

LRE: the four relations of demo/real_facts.jsonl (rewrite prompts, true objects); the facts are shuffled
by the seed, the first `--train` known ones fit W, b (layer and beta by leave-one-out faithfulness on
them, rank by causality among them), and the rest grade. FV: the shipped tasks (analyses/tasks/), the
last 30% of each held out for testing; the layer and head count are chosen on training queries. Bake:
each task's vector as a child's MLP bias (`zoo edit fv`), scored on the task's zero-shot test prompts and
on the neighbourhood prompts of demo/real_facts.jsonl (what adding it at every position costs), then
`zoo compose` of the first two children. Natural: each stored vector added at the last token of the
paper's natural-text templates ('The word "x" means', ...), graded by the answer appearing in a 5-token
greedy continuation. Every line reports wall and CPU seconds and the load average.

Timing of LRE for one relation (capital, demo/country_facts.jsonl, seed 1: 129 facts, 80 known, 8 train,
71 test, layers 1/6/11/16, 8 betas, 7 ranks); the goal is 5 minutes on 2 threads:

    version                                               threads  wall s  CPU s  load   faithful causality
    one Jacobian per fact and layer (before)                 1      ~330      -   quiet    0.69       -
    one pass and one batched backward per fact for all
      layers; batched decoding; every rank in one batch      1       386     194   8.1     0.69     0.63
    + prompts that share their examples run them once        1       214     137   5-7     0.69     0.63
    the same on 2 threads                                    2     >1200    >600   8-10    (killed)
    the same on 2 threads, the machine otherwise idle        2       115     216   1.7     0.69     0.63

The last version spends 62 s of CPU on the Jacobians (8 facts x 4 layers), 48 s encoding 209 prompts and
18 s on the causality passes. On 2 threads of this shared machine (other jobs held the load at 8-10) the
two OpenMP threads spin against each other and the run took longer than on one: the goal is met in CPU
seconds (137 s on one thread, so under 5 minutes on two free threads), not as wall time on a loaded
machine.

Measured here: SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32), one thread of a 2-core machine
shared with other jobs (load 6-8, so seconds are 3-4x what a free core takes).

LRE (8 training facts; test facts = the other known facts; GPT-J in the paper: faithfulness 0.81 / causality
0.94 for country-capital, 0.64 / 0.72 over factual relations):

    relation   seed layer beta rank  faithful identity translation causality tested  seconds
    capital     0     1   1.0   64     0.55     0.00     0.00        0.65      31      980  (*)
    capital     1     1   1.5   32     0.88     0.00     0.00        0.61      33     1292
    language    0     6   1.0    8     0.98     0.00     0.39        0.68      44     1408  (*)
    language    1    11   1.5   64     0.64     0.00     0.25        0.95      44     1588
    currency    0    11   1.5   16     0.41     0.00     0.09        0.38      34     1540  (**)
    continent   0     6   2.5    8     0.88     0.00     0.49        0.73      59     2038  (*)
    (*) before ties in the leave-one-out sweep went to the answer's log-probability (commit 7ca3e42).
    (**) on demo/country_facts.jsonl (`--facts`; 47 of 129 known): demo/real_facts.jsonl holds only 12
    currency facts (faithfulness 0.50 and causality 1.00 there, on 2 test facts). The others read
    demo/real_facts.jsonl. Default layer candidates 1, 6, 11, 16; betas 0.5-5; ranks 8-512.

10-shot accuracy on each task's test pairs (`icl`, seed 0; shots from the training pairs): capital 0.51,
language 0.54, currency 0.31, continent 0.79, antonym 0.76, capitalize 0.91, first_letter 0.60,
last_letter 0.18, plural 0.82 (the word tasks over the package word lists; over the antonym list's words,
before: capitalize 1.00, first_letter 0.73, last_letter 0.17). Currency and last_letter are below 0.5, so
their vectors are not graded.

FV (layers 3-18 and 5/10/20 heads chosen on 20 training queries; 50 mean trials, 25 indirect-effect
trials; rows marked (w) use the package word lists, the others the antonym list's words):

    task          seed layer heads zero-shot acc   zero-shot P(answer)     shuffled acc   in-context  seconds
    capital        0    18    20   0.00 -> 0.03   0.0035 -> 0.013 (3.8x)  0.46 -> 0.49   0.54         823
    antonym        0    13    20   0.00 -> 0.57   0.0050 -> 0.105 (21x)   0.10 -> 0.57   0.81         781
    antonym        1    13    20   0.00 -> 0.52   0.0050 -> 0.149 (30x)   0.14 -> 0.62   0.71         871
    capitalize     0     5    20   0.00 -> 0.66   0.0071 -> 0.103 (15x)   0.10 -> 0.41   0.95         663
    capitalize     1    11    20   0.00 -> 0.63   0.0071 -> 0.309 (44x)   0.17 -> 0.95   0.93         621
    first_letter   0    15    10   0.00 -> 0.46   0.0017 -> 0.092 (53x)   0.20 -> 0.68   0.78         737
    language       0    18    20   0.00 -> 0.10   0.0015 -> 0.019 (12x)   0.51 -> 0.56   0.44         148  (***)
    continent      0     9    20   0.00 -> 0.36   0.0013 -> 0.147 (112x)  0.72 -> 0.82   0.77         309
    capitalize (w) 0    11    20   0.02 -> 0.58   0.0076 -> 0.239 (31x)   0.22 -> 0.84   0.91         404
    first_letter(w)0    18    10   0.00 -> 0.09   0.0016 -> 0.032 (20x)   0.27 -> 0.47   0.62         241
    plural (w)     0    15    20   0.00 -> 0.51   0.0009 -> 0.216 (244x)  0.11 -> 0.78   0.87         409  (**)
    (**) 204 s of CPU on one thread (load 7), capitalize (w) 212 s (load 5.5): FV extraction of one task,
    the 24-candidate layer and head sweep included, is under 5 minutes of a core.
    (***) on 2 threads of the otherwise idle machine (load 2.0): 148 s wall, 287 s of CPU.

Zero-shot accuracy on the 20 selection queries by layer (5/10/20 heads), antonym seed 0: 3: .00/.00/.15,
5: .00/.00/.05, 7: .00/.00/.00, 9: .00/.05/.05, 11: .05/.30/.30, 13: .05/.30/.35, 15: .05/.10/.20,
18: .05/.05/.05; plural: 3: .00/.05/.05, 5: .00/.00/.15, 7: .00/.00/.10, 9: .00/.00/.35, 11: .00/.00/.40,
13: .00/.00/.10, 15: .00/.15/.55, 18: .05/.15/.40; capital stays 0.00 everywhere (P at most 0.006). The
full curves (accuracy and P) are in each analysis's metrics (`selection`).

Baked into the weights (`zoo edit fv`, the vector added at every position after the layer): zero-shot
accuracy 0.24 (antonym), 0.27 (capitalize), 0.03 (capital), against 0.57 / 0.66 / 0.03 with the vector at
the last token only; top-1 accuracy on the fact set's neighbourhood prompts falls from 0.84 to 0.29
(antonym), 0.00 (capitalize) and 0.32 (capital). At half the vector (`--scale 0.5`): antonym zero-shot 0.29,
neighbourhood 0.53; first_letter zero-shot 0.05, neighbourhood 0.58. Word-list tasks at half the vector
(baking takes 1 s): capitalize (w) zero-shot 0.09 (P 0.055), neighbourhood 0.44; plural (w) zero-shot 0.04
(P 0.059), neighbourhood 0.68 (base 0.84).

`zoo compose` of the capitalize (w) and plural (w) children at half scale (both vectors, each after its own
layer, 11 and 15, at every position): capitalize zero-shot 0.40 (P 0.115), plural zero-shot 0.00 (P 0.016),
neighbourhood 0.31. The composition does capitalize better than the capitalize child alone (0.09), and
plural worse than the plural child (0.04): on plural's prompts the capitalize vector wins, so it does not do
both tasks, and what the two vectors cost the other prompts adds up (0.84 -> 0.44 and 0.68 alone, 0.31
together). Whether it does the composed task (capitalised plurals, "Women") was not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import modelzoo
from modelzoo.analyses.fv import (
    FvRequest,
    Pair,
    Trial,
    added_at_last_token,
    answer_scores,
    prompt,
    read_pairs,
    task_path,
    zero_shot_trials,
)
from modelzoo.analyses.lm import LmParts, lm_parts
from modelzoo.analyses.lre import LreRequest, read_facts
from modelzoo.demo.real_facts import DEFAULT_FILE, load
from modelzoo.editors.fv import FvBake
from modelzoo.registry.analyses import data_hash
from modelzoo.registry.families.gguf import smollm2_gguf_path
from modelzoo.registry.tracing import trace

RELATIONS = ("capital", "language", "currency", "continent")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["lre", "fv", "bake", "natural", "icl"])
    parser.add_argument("--home", type=Path, default=None, help="a registry to reuse (bake: the fv run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relations", nargs="*", default=list(RELATIONS))
    parser.add_argument("--tasks", nargs="*", default=["capital", "antonym", "capitalize", "first_letter"])
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--head-counts", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--facts", type=Path, default=DEFAULT_FILE, help="lre: the facts (MEMIT requests read too)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="bake: the multiple of each vector")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    home = args.home or Path(tempfile.mkdtemp(prefix="zoo-analyses-"))
    zoo = modelzoo.open(home)
    print(json.dumps({"home": str(home)}), flush=True)
    if args.part == "bake":
        bake(zoo, args.tasks, args.scale)
        return
    if args.part == "natural":
        natural(zoo, args.tasks)
        return
    ref = zoo.import_(smollm2_gguf_path(Path(tempfile.gettempdir()) / "modelzoo-smollm2"), "smol").ref
    if args.part == "icl":
        icl(zoo, ref, args.tasks, args.seed)
    elif args.part == "lre":
        facts = read_facts(args.facts)
        random.Random(args.seed).shuffle(facts)
        for relation in args.relations:
            request = LreRequest(facts=tuple(facts), relation=relation, train=args.train,
                                 layers=tuple(args.layers) if args.layers else None)
            with timed() as took:
                info = zoo.analyze(ref, "lre", request)
            print(json.dumps({"seed": args.seed, **took, "id": info.id, **info.metrics}), flush=True)
    else:
        layers = tuple(args.layers) if args.layers else (3, 5, 7, 9, 11, 13, 15, 18)
        for task in args.tasks:
            request = FvRequest(task=tuple(read_pairs(task_path(task))), layers=layers,
                                head_counts=tuple(args.head_counts), seed=args.seed)
            with timed() as took:
                info = zoo.analyze(ref, "fv", request)
            print(json.dumps({"task": task, "seed": args.seed, **took, "id": info.id, **info.metrics}), flush=True)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Wall and CPU seconds of the block (CPU over all threads), and the load average it ran under: on a
    shared machine wall seconds stretch with the load, CPU seconds much less."""
    took: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield took
    took.update(seconds=round(time.perf_counter() - wall), cpu_seconds=round(time.process_time() - cpu),
                load=round(os.getloadavg()[0], 1))


def icl(zoo: modelzoo.Zoo, ref: str, tasks: list[str], seed: int) -> None:
    """Each task's 10-shot accuracy on its held-out pairs (shots drawn from the rest): can the model do it?"""
    parts = lm_parts(zoo.load(ref))
    for task in tasks:
        train, test = FvRequest(task=tuple(read_pairs(task_path(task)))).split()
        rng = random.Random(seed)
        trials = [Trial(parts.ids(prompt(rng.sample(train, 10), p.input)), parts.answer_token(p.output)) for p in test]
        accuracy, p = answer_scores(parts, trials)
        print(json.dumps({"task": task, "seed": seed, "icl_10_shot": accuracy, "p": p, "tested": len(test)}),
              flush=True)


def _neighbourhood(zoo: modelzoo.Zoo, ref: str) -> float:
    """Top-1 accuracy on the first token of every neighbourhood prompt's own answer in the fact set."""
    parts = lm_parts(zoo.load(ref))
    seen = {(n["prompt"], n["target"]) for row in load(DEFAULT_FILE) for n in row["neighborhood_prompts"]}
    trials = [Trial(parts.ids(p), parts.answer_token(t)) for p, t in sorted(seen)]
    return answer_scores(parts, trials)[0]


# the paper's natural-text check (section 3): does the answer show up in a short greedy continuation?
NATURAL = ('The word "{}" means', "When I think of {}, I usually",
           'While reading a book, I came across the word "{}". I looked it up in a dictionary and it turns out '
           "that it means")


@torch.no_grad()
def _continuation(parts: LmParts, text: str, layer: int, vector: torch.Tensor | None, steps: int = 5) -> str:
    """Greedy `steps` tokens after `text`, with `vector` added after block `layer` at the last token of
    each pass when given."""
    ids = parts.ids(text)
    start = len(ids)
    for _ in range(steps):
        tokens = torch.tensor([ids])
        if vector is None:
            logits = parts.lm(tokens).logits
        else:
            with trace(parts.lm, parts.block(layer), edit_output=added_at_last_token(vector), retain_output=False):
                logits = parts.lm(tokens).logits
        ids.append(int(logits[0, -1].argmax()))
    return str(parts.tokenizer.decode(ids[start:]))


def natural(zoo: modelzoo.Zoo, tasks: list[str]) -> None:
    """Each task's stored vector (from `fv --home H`) on its test words in natural-text templates: the share
    of continuations that contain the answer, without and with the vector at the last token."""
    ref = "smol@1"
    by_hash = {a.input_hash: a for a in zoo.analyses(ref, "fv")}
    parts = lm_parts(zoo.load(ref))
    for task in tasks:
        train, test = FvRequest(task=tuple(read_pairs(task_path(task)))).split()
        analysis = by_hash[data_hash({"task": [p.__dict__ for p in train], "test": [p.__dict__ for p in test]})]
        v = zoo.analysis_tensors(analysis.id)["function_vector"]
        layer = int(analysis.metrics["layer"])
        shares = {}
        for template in NATURAL:
            hits = {"base": 0, "fv": 0}
            for pair in test:
                text = template.format(pair.input)
                hits["base"] += pair.output in _continuation(parts, text, layer, None)
                hits["fv"] += pair.output in _continuation(parts, text, layer, v)
            shares[template] = {k: round(h / len(test), 3) for k, h in hits.items()}
        print(json.dumps({"task": task, "analysis": analysis.id, "layer": layer, "tested": len(test),
                          "natural_text": shares}), flush=True)


def _zero_shot_test(task: str) -> list[Pair]:
    return FvRequest(task=tuple(read_pairs(task_path(task)))).split()[1]


def bake(zoo: modelzoo.Zoo, tasks: list[str], scale: float) -> None:
    """Each task's vector baked into a child; then the first two children composed (both vectors, each
    after its own layer), scored on both tasks and on the neighbourhood prompts."""
    ref = "smol@1"
    by_hash = {a.input_hash: a for a in zoo.analyses(ref, "fv")}
    children = []
    base_neighbours = _neighbourhood(zoo, ref)
    for task in tasks:
        train, test = FvRequest(task=tuple(read_pairs(task_path(task)))).split()
        analysis = by_hash[data_hash({"task": [p.__dict__ for p in train], "test": [p.__dict__ for p in test]})]
        started = time.perf_counter()
        child = zoo.apply_function_vector(ref, FvBake(analysis.id, scale=scale), name=f"smol-fv-{task}")
        seconds = time.perf_counter() - started
        children.append(child.ref)
        parts = lm_parts(zoo.load(child.ref))
        zero, zero_p = answer_scores(parts, zero_shot_trials(parts, test))
        print(json.dumps({"task": task, "analysis": analysis.id, "child": child.ref, "scale": scale,
                          "bake_seconds": round(seconds, 1), "layer": analysis.metrics["layer"],
                          "zero_shot_last_token": analysis.metrics["zero_shot"],
                          "zero_shot_p_last_token": analysis.metrics["zero_shot_p"],
                          "child_zero_shot": zero, "child_zero_shot_p": zero_p,
                          "neighbourhood": {"base": base_neighbours, "child": _neighbourhood(zoo, child.ref)}}),
              flush=True)
    if len(children) < 2:
        return
    composed = zoo.compose(children[:2], name="smol-fv-composed").ref
    parts = lm_parts(zoo.load(composed))
    scores = {task: answer_scores(parts, zero_shot_trials(parts, _zero_shot_test(task))) for task in tasks[:2]}
    print(json.dumps({"compose": children[:2], "ref": composed, "scale": scale,
                      "zero_shot": {t: a for t, (a, _) in scores.items()},
                      "zero_shot_p": {t: p for t, (_, p) in scores.items()},
                      "neighbourhood": _neighbourhood(zoo, composed)}), flush=True)


if __name__ == "__main__":
    main()

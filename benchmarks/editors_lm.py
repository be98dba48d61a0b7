"""MEMIT, AlphaEdit and plain fine-tuning on SmolLM2-135M: the CounterFact table, and timings (JSON).

    python benchmarks/editors_lm.py table --home H --ref smol [--half selection] [--sizes 1,10,80]
        [--lams 1000,2000,4000,8000] [--thresholds 2e-2,1e-2,5e-3]
    python benchmarks/editors_lm.py timing --home H --ref smol [--edits 1,100,1000] [--z-limit 100]
    python benchmarks/editors_lm.py zbatch --home H --ref smol [--sizes 1,10,32,100,1000] [--seq-limit 32]
    python benchmarks/editors_lm.py gpt2-small --home H --ref smol   # registers `gpt2-small-shaped`

`table` edits the first 1, 10 and 80 requests of one half of `demo/real_facts.jsonl` (counterfactuals of
facts the model knows; `--half`, see demo/real_facts.py `half`: settings are chosen on "selection", the slow
test asserts on "acceptance"; the halves hold 90 and 89 facts, so 80 is the largest count both reach) and
scores efficacy, paraphrase, neighborhood and their harmonic mean for MEMIT (each lam), AlphaEdit (each
null-space threshold) and fine-tuning of the same down-projections. z depends neither on lam nor on the
threshold nor on which other requests are edited with it, so it is computed once per request and every
solve reuses it. `timing` reports seconds and peak memory (RSS high-water mark, per phase) of statistics,
z optimisation and the solve. `gpt2-small` registers a random GPT-2-small-shaped model (12 layers, 768
wide, SmolLM2's tokenizer and vocabulary) for `timing`: it knows no facts, so its z runs every step (the
most a request costs). Results are rewritten to `--out` after every row, so an interrupted run keeps what
it measured.

Measured on SmolLM2-135M-Instruct (Q4_1 GGUF dequantized; layers 4-8; C from 32,768 self-generated
tokens; z in bfloat16 autocast; 1 CPU thread of a 2-core machine busy with other work), `table --half
selection`, then `--half acceptance` (4 relations, 10 neighbours per fact; at 80 edits 340 (selection) and
349 (acceptance) of 800 neighbour prompts are facts the batch itself rewrites and are left out). At 1 edit
(efficacy / neighbourhood): on the selection half 1.00 / 1.00 for every lam and for AlphaEdit at 2e-2 and
1e-2, 0.00 / 1.00 for AlphaEdit at 5e-3, 1.00 / 0.80 for fine-tuning; on the acceptance half efficacy 1.00
throughout, neighbourhood 0.70 at lam 1,000 and 2,000, 0.80 at 4,000, 0.90 at 8,000, 0.70 / 0.80 / 1.00 for
AlphaEdit at 2e-2 / 1e-2 / 5e-3, 0.00 for fine-tuning.

Selection half (90 facts; the rule in editors/memit.py `_MEASURED` picks lam 4,000 and threshold 1e-2 here):

| edits | method                     | efficacy | paraphrase | neighborhood | score |
|------:|----------------------------|---------:|-----------:|-------------:|------:|
|    10 | unedited                   |     0.00 |       0.05 |         1.00 |  0.00 |
|    10 | MEMIT lam 1,000            |     1.00 |       0.85 |         0.96 |  0.93 |
|    10 | MEMIT lam 2,000            |     1.00 |       0.85 |         0.96 |  0.93 |
|    10 | MEMIT lam 4,000 (chosen)   |     1.00 |       0.75 |         0.98 |  0.89 |
|    10 | MEMIT lam 8,000            |     0.40 |       0.30 |         1.00 |  0.44 |
|    10 | AlphaEdit threshold 2e-2   |     1.00 |       0.85 |         0.95 |  0.93 |
|    10 | AlphaEdit 1e-2 (chosen)    |     1.00 |       0.85 |         0.98 |  0.94 |
|    10 | AlphaEdit 5e-3             |     0.00 |       0.10 |         1.00 |  0.00 |
|    10 | fine-tuning                |     1.00 |       0.45 |         0.47 |  0.56 |
|    80 | unedited                   |     0.00 |       0.04 |         1.00 |  0.00 |
|    80 | MEMIT lam 1,000            |     0.98 |       0.86 |         0.83 |  0.88 |
|    80 | MEMIT lam 2,000            |     0.98 |       0.84 |         0.84 |  0.88 |
|    80 | MEMIT lam 4,000 (chosen)   |     0.94 |       0.71 |         0.87 |  0.83 |
|    80 | MEMIT lam 8,000            |     0.54 |       0.48 |         0.91 |  0.60 |
|    80 | AlphaEdit threshold 2e-2   |     0.98 |       0.86 |         0.84 |  0.89 |
|    80 | AlphaEdit 1e-2 (chosen)    |     0.98 |       0.83 |         0.85 |  0.88 |
|    80 | AlphaEdit 5e-3             |     0.33 |       0.26 |         0.97 |  0.38 |
|    80 | fine-tuning                |     0.81 |       0.21 |         0.38 |  0.35 |

Acceptance half (89 facts; nothing was chosen here):

| edits | method                     | efficacy | paraphrase | neighborhood | score |
|------:|----------------------------|---------:|-----------:|-------------:|------:|
|    10 | unedited                   |     0.00 |       0.15 |         1.00 |  0.00 |
|    10 | MEMIT lam 1,000            |     1.00 |       0.75 |         0.90 |  0.87 |
|    10 | MEMIT lam 2,000            |     1.00 |       0.75 |         0.90 |  0.87 |
|    10 | MEMIT lam 4,000 (chosen)   |     1.00 |       0.65 |         0.94 |  0.83 |
|    10 | MEMIT lam 8,000            |     0.80 |       0.55 |         0.96 |  0.73 |
|    10 | AlphaEdit threshold 2e-2   |     1.00 |       0.75 |         0.90 |  0.87 |
|    10 | AlphaEdit 1e-2 (chosen)    |     1.00 |       0.75 |         0.91 |  0.88 |
|    10 | AlphaEdit 5e-3             |     0.50 |       0.35 |         0.98 |  0.51 |
|    10 | fine-tuning                |     1.00 |       0.60 |         0.57 |  0.68 |
|    80 | unedited                   |     0.00 |       0.08 |         1.00 |  0.00 |
|    80 | MEMIT lam 1,000            |     0.98 |       0.84 |         0.73 |  0.84 |
|    80 | MEMIT lam 2,000            |     0.95 |       0.85 |         0.77 |  0.85 |
|    80 | MEMIT lam 4,000 (chosen)   |     0.86 |       0.74 |         0.85 |  0.81 |
|    80 | MEMIT lam 8,000            |     0.59 |       0.53 |         0.93 |  0.64 |
|    80 | AlphaEdit threshold 2e-2   |     0.94 |       0.83 |         0.79 |  0.85 |
|    80 | AlphaEdit 1e-2 (chosen)    |     0.93 |       0.81 |         0.84 |  0.86 |
|    80 | AlphaEdit 5e-3             |     0.36 |       0.31 |         0.97 |  0.43 |
|    80 | fine-tuning                |     0.74 |       0.24 |         0.56 |  0.41 |

The chosen lam holds on the selection half and not on the other: at 80 edits no lam of the grid reaches
both 0.90 efficacy and 0.80 neighbourhood on the acceptance half (2,000: 0.95 / 0.77; 4,000: 0.86 / 0.85),
while AlphaEdit at the chosen threshold does (0.93 / 0.84). 89-90 facts per half make each efficacy figure
at 80 edits a count of single facts (0.0125 each), so the edge of the trade-off moves between halves.

On the selection half statistics took 602 s and z 1,627 s for the 80 requests (20 s each; 6.2 s each when
the machine was idle), each 80-edit solve (keys, residuals, 5 closed forms) 43-53 s for MEMIT and 110-134 s for
AlphaEdit (one SVD of C per layer), fine-tuning 419 s. Two reference details moved these figures: keys
averaged as the reference's `compute_ks` does (the bare prompt weighs one half; with a uniform mean over
the six templates lam 1,500 gave 100-edit efficacy 0.87 where it gave 0.98), and neighbours rewritten by
the same batch left out of the neighbourhood score (counted, they put MEMIT lam 1,000 at 0.59 at 100
edits).

`timing --edits 1,100,1000 --z-limit 20 --threads 1` (z measured on 20 requests, 25 steps at most, and
scaled linearly; statistics 32,768 tokens; the machine's other core busy with the table run; peak RSS is
the process's high-water mark so far, so it only grows down the table):

| model                         | edits | statistics s | z s (per request) | solve s | peak RSS |
|-------------------------------|------:|-------------:|------------------:|--------:|---------:|
| SmolLM2-135M (30 layers, 576) |     1 | 110 (2 threads, then cached) | 15.5 (15.5) | 1.2 | 1.8 GB |
| SmolLM2-135M                  |   100 | cached       |       675 (6.7)   |    31   |   3.6 GB |
| SmolLM2-135M                  | 1,000 | cached       |     6,320 (6.3)   |   313   |   4.0 GB |
| GPT-2-small shape (12, 768)   |     1 | 280          |        7.1 (7.1)  |   3.6   |   2.7 GB |
| GPT-2-small shape             |   100 | cached       |       519 (5.2)   |    66   |   3.8 GB |
| GPT-2-small shape             | 1,000 | cached       |     5,637 (5.6)   |   751   |   6.0 GB |

z dominates and grows linearly (each request optimises its own vector over 6 prompts); the solve grows
with the keys and residuals recomputed per layer (6 templates x n requests through the model, 5 layers).

`zbatch --sizes 32` (selection half; statistics cached; z in bfloat16 autocast; 1 thread on a 2-core
machine whose other core ran the test suite), 32 requests, three ways in one run: `reference`, the
reference's loop (one request at a time, whole prompts every step) with this module's other savings (one
head call per step, weights held in bfloat16, plain-matmul attention); `sequential`, one request at a time
over the prefix cache; `batched`, all 32 together over the prefix cache. The first row is the code before
any of these changes (the reference's loop as it stood), run alone on an idle core:

| z                          | wall s | CPU s | per request (CPU) | mean steps | efficacy | paraphrase | neighbourhood |
|----------------------------|-------:|------:|------------------:|-----------:|---------:|-----------:|--------------:|
| before (reference's loop)  |    402 |   402 |              12.6 |      19.22 |    0.875 |      0.672 |         0.895 |
| reference (whole prompts)  |    292 |   282 |               8.8 |      19.25 |    0.875 |      0.672 |         0.898 |
| sequential (prefix cache)  |    259 |   163 |               5.1 |      19.31 |    0.875 |      0.672 |         0.898 |
| batched (prefix cache)     |    115 |   113 |               3.5 |      19.28 |    0.875 |      0.672 |         0.898 |

Batched against the loop as it stood: 3.6x (separate runs); in one run 2.5x against the reference's loop
and 1.45x against one request at a time over the cache. Deltas lie within 2% of the reference's on average
(4.9% at most: bfloat16 rounding amplified by Adam), one request took one step more, and efficacy,
paraphrase and neighbourhood are equal. Where the time went, by the profiler, one request per step before:
the head (49,152 x 576) read once per sequence, 30%; autocast casting every weight at every call, 25%;
whole prompts where a quarter of their tokens depend on delta. In a batch the fused bfloat16 attention
backward was the largest single cost (4x slower than plain matmuls at these sizes). The plan's 4x batched
against sequential did not appear on a CPU: once a step runs only the rests, one request's step is
already mostly matrix products (about 85 GFLOP/s on one thread), which a batch cannot make much faster.

`timing --edits 1000 --z-limit 100` with batched z (1 thread, load average 3-4 on 2 cores, so wall
seconds are about twice an idle core's): z measured on 100 requests and scaled, 6,515 s (65 s per 10
requests); the solve 391 s; peak RSS 7.0 GB. At the idle batched 3.5 CPU s a request, 1,000 requests' z
would take about 3,500 s: an extrapolation, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import modelzoo
from modelzoo.demo.real_facts import DEFAULT_FILE, HALVES, half, load
from modelzoo.editors import memit
from modelzoo.editors.lm_eval import fact_scores
from modelzoo.editors.lm_finetune import finetune
from modelzoo.editors.lm_requests import pad_batch, request_from_json
from modelzoo.editors.memit import MemitRequest, compute_z, context_templates, prepare, statistics, update_layers
from modelzoo.registry.derived import DerivedTensors


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write(out: Path, record: dict[str, Any]) -> None:
    out.write_text(json.dumps(record, indent=1))


def table(args: argparse.Namespace) -> dict[str, Any]:
    zoo = modelzoo.open(args.home)
    info = zoo.get(args.ref)
    model = zoo.load(info.ref)
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = [request_from_json(r) for r in half(load(Path(args.requests)), args.half)[: max(sizes)]]
    request = MemitRequest(requests=tuple(rows), cache=DerivedTensors(zoo.registry), model_hash=info.manifest_hash,
                           stats_samples=args.stats_samples)
    prep = prepare(model, request)
    record: dict[str, Any] = {"model": info.ref, "half": args.half, "hparams": asdict(prep.hp), "rows": []}
    started = time.perf_counter()
    stats = statistics(prep)
    record["stats_s"] = round(time.perf_counter() - started, 1)
    templates = context_templates(prep.lm, prep.tokenizer, prep.hp.template_count, prep.hp.template_length, 0)
    record["templates"] = templates
    original = {prep.layout.down_name(x): prep.lm.get_submodule(prep.layout.down_name(x)).weight.detach().clone()
                for x in prep.hp.layers}
    deltas: list[torch.Tensor] = []
    record["z_s"] = 0.0

    def restore() -> None:
        with torch.no_grad():
            for name, w in original.items():
                prep.lm.get_submodule(name).weight.copy_(w)

    def score(n: int, method: str, **extra: Any) -> None:
        s = fact_scores(prep.lm, prep.tokenizer, rows[:n])
        record["rows"].append({"edits": n, "method": method, **extra, **asdict(s)})
        _write(args.out, record)
        print(json.dumps(record["rows"][-1]), flush=True)

    lams = [float(x) for x in args.lams.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",")]
    for n in sizes:
        # z for the requests not yet optimised (a request's z does not depend on the others)
        z = compute_z(prep.lm, prep.tokenizer, prep.layout, prep.hp, rows[len(deltas) : n], templates)
        deltas += list(z.delta)
        record["z_s"] = round(record["z_s"] + z.seconds, 1)
        delta = torch.stack(deltas[:n])
        sub = replace(prep, requests=rows[:n])
        score(n, "unedited")
        for lam in lams:
            started = time.perf_counter()
            update_layers(replace(sub, hp=replace(prep.hp, lam=lam)), "memit", delta, templates, stats)
            score(n, "memit", lam=lam, solve_s=round(time.perf_counter() - started, 1))
            restore()
        for threshold in thresholds:
            started = time.perf_counter()
            hp = replace(prep.hp, nullspace_threshold=threshold)
            update_layers(replace(sub, hp=hp, cache=None), "alphaedit", delta, templates, stats)
            score(n, "alphaedit", nullspace_threshold=threshold, solve_s=round(time.perf_counter() - started, 1))
            restore()
        started = time.perf_counter()
        finetune(prep.lm, prep.tokenizer, [prep.layout.down_name(x) for x in prep.hp.layers], rows[:n])
        score(n, "finetune", solve_s=round(time.perf_counter() - started, 1))
        restore()
    return record


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds and peak memory per phase for each edit count (the z phase optimises every request)."""
    zoo = modelzoo.open(args.home)
    info = zoo.get(args.ref)
    model = zoo.load(info.ref)
    facts = [request_from_json(r) for r in load(Path(args.requests))]
    record: dict[str, Any] = {"model": info.ref, "runs": []}
    for n in [int(x) for x in args.edits.split(",")]:
        rows = [facts[i % len(facts)] for i in range(n)]  # repeats beyond the fact set: same cost per edit
        request = MemitRequest(requests=tuple(rows), cache=DerivedTensors(zoo.registry),
                               model_hash=info.manifest_hash, stats_samples=args.stats_samples)
        prep = prepare(model, request)
        run: dict[str, Any] = {"edits": n}
        started = time.perf_counter()
        stats = statistics(prep)
        run["stats"] = {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": _peak_mb(),
                        "cached": all(s.cached for s in stats.values()),
                        "seconds_when_computed": round(next(iter(stats.values())).seconds, 1)}
        templates = context_templates(prep.lm, prep.tokenizer, prep.hp.template_count, prep.hp.template_length, 0)
        z_rows = rows[: args.z_limit] if args.z_limit else rows
        z = compute_z(prep.lm, prep.tokenizer, prep.layout, prep.hp, z_rows, templates)
        per = z.seconds / len(z_rows)
        run["z"] = {"seconds": round(per * n, 1), "measured_requests": len(z_rows), "peak_rss_mb": _peak_mb()}
        delta = z.delta[torch.arange(n) % len(z_rows)]
        started = time.perf_counter()
        update_layers(prep, "memit", delta, templates, stats)
        run["solve"] = {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": _peak_mb()}
        record["runs"].append(run)
        _write(args.out, record)
        print(json.dumps(run), flush=True)
        model = zoo.load(info.ref)
    return record


class _WholeSequences:
    """The reference's pass: every step runs each prompt from its first token (no prefix cache). It
    returns what `memit._SplitBatch` does, the hidden states from each subject's last token on."""

    def __init__(self, lm: torch.nn.Module, seqs: list[Any], pad: int, device: torch.device) -> None:
        self.seqs, self.pad, self.device = seqs, pad, device

    def groups(self, rows: list[int]) -> list[list[int]]:
        return [list(range(len(rows)))]  # one pass, every prompt padded to the longest

    def subject_positions(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor([self.seqs[r].tokens.subject_last for r in rows])

    def final_hidden(self, lm: torch.nn.Module, rows: list[int]) -> torch.Tensor:
        ids, mask = pad_batch([self.seqs[r].ids for r in rows], self.pad)
        whole = lm.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        starts = torch.tensor([self.seqs[r].tokens.subject_last for r in rows], device=whole.device)
        index = (starts[:, None] + torch.arange(whole.shape[1], device=whole.device)).clamp_max(whole.shape[1] - 1)
        return whole.gather(1, index[:, :, None].expand(-1, -1, whole.shape[2]))


Z_WAYS = {"reference": (1, _WholeSequences), "sequential": (1, memit._SplitBatch), "batched": (None, memit._SplitBatch)}
"""How z is optimised: (requests per batch, None for `--z-batch`; the pass each step runs)."""


def zbatch(args: argparse.Namespace) -> dict[str, Any]:
    """z three ways at each edit count: the reference's loop (one request at a time, whole prompts every
    step), one request at a time over the prefix cache, and batched over the prefix cache. z seconds, how
    far each way's deltas lie from the reference's, and MEMIT's efficacy, paraphrase and neighbourhood after
    each (same statistics, templates and solve). Time is wall-clock and CPU time of the process (the fairer
    figure on a machine shared with other work). Counts beyond the half repeat its facts (same cost per
    edit; scores are over the distinct facts). `--seq-limit` caps the requests the one-at-a-time ways run
    (their time is then scaled linearly and their scores are not given)."""
    zoo = modelzoo.open(args.home)
    info = zoo.get(args.ref)
    model = zoo.load(info.ref)
    facts = [request_from_json(r) for r in half(load(Path(args.requests)), args.half)]
    sizes = [int(x) for x in args.sizes.split(",")]
    ways = args.ways.split(",")
    record: dict[str, Any] = {"model": info.ref, "half": args.half, "threads": torch.get_num_threads(), "rows": []}
    for n in sizes:
        rows = [facts[i % len(facts)] for i in range(n)]
        request = MemitRequest(requests=tuple(rows), cache=DerivedTensors(zoo.registry),
                               model_hash=info.manifest_hash, stats_samples=args.stats_samples)
        prep = prepare(model, request)
        stats = statistics(prep)
        templates = context_templates(prep.lm, prep.tokenizer, prep.hp.template_count, prep.hp.template_length, 0)
        original = {x: prep.lm.get_submodule(prep.layout.down_name(x)).weight.detach().clone() for x in prep.hp.layers}
        distinct = rows[: len(facts)]
        row: dict[str, Any] = {"edits": n}
        deltas = {}
        for how in ways:
            z_batch, pass_ = Z_WAYS[how]
            limit = args.seq_limit if z_batch == 1 else 0
            measured = rows[:limit] if limit and limit < n else rows
            hp = replace(prep.hp, z_batch=args.z_batch if z_batch is None else z_batch)
            memit._SplitBatch = pass_  # type: ignore[misc]
            cpu = time.process_time()
            try:
                z = compute_z(prep.lm, prep.tokenizer, prep.layout, hp, measured, templates)
            finally:
                memit._SplitBatch = Z_WAYS["batched"][1]  # type: ignore[misc]
            cpu = time.process_time() - cpu
            part: dict[str, Any] = {"z_s": round(z.seconds * n / len(measured), 1),
                                    "z_cpu_s": round(cpu * n / len(measured), 1), "measured_requests": len(measured),
                                    "batch": z.batch, "z_steps_mean": round(sum(z.steps) / len(z.steps), 2),
                                    "peak_rss_mb": _peak_mb()}
            if len(measured) == n:
                deltas[how] = z.delta
                update_layers(prep, "memit", z.delta, templates, stats)
                part |= asdict(fact_scores(prep.lm, prep.tokenizer, distinct))
                with torch.no_grad():
                    for x, w in original.items():
                        prep.lm.get_submodule(prep.layout.down_name(x)).weight.copy_(w)
            row[how] = part
            _write(args.out, record | {"rows": [*record["rows"], row]})
        for how in ways[1:]:
            row[how]["speedup"] = round(row[ways[0]]["z_s"] / row[how]["z_s"], 2)
            row[how]["cpu_speedup"] = round(row[ways[0]]["z_cpu_s"] / row[how]["z_cpu_s"], 2)
            if ways[0] in deltas and how in deltas:
                a, b = deltas[ways[0]], deltas[how]
                gap = (a - b).norm(dim=1) / a.norm(dim=1)
                row[how]["delta_relative_difference"] = {"max": round(float(gap.max()), 5),
                                                         "mean": round(float(gap.mean()), 5)}
        record["rows"].append(row)
        _write(args.out, record)
        print(json.dumps(row), flush=True)
        model = zoo.load(info.ref)
    return record


def gpt2_small(args: argparse.Namespace) -> dict[str, Any]:
    """Register a random GPT-2-small-shaped LM that uses the tokenizer of `--ref`."""
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel

    zoo = modelzoo.open(args.home)
    tokenizer = zoo.load(args.ref).tokenizer
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = zoo.import_(Path(tmp), "gpt2-small-shaped")
    return {"registered": str(info.ref), "parameters": sum(t.numel() for t in zoo.tensors(info.ref).values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["table", "timing", "zbatch", "gpt2-small"])
    parser.add_argument("--home", required=True)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--requests", default=str(DEFAULT_FILE))
    parser.add_argument("--half", choices=HALVES, default="selection",
                        help="which half of the fact set (demo/real_facts.py `half`): choose on selection")
    parser.add_argument("--sizes", default="1,10,80")
    parser.add_argument("--lams", default="1000,2000,4000,8000")
    parser.add_argument("--thresholds", default="2e-2,1e-2,5e-3", help="AlphaEdit null-space thresholds")
    parser.add_argument("--edits", default="1,100,1000")
    parser.add_argument("--z-limit", type=int, default=0, help="optimise z for at most this many requests and "
                        "extrapolate its time linearly (z costs the same per request)")
    parser.add_argument("--seq-limit", type=int, default=0, help="zbatch: run sequential z on at most this many "
                        "requests and scale its time (0: all)")
    parser.add_argument("--z-batch", type=int, default=0, help="zbatch: requests per batch (0: all that fit)")
    parser.add_argument("--ways", default="reference,sequential,batched",
                        help=f"zbatch: which of {','.join(Z_WAYS)}, the first being the baseline")
    parser.add_argument("--stats-samples", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("editors_lm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = {"table": table, "timing": timing, "zbatch": zbatch, "gpt2-small": gpt2_small}[args.mode](args)
    print(json.dumps(record))


if __name__ == "__main__":
    main()

"""Desiderata-based circuits (`zoo analyze circuit`) and knockout children (`zoo edit ablate`) on a tiny random
Llama whose layer-1 head 2 is wired by hand to copy the first bound value: in `a=7, b=3. a=` it attends from
the last token to the token seven places back and writes that digit where the unembedding reads it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from tiny_models import tiny_gpt2

import modelzoo
from modelzoo.analyses.circuit import (
    CircuitRequest,
    Component,
    ablator,
    desiderata_path,
    read_desiderata,
    task_accuracy,
)
from modelzoo.analyses.circuit_tasks import arithmetic, lookup
from modelzoo.analyses.lm import lm_parts
from modelzoo.editors.ablate import knockout_changes
from modelzoo.registry.analyses import NewAnalysis, store_analysis
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.tracing import trace

WORDS = ["<s>", "[UNK]", *"abcdefgh", *"0123456789", "=", ",", "."]
LAYER, HEAD = 1, 2  # the wired head
OFFSET = 7  # the first value's distance from the last token in `a=7, b=3. a=` (tokens a = 7 , b = 3 . a =)


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="[UNK]")


def wired_llama(seed: int = 0) -> Any:
    """A random 2-layer Llama (hidden 64, 4 heads of 16) with one head wired to copy by position.

    Every embedding is c on dim 0 plus c on the token's own dim, so after RMSNorm dim 0 is a constant the
    wired head's queries and keys are made of: per rotary pair i, k = (A, 0) and q = A(cos phi_i, sin phi_i)
    with phi_i = -OFFSET theta_i, so q.k peaks where the key sits OFFSET tokens before the query. Its values
    read the digits' dims, its output writes each digit back onto its own dim, which the unembedding reads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    c, A, d = math.sqrt(32), 4.0, 16
    normed = math.sqrt(32)  # dim 0 and the token's dim after RMSNorm (2 c^2 / 64 = 1)
    theta = [10000 ** (-2 * i / d) for i in range(d // 2)]
    digits = [WORDS.index(str(n)) for n in range(10)]
    with torch.no_grad():
        E = model.model.embed_tokens.weight
        E.zero_()
        E[:, 0] = c
        E[torch.arange(len(WORDS)), 1 + torch.arange(len(WORDS))] = c
        attn = model.model.layers[LAYER].self_attn
        rows = slice(HEAD * d, (HEAD + 1) * d)
        for W in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            W[rows] = 0
        attn.o_proj.weight[:, rows] = 0
        for i, t in enumerate(theta):
            attn.k_proj.weight[HEAD * d + i, 0] = A / normed
            attn.q_proj.weight[HEAD * d + i, 0] = A * math.cos(-OFFSET * t) / normed
            attn.q_proj.weight[HEAD * d + i + d // 2, 0] = A * math.sin(-OFFSET * t) / normed
        for j, token in enumerate(digits):
            attn.v_proj.weight[HEAD * d + j, 1 + token] = 1.0
            attn.o_proj.weight[1 + token, HEAD * d + j] = 4.0
            model.lm_head.weight[token, 1 + token] = 4.0
    return model


@pytest.fixture(scope="module")
def wired_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("circuit") / "wired"
    wired_llama().save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


def _pairs(rng: random.Random, n: int) -> list[dict[str, list[dict[str, str]]]]:
    value, distractor = [], []
    for _ in range(n):
        a, b = rng.sample("abcdefgh", 2)
        x, y = rng.sample(range(10), 2)
        other = rng.choice([v for v in range(10) if v not in (x, y)])
        base = f"{a}={x}, {b}={y}. {a}="
        value.append({"base": base, "source": f"{a}={other}, {b}={y}. {a}=", "answer": str(x), "target": str(other)})
        distractor.append({"base": base, "source": f"{a}={x}, {b}={other}. {a}=", "answer": str(x),
                           "target": str(other)})
    return [{"name": "value_dependence", "kind": "change", "weight": 5.0, "pairs": value},
            {"name": "distractor_invariance", "kind": "keep", "pairs": distractor}]


def _desiderata(path: Path, seed: int = 0, n: int = 24) -> Path:
    path.write_text(json.dumps({"desiderata": _pairs(random.Random(seed), n)}))
    return path


def _prompts(seed: int, n: int = 40) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample("abcdefgh", 2)
        x, y = rng.sample(range(10), 2)
        out.append((f"{a}={x}, {b}={y}. {a}=", str(x)))
    return out


def _accuracy(model: Any, prompts: list[tuple[str, str]]) -> float:
    tok = _tokenizer()
    hits = 0
    for text, answer in prompts:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            hits += int(model(ids).logits[0, -1].argmax()) == tok.convert_tokens_to_ids(answer)
    return hits / len(prompts)


def test_wired_llama_does_the_lookup_through_its_wired_head_only():
    model = wired_llama()
    prompts = _prompts(seed=5)
    assert _accuracy(model, prompts) == 1.0
    with torch.no_grad():
        model.model.layers[LAYER].self_attn.o_proj.weight[:, HEAD * 16:(HEAD + 1) * 16] = 0
    assert _accuracy(model, prompts) <= 0.3


def test_circuit_mask_finds_the_wired_head_and_mean_ablating_it_removes_the_lookup(capsys, home, wired_dir, tmp_path):
    assert zoo_cli(capsys, home, "import", str(wired_dir), "--name", "wired").code == 0
    png = tmp_path / "sweep.png"
    result = zoo_cli(capsys, home, "analyze", "circuit", "wired", "--desiderata",
                     str(_desiderata(tmp_path / "d.json")), "--sweep", "1000", "--png", str(png), "--json")
    assert result.code == 0, result.err
    r = json.loads(result.out)
    assert r["kind"] == "circuit" and r["components"] == [f"L{LAYER}.H{HEAD}"]
    assert r["component_count"] == 1 and r["total_components"] == 2 * (4 + 1)
    assert r["task_accuracy"] == 1.0
    assert r["ablated_accuracy"] <= 0.3
    assert r["random_ablated_accuracy"] >= 0.9
    assert r["desiderata_accuracy"] == 1.0 and r["desiderata_accuracy_unpatched"] == 0.5
    # a penalty far above the loss's pull keeps every mask at 1: the sweep's other end is the empty circuit
    assert [(row["lambda"], row["components"]) for row in r["sweep"]] == [(0.1, 1), (1000.0, 0)]
    from PIL import Image

    assert Image.open(png).size == (640, 400)
    listed = json.loads(zoo_cli(capsys, home, "analyses", "wired", "--json").out)
    assert [a["id"] for a in listed] == [r["id"]]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_knockout_child_loads_in_transformers_and_loses_the_lookup(capsys, home, wired_dir, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    zoo_cli(capsys, home, "import", str(wired_dir), "--name", "wired")
    r = json.loads(zoo_cli(capsys, home, "analyze", "circuit", "wired", "--desiderata",
                           str(_desiderata(tmp_path / "d.json")), "--sweep", "", "--json").out)
    result = zoo_cli(capsys, home, "edit", "ablate", "wired", "--analysis", str(r["id"]), "--mode", mode, "--json")
    assert result.code == 0, result.err
    child = json.loads(result.out)
    assert child["method"] == "ablate"
    assert child["params"]["components"] == [f"L{LAYER}.H{HEAD}"] and child["params"]["analysis"] == r["id"]
    assert child["params"]["biases_added"] == (["attention_bias"] if mode == "mean" else [])
    assert zoo_cli(capsys, home, "export", child["ref"], str(tmp_path / "child")).code == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "child").eval()
    held_out = _prompts(seed=9)
    assert _accuracy(wired_llama(), held_out) == 1.0
    assert _accuracy(loaded, held_out) <= 0.3


def test_mean_knockout_weights_compute_exactly_the_hooked_mean_ablation(zoo, wired_dir, tmp_path):
    """The editor's weights reproduce the ablation the analysis measures, for a head and an MLP, at every
    position: the same logits, and the same accuracy as `task_accuracy` with the hooks."""
    ref = zoo.import_(wired_dir, "wired").ref
    desiderata = read_desiderata(_desiderata(tmp_path / "d.json"))
    analysis = zoo.analyze(ref, "circuit", CircuitRequest(desiderata, steps=5))
    stored = zoo.analysis_tensors(analysis.id)
    means = (stored["head_means"], stored["mlp_means"])
    knocked = [Component(LAYER, HEAD), Component(0, None)]
    parent = wired_llama()
    tensors = {k: v.detach().clone() for k, v in parent.state_dict().items()}
    changed, flags = knockout_changes(tensors, parent.config.to_dict(), knocked, "mean", *means)
    assert flags == {"attention_bias": True, "mlp_bias": True}
    parent.config.attention_bias = parent.config.mlp_bias = True
    child = type(parent)(parent.config).eval()
    child.load_state_dict({**tensors, **changed})

    parts = lm_parts(LoadedModel(ref=ref, family="lm", pipeline=wired_llama(), modules={}, tokenizer=_tokenizer()))
    ids = torch.tensor([parts.ids("c=4, d=1. c="), parts.ids("h=0, a=9. h=")])
    edit = ablator(parts, knocked, means)
    with torch.no_grad(), trace(parts.lm, [parts.attn_out(0), parts.attn_out(1)], edit_input=edit), \
            trace(parts.lm, [f"{parts.block(0)}.mlp", f"{parts.block(1)}.mlp"], edit_output=edit):
        hooked = parts.lm(ids).logits
    with torch.no_grad():
        baked = child(ids).logits
    torch.testing.assert_close(baked, hooked, atol=1e-5, rtol=1e-5)
    prompts = _prompts(seed=3)
    encoded = [(parts.ids(t), int(parts.tokenizer.convert_tokens_to_ids(a))) for t, a in prompts]
    assert task_accuracy(parts, encoded, knocked, means) == _accuracy(child, prompts) <= 0.3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_knockout_weights_equal_the_hooked_ablation_for_both_layouts(arch, mode):
    """Zero mode equals hooking zeros in; mean mode hooking the means in (GPT-2's Conv1D stores (in, out))."""
    parent = wired_llama() if arch == "llama" else tiny_gpt2(seed=1, n_layer=2, vocab_size=len(WORDS))
    parts = lm_parts(LoadedModel(ref="x@1", family="lm", pipeline=parent, modules={}, tokenizer=_tokenizer()))
    g = torch.Generator().manual_seed(0)
    head_means = torch.randn(parts.n_layers, parts.n_heads, parts.head_dim, generator=g)
    mlp_means = torch.randn(parts.n_layers, parts.hidden, generator=g)
    if mode == "zero":
        head_means, mlp_means = torch.zeros_like(head_means), torch.zeros_like(mlp_means)
    knocked = [Component(1, parts.n_heads - 1), Component(0, 0), Component(0, None)]
    tensors = {k: v.detach().clone() for k, v in parent.state_dict().items()}
    changed, flags = knockout_changes(tensors, parent.config.to_dict(), knocked, mode, head_means, mlp_means)
    config = parent.config
    for flag in flags:
        setattr(config, flag, True)
    child = type(parent)(config).eval()
    child.load_state_dict({**tensors, **changed})
    ids = torch.tensor([parts.ids("c=4, d=1. c="), parts.ids("h=0, a=9. h=")])
    edit = ablator(parts, knocked, (head_means, mlp_means))
    with torch.no_grad(), trace(parts.lm, [parts.attn_out(0), parts.attn_out(1)], edit_input=edit), \
            trace(parts.lm, [f"{parts.block(0)}.mlp", f"{parts.block(1)}.mlp"], edit_output=edit):
        hooked = parts.lm(ids).logits
    with torch.no_grad():
        baked = child(ids).logits
    torch.testing.assert_close(baked, hooked, atol=1e-5, rtol=1e-5)


def test_shipped_desiderata_are_addressable_by_name_and_match_their_generator():
    for name, make in (("lookup", lookup), ("arithmetic", arithmetic)):
        path = desiderata_path(name)
        assert json.loads(path.read_text()) == make()
        desiderata = read_desiderata(path)
        assert [d.kind for d in desiderata] == ["change", "keep"]
        assert all(len(d.pairs) >= 50 for d in desiderata)


@pytest.mark.parametrize("case", ["malformed", "not json", "no change", "multi-token answer", "non-LM", "missing",
                                  "not a circuit", "negative lambda"])
def test_bad_circuit_input_is_one_line_exit_2_and_stores_nothing(capsys, home, wired_dir, tiny_gan_dir, tmp_path,
                                                                case):
    zoo_cli(capsys, home, "import", str(wired_dir), "--name", "wired")
    zoo_cli(capsys, home, "import", str(tiny_gan_dir), "--name", "gan")
    good = _desiderata(tmp_path / "good.json", n=4)
    pairs = _pairs(random.Random(0), 4)
    files = {
        "malformed": {"desiderata": [{"kind": "change", "pairs": [{"base": "a=1, b=2. a="}]}]},
        "no change": {"desiderata": [{**pairs[1]}]},
        "multi-token answer": {"desiderata": [
            {**pairs[0], "pairs": [{**p, "answer": "7 5"} for p in pairs[0]["pairs"]]}, pairs[1]]},
    }
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(files[case]) if case in files else '{"desiderata": [')
    args = {
        "non-LM": ["analyze", "circuit", "gan", "--desiderata", str(good)],
        "missing": ["analyze", "circuit", "wired", "--desiderata", str(tmp_path / "absent.json")],
        "not a circuit": ["edit", "ablate", "wired", "--analysis", "1"],
        "negative lambda": ["analyze", "circuit", "wired", "--desiderata", str(good), "--lambda", "-1"],
    }.get(case, ["analyze", "circuit", "wired", "--desiderata", str(bad), "--sweep", ""])
    if case == "not a circuit":
        store_analysis(modelzoo.open(home).registry, "wired", NewAnalysis("fv", {}, {"layer": 0}, "0" * 64))
    before = snapshot(home)
    result = zoo_cli(capsys, home, *args)
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and result.err.startswith("error: ")
    assert snapshot(home) == before

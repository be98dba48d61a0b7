"""LRE and function vectors on tiny random Llama and GPT-2 models, and analyses kept in the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from test_family_lm import tiny_bpe_tokenizer
from tiny_models import tiny_gpt2

from modelzoo.analyses import fv, lre
from modelzoo.analyses.lm import LmParts, lm_parts, prefix, residual, run_rest, with_residual
from modelzoo.registry.analyses import NewAnalysis, store_analysis
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.tracing import trace

FACTS = [("France", "Paris"), ("cat", "mat"), ("red", "circle"), ("blue", "square"), ("mat", "sat"),
         ("the", "cat"), ("square", "red"), ("circle", "blue")]


def _tiny_lm(arch: str, seed: int = 0) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_bpe_tokenizer()
    if arch == "gpt2":
        model = tiny_gpt2(seed=seed, n_layer=3, vocab_size=len(tokenizer))
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False))
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.bos_token_id
    return model.eval(), tokenizer


def _parts(arch: str, dtype: torch.dtype = torch.float64) -> LmParts:
    model, tokenizer = _tiny_lm(arch)
    model = model.to(dtype)
    return lm_parts(LoadedModel(ref="tiny@1", family="lm", pipeline=model, modules={"": model}, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("analyses") / "llama"
    model, tokenizer = _tiny_lm("llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- LRE ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lre_jacobians_of_every_layer_match_finite_differences(arch):
    parts = _parts(arch)
    facts = [lre.Fact("r", "The capital of {} is", s, o) for s, o in FACTS]
    enc = lre.encode(parts, facts[0], facts[1:5], [0, 1])
    Js, hs, z = lre.jacobians(parts, enc.ids, enc.subject_at, [0, 1])
    assert torch.allclose(z, enc.z)
    pre = prefix(parts, enc.ids, enc.subject_at)
    last = parts.block(parts.n_layers - 1)
    generator = torch.Generator().manual_seed(0)
    eps = 1e-5
    for layer in (0, 1):
        assert torch.allclose(hs[layer], enc.h[layer])

        def z_after(delta: torch.Tensor, source: str = parts.block(layer)) -> torch.Tensor:
            def add(name: str, output: Any) -> Any:
                if name != source:
                    return output
                hidden = residual(output).clone()
                hidden[0, 0] += delta
                return with_residual(output, hidden)

            with torch.no_grad(), trace(parts.lm, [source, last], edit_output=add) as traces:
                run_rest(parts, pre)
            return residual(traces[last].output)[0, -1]

        J = Js[layer]
        for _ in range(4):
            v = torch.randn(parts.hidden, generator=generator, dtype=torch.float64)
            numeric = (z_after(eps * v) - z_after(-eps * v)) / (2 * eps)
            assert torch.allclose(J.double() @ v, numeric, atol=1e-3 * float(numeric.abs().max()))
        # the Jacobian is no constant: dropping W (z = h + b) misses the first-order change
        assert float((J - torch.eye(parts.hidden)).abs().max()) > 1e-2
    assert not torch.allclose(Js[0], Js[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lre_prompts_that_share_the_examples_cache_equal_full_passes(arch):
    parts = _parts(arch)
    facts = [lre.Fact("r", "The capital of {} is", s, o) for s, o in FACTS]
    shared = lre.examples_prefix(parts, facts[:4], facts[5])
    for fact in facts[4:]:
        full, cached = lre.encode(parts, fact, facts[:4], [1]), lre.encode(parts, fact, facts[:4], [1], shared)
        assert cached.ids == full.ids and cached.answer == full.answer
        assert torch.allclose(cached.h[1], full.h[1]) and torch.allclose(cached.z, full.z)
        J_full = lre.jacobians(parts, full.ids, full.subject_at, [1])[0][1]
        assert torch.allclose(lre.jacobians(parts, cached.ids, cached.subject_at, [1], shared)[0][1], J_full)
    other = lre.encode(parts, facts[0], facts[1:5], [1], shared)  # other examples: the cache is not used
    assert torch.allclose(other.z, lre.encode(parts, facts[0], facts[1:5], [1]).z)


def test_rank_k_pseudo_inverse_inverts_the_top_k_directions():
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    S = torch.tensor([5.0, 4, 3, 2, 1, 0.5], dtype=torch.float64)
    W = (U @ torch.diag(S) @ V.T).float()
    assert torch.allclose(lre.pinv_rank(W, 6) @ W, torch.eye(6), atol=1e-4)
    P = lre.pinv_rank(W, 2)
    assert torch.allclose(P @ W @ V[:, :2].float(), V[:, :2].float(), atol=1e-4)
    assert torch.allclose(P @ U[:, 2:].float(), torch.zeros(6, 4), atol=1e-5)


def test_lre_request_refuses_too_few_facts_and_ambiguous_relations():
    facts = tuple(lre.Fact(r, "The {} is", s, o) for r in ("a", "b") for s, o in FACTS[:4])
    with pytest.raises(lre.BadInput, match="pick one with --relation"):
        lre.LreRequest(facts).chosen_facts()
    with pytest.raises(lre.BadInput, match="needs 9"):
        lre.LreRequest(facts, relation="a", train=8).chosen_facts()
    assert len(lre.LreRequest(facts, relation="b", train=3).chosen_facts()[1]) == 4


# ---- function vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patching_a_head_mean_changes_exactly_that_slice(arch):
    parts = _parts(arch)
    a = torch.randn(parts.n_layers, parts.n_heads, parts.head_dim, dtype=torch.float64)
    ids = parts.ids(fv.prompt([fv.Pair("cat", "mat")], "red"))
    pre = prefix(parts, ids, len(ids) - 1)
    names = [parts.attn_out(layer) for layer in range(parts.n_layers)]
    rows = [(1, 1), (2, 0), (1, 0)]
    with torch.no_grad(), trace(parts.lm, names, retain_input=True) as clean:
        run_rest(parts, pre, len(rows))
    patch = fv.patch_heads(parts, a, rows)
    with torch.no_grad(), trace(parts.lm, names, retain_input=True, edit_input=patch) as patched:
        run_rest(parts, pre, len(rows))
    d = parts.head_dim
    for r, (layer, head) in enumerate(rows):
        x = patched[parts.attn_out(layer)].input[r, -1]
        assert torch.equal(x[head * d:(head + 1) * d], a[layer, head])
    # everything before the patched layer is the clean pass; at it only the patched slice differs
    for r, (layer, head) in enumerate(rows):
        for below in range(layer):
            assert torch.equal(patched[parts.attn_out(below)].input[r], clean[parts.attn_out(below)].input[r])
        diff = patched[parts.attn_out(layer)].input[r, -1] != clean[parts.attn_out(layer)].input[r, -1]
        assert diff.nonzero().flatten().tolist() == [i for i in range(head * d, (head + 1) * d) if diff[i]]
        assert diff[head * d:(head + 1) * d].any()


def test_indirect_effects_with_the_cache_equal_full_passes():
    parts = _parts("llama")
    pairs = [fv.Pair(s, o) for s, o in FACTS]
    sampler = fv.Sampler(parts, pairs, 3, seed=1)
    trials = [sampler.trial(shuffled=True) for _ in range(2)]
    a, _ = fv.mean_head_outputs(parts, [sampler.trial() for _ in range(3)])
    effect = fv.indirect_effects(parts, a, trials)
    names = [parts.attn_out(layer) for layer in range(parts.n_layers)]
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        rises = []
        for t in trials:
            ids = torch.tensor([t.ids])
            with torch.no_grad():
                clean = parts.lm(ids).logits[0, -1].softmax(-1)[t.answer]
                with trace(parts.lm, names, edit_input=fv.patch_heads(parts, a, [(layer, head)])):
                    patched = parts.lm(ids).logits[0, -1].softmax(-1)[t.answer]
            rises.append(float(patched - clean))
        assert effect[layer, head] == pytest.approx(sum(rises) / len(rises), abs=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_planted_head_tops_the_ranking_and_its_vector_gives_the_answer(arch):
    """Head (2, 1)'s mean output is set to what W_O maps onto the answer's unembedding: patching it must
    raise P(answer) most, and its function vector, added at the last layer, must make the answer top-1."""
    parts = _parts(arch)
    pairs = [fv.Pair(s, "cat") for s, _ in FACTS]
    sampler = fv.Sampler(parts, pairs, 3, seed=0)
    a, _ = fv.mean_head_outputs(parts, [sampler.trial() for _ in range(3)])
    answer = parts.answer_token("cat")
    u = parts.lm.get_output_embeddings().weight[answer].detach()
    d = parts.head_dim
    W_slice = parts.out_weight(2)[:, d:2 * d].detach()
    a[2, 1] = 50 * torch.linalg.lstsq(W_slice, u.unsqueeze(1)).solution.squeeze(1) / u.norm()
    effect = fv.indirect_effects(parts, a, [sampler.trial(shuffled=True) for _ in range(2)])
    assert fv.top_heads(effect, 3)[0] == (2, 1)
    v = fv.function_vector(parts, a, [(2, 1)])
    zero = fv.zero_shot_trials(parts, pairs)
    base, base_p = fv.answer_scores(parts, zero)
    acc, p = fv.answer_scores(parts, zero, 2, v)
    assert base < 0.5 and acc == 1.0 and p > base_p


def test_function_vector_is_the_heads_mean_outputs_through_w_o():
    parts = _parts("gpt2")
    a = torch.randn(parts.n_layers, parts.n_heads, parts.head_dim, dtype=torch.float64)
    v = fv.function_vector(parts, a, [(0, 1), (2, 0)])
    expected = torch.zeros(parts.hidden, dtype=torch.float64)
    for layer, head in [(0, 1), (2, 0)]:
        x = torch.zeros(parts.hidden, dtype=torch.float64)
        x[head * parts.head_dim:(head + 1) * parts.head_dim] = a[layer, head]
        proj = parts.lm.get_submodule(parts.attn_out(layer))
        expected += proj(x.unsqueeze(0)).squeeze(0) - proj.bias  # the head's share, without the layer's bias
    assert torch.allclose(v.double(), expected.detach(), atol=1e-6)


# ---- the registry and the CLI ---------------------------------------------------------------------


def test_analyses_round_trip_verify_and_gc(zoo, llama_dir):
    info = zoo.import_(llama_dir, "tiny")
    tensors = {"W": torch.randn(4, 4), "b": torch.arange(4.0)}
    stored = store_analysis(zoo.registry, info.ref, NewAnalysis("lre", {"train": 8}, {"faithfulness": 0.5},
                                                                "ab" * 32, tensors))
    assert [a.id for a in zoo.analyses("tiny")] == [stored.id] and stored.tensors == ["W", "b"]
    assert zoo.analysis(stored.id).metrics == {"faithfulness": 0.5}
    loaded = zoo.analysis_tensors(stored.id)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert zoo.get("tiny").analyses == 1
    assert zoo.gc(grace_s=0).blobs_removed == 0 and zoo.verify().ok and zoo.verify("tiny").ok

    sha = _analysis_blob(zoo, stored.id, "b")
    path = next(p for p in zoo.registry.settings.blob_dir.rglob(f"*{sha}*") if p.is_file())
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    for report in (zoo.verify(), zoo.verify("tiny")):
        assert [d.analyses for d in report.damaged] == [[f"analysis {stored.id} (lre) of tiny@1"]]

    zoo.delete("tiny@1")
    report = zoo.gc(purge_deleted=True, grace_s=0)
    assert report.analyses_dropped == 1 and not path.exists()


def _analysis_blob(zoo: Any, analysis_id: int, name: str) -> str:
    from sqlalchemy import select

    from modelzoo.registry.schema import AnalysisTensor

    with zoo.registry.db.read() as session:
        return str(session.scalar(select(AnalysisTensor.blob_sha256).where(
            AnalysisTensor.analysis_id == analysis_id, AnalysisTensor.name == name)))


def test_zoo_analyze_fv_stores_the_vector_and_lists_it(capsys, home, llama_dir, tmp_path):
    assert zoo_cli(capsys, home, "import", str(llama_dir), "--name", "tiny").code == 0
    task = _write(tmp_path / "task.jsonl", [{"input": s, "output": o} for s, o in FACTS * 2])
    done = zoo_cli(capsys, home, "analyze", "fv", "tiny", "--task", str(task), "--shots", "3", "--mean-trials", "3",
                   "--ie-trials", "2", "--layers", "1,2", "--head-counts", "1,2", "--json")
    assert done.code == 0, done.err
    result = json.loads(done.out)
    assert result["kind"] == "fv" and result["layer"] in (1, 2) and result["tested"] == 5
    assert {"base", "fv"} <= set(result["zero_shot"]) and {"base", "fv"} <= set(result["zero_shot_p"])
    assert all(len(h) == 2 for h in result["heads"]) and len(result["heads"]) in (1, 2)
    listed = json.loads(zoo_cli(capsys, home, "analyses", "tiny", "--json").out)
    assert [(a["id"], a["kind"]) for a in listed] == [(result["id"], "fv")]
    assert set(listed[0]) >= {"id", "kind", "created_at", "metrics"}
    shown = json.loads(zoo_cli(capsys, home, "analysis", str(result["id"]), "--json").out)
    assert shown["tensors"] == ["function_vector", "indirect_effect", "mean_head_outputs"]
    assert json.loads(zoo_cli(capsys, home, "show", "tiny", "--json").out)["analyses"] == 1


def test_zoo_analyze_lre_on_a_model_that_ignores_context(capsys, home, tmp_path):
    """With every attention output zeroed, the last token alone decides the answer; its unembedding row is
    set so that the answer is " cat". Every fact with that object is known, so the whole pipeline runs,
    and since h cannot reach z, W is 0 and causality has no pair with another answer."""
    model, tokenizer = _tiny_lm("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        parts = lm_parts(LoadedModel("x", "lm", model, {"": model}, tokenizer))
        final = model.model(torch.tensor([parts.ids("The cat is")])).last_hidden_state[0, -1]
        model.lm_head.weight[parts.answer_token("cat")] = 100 * final / final.norm()
    directory = tmp_path / "deaf"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    facts = _write(tmp_path / "facts.jsonl", [
        {"relation": "r", "prompt": "The {} is", "subject": s, "object": "cat"} for s, _ in FACTS])
    assert zoo_cli(capsys, home, "import", str(directory), "--name", "deaf").code == 0
    done = zoo_cli(capsys, home, "analyze", "lre", "deaf", "--facts", str(facts), "--train", "3", "--layers", "0,1",
                   "--json")
    assert done.code == 0, done.err
    result = json.loads(done.out)
    assert (result["relation"], result["tested"], result["causality_tested"]) == ("r", 5, 0)
    assert result["faithfulness"] == 1.0 and set(result["baselines"]) == {"identity", "translation"}
    assert {"id", "layer", "beta", "rank", "causality"} <= set(result)
    W = json.loads(zoo_cli(capsys, home, "analysis", str(result["id"]), "--json").out)["tensors"]
    assert W == ["W", "b"]


@pytest.mark.parametrize("case", ["empty", "malformed", "few facts", "unknown relation", "non-LM", "unknown id",
                                  "bad id", "missing file"])
def test_bad_analysis_input_is_one_line_exit_2_and_stores_nothing(capsys, home, llama_dir, tiny_gan_dir, tmp_path,
                                                                  case):
    zoo_cli(capsys, home, "import", str(llama_dir), "--name", "tiny")
    zoo_cli(capsys, home, "import", str(tiny_gan_dir), "--name", "gan")
    facts = [{"relation": "r", "prompt": "The {} is", "subject": s, "object": o} for s, o in FACTS]
    args = {
        "empty": ["analyze", "fv", "tiny", "--task", str(_write(tmp_path / "e.jsonl", []))],
        "malformed": ["analyze", "lre", "tiny", "--facts", str(tmp_path / "m.jsonl")],
        "few facts": ["analyze", "lre", "tiny", "--facts", str(_write(tmp_path / "f.jsonl", facts)), "--train", "8"],
        "unknown relation": ["analyze", "lre", "tiny", "--facts", str(_write(tmp_path / "f.jsonl", facts)),
                             "--relation", "nope"],
        "non-LM": ["analyze", "fv", "gan", "--task", str(_write(tmp_path / "t.jsonl", [
            {"input": s, "output": o} for s, o in FACTS * 2])), "--shots", "2"],
        "unknown id": ["analysis", "999"],
        "bad id": ["analysis", "x1"],
        "missing file": ["analyze", "fv", "tiny", "--task", str(tmp_path / "absent.jsonl")],
    }[case]
    (tmp_path / "m.jsonl").write_text('{"relation": "r", "prompt": "The {} is"\n')
    before = snapshot(home)
    result = zoo_cli(capsys, home, *args)
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and result.err.startswith("error: ")
    assert snapshot(home) == before


def _stored_fv(zoo: Any, ref: str, hidden: int, layer: int) -> tuple[int, torch.Tensor]:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(3))
    info = store_analysis(zoo.registry, ref, NewAnalysis("fv", {}, {"layer": layer, "heads": [[0, 1]]}, "0" * 64,
                                                         {"function_vector": v}))
    return info.id, v


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zoo_edit_fv_child_adds_the_vector_after_its_layer_at_every_position(capsys, home, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _tiny_lm(arch)
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    assert zoo_cli(capsys, home, "import", str(tmp_path / arch), "--name", "tiny").code == 0
    zoo = __import__("modelzoo").open(home)
    analysis, v = _stored_fv(zoo, "tiny@1", model.config.hidden_size, 1)
    done = zoo_cli(capsys, home, "edit", "fv", "tiny", "--analysis", str(analysis), "--scale", "2", "--json")
    assert done.code == 0, done.err
    child = json.loads(done.out)
    assert child["params"]["analysis"] == analysis and child["parents"][0]["ref"] == "tiny@1"

    ids = torch.tensor([tokenizer("The cat sat on the mat")["input_ids"]])
    parent = lm_parts(LoadedModel("p", "lm", model, {"": model}, tokenizer))
    with torch.no_grad(), trace(model, parent.block(1), edit_output=lambda n, o: with_residual(o, residual(o) + 2 * v)):
        expected = model(ids).logits
    zoo.export(child["ref"], tmp_path / "child")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "child").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-4)
    assert (loaded.config.model_type == "gpt2") != bool(getattr(loaded.config, "mlp_bias", False))

    other = zoo_cli(capsys, home, "edit", "fv", "tiny@2", "--analysis", str(analysis))
    assert other.code == 2 and "was computed on tiny@1" in other.err


def test_composed_fv_children_add_both_vectors_each_after_its_layer(capsys, home, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _tiny_lm("llama")
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    assert zoo_cli(capsys, home, "import", str(tmp_path / "llama"), "--name", "tiny").code == 0
    zoo = __import__("modelzoo").open(home)
    vectors = {}
    for layer in (0, 1):
        analysis, vectors[layer] = _stored_fv(zoo, "tiny@1", model.config.hidden_size, layer)
        vectors[layer] = vectors[layer] * (layer + 1)  # two different vectors
        assert zoo_cli(capsys, home, "edit", "fv", "tiny@1", "--analysis", str(analysis), "--scale",
                       str(layer + 1)).code == 0
    done = zoo_cli(capsys, home, "compose", "tiny@2", "tiny@3", "--name", "both", "--scale", "1", "--scale", "0.5",
                   "--json")
    assert done.code == 0, done.err

    ids = torch.tensor([tokenizer("The cat sat on the mat")["input_ids"]])
    parts = lm_parts(LoadedModel("p", "lm", model, {"": model}, tokenizer))
    scaled = {parts.block(0): vectors[0], parts.block(1): 0.5 * vectors[1]}
    def add(name: str, output: Any) -> Any:
        return with_residual(output, residual(output) + scaled[name])

    with torch.no_grad(), trace(model, list(scaled), edit_output=add):
        expected = model(ids).logits
    zoo.export(json.loads(done.out)["ref"], tmp_path / "both")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "both").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-4)

    weights = zoo.registry.load_tensors("tiny@1")
    plain = zoo.registry.commit("tiny@1", {"lm_head.weight": weights["lm_head.weight"] + 1}, "test").ref
    refused = zoo_cli(capsys, home, "compose", "tiny@2", plain, "--name", "mixed")
    assert refused.code == 2 and "add different biases" in refused.err

"""MEMIT and AlphaEdit on tiny real models (fast), and the closed forms they rest on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from sqlalchemy import select
from test_family_lm import tiny_bpe_tokenizer, tiny_llama
from tiny_models import tiny_gpt2

from modelzoo.demo.real_facts import DEFAULT_FILE, HALVES, half, load
from modelzoo.editors import memit_stats
from modelzoo.editors.lm_eval import fact_scores, harmonic_mean
from modelzoo.editors.lm_layout import layout_of
from modelzoo.editors.lm_requests import load_requests, request_from_json, subject_tokens
from modelzoo.editors.memit import (
    PREV_KIND,
    MemitRequest,
    _load_prev,
    alphaedit_delta,
    default_hparams,
    keys_at,
    memit_delta,
    null_space_projector,
)
from modelzoo.registry.derived import DerivedTensors
from modelzoo.registry.errors import BadInput
from modelzoo.registry.schema import Blob, DerivedTensor

FACTS = [
    {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome", "target_true": "Paris",
     "paraphrase_prompts": ["France has its capital in"],
     "neighborhood_prompts": [{"prompt": "The capital of Italy is", "target": "Rome"}]},
    {"prompt": "A red {} and", "subject": "circle", "target_new": "mat", "target_true": "a",
     "neighborhood_prompts": ["A blue square and"]},
]
SMALL = {"v_steps": 6, "template_count": 2, "template_length": 3}


def _save_tiny_lm(directory: Path, arch: str = "gpt2") -> Path:
    tokenizer = tiny_bpe_tokenizer()
    if arch == "gpt2":
        model = tiny_gpt2(seed=1, vocab_size=len(tokenizer))
    else:
        model = tiny_llama(seed=1)
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_lm(tmp_path_factory.mktemp("memit") / "gpt2")


@pytest.fixture
def lm(zoo, lm_dir):  # type: ignore[no-untyped-def]
    return zoo.import_(lm_dir, "tiny")


def _request(zoo, info, facts=FACTS, **options) -> MemitRequest:  # type: ignore[no-untyped-def]
    return MemitRequest.of(facts, stats_samples=256, hparams={**SMALL, **options.pop("hparams", {})}, **options)


def _derived(zoo, kind: str) -> list[DerivedTensor]:  # type: ignore[no-untyped-def]
    with zoo.registry.db.read() as session:
        rows = session.scalars(select(DerivedTensor).where(DerivedTensor.kind == kind)).all()
        session.expunge_all()
        return list(rows)


def test_closed_form_maps_each_key_to_its_target_with_a_tiny_ridge():
    torch.manual_seed(0)
    key_dim, hidden, n = 48, 16, 12
    W = torch.randn(hidden, key_dim, dtype=torch.float64)
    K = torch.randn(key_dim, n, dtype=torch.float64)
    V = torch.randn(hidden, n, dtype=torch.float64)  # the values each key should map to
    A = torch.randn(key_dim, key_dim, dtype=torch.float64)
    C = A @ A.T / key_dim
    delta = memit_delta(K, V - W @ K, C, lam=1e-6)
    error = ((W + delta) @ K - V).norm(dim=0) / V.norm(dim=0)
    assert float(error.max()) < 0.01
    # the normal equations themselves: Delta (lam C + K K^T) = R K^T
    lam = 3.0
    delta = memit_delta(K, V - W @ K, C, lam)
    assert torch.allclose(delta @ (lam * C + K @ K.T), (V - W @ K) @ K.T, atol=1e-8)


def test_alphaedit_update_stays_in_the_null_space_and_fits_the_keys_there():
    torch.manual_seed(0)
    key_dim, hidden, n = 32, 8, 4
    U, _ = torch.linalg.qr(torch.randn(key_dim, key_dim, dtype=torch.float64))
    S = torch.cat([torch.ones(16), torch.full((16,), 1e-4)]).double()
    C = U @ torch.diag(S) @ U.T
    P, dim = null_space_projector(C, 1e-2)
    assert dim == 16
    K = P @ torch.randn(key_dim, n, dtype=torch.float64)  # keys inside the null space can be fitted exactly
    R = torch.randn(hidden, n, dtype=torch.float64)
    delta = alphaedit_delta(K, R, P, torch.zeros(key_dim, key_dim), l2=1e-8)
    assert float(((delta @ K - R).norm(dim=0) / R.norm(dim=0)).max()) < 0.01
    preserved = U[:, :16]  # C's principal directions: the update must leave them alone
    assert float((delta @ preserved).norm()) < 1e-6 * float(delta.norm())


def test_default_hyperparameters_follow_the_reference_per_architecture():
    with torch.device("meta"):
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        xl = GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=64, n_head=2))
        smol = LlamaForCausalLM(LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=64))
    gpt2 = default_hparams(layout_of(xl))
    assert (gpt2.layers, gpt2.lam, gpt2.v_steps) == ((13, 14, 15, 16, 17), 20000.0, 20)
    llama = layout_of(smol)
    assert (llama.down_proj, llama.key_dim, llama.hidden) == ("model.layers.{}.mlp.down_proj", 1536, 576)
    assert (default_hparams(llama).layers, default_hparams(llama).lam) == ((4, 5, 6, 7, 8), 4000.0)


def test_keys_weigh_the_bare_prompt_as_much_as_all_generated_prefixes(zoo, lm):
    """The reference's compute_ks: mean over each kind of template, then the mean of the two kinds."""
    model = zoo.load(lm.ref)
    layout = layout_of(model.pipeline)
    (fact,) = [request_from_json(FACTS[0])]
    templates = ["{}", "It rained. {}", "So. {}"]
    one = [keys_at(model.pipeline, model.tokenizer, layout, 1, [fact], [t])[0] for t in templates]
    got = keys_at(model.pipeline, model.tokenizer, layout, 1, [fact], templates)[0]
    torch.testing.assert_close(got, (one[0] + (one[1] + one[2]) / 2) / 2)
    assert not torch.allclose(got, sum(one) / 3)


def test_subject_last_token_is_found_in_the_filled_prompt():
    tok = tiny_bpe_tokenizer()
    t = subject_tokens(tok, "The capital of {} is", "France")
    assert tok.decode(t.ids[: t.subject_last + 1]).endswith("France")
    assert not tok.decode(t.ids[: t.subject_last]).endswith("France")


def test_edit_changes_only_the_edited_down_projections_and_records_provenance(zoo, lm):
    child = zoo.edit(lm.ref, "memit", _request(zoo, lm, layers=(1,)))
    diff = zoo.diff(lm.ref, child.ref)
    assert [c.tensor for c in diff.changed] == ["transformer.h.1.mlp.c_proj.weight"]
    assert child.method == "memit"
    assert child.params["hparams"]["layers"] == [1]
    assert child.params["request"]["requests"][0]["subject"] == "France"
    assert child.metrics["edits"] == 2
    assert set(child.metrics["timings_s"]) == {"stats_s", "templates_s", "z_s", "solve_s"}


def test_statistics_are_cached_and_reused_without_a_second_pass(zoo, lm, monkeypatch):
    first = zoo.edit(lm.ref, "memit", _request(zoo, lm))
    assert not any(s["cached"] for s in first.metrics["stats"].values())
    cached = _derived(zoo, memit_stats.DERIVED_KIND)
    assert len(cached) == len(first.params["hparams"]["layers"])
    assert {r.key["model"] for r in cached} == {lm.manifest_hash}
    zoo.gc(grace_s=0)  # the statistics are registry blobs that gc keeps

    def no_second_pass(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("statistics recomputed")

    monkeypatch.setattr(memit_stats, "_generate_keys", no_second_pass)
    second = zoo.edit(lm.ref, "memit", _request(zoo, lm, lam=5.0))
    assert all(s["cached"] for s in second.metrics["stats"].values())
    assert second.metrics["stats"] == {k: {**v, "cached": True} for k, v in first.metrics["stats"].items()}


def test_gc_drops_derived_tensors_only_when_asked(zoo, lm, home, capsys):
    zoo.edit(lm.ref, "memit", _request(zoo, lm))
    layers = len(_derived(zoo, memit_stats.DERIVED_KIND))
    key_dim = zoo.load(lm.ref).pipeline.config.n_inner or 4 * zoo.load(lm.ref).pipeline.config.n_embd
    assert zoo.stats().derived_bytes == layers * key_dim * key_dim * 4  # float32 C per layer
    r = zoo_cli(capsys, home, "gc", "--grace", "0", "--json")
    assert r.code == 0 and json.loads(r.out)["derived_dropped"] == 0 and len(_derived(zoo, memit_stats.DERIVED_KIND))
    r = zoo_cli(capsys, home, "gc", "--grace", "0", "--drop-derived", "--json")
    report = json.loads(r.out)
    assert r.code == 0 and report["derived_dropped"] == layers and report["blobs_removed"] == layers
    assert _derived(zoo, memit_stats.DERIVED_KIND) == [] and zoo.verify().damaged == []
    assert zoo.stats().derived_bytes == 0
    again = zoo.edit(lm.ref, "memit", _request(zoo, lm, lam=5.0))
    assert not any(s["cached"] for s in again.metrics["stats"].values())


def test_statistics_from_a_corpus_file_are_keyed_by_its_hash(zoo, lm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris.\nA red circle and a blue square.\n" * 40)
    child = zoo.edit(lm.ref, "memit", _request(zoo, lm, stats_corpus=str(corpus)))
    assert child.params["stats"]["corpus"] == str(corpus)
    (row, *_) = _derived(zoo, memit_stats.DERIVED_KIND)
    assert row.key["corpus"] == memit_stats.corpus_hash(corpus) and row.key["model"] == lm.manifest_hash
    hit = DerivedTensors(zoo.registry).get(memit_stats.DERIVED_KIND, row.key)
    assert hit is not None and hit.meta["count"] >= 256
    C = hit.tensor
    assert torch.allclose(C, C.T) and float(torch.linalg.eigvalsh(C.double()).min()) > -1e-6


def test_gc_purge_drops_statistics_once_their_version_is_purged(zoo, lm):
    child = zoo.edit(lm.ref, "alphaedit", _request(zoo, lm))
    stats, prev = _derived(zoo, memit_stats.DERIVED_KIND), _derived(zoo, PREV_KIND)
    assert {r.depends_on for r in stats} == {lm.manifest_hash} and {r.depends_on for r in prev} == {child.manifest_hash}
    zoo.delete(lm.ref)
    assert zoo.gc(grace_s=0).derived_dropped == 0  # deleted, not purged: restorable, its caches kept
    report = zoo.gc(purge_deleted=True, grace_s=0)
    assert report.derived_dropped == len(stats) and _derived(zoo, memit_stats.DERIVED_KIND) == []
    assert len(_derived(zoo, PREV_KIND)) == len(prev)  # the child is alive
    assert zoo.verify().damaged == []


def test_damaged_statistics_are_reported_by_verify_and_recomputed_by_the_next_edit(zoo, lm, home, capsys):
    zoo.edit(lm.ref, "memit", _request(zoo, lm))
    (row, *_) = _derived(zoo, memit_stats.DERIVED_KIND)
    with zoo.registry.db.read() as session:
        location = session.get(Blob, row.blob_sha256).location
    path = zoo.settings.blob_dir / location
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = zoo.verify()
    assert [d.sha256 for d in report.damaged] == [row.blob_sha256] and report.damaged[0].versions == []
    r = zoo_cli(capsys, home, "verify")
    assert r.code == 1 and "editor cache memit-stats (recomputed on next use" in r.err
    again = zoo.edit(lm.ref, "memit", _request(zoo, lm, lam=5.0))
    assert not all(s["cached"] for s in again.metrics["stats"].values())
    assert zoo.verify().damaged == []


def test_export_loads_in_transformers_and_reproduces_the_edit(zoo, lm, tmp_path):
    from transformers import AutoModelForCausalLM

    child = zoo.edit(lm.ref, "memit", _request(zoo, lm))
    exported = AutoModelForCausalLM.from_pretrained(zoo.export(child.ref, tmp_path / "out")).eval()
    loaded = zoo.load(child.ref)
    parent = zoo.load(lm.ref)
    ids = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        got, want, before = (m(ids).logits for m in (exported, loaded.pipeline, parent.pipeline))
    assert torch.equal(got, want)
    assert not torch.allclose(got, before)


def test_quick_edit_prefers_the_new_targets(zoo, lm):
    """The tiny model is random, so only efficacy on the edited prompts is asked for; it is reported."""
    facts = [request_from_json(f) for f in FACTS]
    child = zoo.edit(lm.ref, "memit", _request(zoo, lm, lam=1.0, hparams={"v_steps": 15}))
    edited = zoo.load(child.ref)
    after = fact_scores(edited.pipeline, edited.tokenizer, facts)
    print(json.dumps({"tiny_gpt2_after": after.__dict__}))
    assert after.efficacy == 1.0


def _keys_of(model, info, facts, layer: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """K (key_dim, n) of an edit's facts at `layer`, read from the edited version with the edit's templates.

    A layer's keys depend only on the layers before it, which the edit had already updated when it read
    them, so the committed child gives the same keys the edit used."""
    requests = [request_from_json(f) for f in facts]
    templates = info.params["context_templates"]
    return keys_at(model.pipeline, model.tokenizer, layout_of(model.pipeline), layer, requests, templates).T


# A threshold above every singular value makes P = I, so the solve is (K K^T + C_prev + l2 I) Delta^T = K R^T;
# with a ridge far below the tiny model's |k|^2 that update maps every key in C_prev to (almost) zero.
ONLY_EARLIER_KEYS = {"nullspace_threshold": 1e9, "l2": 1e-4}


def test_sequential_edits_chain_in_lineage_and_alphaedit_accumulates_earlier_keys(zoo, lm):
    first = zoo.edit(lm.ref, "alphaedit", _request(zoo, lm, facts=FACTS[:1], hparams=ONLY_EARLIER_KEYS))
    second_request = _request(zoo, first, facts=FACTS[1:], hparams=ONLY_EARLIER_KEYS)
    second = zoo.edit(first.ref, "alphaedit", second_request)
    assert [p.ref for p in second.parents] == [first.ref]
    ancestors = [a.ref for a in zoo.lineage(second.ref).ancestors]
    assert first.ref in ancestors and lm.ref in ancestors
    assert second.method == "alphaedit"
    assert len(_derived(zoo, PREV_KIND)) == 2 * len(first.params["hparams"]["layers"])
    assert "cache" not in second.params["request"]

    cache = DerivedTensors(zoo.registry)
    m0, m1, m2 = (zoo.load(v.ref) for v in (lm, first, second))
    layout = layout_of(m0.pipeline)
    for layer in first.params["hparams"]["layers"]:
        W0, W1, W2 = (m.tensor(layout.weight_name(layer)) for m in (m0, m1, m2))
        K1 = _keys_of(m1, first, FACTS[:1], layer).double()
        K2 = _keys_of(m2, second, FACTS[1:], layer).double()
        C1 = _load_prev(cache, W1, layout.key_dim).double()
        torch.testing.assert_close(C1, K1 @ K1.T, rtol=1e-4, atol=1e-4)
        C2 = _load_prev(cache, W2, layout.key_dim).double()
        torch.testing.assert_close(C2, K1 @ K1.T + K2 @ K2.T, rtol=1e-4, atol=1e-4)
        assert not torch.equal(W1, W0)

        delta = (W2 - W1).double()
        delta = delta.T if layout.weight_is_input_major else delta  # (hidden, key_dim)
        # An update blind to C_prev, R k2^T / |k2|^2, would move the first key's output by cos(k1, k2) of
        # its size; the update solved against C_prev leaves it where the first edit put it.
        moved = float((delta @ K1).norm() / (delta.norm() * K1.norm()))
        blind_moved = float((K1.T @ K2).abs().max() / (K1.norm() * K2.norm()))
        assert moved < blind_moved / 100


def test_llama_style_models_are_edited_in_their_down_proj(zoo, tmp_path):
    info = zoo.import_(_save_tiny_lm(tmp_path / "llama", "llama"), "tiny-llama")
    child = zoo.edit(info.ref, "memit", _request(zoo, info))
    names = sorted(c.tensor for c in zoo.diff(info.ref, child.ref).changed)
    assert names and all(n.startswith("model.layers.") and n.endswith("mlp.down_proj.weight") for n in names)


def test_cli_edits_and_evaluates(zoo, lm, home, tmp_path, capsys):
    requests = tmp_path / "facts.jsonl"
    requests.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    hp = [f"--hparam={k}={v}" for k, v in SMALL.items()]
    r = zoo_cli(capsys, home, "edit", "memit", lm.ref, "--requests", str(requests), "--layers", "0-1",
                "--stats-samples", "256", "--name", "tiny-edited", "--z-batch", "1", "--json", *hp)
    assert r.code == 0, r.err
    child = json.loads(r.out)
    assert child["ref"] == "tiny-edited@1" and child["method"] == "memit"
    assert zoo.get("tiny-edited@1").params["hparams"]["z_batch"] == 1
    r = zoo_cli(capsys, home, "edit", "memit", "tiny-edited@1", "--prompt", "{} sat on the", "--subject", "The cat",
                "--target-new", "square", "--method", "alphaedit", "--stats-samples", "256", "--json", *hp)
    assert r.code == 0, r.err
    assert json.loads(r.out)["method"] == "alphaedit"
    r = zoo_cli(capsys, home, "eval", "facts", "tiny-edited@2", "--requests", str(requests), "--json")
    assert r.code == 0, r.err
    scores = json.loads(r.out)["scores"]
    assert set(scores) >= {"efficacy", "paraphrase", "neighborhood", "score"}


BAD = {
    "subject not in the prompt": ({"prompt": "France is in", "subject": "France"}, "write {}"),
    "prompt without {}": ({"prompt": "The capital is"}, "has no {}"),
    "empty target": ({"target_new": " "}, "target_new is empty"),
    "subject missing from a paraphrase": ({"paraphrase_prompts": ["Its capital is"]}, "does not occur"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_refuses_bad_requests_and_registers_nothing(zoo, lm, home, tmp_path, capsys, case):
    change, message = BAD[case]
    requests = tmp_path / "bad.json"
    requests.write_text(json.dumps([{**FACTS[0], **change}]))
    before = snapshot(home)
    r = zoo_cli(capsys, home, "edit", "memit", lm.ref, "--requests", str(requests))
    assert r.code == 2 and message in r.err, r.err
    assert snapshot(home) == before


@pytest.mark.parametrize("layers", ["0-2", "5", "x"])
def test_cli_refuses_layers_out_of_range(zoo, lm, home, capsys, layers):
    before = snapshot(home)
    r = zoo_cli(capsys, home, "edit", "memit", lm.ref, "--prompt", "{} is", "--subject", "France",
                "--target-new", "Rome", "--layers", layers)
    assert r.code == 2 and "layers" in r.err, r.err
    assert snapshot(home) == before


def test_cli_refuses_a_model_that_is_not_a_language_model(zoo, sd_dir, home, capsys):
    sd = zoo.import_(sd_dir, "sd")
    before = snapshot(home)
    r = zoo_cli(capsys, home, "edit", "memit", sd.ref, "--prompt", "{} is", "--subject", "a", "--target-new", "b")
    assert r.code == 2 and "diffusion" in r.err, r.err
    assert snapshot(home) == before


def test_request_files_are_read_as_json_jsonl_and_counterfact(tmp_path):
    nested = tmp_path / "cf.json"
    nested.write_text(json.dumps([{"case_id": 7, "requested_rewrite": {
        "prompt": "{} plays", "subject": "Messi", "target_new": {"str": "tennis"}, "target_true": {"str": "soccer"}}}]))
    (r,) = load_requests(nested)
    assert (r.target_new, r.target_true, r.case_id) == ("tennis", "soccer", "7")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(BadInput, match="not valid JSONL"):
        load_requests(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(BadInput, match="not UTF-8"):
        load_requests(binary)


def test_harmonic_mean_is_zero_when_any_part_fails():
    assert harmonic_mean([1.0, 1.0, 0.0]) == 0.0
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)


def test_neighbours_edited_in_the_same_batch_are_left_out_of_the_neighbourhood_score(zoo, lm):
    """A neighbour that another request rewrites was changed on purpose: it must not count as leakage."""
    model = zoo.load(lm.ref)
    france = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome", "target_true": "Paris",
              "neighborhood_prompts": [{"prompt": "The capital of Italy is", "target": "Rome"},
                                       {"prompt": "The capital of Spain is", "target": "Madrid"}]}
    italy = {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Oslo", "target_true": "Rome"}
    spain_only = {**france, "neighborhood_prompts": france["neighborhood_prompts"][1:]}
    together = fact_scores(model.pipeline, model.tokenizer, [request_from_json(france), request_from_json(italy)])
    alone = fact_scores(model.pipeline, model.tokenizer, [request_from_json(france)])
    expected = fact_scores(model.pipeline, model.tokenizer, [request_from_json(spain_only)])
    assert (together.neighbors_skipped, alone.neighbors_skipped) == (1, 0)
    assert together.neighborhood == expected.neighborhood


def test_fact_set_splits_into_fixed_halves_that_share_no_fact_and_each_hold_every_relation():
    """Settings are chosen on one half and asserted on the other, so the split must not drift."""
    rows = load(DEFAULT_FILE)
    selection, acceptance = (half(rows, h) for h in HALVES)
    assert [r["case_id"] for r in selection[:3]] == ["capital:Spain", "language:Mexico", "currency:China"]
    assert [r["case_id"] for r in acceptance[:3]] == ["language:South Africa", "currency:Mexico", "continent:Kenya"]
    assert sorted(r["case_id"] for r in selection + acceptance) == sorted(r["case_id"] for r in rows)
    for relation in {r["relation"] for r in rows}:
        counts = [sum(r["relation"] == relation for r in h) for h in (selection, acceptance)]
        assert min(counts) >= 1 and abs(counts[0] - counts[1]) <= 1
    assert min(len(selection), len(acceptance)) >= 80  # the most the slow test and the benchmark edit


MORE_FACTS = FACTS + [
    {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Paris", "target_true": "Rome"},
    {"prompt": "A blue {} and", "subject": "square", "target_new": "circle"},
    {"prompt": "{} is a", "subject": "France", "target_new": "square"},
]


def _z(model, facts, monkeypatch=None, **hparams):  # type: ignore[no-untyped-def]
    from modelzoo.editors.memit import compute_z, context_templates, prepare

    request = MemitRequest.of(facts, hparams={**SMALL, "v_steps": 12, "z_precision": "float32", **hparams})
    prep = prepare(model, request)
    templates = context_templates(prep.lm, prep.tokenizer, prep.hp.template_count, prep.hp.template_length, 0)
    return compute_z(prep.lm, prep.tokenizer, prep.layout, prep.hp, prep.requests, templates)


def test_batched_z_equals_one_request_at_a_time(zoo, lm, monkeypatch):
    """Each request keeps its own loss, KL, clamp and early stop inside the batch, so its z is the one the
    reference's sequential loop finds; a row leaking into another (padding, a shared loss) would differ.
    The tiny random model never reaches the reference's stopping loss, so the stop is set between its
    requests' first losses: some stop at once, the others run on, in the batch as alone."""
    from modelzoo.editors import memit

    model = zoo.load(lm.ref)
    first = _z(model, MORE_FACTS, z_batch=1, layers=(0,), v_steps=1).losses
    monkeypatch.setattr(memit, "EARLY_STOP", sorted(first)[len(first) // 2])
    sequential = _z(model, MORE_FACTS, z_batch=1, layers=(0,))
    batched = _z(model, MORE_FACTS, layers=(0,))
    assert (sequential.batch, batched.batch) == (1, len(MORE_FACTS))
    assert len(set(sequential.steps)) == 2
    assert sequential.delta.norm(dim=1).min() == 0 < sequential.delta.norm(dim=1).max()
    _assert_same_z(batched, sequential)


def _assert_same_z(a, b) -> None:  # type: ignore[no-untyped-def]
    """Equal up to the optimiser's tolerance: float rounding differs with the batch's shape, and Adam's
    first steps move a coordinate by about lr whatever its gradient's size, so where a gradient is near
    zero the rounding can pick its sign."""
    assert a.steps == b.steps
    gap = (a.delta - b.delta).norm(dim=1) / b.delta.norm(dim=1).clamp_min(1e-12)
    assert float(gap.max()) < 1e-2, gap
    assert a.losses == pytest.approx(b.losses, rel=1e-3)


def test_default_z_batch_is_bounded_by_free_memory(zoo, lm, monkeypatch):
    from modelzoo.editors import memit

    model = zoo.load(lm.ref)
    everything = _z(model, MORE_FACTS, layers=(0,))
    monkeypatch.setattr(memit, "_free_bytes", lambda device: 1)
    squeezed = _z(model, MORE_FACTS, layers=(0,))
    assert squeezed.batch == 1 and everything.batch == len(MORE_FACTS)
    _assert_same_z(squeezed, everything)


def test_a_negative_z_batch_is_refused(zoo, lm):
    with pytest.raises(BadInput, match="z_batch"):
        _z(zoo.load(lm.ref), FACTS, z_batch=-1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rests_over_the_prefix_cache_equal_the_whole_sequences(tmp_path, arch):
    """z's steps run only the tokens from each subject's last one on, over the prefixes' cached keys and
    values: every hidden state there must be the whole sequence's, whatever the other rows' prefix lengths
    (a subject at position 0 has no prefix at all; a shifted position or a visible pad would differ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelzoo.editors.lm_requests import pad_batch
    from modelzoo.editors.memit import _rewrite_sequences, _SplitBatch

    directory = _save_tiny_lm(tmp_path / arch, arch)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    one_token = {"prompt": "{} is a", "subject": "a", "target_new": "square"}
    requests = [request_from_json(f) for f in [*MORE_FACTS, one_token]]
    seqs = _rewrite_sequences(tokenizer, requests, ["{}", "Some longer text before it all. {}"], range(len(requests)))
    assert min(s.tokens.subject_last for s in seqs) == 0 < max(s.tokens.subject_last for s in seqs)
    split = _SplitBatch(model, seqs, 0, torch.device("cpu"))
    rows = [i for i in range(len(seqs)) if i % 3]  # a subset, as when requests have stopped
    with torch.no_grad():
        rests = split.final_hidden(model, rows)
        ids, mask = pad_batch([seqs[r].ids for r in rows], 0)
        whole = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, r in enumerate(rows):
        start, length = seqs[r].tokens.subject_last, len(seqs[r].ids)
        torch.testing.assert_close(rests[i, : length - start], whole[i, start:length], atol=1e-5, rtol=1e-4)


def test_z_in_bfloat16_leaves_the_model_as_it_found_it(zoo, lm):
    """z holds the blocks' linear weights in bfloat16 while it runs (autocast would cast them at every
    call); they must come back as they were, tied head and embedding included."""
    model = zoo.load(lm.ref)
    before = {name: p.detach().clone() for name, p in model.pipeline.named_parameters()}
    tied = model.pipeline.get_output_embeddings().weight is model.pipeline.get_input_embeddings().weight
    _z(model, FACTS, z_precision="bfloat16")
    after = dict(model.pipeline.named_parameters())
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert p.dtype == before[name].dtype and torch.equal(p.detach(), before[name]), name
    assert tied == (model.pipeline.get_output_embeddings().weight is model.pipeline.get_input_embeddings().weight)


def test_z_is_the_same_whether_rests_of_different_lengths_share_a_pass_or_not(zoo, lm, monkeypatch):
    """Grouping rests by length only saves padding: every group's deltas, hidden states at the subject and
    losses must come back in the batch's order."""
    from modelzoo.editors import memit

    model = zoo.load(lm.ref)
    monkeypatch.setattr(memit, "MERGE_PADDING", 10**9)
    one_pass = _z(model, MORE_FACTS, layers=(0,))
    monkeypatch.setattr(memit, "MERGE_PADDING", 0)
    grouping = memit._SplitBatch.groups
    counts: list[int] = []

    def counted(self, rows):  # type: ignore[no-untyped-def]
        groups = grouping(self, rows)
        counts.append(len(groups))
        return groups

    monkeypatch.setattr(memit._SplitBatch, "groups", counted)
    by_length = _z(model, MORE_FACTS, layers=(0,))
    assert max(counts) > 1
    _assert_same_z(by_length, one_pass)

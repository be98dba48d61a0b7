"""The `lm` family: tiny causal LMs imported, loaded from the registry's tensors, sampled and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_gpt2

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import get_family
from modelzoo.registry.families.lm import LanguageModelFamily, gpt2_xl

CORPUS = ["The capital of France is Paris.", "A red circle and a blue square.", "The cat sat on the mat."] * 10
END = "<|endoftext|>"


def tiny_bpe_tokenizer(vocab_size: int = 300):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer (GPT-2's kind) trained offline on a few sentences; id 0 is <|endoftext|>."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=[END], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=END, eos_token=END)


@pytest.fixture(scope="module")
def gpt2_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a real tokenizer and in-vocabulary BOS/EOS ids."""
    directory = tmp_path_factory.mktemp("gpt2tok") / "gpt2"
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_gpt2(seed=1, vocab_size=len(tokenizer))
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)  # type: ignore[operator]
    return directory


def tiny_llama(seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gptj(seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    config = GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                        bos_token_id=1, eos_token_id=2)
    return GPTJForCausalLM(config).eval()


def tiny_neox(seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return GPTNeoXForCausalLM(config).eval()


def _load(zoo, ref: str):  # type: ignore[no-untyped-def]
    return get_family("lm").load(zoo.registry, ref)


def test_lm_family_is_found_through_its_entry_point():
    family = get_family("lm")
    assert isinstance(family, LanguageModelFamily)
    assert family.takes_prompts and not family.needs_prompt


def test_load_assigns_the_registry_tensors_without_copying_and_ties_the_output_embedding(zoo, gpt2_dir, monkeypatch):
    info = zoo.import_(gpt2_dir, "gpt2")
    assert "lm_head.weight" not in zoo.tensors(info.ref)  # the checkpoint leaves the tied head out
    handed_out: dict[str, torch.Tensor] = {}
    original = zoo.registry.load_tensors

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        handed_out.update(original(*args, **kwargs))
        return handed_out

    monkeypatch.setattr(zoo.registry, "load_tensors", recording)
    model = _load(zoo, info.ref)
    lm = model.pipeline
    params = dict(lm.named_parameters())
    for name, tensor in handed_out.items():
        assert params[name].data_ptr() == tensor.data_ptr(), name
    assert lm.lm_head.weight is lm.transformer.wte.weight
    assert not lm.training


def test_loaded_gpt2_gives_the_same_logits_as_transformers(zoo, gpt2_dir):
    from transformers import AutoModelForCausalLM

    info = zoo.import_(gpt2_dir, "gpt2")
    native = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(_load(zoo, info.ref).pipeline(ids).logits, native(ids).logits)


def test_same_seed_gives_the_same_text_and_a_seed_does_not_depend_on_its_batch(zoo, gpt2_tok_dir):
    info = zoo.import_(gpt2_tok_dir, "gpt2")
    family = get_family("lm")
    model = family.load(zoo.registry, info.ref)
    rng_before = torch.get_rng_state()
    first = family.sample(model, [5], prompt="The capital of", max_new_tokens=12)
    again = family.sample(model, [5], prompt="The capital of", max_new_tokens=12)
    batch = family.sample(model, [3, 5], prompt="The capital of", max_new_tokens=12)
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling leaves the global RNG alone
    assert first[0].text == again[0].text and first[0].text
    assert [s.seed for s in batch] == [3, 5] and batch[1].text == first[0].text
    assert batch[0].text != batch[1].text
    assert all(s.prompt == "The capital of" and s.image is None for s in batch)


def test_greedy_sampling_ignores_the_seed(zoo, gpt2_tok_dir):
    info = zoo.import_(gpt2_tok_dir, "gpt2")
    family = get_family("lm")
    model = family.load(zoo.registry, info.ref)
    texts = {s.text for s in family.sample(model, [0, 1, 2], prompt="A red", max_new_tokens=8, temperature=0)}
    assert len(texts) == 1


def test_export_generates_exactly_what_the_adapter_samples(zoo, gpt2_tok_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = zoo.import_(gpt2_tok_dir, "gpt2")
    family = get_family("lm")
    model = family.load(zoo.registry, info.ref)
    samples = family.sample(model, [3, 5], prompt="The cat", max_new_tokens=10, temperature=0.9, top_k=20)
    out = zoo.export(info.ref, tmp_path / "export")
    native = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The cat", return_tensors="pt").input_ids
    for sample in samples:
        torch.manual_seed(sample.seed)
        generated = native.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.9,
                                    top_k=20, max_new_tokens=10)
        assert tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True) == sample.text
    with torch.no_grad():
        assert torch.equal(native(ids).logits, model.pipeline(ids).logits)


def test_sampling_without_a_prompt_starts_from_the_bos_token(zoo, gpt2_tok_dir):
    info = zoo.import_(gpt2_tok_dir, "gpt2")
    family = get_family("lm")
    model = family.load(zoo.registry, info.ref)
    bos = model.tokenizer.bos_token_id
    [sample] = family.sample(model, [7], max_new_tokens=6)
    torch.manual_seed(7)
    start = torch.tensor([[bos]])
    expected = model.pipeline.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=50,
                                       temperature=1.0, max_new_tokens=6, pad_token_id=bos)
    assert sample.prompt is None
    assert sample.text == model.tokenizer.decode(expected[0, 1:], skip_special_tokens=True)


def test_model_without_tokenizer_speaks_token_ids(zoo, gpt2_dir):
    info = zoo.import_(gpt2_dir, "gpt2")
    family = get_family("lm")
    model = family.load(zoo.registry, info.ref)
    assert model.tokenizer is None
    [sample] = family.sample(model, [1], prompt="5 6 7", max_new_tokens=4)
    assert len(sample.text.split()) == 4 and all(0 <= int(t) < 128 for t in sample.text.split())
    with pytest.raises(BadInput, match="token ids"):
        family.sample(model, [1], prompt="hello there")
    with pytest.raises(BadInput, match="vocabulary"):  # the fixture's BOS id 50256 is outside its 128 tokens
        family.sample(model, [1])


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5])
def test_bad_seeds_are_refused(zoo, gpt2_dir, bad):
    info = zoo.import_(gpt2_dir, "gpt2")
    family = get_family("lm")
    with pytest.raises(BadInput, match="seeds"):
        family.sample(family.load(zoo.registry, info.ref), [bad], prompt="1")


def test_gpt2_editable_tensors_are_the_attention_and_mlp_projections(zoo, gpt2_dir):
    info = zoo.import_(gpt2_dir, "gpt2")
    names = get_family("lm").editable_tensors(_load(zoo, info.ref))
    projections = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert names == [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in projections]
    assert set(names) <= set(zoo.tensors(info.ref))


def test_tiny_llama_round_trips_through_the_registry(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_llama()
    info = zoo.import_(_save(original, tmp_path / "llama"), "llama")
    assert info.family == "lm" and "lm_head.weight" in zoo.tensors(info.ref)
    family = get_family("lm")
    model = family.load(zoo.registry, info.ref)
    assert type(model.pipeline).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, 17, 33, 9, 60]])
    with torch.no_grad():
        assert torch.equal(model.pipeline(ids).logits, original(ids).logits)
    exported = AutoModelForCausalLM.from_pretrained(zoo.export(info.ref, tmp_path / "export")).eval()
    [sample] = family.sample(model, [11], prompt="1 17 33", max_new_tokens=6)
    start = torch.tensor([[1, 17, 33]])
    torch.manual_seed(11)
    expected = exported.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=50,
                                 max_new_tokens=6)
    assert sample.text == " ".join(str(int(t)) for t in expected[0, 3:])
    [unprompted] = family.sample(model, [11], max_new_tokens=3)  # starts from the config's BOS id 1
    assert len(unprompted.text.split()) == 3
    assert family.editable_tensors(model) == [
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]


@pytest.mark.parametrize(
    ("build", "projections"),
    [
        (tiny_gptj, ("attn.k_proj", "attn.v_proj", "attn.q_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")),
        (tiny_neox, ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    ],
)
def test_gptj_and_gpt_neox_load_with_native_logits_and_checkpoint_names(zoo, tmp_path, build, projections):
    original = build()
    info = zoo.import_(_save(original, tmp_path / "model"), "model")
    model = _load(zoo, info.ref)
    stored = zoo.tensors(info.ref)
    # GPT-NeoX's checkpoints call the output head `embed_out`; transformers 5 renames it `lm_head` on load
    assert set(model.named_tensors()) == set(stored)
    assert all(torch.equal(model.tensor(name), tensor) for name, tensor in stored.items())
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    with torch.no_grad():
        assert torch.equal(model.pipeline(ids).logits, original(ids).logits)
    names = get_family("lm").editable_tensors(model)
    assert len(names) == 2 * len(projections)
    assert all(any(f".{p}.weight" in n for n in names) for p in projections)


def test_an_edited_child_loads_its_own_tensors(zoo, gpt2_dir):
    info = zoo.import_(gpt2_dir, "gpt2")
    family = get_family("lm")
    name = family.editable_tensors(_load(zoo, info.ref))[3]
    child = zoo.commit(info.ref, {name: torch.zeros_like(zoo.tensors(info.ref)[name])}, method="test-edit")
    parent, edited = _load(zoo, info.ref), _load(zoo, child.ref)
    assert bool(edited.tensor(name).eq(0).all()) and not bool(parent.tensor(name).eq(0).all())
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert not torch.equal(parent.pipeline(ids).logits, edited.pipeline(ids).logits)


def test_a_version_missing_a_tensor_is_refused(zoo, gpt2_dir):
    info = zoo.import_(gpt2_dir, "gpt2")
    child = zoo.commit(info.ref, {}, method="test-drop", removed=["transformer.h.1.mlp.c_fc.weight"])
    with pytest.raises(BadInput, match="lacks tensors"):
        _load(zoo, child.ref)


def test_a_tensor_the_architecture_has_no_place_for_is_refused(zoo, gpt2_dir, tmp_path):
    directory = tmp_path / "smaller"
    directory.mkdir()
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["n_layer"] = 1
    info = zoo.import_(gpt2_dir, "gpt2")
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
    smaller = zoo.import_(directory, "smaller")
    assert smaller.manifest_hash != info.manifest_hash
    with pytest.raises(BadInput, match="no place"):
        _load(zoo, smaller.ref)


def test_gpt2_xl_shape_has_1_56_billion_parameters():
    with torch.device("meta"):
        model = gpt2_xl()
    assert sum(p.numel() for p in model.parameters()) == 1_557_611_200
    assert model.config.n_layer == 48 and model.config.n_embd == 1600 and model.config.n_head == 25

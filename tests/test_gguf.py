"""GGUF import: a tiny Llama written as a Q8_0 GGUF offline, and (slow) the real SmolLM2-135M Q4_1 file."""

from __future__ import annotations

import gc
import hashlib
import json
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_family_lm import CORPUS

from modelzoo.registry.errors import BadInput, ZooError
from modelzoo.registry.families.base import get_family
from modelzoo.registry.families.gguf import smollm2_gguf_path

PROMPTS = ["The capital of France is", "A red circle and", "The cat sat"]


def _permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders each head's Q and K rows for its rotary layout; transformers undoes it."""
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny Llama and a byte-level BPE tokenizer written the way llama.cpp's converter writes them:
    matrices as Q8_0, norms as F32, llama.cpp's tensor names and metadata keys. Returns the float model."""
    import gguf
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"],
                            show_progress=False)
    spec = json.loads(bpe._tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t in ("<s>", "</s>") else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            tensor = _permute_for_llama_cpp(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = _permute_for_llama_cpp(tensor, config.num_key_value_heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if tensor.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(tensor.numpy(), q8), raw_dtype=q8)
        else:
            writer.add_tensor(target, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_llama_gguf(path)


def _transformers_gguf(path: Path):  # type: ignore[no-untyped-def]
    """The model and tokenizer as transformers' own GGUF loader gives them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _greedy(model, tokenizer, prompt: str, tokens: int = 12) -> str:  # type: ignore[no-untyped-def]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                         pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def _check_gguf_import(zoo, path: Path, tmp_path: Path, file_type: str) -> float:  # type: ignore[no-untyped-def]
    """Import `path`; the registry's model must be transformers' own GGUF load, exported loadably.
    Returns the import's wall time in seconds."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    info = zoo.import_(path, "gguf-lm")
    import_s = time.perf_counter() - started
    assert info.family == "lm" and info.config["format"] == "transformers"
    record = info.source["gguf"]
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["file_type"] == file_type and file_type in record["tensor_types"]
    assert record["dequantized_dtype"] == "float32" and info.source["path"] == str(path.resolve())

    family = get_family("lm")
    loaded = family.load(zoo.registry, info.ref)
    native, native_tokenizer = _transformers_gguf(path)
    for prompt in PROMPTS:
        [sample] = family.sample(loaded, [0], prompt=prompt, max_new_tokens=12, temperature=0)
        assert sample.text == _greedy(native, native_tokenizer, prompt)
        assert loaded.tokenizer(prompt)["input_ids"] == native_tokenizer(prompt)["input_ids"]

    exported = AutoModelForCausalLM.from_pretrained(zoo.export(info.ref, tmp_path / "export")).eval()
    ids = native_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, native(ids).logits)
        assert torch.equal(loaded.pipeline(ids).logits, native(ids).logits)
    return import_s


def test_tiny_gguf_imports_as_the_model_transformers_loads(zoo, tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    _check_gguf_import(zoo, path, tmp_path, "Q8_0")
    info = zoo.get("gguf-lm@1")
    assert info.source["gguf"]["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert info.source["gguf"]["architecture"] == "llama" and info.source["gguf"]["name"] == "tiny llama"


def test_tiny_gguf_import_is_close_to_the_float_model_it_was_quantized_from(zoo, tiny_gguf):
    path, original = tiny_gguf
    info = zoo.import_(path, "gguf-lm")
    loaded = get_family("lm").load(zoo.registry, info.ref)
    ids = torch.tensor([[0, 40, 80, 120, 160, 200, 240]])
    with torch.no_grad():
        expected, got = original(ids).logits, loaded.pipeline(ids).logits
    # Q8_0 keeps ~2 decimal digits per weight; a wrong Q/K permutation would be far off
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_gguf_import_leaves_no_temporary_folder_behind(zoo, tiny_gguf, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    zoo.import_(tiny_gguf[0], "gguf-lm")
    gc.collect()
    assert not list(scratch.glob("zoo-gguf-*"))


def test_gguf_is_refused_as_another_family(zoo, tiny_gguf):
    with pytest.raises(BadInput, match="GGUF language model"):
        zoo.import_(tiny_gguf[0], "g", family="diffusion")


def test_a_file_that_is_not_gguf_is_refused_before_anything_is_stored(zoo, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(BadInput, match="GGUF"):
        zoo.import_(fake, "g")
    assert zoo.list() == []


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return smollm2_gguf_path(Path(tempfile.gettempdir()) / "modelzoo-smollm2")
    except ZooError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.mark.slow
def test_smollm2_q4_1_gguf_imports_as_the_model_transformers_loads(zoo, smollm2, tmp_path):
    started = time.perf_counter()
    import_s = _check_gguf_import(zoo, smollm2, tmp_path, "Q4_1")
    info = zoo.get("gguf-lm@1")
    assert info.source["gguf"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    loaded = get_family("lm").load(zoo.registry, info.ref)
    [paris] = get_family("lm").sample(loaded, [0], prompt=PROMPTS[0], max_new_tokens=4, temperature=0)
    assert "Paris" in paris.text
    print(json.dumps({"smollm2_import_s": round(import_s, 1), "test_s": round(time.perf_counter() - started)}))

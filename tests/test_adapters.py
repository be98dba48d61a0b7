"""LoRA adapters import as factored children of their base and export back; PEFT and diffusers, loading
the same files themselves, are the judges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from lora_files import save_diffusers_sd_lora, save_kohya_sd_lora, save_peft_gpt2_lora, save_peft_sd_unet_lora
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_gpt2, tiny_gpt2, tiny_sd_pipeline


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gpt2_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


RSLORA = {"use_rslora": True, "rank_pattern": {"c_fc": 2}, "alpha_pattern": {"c_fc": 3}}


@pytest.mark.parametrize("config", [{}, RSLORA], ids=["alpha-over-r", "rslora-patterns"])
def test_peft_lm_adapter_is_a_factored_child_equal_to_merge_and_unload(zoo, gpt2_dir, tmp_path, config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = save_peft_gpt2_lora(tmp_path / "adapter", **config)
    base = zoo.import_(gpt2_dir, "gpt2")
    child = zoo.import_(adapter, "gpt2-lora", base=base.ref)

    assert [(p.ref, p.relation) for p in child.parents] == [(base.ref, "adapter")]
    assert child.params["adapter"]["configs"]["model"]["use_rslora"] == bool(config)
    adapter_bytes = sum(t.numel() * t.element_size() for t in load_file(adapter / "adapter_model.safetensors").values())
    assert abs(child.added_bytes - adapter_bytes) <= 0.1 * adapter_bytes
    judge = gpt2_logits(PeftModel.from_pretrained(tiny_gpt2(), adapter).merge_and_unload())
    assert relative_error(gpt2_logits(tiny_gpt2()), judge) > 1e-3  # the adapter changes the model

    merged = AutoModelForCausalLM.from_pretrained(zoo.export(child.ref, tmp_path / "merged"))
    assert relative_error(gpt2_logits(merged), judge) < 1e-5
    exported = zoo.export(child.ref, tmp_path / "lora", format="lora")
    base_model = AutoModelForCausalLM.from_pretrained(zoo.export(base.ref, tmp_path / "base"))
    assert relative_error(gpt2_logits(PeftModel.from_pretrained(base_model, exported)), judge) < 1e-5


def sd_outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The text encoder's hidden states and the UNet's noise prediction on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids, x = torch.randint(0, 1000, (1, 77), generator=g), torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return text, pipe.unet(x, torch.tensor([10]), text).sample


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_sd_lora_file_child_equals_diffusers_load_lora_weights_and_fuse(zoo, sd_dir, tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    path = (save_diffusers_sd_lora(folder) if kind == "diffusers"
            else save_kohya_sd_lora(folder / "style.safetensors"))
    base = zoo.import_(sd_dir, "sd")
    child = zoo.import_(path, f"sd-{kind}", base=base.ref)
    assert child.params["adapter"]["format"] == kind and child.parents[0].relation == "adapter"

    judge = tiny_sd_pipeline()
    judge.load_lora_weights(str(folder), weight_name=path.name)
    judge.fuse_lora()
    expected = sd_outputs(judge)
    for mine, theirs in zip(sd_outputs(zoo.load(child.ref).pipeline), expected, strict=True):
        assert relative_error(mine, theirs) < 1e-4
    assert relative_error(sd_outputs(tiny_sd_pipeline())[1], expected[1]) > 1e-3

    exported = zoo.export(child.ref, tmp_path / "exported", format="lora")
    again = tiny_sd_pipeline()
    again.load_lora_weights(str(exported))
    again.fuse_lora()
    for mine, theirs in zip(sd_outputs(again), expected, strict=True):
        assert relative_error(mine, theirs) < 1e-4


def test_peft_folder_per_component_adapts_that_component_of_a_pipeline(zoo, sd_dir, tmp_path):
    from peft import PeftModel

    adapter = save_peft_sd_unet_lora(tmp_path / "adapter")
    base = zoo.import_(sd_dir, "sd")
    child = zoo.import_(adapter, "sd-peft", base=base.ref)
    assert {n.split("/")[0] for n in zoo.diff(base.ref, child.ref).changed for n in [n.tensor]} == {"unet"}

    judge = tiny_sd_pipeline()
    judge.unet = PeftModel.from_pretrained(judge.unet, adapter / "unet").merge_and_unload()
    for mine, theirs in zip(sd_outputs(zoo.load(child.ref).pipeline), sd_outputs(judge), strict=True):
        assert relative_error(mine, theirs) < 1e-4


def test_kohya_alphas_scale_each_module_by_its_own_alpha_over_rank(zoo, sd_dir, tmp_path):
    from lora_files import kohya_sd_lora

    tensors = kohya_sd_lora(alphas=(1.0, 2.0, 4.0))
    save_file(tensors, tmp_path / "mixed.safetensors")
    base = zoo.import_(sd_dir, "sd")
    child = zoo.import_(tmp_path / "mixed.safetensors", "sd-mixed", base=base.ref)
    for kohya, tensor in (("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k",
                           "unet/down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"),
                          ("lora_te_text_model_encoder_layers_1_self_attn_v_proj",
                           "text_encoder/text_model.encoder.layers.1.self_attn.v_proj.weight")):
        up, down, alpha = (tensors[f"{kohya}.{k}"] for k in ("lora_up.weight", "lora_down.weight", "alpha"))
        stored_name = tensor if tensor in zoo.tensors(base.ref) else tensor.replace("text_model.", "")
        expected = zoo.tensors(base.ref)[stored_name] + float(alpha) / down.shape[0] * up @ down
        assert relative_error(zoo.tensors(child.ref)[stored_name], expected) < 1e-6, kohya


def _edited(adapter: Path, out: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    out.mkdir()
    (out / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def _first(tensors: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


@pytest.fixture
def bad_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    adapter = save_peft_gpt2_lora(root / "good")
    nan = _edited(adapter, root / "nan", lambda t: t[_first(t, "lora_B")].fill_(float("nan")))
    ranks = _edited(adapter, root / "ranks", lambda t: t.update({_first(t, "lora_A"): torch.ones(3, 32)}))
    wider = save_peft_gpt2_lora(root / "wider", seed=1)
    other = _edited(wider, root / "other-shape", lambda t: t.update(
        {k: torch.ones(v.shape[0], 48) if "lora_A" in k else v for k, v in t.items()}))
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = root / "targets"
    targets.mkdir()
    (targets / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_proj"]}))
    (targets / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    return {"nan": nan, "ranks": ranks, "other-shape": other, "targets": targets, "good": adapter}


@pytest.mark.parametrize("case, args, message", [
    ("nan", ["--base", "gpt2@1"], "NaN"),
    ("ranks", ["--base", "gpt2@1"], "ranks disagree"),
    ("other-shape", ["--base", "gpt2@1"], "does not fit gpt2@1"),
    ("targets", ["--base", "gpt2@1"], "does not match"),
    ("good", ["--base", "missing@1"], "missing"),
    ("good", [], "--base"),
])
def test_bad_adapter_is_refused_with_one_line_and_nothing_stored(home, gpt2_dir, capsys, bad_adapters, case, args,
                                                                  message):
    assert zoo_cli(capsys, home, "import", str(gpt2_dir), "--name", "gpt2").code == 0
    before = snapshot(home)
    result = zoo_cli(capsys, home, "import", str(bad_adapters[case]), "--name", "child", *args)
    assert result.code == 2, result.err
    assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert snapshot(home) == before


def test_adapter_for_modules_the_base_lacks_is_refused(zoo, sd_dir, tmp_path):
    from modelzoo.registry.errors import BadInput

    tensors = {"lora_unet_no_such_block.lora_down.weight": torch.ones(2, 8),
               "lora_unet_no_such_block.lora_up.weight": torch.ones(8, 2)}
    path = tmp_path / "stray.safetensors"
    save_file(tensors, path)
    base = zoo.import_(sd_dir, "sd")
    with pytest.raises(BadInput, match="fit"):
        zoo.import_(path, "sd-stray", base=base.ref)
    assert [m.name for m in zoo.list()] == ["sd"]


def test_lora_export_of_a_dense_child_is_refused(zoo, tmp_path):
    from modelzoo.registry.errors import BadInput

    base = zoo.import_(save_tiny_gpt2(tmp_path / "gpt2"), "gpt2")
    child = zoo.commit(base.ref, {"transformer.ln_f.weight": torch.full((32,), 2.0)}, method="scale")
    with pytest.raises(BadInput, match="dense"):
        zoo.export(child.ref, tmp_path / "lora", format="lora")


def test_a_lora_file_linked_from_outside_the_folder_is_refused(zoo, sd_dir, tmp_path):
    from modelzoo.registry.errors import BadInput

    outside = save_kohya_sd_lora(tmp_path / "elsewhere.safetensors")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").symlink_to(outside)
    base = zoo.import_(sd_dir, "sd")
    with pytest.raises(BadInput, match="outside"):
        zoo.import_(folder, "sd-linked", base=base.ref)
    child = zoo.import_(folder, "sd-linked", base=base.ref, follow_symlinks=True)
    assert child.params["adapter"]["format"] == "kohya"

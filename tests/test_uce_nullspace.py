"""UCE with null-space preservation (AlphaEdit / SPEED): preserved prompts keep every token's projected
output, erased concepts still move, on a tiny SD-shaped pipeline whose text encoder is wider than its
preserved prompts' keys are many (so their null space is exact, not set by the threshold)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import zoo_cli
from test_editor_uce import (
    COLOURS,
    SHAPE_TEMPLATES,
    SHAPES,
    colour_share,
    loaded,
    projections,
    quick_shapes_pipeline,
    shapes_model,
)
from tiny_models import tiny_sd_pipeline

from modelzoo.editors.diffusion_text import text_side
from modelzoo.editors.uce import UceEditor, UceRequest, null_space_projector
from modelzoo.registry.errors import BadInput

WIDTH, LENGTH = 256, 8
ERASE = tuple(f"{w}" for w in ("cat", "dog", "house", "tree", "car", "bird", "boat", "fish", "lamp", "door"))
PRESERVE = tuple(f"a {c} {s}" for c in ("red", "blue", "green", "pink", "gray", "black")
                 for s in ("hat", "cup", "box", "pen", "bag"))


def wide_text_pipeline(seed: int = 0):  # type: ignore[no-untyped-def]
    """An SD pipeline of diffusers' tiny test shapes with a WIDTH-wide text encoder reading LENGTH tokens."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from modelzoo.registry.families.clip_tokenizer import clip_tokenizer_files

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=2, attention_head_dim=2,
    )
    vae = AutoencoderKL(block_out_channels=(4,), latent_channels=4, norm_num_groups=2, sample_size=8)
    merges = 1000
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=WIDTH, intermediate_size=32, layer_norm_eps=1e-5,
        num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=512 + merges + 2,
        max_position_embeddings=LENGTH,
    ))
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in clip_tokenizer_files(merges).items():
            (Path(tmp) / name).write_bytes(data)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=LENGTH)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def outputs(pipe, weights: dict[str, torch.Tensor], texts) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Every projection's output at every token position of every text: (texts * LENGTH, out)."""
    hidden = text_side(loaded(pipe)).encode(list(texts)).reshape(-1, WIDTH)
    return {n: hidden @ w.T for n, w in weights.items()}


def drift(pipe, before, after, texts) -> float:  # type: ignore[no-untyped-def]
    """The largest relative change of one token's projected output."""
    old, new = outputs(pipe, before, texts), outputs(pipe, after, texts)
    return max(float(((new[n] - old[n]).norm(dim=1) / old[n].norm(dim=1)).max()) for n in old)


def gaps(pipe, weights, concepts) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Per concept, the distance of its rows' outputs (its last token and every position after it) from
    their targets, the empty prompt's outputs from its start token on, summed over projections."""
    side = text_side(loaded(pipe))
    hidden, empty = side.encode(list(concepts)), side.encode([""])[0]
    out = []
    for concept, h in zip(concepts, hidden, strict=True):
        start = len(side.token_ids(concept, "concept"))
        target = empty[: LENGTH - start]
        out.append(sum(float((h[start:] @ w.T - target @ w.T).norm()) for w in weights.values()))
    return torch.tensor(out)


def test_nullspace_erasure_keeps_every_preserved_token_output_and_moves_every_erased_concept() -> None:
    pipe = wide_text_pipeline()
    before = projections(pipe)
    result = UceEditor().edit(loaded(pipe), UceRequest(erase=ERASE, preserve=PRESERVE, preserve_mode="nullspace"))
    after = projections(pipe)
    assert drift(pipe, before, after, (*PRESERVE, "")) < 1e-4
    assert result.metrics["preserve_drift_max"] < 1e-4
    assert result.metrics["preserved_keys"] == (len(PRESERVE) + 1) * LENGTH
    moved = gaps(pipe, after, ERASE) / gaps(pipe, before, ERASE)
    assert float(moved.max()) < 0.5, moved  # every erased concept's output is at least halfway to its target


def test_the_penalty_only_pulls_preserved_outputs_back() -> None:
    """The same edit with UCE's own preservation term moves the preserved outputs measurably."""
    pipe = wide_text_pipeline()
    before = projections(pipe)
    UceEditor().edit(loaded(pipe), UceRequest(erase=ERASE, preserve=PRESERVE))
    assert drift(pipe, before, projections(pipe), PRESERVE) > 1e-2


def test_projector_spans_exactly_the_directions_no_preserved_key_reaches() -> None:
    torch.manual_seed(0)
    Kp = torch.randn(5, 12, dtype=torch.float64) @ torch.randn(12, 20, dtype=torch.float64)  # rank 5 in 20 dims
    P = null_space_projector(Kp, 1e-9)
    assert torch.allclose(P @ P, P, atol=1e-10) and round(float(torch.trace(P))) == 15
    assert float((Kp @ P).abs().max()) < 1e-9


def test_cli_erases_in_the_null_space(capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path) -> None:
    wide_text_pipeline().save_pretrained(tmp_path / "wide")
    assert zoo_cli(capsys, home, "import", str(tmp_path / "wide"), "--name", "wide").code == 0
    result = zoo_cli(capsys, home, "edit", "uce", "wide", "--erase", "cat", "--preserve", "a red hat",
                     "--preserve-mode", "nullspace", "--json")
    assert result.code == 0, result.err
    metrics = json.loads(result.out)["metrics"]
    assert metrics["preserve_drift_max"] < 1e-4 and metrics["null_space_dim"] > 0


def test_preserved_keys_that_fill_the_space_are_refused_before_any_weight_changes() -> None:
    """The 16-wide tiny pipeline reads 77 positions, so two prompts' keys span its space (once its final
    norm has a bias: with none, every output is orthogonal to the all-ones direction)."""
    pipe = tiny_sd_pipeline()
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.bias.normal_()
    before = projections(pipe)
    with pytest.raises(BadInput, match="span all 16 dimensions"):
        UceEditor().edit(loaded(pipe), UceRequest(erase=("cat",), preserve=("dog",), preserve_mode="nullspace"))
    assert all(torch.equal(w, before[n]) for n, w in projections(pipe).items())


@pytest.mark.parametrize(("request_", "message"), [
    (UceRequest(erase=("cat",), preserve_mode="exact"), "preserve mode"),  # type: ignore[arg-type]
    (UceRequest(erase=("cat",), preserve_mode="nullspace", nullspace_threshold=1.5), "nullspace_threshold"),
    (UceRequest(erase=("cat",), preserve_mode="nullspace", keep_empty=False), "give --preserve"),
])
def test_bad_nullspace_requests_are_refused(request_: UceRequest, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        request_.validate()


def shape_agreement(model, n: int = 8, seed: int = 7) -> float:  # type: ignore[no-untyped-def]
    """Share of samples of every "a <colour> <shape>" caption that the meter reads as that shape."""
    from modelzoo.demo.meters import shapes_of

    hits: list[bool] = []
    for colour in COLOURS:
        for shape in SHAPES:
            with torch.no_grad():
                images = model.pipeline(f"a {colour} {shape}", num_images_per_prompt=n, output_type="np",
                                        generator=torch.Generator().manual_seed(seed)).images
            hits += [s == shape for s in shapes_of((images * 255).round().clip(0, 255).astype(np.uint8))]
    return float(np.mean(hits))


@pytest.mark.slow
def test_two_colours_erased_together_with_the_others_in_the_null_space(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The quick shapes-world model (seed 0). Its text encoder's outputs for the 17 captions span few
    dimensions and the colours lie along a hue line (red, yellow, green, blue), so a colour between two
    preserved ones has little room outside their keys: green beside preserved red and yellow fell 7-17%
    at every setting tried on seed 1. Blue and yellow erased with red and green preserved, threshold 1e-3
    (chosen on seed 1: at 1e-6 yellow fell only 28%; at 1e-3 blue 91%, yellow 84%, the
    others kept 100%). Measured here: both fall 100%, red and green keep 100%, shape agreement 25% before
    and after (the quick model's shapes are weak; the meter reads a quarter right, as by chance)."""
    directory = quick_shapes_pipeline(tmp_path_factory, seed=0)
    parent = shapes_model(directory)
    before = {c: colour_share(parent, f"a {c} circle", c) for c in COLOURS}
    shapes_before = shape_agreement(parent)
    child = shapes_model(directory)
    erase, keep = ("blue", "yellow"), ("red", "green")
    UceEditor().edit(child, UceRequest(erase=erase, preserve=keep, templates=SHAPE_TEMPLATES,
                                       preserve_mode="nullspace", nullspace_threshold=1e-3))
    after = {c: colour_share(child, f"a {c} circle", c) for c in COLOURS}
    for colour in erase:
        assert (before[colour] - after[colour]) / before[colour] >= 0.7, (colour, before, after)
    for colour in keep:
        assert after[colour] >= 0.95 * before[colour], (colour, before, after)
    assert abs(shape_agreement(child) - shapes_before) <= 0.05

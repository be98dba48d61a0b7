import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from modelzoo.demo import meters, shapes
from modelzoo.demo.shapes import BACKGROUND, RGB, SHAPES, ShapeSpec
from modelzoo.registry.errors import BadInput

# Never used while the meters were tuned, so the accuracies below are held-out numbers.
HELD_OUT_SEED = 8_675_309
N_IMAGES = 480


def corrupt(images: np.ndarray, sigma: float, blur: float, seed: int) -> np.ndarray:
    """Gaussian blur (radius in pixels) then Gaussian noise (sigma in 0..255 units), like a weak generator."""
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(blur))) for im in images])
    noisy = blurred + np.random.default_rng(seed).normal(0.0, sigma, blurred.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=[32, 64], ids=["32px", "64px"])
def held_out(request: pytest.FixtureRequest) -> tuple[np.ndarray, list[ShapeSpec]]:
    # Stretched as well as rotated: the shape meter must not mistake a wide square for anything else.
    images, _, specs = shapes.dataset(N_IMAGES, HELD_OUT_SEED, resolution=request.param, aspect_range=(0.75, 1.33))
    return images, specs


def accuracy(images: np.ndarray, specs: list[ShapeSpec]) -> tuple[float, float]:
    readings = meters.measure(images)
    colour = np.mean([r.colour == s.colour for r, s in zip(readings, specs, strict=True)])
    shape = np.mean([r.shape == s.shape for r, s in zip(readings, specs, strict=True)])
    return float(colour), float(shape)


def test_colour_and_shape_are_read_from_clean_drawings(held_out):
    colour, shape = accuracy(*held_out)
    assert colour >= 0.98
    assert shape >= 0.98


def test_colour_and_shape_survive_noise_and_blur(held_out):
    images, specs = held_out
    colour, shape = accuracy(corrupt(images, sigma=15.0, blur=0.8, seed=1), specs)
    assert colour >= 0.95
    assert shape >= 0.95


def test_single_image_helpers_agree_with_the_batch(held_out):
    images, _ = held_out
    readings = meters.measure(images[:8])
    assert [meters.colour_of(im) for im in images[:8]] == [r.colour for r in readings]
    assert [meters.shape_of(im) for im in images[:8]] == meters.shapes_of(images[:8])
    assert meters.colours_of(images[:8]) == [r.colour for r in readings]
    np.testing.assert_allclose(meters.aspect_ratios_of(images[:8]), [r.aspect for r in readings])


@pytest.mark.parametrize("resolution", [32, 64])
def test_aspect_ratio_recovers_the_requested_stretch(resolution):
    images, _, specs = shapes.dataset(300, HELD_OUT_SEED + 1, resolution=resolution, aspect_range=(0.7, 1.5))
    measured = meters.aspect_ratios_of(images)
    requested = np.array([s.aspect for s in specs])
    assert np.abs(measured / requested - 1).max() <= 0.10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aspect", [0.7, 1.0, 1.5])
def test_aspect_ratio_holds_at_any_rotation(shape, aspect):
    images = np.stack(
        [shapes.draw(ShapeSpec(shape, "green", 0.5, 0.5, 0.55, aspect, rot), resolution=32) for rot in (0, 25, 70)]
    )
    np.testing.assert_allclose(meters.aspect_ratios_of(images), aspect, rtol=0.10)


def test_blank_and_pure_noise_images_have_no_colour_or_shape():
    rng = np.random.default_rng(HELD_OUT_SEED)
    blank = np.broadcast_to(np.array(BACKGROUND, np.uint8), (4, 32, 32, 3))
    grey_noise = np.clip(np.array(BACKGROUND) + rng.normal(0, 15, (8, 32, 32, 3)), 0, 255).astype(np.uint8)
    strong_noise = np.clip(np.array(BACKGROUND) + rng.normal(0, 60, (8, 32, 32, 3)), 0, 255).astype(np.uint8)
    uniform_noise = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    for images in (blank, grey_noise, strong_noise, uniform_noise):
        readings = meters.measure(images)
        assert [r.colour for r in readings] == [None] * len(images)
        assert [r.shape for r in readings] == [None] * len(images)
        assert all(math.isnan(r.aspect) for r in readings)


def test_colour_survives_a_tinted_background_and_a_faded_shape():
    spec = ShapeSpec("triangle", "orange", 0.5, 0.5, 0.6, rotation=10)
    alpha = 0.6 * shapes.coverage(spec, 32)[..., None]
    tinted = np.array([150, 120, 100])
    image = np.rint(tinted * (1 - alpha) + np.array(RGB["orange"]) * alpha).astype(np.uint8)
    reading = meters.measure(image)[0]
    assert reading.colour == "orange"
    assert reading.shape == "triangle"


def test_two_equal_colours_are_not_named():
    left = shapes.coverage(ShapeSpec("square", "red", 0.3, 0.5, 0.5), 32)[..., None]
    right = shapes.coverage(ShapeSpec("square", "blue", 0.7, 0.5, 0.5), 32)[..., None]
    image = np.array(BACKGROUND) * (1 - left - right) + np.array(RGB["red"]) * left + np.array(RGB["blue"]) * right
    assert meters.colour_of(np.rint(image).astype(np.uint8)) is None


def test_a_dark_achromatic_shape_has_a_shape_but_no_colour():
    alpha = shapes.coverage(ShapeSpec("star", "red", 0.5, 0.5, 0.7), 32)[..., None]
    image = np.rint(np.array(BACKGROUND) * (1 - alpha) + 20 * alpha).astype(np.uint8)
    reading = meters.measure(image)[0]
    assert reading.colour is None
    assert reading.shape == "star"


def test_palette_can_be_restricted():
    image = shapes.draw(ShapeSpec("circle", "purple", 0.5, 0.5, 0.6))
    assert meters.colour_of(image) == "purple"
    assert meters.colour_of(image, colours=("purple", "green")) == "purple"
    assert meters.colour_of(image, colours=("red", "green")) is None


def test_float_images_are_rejected_with_a_conversion_hint():
    with pytest.raises(BadInput, match="uint8"):
        meters.measure(np.zeros((32, 32, 3), dtype=np.float32))


# -- fact meter -------------------------------------------------------------------------------------

WORDS = ["The", "Ġcapital", "Ġof", "ĠFrance", "ĠItaly", "Ġis", "Ġthe"]
WORDS += ["ĠParis", "Paris", "ĠRome", "Ġtower", "ĠEiffel", "ĠTower"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style tokenizer built offline: byte-level pre-tokenisation, so " Paris" and "Paris" differ."""
    vocab = {word: i for i, word in enumerate(["<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<unk>")


def tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def rig(model: GPT2LMHeadModel, token: int, logit: float) -> None:
    """Every position's final hidden state becomes e_0, and only `token` reads it: logits are known exactly."""
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[token, 0] = logit


def test_tokenizer_separates_word_initial_forms(tokenizer):
    assert tokenizer(" Paris", add_special_tokens=False)["input_ids"] != tokenizer("Paris")["input_ids"]


def test_fact_meter_finds_the_rigged_top_token_with_its_softmax_probability(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    paris = tokenizer.convert_tokens_to_ids("ĠParis")
    rig(model, paris, logit=3.0)
    expected = math.exp(3.0) / (math.exp(3.0) + len(tokenizer) - 1)
    for target in ("Paris", " Paris"):
        reading = meters.fact_meter(model, tokenizer, "The capital of France is", target)
        assert reading.top1
        assert reading.predicted == " Paris"
        assert reading.probability == pytest.approx(expected, rel=1e-6)
    # Without the space the target is the word-internal "Paris", which the model does not favour.
    glued = meters.fact_meter(model, tokenizer, "The capital of France is", "Paris", separator="")
    assert not glued.top1
    assert glued.probability == pytest.approx(1 / (math.exp(3.0) + len(tokenizer) - 1), rel=1e-6)


def test_fact_meter_reports_a_miss_when_another_token_wins(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    rig(model, tokenizer.convert_tokens_to_ids("ĠRome"), logit=5.0)
    reading = meters.fact_meter(model, tokenizer, "The capital of France is", "Paris")
    assert not reading.top1
    assert reading.predicted == " Rome"


def test_fact_probability_is_the_teacher_forced_product_of_softmaxes(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    prompt = tokenizer("The tower is the")["input_ids"]
    target = tokenizer(" Eiffel Tower", add_special_tokens=False)["input_ids"]
    assert len(target) == 2
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target])).logits[0].double()
    manual = 1.0
    for i, token in enumerate(target):
        row = logits[len(prompt) - 1 + i]
        manual *= float(torch.exp(row[token]) / torch.exp(row).sum())
    reading = meters.fact_meter(model, tokenizer, "The tower is the", "Eiffel Tower")
    assert reading.probability == pytest.approx(manual, rel=1e-6)
    assert reading.log_probability == pytest.approx(math.log(manual), rel=1e-6)
    assert reading.top1 == (int(logits[len(prompt) - 1].argmax()) == target[0])


def test_batched_facts_match_one_at_a_time_despite_padding(tokenizer):
    model = tiny_gpt2(len(tokenizer)).train()
    facts = [
        ("The capital of France is", "Paris"),
        ("The tower is the", "Eiffel Tower"),
        ("The capital", "of Italy is Rome"),
    ]
    batched = meters.fact_meters(model, tokenizer, facts, batch_size=3)
    single = [meters.fact_meter(model, tokenizer, p, t) for p, t in facts]
    for b, s in zip(batched, single, strict=True):
        assert b.top1 == s.top1
        assert b.probability == pytest.approx(s.probability, rel=1e-5)
    assert model.training


def test_empty_target_is_rejected(tokenizer):
    with pytest.raises(BadInput, match="target"):
        meters.fact_meter(tiny_gpt2(len(tokenizer)), tokenizer, "The capital of France is", "  ")

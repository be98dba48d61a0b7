"""Analytic meters: what a (generated) shapes-world image contains, and whether an LM completes a fact.

No learned model is involved, so a meter cannot share the blind spots of the models it judges. The image
meters assume only what `modelzoo.demo.shapes` guarantees: one shape of one palette colour on a uniform
background. They are written for imperfect generated images (blur, noise, faded colours, a tinted
background, stray pixels), not just for clean drawings:

- The background is estimated as the per-channel median of the image border, and every pixel is read
  as its difference d = pixel - background. A pixel that mixes a colour with the background
  (anti-aliasing, blur) has d = alpha * (colour - background): the same direction, shorter. So the
  direction of d names the colour at any alpha, and the projection of d on the foreground's mean
  direction estimates alpha, a soft mask that is unbiased under noise.
- The colour is read from the hue of d on the opponent plane (a = R - (G + B) / 2,
  b = sqrt(3) / 2 (G - B)), which ignores brightness: confident foreground pixels vote for their
  nearest palette hue, and the mean hue of the pixels within 45 degrees of the plurality names the
  colour. Less than 60% of the foreground in that window, or too few pixels, reads as no colour.
- The shape is read from the soft mask with affine-invariant angular harmonics (below), the aspect
  ratio from its second moments.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from modelzoo.demo.shapes import BACKGROUND, COLOURS, RGB, SHAPES, ShapeSpec, coverage
from modelzoo.registry.errors import BadInput

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MIN_CONTRAST = 60.0
"""Smallest |pixel - background| (0..255 units, Euclidean over RGB) that can count as foreground;
about 4 sigma of the 3-channel noise magnitude at sigma = 15 and a third of any palette colour's."""
MIN_FOREGROUND = 0.01
"""Smallest fraction of the image the confident foreground must cover (10 pixels at 32 x 32)."""
MIN_SHARE = 0.6
"""A colour is named only when at least this share of the confident foreground lies in its hue window:
a clear majority, so half-and-half images stay unnamed (heavy noise and blur keep shares above 0.65)."""
HUE_WINDOW_COS = math.cos(math.radians(45))
"""Half-width of the hue window around the plurality colour: wider than the 30 degrees between
neighbouring palette colours, narrower than the 60 degrees to a colour halfway between two of them."""
ALPHA_RAMP = (0.3, 0.7)
"""Estimated coverage mapped linearly to mask weight 0..1: keeps the boundary at half coverage and
drops background noise (alpha noise is about 0.08 at sigma = 15)."""
HARMONICS = {3: "triangle", 4: "square", 5: "star"}
"""Angular harmonic k that each cornered shape excites; a disc excites none."""
MIN_HARMONIC = 0.3
"""A shape is cornered when its strongest harmonic reaches this fraction of the clean shape's value;
clean circles score under 0.05 and noisy, blurred cornered shapes over 0.7."""


@dataclass(frozen=True)
class ImageReading:
    """What one image shows; `None` / NaN where the image has no clear single-coloured foreground.

    `colour_share` is the share of the confident foreground within the named colour's hue window and
    `foreground` the fraction of the image covered by the soft mask: they say how sure a reading is.
    `harmonics` holds, per cornered shape, its harmonic strength relative to a clean drawing (1.0 = like
    the drawing).
    """

    colour: str | None
    shape: str | None
    aspect: float
    colour_share: float
    foreground: float
    harmonics: dict[str, float]


def _as_batch(images: np.ndarray) -> np.ndarray:
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise BadInput(
            f"expected uint8 RGB images shaped (H, W, 3) or (N, H, W, 3), got {batch.dtype} {batch.shape}; "
            "convert generated images with (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    return batch


def _opponent(d: np.ndarray) -> np.ndarray:
    """RGB differences on the opponent plane (..., 2): a = R - (G + B) / 2, b = sqrt(3) / 2 (G - B).

    Adding the same amount to all three channels (a brightness change) does not move a point here.
    """
    a = d[..., 0] - (d[..., 1] + d[..., 2]) / 2
    b = math.sqrt(3) / 2 * (d[..., 1] - d[..., 2])
    return np.stack([a, b], axis=-1)


def _palette_directions(colours: Sequence[str]) -> np.ndarray:
    """Unit hue directions (K, 2) of the palette colours, as drawn on the background."""
    ab = _opponent(np.array([RGB[c] for c in colours], dtype=np.float32) - np.array(BACKGROUND, np.float32))
    return ab / np.linalg.norm(ab, axis=-1, keepdims=True)


def _near_confident(confident: np.ndarray) -> np.ndarray:
    """Pixels within one step (8-neighbourhood) of a confident pixel: isolated noise is not."""
    padded = np.pad(confident, ((0, 0), (1, 1), (1, 1)))
    height, width = confident.shape[1:]
    near = np.zeros_like(confident)
    for dy in range(3):
        for dx in range(3):
            near |= padded[:, dy : dy + height, dx : dx + width]
    return near


@dataclass(frozen=True)
class _Moments:
    """Weighted centroid and covariance of soft masks, and the mass they rest on (per image)."""

    mass: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    cxx: np.ndarray
    cyy: np.ndarray
    cxy: np.ndarray


def _moments(w: np.ndarray) -> _Moments:
    height, width = w.shape[1:]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    mass = w.sum((1, 2))
    safe = np.maximum(mass, 1e-6)
    dx = xs - ((w * xs).sum((1, 2)) / safe)[:, None, None]
    dy = ys - ((w * ys).sum((1, 2)) / safe)[:, None, None]
    return _Moments(
        mass=mass,
        dx=dx,
        dy=dy,
        cxx=(w * dx * dx).sum((1, 2)) / safe,
        cyy=(w * dy * dy).sum((1, 2)) / safe,
        cxy=(w * dx * dy).sum((1, 2)) / safe,
    )


def _harmonics(w: np.ndarray, m: _Moments) -> np.ndarray:
    """Affine-invariant angular harmonics h_k (N, len(HARMONICS)) of soft masks w (N, H, W).

    Whitening maps the mask by Sigma^-1/2 (Sigma: its covariance), which undoes any stretch, shear or
    scale; every shapes-world shape has isotropic covariance, so its whitened mask is the regular
    shape, rotated. With z the whitened position as a complex number,
    h_k = |sum w |z| e^(i k arg z)| / sum w |z|: a rotation only turns the sum, a triangle excites
    k = 3 (and multiples), a square k = 4, a five-pointed star k = 5, a disc none. Sums over the
    whole mask make it insensitive to noise and blur, unlike corner counting or convex hulls.
    """
    # Sigma^-1/2 of [[p, q], [q, r]] in closed form: adj(Sigma + s I) / (s t), s = sqrt(det), t = sqrt(tr + 2 s).
    p, q, r = m.cxx, m.cxy, m.cyy
    s = np.sqrt(np.maximum(p * r - q * q, 1e-12))
    t = np.sqrt(p + r + 2 * s)
    scale = 1.0 / (t * s)
    p, q, r = [v[:, None, None] for v in ((r + s) * scale, -q * scale, (p + s) * scale)]
    z = (p * m.dx + q * m.dy) + 1j * (q * m.dx + r * m.dy)
    radius = np.abs(z)
    unit = z / np.maximum(radius, 1e-9)
    weight = w * radius
    total = np.maximum(weight.sum((1, 2)), 1e-9)
    return np.stack([np.abs((weight * unit**k).sum((1, 2))) / total for k in HARMONICS], axis=1)


@functools.cache
def _clean_harmonics() -> np.ndarray:
    """h_k of each cornered shape drawn cleanly and large: the yardstick that readings are scaled by."""
    resolution = 128
    masks = np.stack(
        [coverage(ShapeSpec(shape, COLOURS[0], 0.5, 0.5, 0.8), resolution) for shape in HARMONICS.values()]
    )
    w = np.clip((masks - ALPHA_RAMP[0]) / (ALPHA_RAMP[1] - ALPHA_RAMP[0]), 0.0, 1.0)
    return np.diag(_harmonics(w, _moments(w)))


@dataclass(frozen=True)
class _ColourVote:
    """Per image: the named palette index, its share of the confident foreground, and its pixels."""

    winner: np.ndarray
    share: np.ndarray
    pixels: np.ndarray


def _vote_colours(d: np.ndarray, confident: np.ndarray, colours: Sequence[str]) -> _ColourVote:
    # Only chromatic pixels vote; a pixel that differs from the background mostly in brightness does not.
    ab = _opponent(d)
    chroma = np.linalg.norm(ab, axis=-1)
    chromatic = confident & (chroma >= 0.5 * np.linalg.norm(d, axis=-1))
    palette = _palette_directions(colours)
    nearest = (ab @ palette.T).argmax(-1)
    votes = np.stack([(chromatic & (nearest == k)).sum((1, 2)) for k in range(len(colours))], axis=1)
    # Noise and blur split a colour's votes with its neighbours 30 degrees away, so the plurality only
    # picks a hue window; the mean of the pixels inside it names the colour.
    window = palette[votes.argmax(1)][:, None, None, :]
    pixels = chromatic & ((ab * window).sum(-1) >= HUE_WINDOW_COS * chroma)
    mean_ab = (ab * pixels[..., None]).sum((1, 2))
    return _ColourVote(
        winner=(mean_ab @ palette.T).argmax(1),
        share=pixels.sum((1, 2)) / np.maximum(confident.sum((1, 2)), 1),
        pixels=pixels,
    )


def _coverage(d: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimated alpha per pixel (N, H, W), d projected on the mean difference of `pixels`, and the
    cosine between each pixel's d and that direction."""
    direction = (d * pixels[..., None]).sum((1, 2)) / np.maximum(pixels.sum((1, 2)), 1)[:, None]
    length = np.maximum(np.linalg.norm(direction, axis=-1), 1e-3)[:, None, None]
    along = (d * direction[:, None, None, :]).sum(-1) / length
    return along / length, along / np.maximum(np.linalg.norm(d, axis=-1), 1e-3)


def _measure_batch(x: np.ndarray, colours: Sequence[str]) -> list[ImageReading]:
    n, height, width, _ = x.shape
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    d = x - np.median(border, axis=1)[:, None, None, :]
    contrast = np.linalg.norm(d, axis=-1)
    # Half the near-peak contrast separates a shape from its blurred rim and from noise alike.
    peak = np.percentile(contrast.reshape(n, -1), 99, axis=1)
    confident = contrast >= np.maximum(MIN_CONTRAST, 0.5 * peak)[:, None, None]
    n_confident = confident.sum((1, 2))
    enough = n_confident >= MIN_FOREGROUND * height * width

    vote = _vote_colours(d, confident, colours)
    named = enough & (vote.share >= MIN_SHARE)
    alpha, cosine = _coverage(d, np.where(named[:, None, None], vote.pixels, confident))
    # A coherent foreground points one way; pure noise has confident pixels in every direction.
    coherent = enough & ((confident & (cosine >= 0.8)).sum((1, 2)) >= 0.5 * n_confident)
    near = _near_confident(alpha >= 0.5)
    w = np.clip((alpha - ALPHA_RAMP[0]) / (ALPHA_RAMP[1] - ALPHA_RAMP[0]), 0.0, 1.0) * near
    m = _moments(w)
    # Coverage itself (not the ramp) keeps the anti-aliased edge's sub-pixel position for the aspect.
    m_linear = _moments(np.clip(alpha, 0.0, 1.0) * near)
    aspect = np.sqrt(m_linear.cxx / np.maximum(m_linear.cyy, 1e-9))

    raw = _harmonics(w, m)
    scores = raw / _clean_harmonics()
    # The strongest raw harmonic picks the corners (noise lifts all h_k alike, and the square's clean
    # value is the smallest, so scaled scores would favour it); the scaled one tells corners from a disc.
    best = raw.argmax(1)
    names = list(HARMONICS.values())
    readings = []
    for i in range(n):
        cornered = scores[i, best[i]] >= MIN_HARMONIC
        shape = (names[best[i]] if cornered else SHAPES[0]) if coherent[i] else None
        readings.append(
            ImageReading(
                colour=colours[vote.winner[i]] if named[i] else None,
                shape=shape,
                aspect=float(aspect[i]) if coherent[i] else math.nan,
                colour_share=float(vote.share[i]),
                foreground=float(m.mass[i] / (height * width)),
                harmonics={name: float(v) for name, v in zip(names, scores[i], strict=True)},
            )
        )
    return readings


def measure(images: np.ndarray, colours: Sequence[str] = COLOURS, batch_size: int = 256) -> list[ImageReading]:
    """Read colour, shape and aspect ratio of uint8 images (H, W, 3) or (N, H, W, 3).

    `colours` restricts the palette the colour vote chooses from (e.g. the four basic colours);
    `batch_size` images are read at once, to bound memory.
    """
    batch = _as_batch(images)
    readings: list[ImageReading] = []
    for start in range(0, len(batch), batch_size):
        readings += _measure_batch(batch[start : start + batch_size].astype(np.float32), colours)
    return readings


def colours_of(images: np.ndarray, colours: Sequence[str] = COLOURS) -> list[str | None]:
    """The dominant foreground colour of each image, None where there is no clear one."""
    return [r.colour for r in measure(images, colours)]


def colour_of(image: np.ndarray, colours: Sequence[str] = COLOURS) -> str | None:
    """The dominant foreground colour of one image (H, W, 3), None where there is no clear one."""
    return colours_of(image, colours)[0]


def shapes_of(images: np.ndarray) -> list[str | None]:
    """The shape of each image's foreground, None where there is no coherent foreground."""
    return [r.shape for r in measure(images)]


def shape_of(image: np.ndarray) -> str | None:
    """The shape of one image's foreground, None where there is no coherent foreground."""
    return shapes_of(image)[0]


def aspect_ratios_of(images: np.ndarray) -> np.ndarray:
    """Width/height of each foreground from its second moments, sqrt(var_x / var_y); NaN if none.

    Second moments use every pixel's weight, so blur and noise move them far less than they move a
    bounding box, and for every shapes-world shape (isotropic covariance at any rotation) they return
    exactly the drawn aspect. Blur adds the same variance on both axes, pulling the ratio slightly
    towards 1.
    """
    return np.array([r.aspect for r in measure(images)], dtype=np.float64)


@dataclass(frozen=True)
class FactReading:
    """Does the LM complete prompt -> target?

    `top1`: the target's first token is the single most likely next token after the prompt (the usual
    "efficacy" of a fact edit). `probability`: P(target | prompt), the product of the teacher-forced
    probabilities of all the target's tokens (the "magnitude" that small edits move first).
    """

    top1: bool
    probability: float
    log_probability: float
    predicted: str


def _split_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, separator: str
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the target as they follow it in the joined text.

    Tokenising the joined text and cutting off the prompt's tokens keeps the target's word-initial
    form (GPT-2's " Paris", one token, rather than "Paris" after no space); when the joined text
    does not start with the prompt's tokens, the target is tokenised on its own with its separator.
    """
    prompt = prompt.rstrip()
    target = target.strip()
    if not target:
        raise BadInput("the fact's target is empty; give the words the model should produce")
    prompt_ids: list[int] = tokenizer(prompt)["input_ids"]
    joined: list[int] = tokenizer(prompt + separator + target)["input_ids"]
    if joined[: len(prompt_ids)] == prompt_ids and len(joined) > len(prompt_ids):
        target_ids = joined[len(prompt_ids) :]
    else:
        target_ids = tokenizer(separator + target, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        if tokenizer.bos_token_id is None:
            raise BadInput("the prompt is empty and the tokenizer has no BOS token to condition on")
        prompt_ids = [tokenizer.bos_token_id]
    return prompt_ids, target_ids


def fact_meters(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[tuple[str, str]],
    separator: str = " ",
    batch_size: int = 32,
) -> list[FactReading]:
    """`fact_meter` for many (prompt, target) pairs, `batch_size` sequences per forward pass.

    Sequences are right-padded: a causal model's logits at real positions never see the padding, and
    position ids stay those of the unpadded sequence.
    """
    pairs = [_split_tokens(tokenizer, p, t, separator) for p, t in facts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    readings: list[FactReading] = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            # The last target token is only predicted, never fed.
            sequences = [p + t[:-1] for p, t in chunk]
            length = max(len(s) for s in sequences)
            ids = torch.zeros((len(chunk), length), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(sequences):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            log_probs = torch.log_softmax(logits.double(), dim=-1).cpu()
            for row, (prompt_ids, target_ids) in enumerate(chunk):
                positions = torch.arange(len(target_ids)) + len(prompt_ids) - 1
                token_log_probs = log_probs[row, positions, torch.tensor(target_ids)]
                first = log_probs[row, len(prompt_ids) - 1]
                predicted = int(first.argmax())
                total = float(token_log_probs.sum())
                readings.append(
                    FactReading(
                        top1=predicted == target_ids[0],
                        probability=math.exp(total),
                        log_probability=total,
                        predicted=tokenizer.decode([predicted]),
                    )
                )
    finally:
        model.train(was_training)
    return readings


def fact_meter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    separator: str = " ",
) -> FactReading:
    """Does a causal LM complete `prompt` with `target`? E.g. ("The capital of France is", "Paris").

    The text read is prompt + separator + target (trailing/leading whitespace of the two is dropped, so
    " Paris" and "Paris" mean the same); pass separator="" where the target continues a word.
    """
    return fact_meters(model, tokenizer, [(prompt, target)], separator)[0]

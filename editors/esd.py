"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., arXiv 2303.07345), by fine-tuning.

The edited UNet theta' is trained so that its prediction for the concept c follows the frozen original
theta* guided *away* from c (paper, eq. 4 and its training loss):

    eps_theta'(x_t, c, t)  <-  eps_theta*(x_t, t) - eta [eps_theta*(x_t, c, t) - eps_theta*(x_t, t)]

with eps(x_t, t) the prediction for the empty prompt, MSE loss and Adam. `templates` place the concept in
the texts the model knows it from ("a {} circle"): c is then a filled template ("a red circle"), one drawn
per step; the default "{}" is the paper's bare concept. x_t is produced as the paper does: start from
noise and run DDIM (`ddim_steps`, classifier-free guidance `start_guidance` on c against the empty
prompt, as the pipeline samples), stopping after a random number of steps; t is then the timestep those
steps reached on the 1000-step training schedule. `sampler` "frozen" draws x_t with the original model
(the current diffusers script; being independent of training, they are drawn `SAMPLE_CHUNK` at a time),
"edited" with the model being trained (the CompVis script). The target is linear in the model's output,
so it is the same statement for epsilon-, v- or sample-predicting UNets (diffusers applies guidance to
the raw output too).

Parameter sets (`train_method`, names as in the reference; UNet parameter names in diffusers' layout):
- xattn (ESD-x): every parameter of the cross-attention blocks (`attn2`);
- noxattn (ESD-u): everything else except the time embedding and the output layer (as CompVis);
- selfattn: the self-attention blocks (`attn1`);  full: every parameter;
- strict (esd-x-strict): only the cross-attention key and value projections.
Defaults follow the paper and its CompVis code (eta 1, lr 1e-5, 1,000 iterations, batch 1, guidance 3)
except the sampler.

Measured on the quick shapes-world models (share of 32 samples per colour prompt; settings chosen on
models trained with seeds 3-5, squares and triangles, and checked in the tests on seeds 0-2 and circles):
- A bare colour is not what that model draws from: its text encoder only saw captions ("a red circle").
  At x_t drawn for "a red circle", eps("red") - eps("") had cosine -0.15 to -0.29 with eps("a red
  circle") - eps("") at the noise levels that decide the colour, and erasing "red" alone (ESD-x, 300
  iterations) left red at 100% on two models. In the caption templates red falls to 0%.
- ESD-x cannot single out a colour there: the text encoder codes colours as opposite pairs (centred
  outputs of "red" and "green": cosine -0.92 to -0.97 on five of six models) and keys and values are
  linear in them, so the edit moved green's values by -0.99 times red's and green turned into its
  opposite before red fell. ESD-u edits after the attention's nonlinearity.
- With the edited sampler ESD-u also trained on what red had become (blue) and erased blue with it (blue
  kept 0% after 100 steps at lr 1e-4, 100% with the frozen sampler).
- The erasure grows with lr x iterations and so does the damage to other colours: ESD-u at lr 3e-5
  erased red by 78-100% after 100 steps and 100% after 200 and 300 on the three models, with every other
  colour kept at 97-100%; at 400 steps one model kept blue at 75%, and at lr 1e-4 another kept yellow at
  84% after 100 steps. ESD has no term that keeps other concepts: at those settings erasing green, blue
  or yellow instead hit a neighbour on two of the three models (kept 0-50%).
- `preserve` adds that term. Holding only the kept colours was not enough (erasing red at lr 1e-4 took
  green and yellow to 0% on one model: guidance amplifies the drift of the unconditional prediction), so
  the empty prompt is held too. With it, red left after erasure / lowest other colour kept, on the three
  selection models: lr 3e-5 x 400 steps 0% / 100%, 6% / 97%, 0% /
  100%; x 600 0% / 100%, 6% / 97%, 19% / 13%; lr 1e-4 x 200 0% / 100%, 6% / 97%, 0% / 50%; lr 3e-4 x 200
  0% / 100%, 0% / 100%, 0% / 0%. Only 3e-5 x 400 held on all three, and it was taken.
- It carried over to two of the three test models (seeds 0-2, circles): red fell by 0% on seed 0 and by
  100% on seeds 1 and 2, every other colour kept at 100%; and on the full world's diffusion
  model the same setting erased no colour at all (each of red, green, blue and yellow stayed at 100%),
  where 200 steps without `preserve` erase red. On these small models the edit sits on a knife edge
  between no effect and damage, and where the edge lies differs from one training seed to the next.
- Why seed 0 keeps red: its erasure reaches the noisiest steps only. After 400 steps (edit seed 10) the
  per-x_t pull (`Pull`) on 64 held-out x_t was -0.03 to 0.01 at t 800-999, where eps*(c) - eps* is largest
  (squared norm 330-380), but 0.5 to 1.5 at t 440-680 (norm 8-57), and red fell by 6%. The paper's loss
  is one mean over all x_t, so those noisiest steps dominate its gradient. Dividing each x_t's error by
  its own signal instead did not help: on selection model 5 it took green to 0% after 100 steps.
- Three re-weightings of that mean were measured at 3e-5 x 400 (red left; lowest other colour kept) and
  none was kept. The paper's error in epsilon rather than in v (weight alpha_bar_t, which silences the
  noisiest steps): 0% / 100% on model 3, 100% / 100% on model 4, 44% / 100% on model 5, where the loss in
  v gives 0%, 6%, 0%. Each x_t's error over its own signal, scaled to the same size: red 100% on model 6
  (a fourth selection model that keeps red like test model 0: 81% in v) and green at 44% on model 5.
  `preserve_weight` 5 at lr 1e-4 and 3e-4: green to 69% and 56%, blue to 0% on model 5.
- The pull does not predict the colour across models either, so `until` is a stopping point to read, not
  a guarantee: red fell by 56% / 94% / 97% at pull 0.60 / 0.38 / 0.32 on model 4 and by 100% at 0.52 on
  model 5, but by 6% at 0.30 on model 0.
- Drawing each x_t's noise level where the concept still pulls (four bands of DDIM stopping steps, each
  drawn in proportion to its pull on held-out x_t, at least 0.1, re-measured every 25 steps) did not move
  the edge either, and was not kept. At 3e-5 x 400 (red left; lowest other colour kept): 0% / 100% on
  model 3, 19% / 100% on model 4, 0% / 100% on model 5, 88% / 100% on model 6 (the uniform draw: 0%, 6%,
  0%, 81%). At 800 steps model 6 reached 31% / 100% but model 5 lost yellow (0% / 62%); its band pulls
  were -0.13 / 0.23 / 0.46 / 0.33, noisiest first, model 6's 0.13 / 0.33 / 0.51 / 0.26. The steps a
  model needs still differ by model; what would follow them is a stopping rule that reads the images.
- The colours along one run (3e-5, uniform draw, 16 squares and triangles per colour every 100 steps):
  model 5 lost red after 100 steps and yellow from 500 on (75%, then 62%); model 6 lost red slowly (81% at
  400, 44% at 600, 31% from 700 to 900) and kept every other colour through 900. No fixed count of steps
  serves both, so `read_until` reads the edit's own images: every 50 steps, 16 images of each erased text
  (red in the four shape captions), stopping once the reader sees red in at most a tenth (values set
  before measuring, not tuned; at most 1,200 steps). With the colour meter as reader it stopped model 3
  after 100 steps (red left 0%, lowest other colour kept 100%), model 4 after 200 (16% / 100%), model 5
  after 100 (0% / 100%), model 6 after 950 (25% / 100%). On the test models (seeds 0-2, 32 circles per
  colour; tests/test_editor_esd.py) red fell by 91%, 100% and 91%, every other colour kept at 97% or more:
  seeds 1 and 2 stopped after 150 steps, seed 0 ran to the cap of 1,200 (its last reading: 14%).
- On the full world's diffusion model, read by the registry's CLIP (the default reader), the same request
  did not erase red within 1,200 steps, and the readings said so: at lr 3e-5 red stayed at 100% (CLIP's
  last reading 97%), at 1e-4 it fell by 25% (CLIP 70%), every other colour kept at 100% in both.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelzoo.editors.base import EditContext, EditProgress, EditResult, changed_tensors
from modelzoo.editors.diffusion_text import CROSS_ATTENTION, UNET, TextSide, in_template, text_side
from modelzoo.editors.readers import CLIP_READER, AttributeReader, read_drawn, registry_clip_reader
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel

TrainMethod = Literal["xattn", "noxattn", "selfattn", "full", "strict"]
Sampler = Literal["edited", "frozen"]
OUTSIDE_NOXATTN = ("time_embedding.", "conv_out.", "conv_norm_out.")
"""diffusers' names for what CompVis's ESD-u leaves out: `time_embed` and the output layer `out.`."""

TRAIN_METHODS: dict[str, Callable[[str], bool]] = {
    "xattn": lambda name: f"{CROSS_ATTENTION}." in name,
    "noxattn": lambda name: f"{CROSS_ATTENTION}." not in name and not name.startswith(OUTSIDE_NOXATTN),
    "selfattn": lambda name: "attn1." in name,
    "full": lambda name: True,
    "strict": lambda name: f"{CROSS_ATTENTION}.to_k." in name or f"{CROSS_ATTENTION}.to_v." in name,
}
ALIASES = {"esd-x": "xattn", "esd-u": "noxattn", "esd-all": "full", "esd-x-strict": "strict"}
SAMPLE_CHUNK = 32
"""Samples per batched run of the frozen sampler (its x_t do not depend on training)."""
TINY = 1e-12
PULL_SAMPLES = 16
"""Held-out x_t on which the erased concepts' pull is measured."""


@dataclass(frozen=True)
class EsdRequest:
    """One ESD edit; with several concepts each iteration erases one drawn at random (CompVis's
    `--separator` behaviour)."""

    erase: tuple[str, ...] = ()
    train_method: str = "xattn"
    eta: float = 1.0
    lr: float = 1e-5
    iterations: int = 1000
    start_guidance: float = 3.0
    ddim_steps: int = 50
    batch_size: int = 1
    sampler: Sampler = "frozen"
    templates: tuple[str, ...] = ("{}",)
    """Texts the concepts are erased in, "{}" marking the place (e.g. "a {} circle"); each step draws one."""
    preserve: tuple[str, ...] = ()
    """Concepts to keep: each step also draws one of them (in a template) or the empty prompt and holds the
    model's prediction for it at the original's. Not in the paper, which has no term that keeps anything."""
    preserve_weight: float = 1.0
    until: float | None = None
    """Stop once the concept's pull has fallen to this fraction of the original's (see `pull`); 0 means it no
    longer pulls towards itself, -eta is ESD's optimum. None trains every iteration (the paper)."""
    check_every: int = 25
    """Iterations between two measurements of the pull (it is reported through progress too)."""
    read_until: float | None = None
    """Stop once at most this share of the images drawn for the erased concepts reads as one of them, the
    images `read_images` per erased text (each concept in each template, the pipeline's own sampling
    settings), read every `read_every` iterations by `read` choosing among the erased and the preserved
    concepts. Unlike the pull it measures the result itself, and how many steps a model needs differs from
    one model to the next. None trains every iteration."""
    read_every: int = 100
    read_images: int = 16
    reader: str = CLIP_READER
    """Which reader `read_until` reads with: "clip" (the registry's CLIP model, zero-shot over the concepts in
    the templates), "clip:zoo:REF", or the name of one handed in as `read`."""
    read: AttributeReader | None = field(default=None, compare=False, repr=False, metadata={"provenance": False})
    """The reader itself, a handle rather than a setting; `Zoo.edit` loads it for the names above."""
    seed: int = 0

    def validate(self) -> EsdRequest:
        return _resolve(self)


def trainable(unet: nn.Module, method: str) -> dict[str, nn.Parameter]:
    """The UNet parameters `method` trains, by name."""
    keep = TRAIN_METHODS[method]
    chosen = {name: p for name, p in unet.named_parameters() if keep(name)}
    if not chosen:
        raise BadInput(f"the UNet has no parameters in ESD's {method!r} set")
    return chosen


def _resolve(r: EsdRequest) -> EsdRequest:
    method = ALIASES.get(r.train_method, r.train_method)
    if method not in TRAIN_METHODS:
        known = ", ".join([*TRAIN_METHODS, *ALIASES])
        raise BadInput(f"unknown ESD train method {r.train_method!r}; choose one of {known}")
    if not r.erase:
        raise BadInput("ESD needs a concept to erase (--erase)")
    for what, value in (("eta", r.eta), ("lr", r.lr), ("start_guidance", r.start_guidance),
                        ("preserve_weight", r.preserve_weight)):
        if not (math.isfinite(value) and value > 0):
            raise BadInput(f"{what} must be a positive number, got {value}")
    if r.until is not None and not (math.isfinite(r.until) and r.until < 1):
        raise BadInput(f"until is the fraction of the concept's pull to stop at, below 1; got {r.until}")
    if r.read_until is not None:
        if not (math.isfinite(r.read_until) and 0 <= r.read_until < 1):
            raise BadInput(f"read_until is the share of images still read as the concept to stop at, in [0, 1); "
                           f"got {r.read_until}")
        if not r.preserve:
            raise BadInput("read_until needs concepts to preserve: the reader chooses among them and the erased ones")
    for what, count in (("iterations", r.iterations), ("ddim_steps", r.ddim_steps), ("batch_size", r.batch_size),
                        ("check_every", r.check_every), ("read_every", r.read_every), ("read_images", r.read_images)):
        if count < 1:
            raise BadInput(f"{what} must be at least 1, got {count}")
    if r.sampler not in ("edited", "frozen"):
        raise BadInput(f"sampler is 'edited' (the paper) or 'frozen', not {r.sampler!r}")
    bad = [t for t in r.templates if t.count("{") != 1 or t.count("}") != 1 or "{}" not in t]
    if bad or not r.templates:
        raise BadInput(f"a template holds one '{{}}' where the concept goes, e.g. 'a {{}} circle'; got {bad or '()'}")
    if both := set(r.erase) & set(r.preserve):
        raise BadInput(f"a concept cannot be erased and preserved at once: {', '.join(sorted(both))}")
    return replace(r, train_method=method, erase=tuple(r.erase), templates=tuple(r.templates),
                   preserve=tuple(r.preserve))


class EsdEditor:
    """The `esd` editor plugin."""

    name: ClassVar[str] = "esd"
    families: ClassVar[tuple[str, ...]] = ("diffusion",)
    request_type: ClassVar[type] = EsdRequest

    @staticmethod
    def _in_templates(side: TextSide, r: EsdRequest, concepts: tuple[str, ...], what: str) -> list[str]:
        """Every concept in every template, each checked to fit the tokenizer."""
        filled = []
        for concept in concepts:
            side.token_ids(concept, what)
            for template in r.templates:
                filled.append(in_template(template, concept))
                side.token_ids(filled[-1], f"{what} in its template")
        return filled

    def with_context(self, request: Any, context: EditContext) -> Any:
        """Load the CLIP model a `read_until` request reads images with, unless a reader was handed in."""
        if not isinstance(request, EsdRequest) or request.read_until is None or request.read is not None:
            return request
        r = _resolve(request)  # a bad request is refused before a model is loaded for it
        name, read = registry_clip_reader(context.derived.registry, r.reader, r.templates)
        return replace(r, reader=name, read=read)

    def edit(self, model: LoadedModel, request: EsdRequest, progress: EditProgress | None = None) -> EditResult:
        from diffusers import DDIMScheduler

        r = _resolve(request)
        if r.read_until is not None and r.read is None:
            raise BadInput(f"the reader {r.reader!r} is not loaded: edit through `Zoo.edit`, which loads the "
                           "registry's CLIP model, or hand a reader in as `read`")
        side = text_side(model)
        erased, kept = (self._in_templates(side, r, concepts, what)
                        for concepts, what in ((r.erase, "concept to erase"), (r.preserve, "concept to keep")))
        texts = side.encode(["", *erased, *kept]).to(next(side.unet.parameters()))
        empty, erase_texts = texts[:1], texts[1 : 1 + len(erased)]
        # The empty prompt is kept too: guidance amplifies any drift of the unconditional prediction
        # (7.5 times at the pipeline's default), which moved every colour where only they were kept.
        keep_texts = torch.cat([empty, texts[1 + len(erased) :]]) if kept else texts[:0]
        unet = side.unet
        params = trainable(unet, r.train_method)
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)
        unet.eval().requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        scheduler = DDIMScheduler.from_config(model.pipeline.scheduler.config)
        scheduler.set_timesteps(r.ddim_steps)
        config = unet.config  # type: ignore[attr-defined]
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        shape = (config.in_channels, size, size)
        # x_t from the frozen model do not depend on training, so many are drawn in one batched run.
        sampler, together = (unet, 1) if r.sampler == "edited" else (frozen, max(1, SAMPLE_CHUNK // r.batch_size))

        def draws(choices: torch.Tensor, count: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
            """(x_t, t, text) for `count` iterations, the text one of `choices` (drawn up front, so the erased
            and the kept draws do not depend on how the sampler batches them)."""
            draw = random.Random(seed)
            noise = torch.Generator().manual_seed(seed)
            plan = [(draw.randrange(len(choices)), draw.randrange(r.ddim_steps)) for _ in range(count)]
            for first in range(0, count, together):
                part = torch.tensor(plan[first : first + together]).repeat_interleave(r.batch_size, dim=0)
                k, stops = part[:, 0], part[:, 1]
                # a seeded CPU draw, so a seed gives the same x_t on every device
                x = torch.randn((len(part), *shape), generator=noise).to(texts) * scheduler.init_noise_sigma
                x, t = _sample_until(sampler, scheduler, x, choices[k], empty, r.start_guidance, stops)
                yield from zip(x.split(r.batch_size), t.split(r.batch_size), choices[k].split(r.batch_size),
                               strict=True)

        pull = Pull(frozen, *(torch.cat(part) for part in zip(*draws(erase_texts, PULL_SAMPLES, r.seed + 2),
                                                               strict=True)), empty)
        optimiser = MasterWeights(list(params.values()), r.lr)
        losses: list[float] = []
        keep_losses: list[float] = []
        pulls: list[float] = []
        reads: list[tuple[int, float]] = []
        kept_draws = draws(keep_texts, r.iterations, r.seed + 1) if len(keep_texts) else itertools.repeat(None)
        for iteration, ((x, t, c), keep) in enumerate(zip(draws(erase_texts, r.iterations, r.seed), kept_draws,
                                                          strict=False)):
            n = len(x)
            xs, ts, cs = [x], [t], [c]
            if keep is not None:
                xs.append(keep[0]), ts.append(keep[1]), cs.append(keep[2])
            with torch.no_grad():
                reference = frozen(torch.cat([x, *xs]), torch.cat([t, *ts]),
                                   encoder_hidden_states=torch.cat([empty.expand_as(c), *cs])).sample
            e_0, e_p, e_k = reference[:n], reference[n : 2 * n], reference[2 * n :]
            predicted = unet(torch.cat(xs), torch.cat(ts), encoder_hidden_states=torch.cat(cs)).sample
            loss = torch.nn.functional.mse_loss(predicted[:n], e_0 - r.eta * (e_p - e_0))
            total = loss
            if keep is not None:
                keep_loss = torch.nn.functional.mse_loss(predicted[n:], e_k)
                total = loss + r.preserve_weight * keep_loss
                keep_losses.append(keep_loss.item())
            total.backward()
            optimiser.step()
            losses.append(loss.item())
            measured = (iteration + 1) % r.check_every == 0 or iteration + 1 == r.iterations
            if measured:
                pulls.append(pull(unet))
            read = r.read_until is not None and (iteration + 1) % r.read_every == 0
            if read:
                reads.append((iteration + 1, _read_share(model, r, erased)))
            if progress is not None:
                progress(iteration + 1, r.iterations, {"loss": losses[-1], **({"pull": pulls[-1]} if measured else {}),
                                                       **({"read": reads[-1][1]} if read else {})})
            if measured and r.until is not None and pulls[-1] <= r.until:
                break
            if read and r.read_until is not None and reads[-1][1] <= r.read_until:
                break
        if not measured:  # stopped by a reading between two measurements of the pull
            pulls.append(pull(unet))
        unet.requires_grad_(False)
        before = {f"{UNET}/{n}": t for n, t in frozen.state_dict().items() if n in params}
        changed = changed_tensors(model, list(before), before)
        tail = losses[-max(1, len(losses) // 10) :]
        metrics = {
            "iterations_run": len(losses), "final_pull": pulls[-1],
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail), "trained_tensors": len(params),
            **({"final_preserve_loss": sum(keep_losses[-len(tail) :]) / len(tail)} if keep_losses else {}),
            **({"reads": reads} if r.read_until is not None else {}),
            "changed_tensors": len(changed), "trained_parameters": sum(p.numel() for p in params.values()),
        }
        settings = {k: v for k, v in asdict(r).items() if k != "read"}
        return EditResult(changed=changed, params=settings, metrics=metrics)


def _read_share(model: LoadedModel, r: EsdRequest, erased: list[str]) -> float:
    """The share of images drawn for the erased texts (the same noise at every reading) that `r.read` reads
    as an erased concept rather than a preserved one."""
    assert r.read is not None
    read = read_drawn(model, erased, r.read_images, r.seed + 3, r.read, [*r.erase, *r.preserve])
    return sum(concept in r.erase for concept in read) / len(read)


class Pull:
    """How much the edited UNet's prediction for the erased concepts still points towards them, on x_t held out
    from training: the projection of eps'(x_t, c) - eps'(x_t) on the original's eps*(x_t, c) - eps*(x_t),
    divided by the original's squared norm, averaged over the x_t. Each x_t counts alike: the concept's
    signal is some 40 times stronger at the noisiest steps than at those that decide a colour, and a ratio
    of sums read 0.04 where the per-x_t mean read 0.30 and the colour had not moved. It is 1 before the edit,
    0 where guidance no longer moves towards c and -eta at ESD's optimum. A measured stopping point: how far
    training must go before the concept stops pulling differs from one model to the next, and going further
    only damages the others."""

    def __init__(self, frozen: nn.Module, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, empty: torch.Tensor):
        self.inputs = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, empty.expand_as(c)]))
        self.d_star = self._direction(frozen)
        self.norm = (self.d_star * self.d_star).flatten(1).sum(1).clamp_min(TINY)

    @torch.no_grad()
    def _direction(self, unet: nn.Module) -> torch.Tensor:
        x, t, c = self.inputs
        conditional, unconditional = unet(x, t, encoder_hidden_states=c).sample.float().chunk(2)
        return conditional - unconditional

    def __call__(self, unet: nn.Module) -> float:
        return float(((self._direction(unet) * self.d_star).flatten(1).sum(1) / self.norm).mean())


class MasterWeights:
    """Adam over float32 copies of half-precision parameters, written back after each step: an Adam step of
    lr 1e-5 is far below bfloat16's resolution (2^-8 of the weight), so updated in place the weights would
    never move. Parameters in float32 or float64 are optimised as they are."""

    def __init__(self, params: list[nn.Parameter], lr: float):
        self.params = params
        self.master = [p.detach().float().clone() if p.dtype in (torch.float16, torch.bfloat16) else p
                       for p in params]
        self.optimiser = torch.optim.Adam(self.master, lr=lr)

    def step(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        self.optimiser.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                if m is not p:
                    p.copy_(m)
                p.grad = None


@torch.no_grad()
def _sample_until(
    unet: nn.Module, scheduler: object, x: torch.Tensor, c: torch.Tensor, empty: torch.Tensor,
    guidance: float, stops: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run DDIM from noise x with guidance on c (one text per sample), sample i stopping after stops[i]
    steps; returns each x_t and the timestep t it is at."""
    timesteps = scheduler.timesteps  # type: ignore[attr-defined]
    order = stops.argsort(descending=True)
    x, c, running = x[order].clone(), c[order], stops[order]
    for step, t in enumerate(timesteps[: int(stops.max())]):
        n = int((running > step).sum())  # the samples still running lead, so they are a prefix
        x_in = scheduler.scale_model_input(torch.cat([x[:n], x[:n]]), t)  # type: ignore[attr-defined]
        both = torch.cat([empty.expand(n, -1, -1), c[:n]])
        uncond, cond = unet(x_in, t, encoder_hidden_states=both).sample.chunk(2)
        x[:n] = scheduler.step(uncond + guidance * (cond - uncond), t, x[:n]).prev_sample  # type: ignore[attr-defined]
    reached = torch.empty_like(x)
    reached[order] = x
    return reached, timesteps[stops].to(x.device)

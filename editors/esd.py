"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., arXiv 2303.07345), by fine-tuning.

The edited UNet theta' is trained so that its prediction for the concept c follows the frozen original
theta* guided *away* from c (paper, eq. 4 and its training loss):

    eps_theta'(x_t, c, t)  <-  eps_theta*(x_t, t) - eta [eps_theta*(x_t, c, t) - eps_theta*(x_t, t)]

with eps(x_t, t) the prediction for the empty prompt, MSE loss and Adam. x_t is produced as the paper
does: start from noise and run DDIM (`ddim_steps`, classifier-free guidance `start_guidance` on c) with
the model being trained (`sampler="edited"`, the CompVis script; "frozen" samples with the original, as
the current diffusers script does), stopping after a random number of steps; t is then the timestep
those steps reached on the 1000-step training schedule. The target is linear in the model's output, so
it is the same statement for epsilon-, v- or sample-predicting UNets (diffusers applies guidance to the
raw output too).

Parameter sets (`train_method`, names as in the reference; UNet parameter names in diffusers' layout):
- xattn (ESD-x): every parameter of the cross-attention blocks (`attn2`);
- noxattn (ESD-u): everything else except the time embedding and the output layer (as CompVis);
- selfattn: the self-attention blocks (`attn1`);  full: every parameter;
- strict (esd-x-strict): only the cross-attention key and value projections.
Defaults follow the paper and its CompVis code: eta 1, lr 1e-5, 1,000 iterations, batch 1, guidance 3.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from modelzoo.editors.base import EditProgress, EditResult, changed_tensors
from modelzoo.editors.diffusion_text import CROSS_ATTENTION, UNET, text_side
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
    sampler: Sampler = "edited"
    seed: int = 0


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
    for what, value in (("eta", r.eta), ("lr", r.lr), ("start_guidance", r.start_guidance)):
        if not (math.isfinite(value) and value > 0):
            raise BadInput(f"{what} must be a positive number, got {value}")
    for what, count in (("iterations", r.iterations), ("ddim_steps", r.ddim_steps), ("batch_size", r.batch_size)):
        if count < 1:
            raise BadInput(f"{what} must be at least 1, got {count}")
    if r.sampler not in ("edited", "frozen"):
        raise BadInput(f"sampler is 'edited' (the paper) or 'frozen', not {r.sampler!r}")
    return EsdRequest(**{**asdict(r), "train_method": method, "erase": tuple(r.erase)})


class EsdEditor:
    """The `esd` editor plugin."""

    name: ClassVar[str] = "esd"
    families: ClassVar[tuple[str, ...]] = ("diffusion",)

    def edit(self, model: LoadedModel, request: EsdRequest, progress: EditProgress | None = None) -> EditResult:
        from diffusers import DDIMScheduler

        r = _resolve(request)
        side = text_side(model)
        for concept in r.erase:
            side.token_ids(concept, "concept to erase")
        unet = side.unet
        params = trainable(unet, r.train_method)
        frozen = copy.deepcopy(unet).eval().requires_grad_(False)
        unet.eval().requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        scheduler = DDIMScheduler.from_config(model.pipeline.scheduler.config)
        scheduler.set_timesteps(r.ddim_steps)
        texts = side.encode(["", *r.erase])
        empty, concepts = texts[:1].expand(r.batch_size, -1, -1), texts[1:]
        config = unet.config  # type: ignore[attr-defined]
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        shape = (r.batch_size, config.in_channels, size, size)
        sampler = unet if r.sampler == "edited" else frozen
        optimiser = torch.optim.Adam(list(params.values()), lr=r.lr)
        draw = random.Random(r.seed)
        noise = torch.Generator().manual_seed(r.seed)
        losses: list[float] = []
        for iteration in range(r.iterations):
            c = concepts[draw.randrange(len(concepts))][None].expand(r.batch_size, -1, -1)
            stop = draw.randrange(r.ddim_steps)
            x = torch.randn(shape, generator=noise) * scheduler.init_noise_sigma
            x, t = _sample_until(sampler, scheduler, x, c, empty, r.start_guidance, stop)
            with torch.no_grad():
                e_0 = frozen(x, t, encoder_hidden_states=empty).sample
                e_p = frozen(x, t, encoder_hidden_states=c).sample
            e_n = unet(x, t, encoder_hidden_states=c).sample
            loss = torch.nn.functional.mse_loss(e_n, e_0 - r.eta * (e_p - e_0))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            if progress is not None:
                progress(iteration + 1, r.iterations, {"loss": losses[-1]})
        unet.requires_grad_(False)
        before = {f"{UNET}/{n}": t for n, t in frozen.state_dict().items() if n in params}
        changed = changed_tensors(model, list(before), before)
        tail = losses[-max(1, len(losses) // 10) :]
        metrics = {
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail), "trained_tensors": len(params),
            "changed_tensors": len(changed), "trained_parameters": sum(p.numel() for p in params.values()),
        }
        return EditResult(changed=changed, params=asdict(r), metrics=metrics)


@torch.no_grad()
def _sample_until(
    unet: nn.Module, scheduler: object, x: torch.Tensor, c: torch.Tensor, empty: torch.Tensor,
    guidance: float, stop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `stop` DDIM steps from noise x with guidance on c; returns x_t and the timestep t it is at."""
    timesteps = scheduler.timesteps  # type: ignore[attr-defined]
    both = torch.cat([empty, c])
    for t in timesteps[:stop]:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)  # type: ignore[attr-defined]
        uncond, cond = unet(x_in, t, encoder_hidden_states=both).sample.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample  # type: ignore[attr-defined]
    return x, timesteps[stop]

"""UCE and ESD cost on this CPU, with random weights built from configs. Prints JSON.

- uce: seconds for one edit erasing 1, 10 and 100 concepts (towards "", nothing preserved, the default
  "last_and_following" tokens) on a Stable Diffusion 1.x-shaped UNet (860M parameters, 32 key/value
  projections) with a CLIP ViT-L/14-shaped text encoder, through `UceEditor.edit` (text encoding, the
  one d x d solve, rewriting the projections, collecting the changed tensors); and the bytes the child
  adds (its changed tensors) against the whole pipeline's (UNet, text encoder and SD's VAE).
- esd_tiny: seconds per ESD iteration (paper defaults: ESD-x, batch 1, 50-step DDIM x_t sampler,
  guidance 3) through `EsdEditor.edit` on the shapes world's pipeline (briefly trained: weights do not
  change the cost).
- esd_sd1: the same iteration on the SD-1.x-shaped UNet, timed by parts because one iteration there
  takes minutes on a CPU: a guided DDIM step of the x_t sampler (UNet on a batch of 2, no gradient) and
  a training step (two frozen forwards, one forward and backward through the edited UNet, Adam on
  ESD-x's parameters); an iteration costs on average 24.5 sampler steps (the stop is uniform on 0..49)
  plus one training step. `--esd-latent` sets the latent side (SD 1.x: 64; default 32, 256 px images,
  which keeps the backward pass within a few GB).

- uce_preserve: UCE's own preservation term against null-space projection (`--preserve-mode nullspace`)
  on the same SD-1.x-shaped model, erasing 1, 10 and 100 concepts with `--preserved` (500) prompts kept:
  seconds, and the preserved prompts' drift over every token position. Both modes encode the same texts;
  null-space mode adds one eigendecomposition of a 768 x 768 matrix and one solve. With random weights the
  keys of 500 x 77 positions fill the 768 dimensions (save the final norm's mean direction), so null-space
  mode there has next to no room: a random encoder says nothing of the effect. Measured (2 threads, quiet;
  seconds are mostly the encoding of 500 x 77 keys):

  | erased | mode      | seconds | preserved drift, mean / max | erased residual | null-space dim |
  |-------:|-----------|--------:|----------------------------:|----------------:|---------------:|
  | 1      | penalty   | 71.7    | 2.5e-3 / 2.8e-2             | 0.107           |                |
  | 1      | nullspace | 61.9    | 4.3e-12 / 1.5e-11           | 0.443           | 1              |
  | 10     | penalty   | 56.9    | 8.6e-3 / 3.8e-2             | 0.083           |                |
  | 10     | nullspace | 56.4    | 1.4e-11 / 5.0e-11           | 0.409           | 1              |
  | 100    | penalty   | 66.0    | 2.1e-2 / 6.7e-2             | 0.061           |                |
  | 100    | nullspace | 64.2    | 1.8e-10 / 6.3e-10           | 0.444           | 1              |

  Penalty drift grows with the number erased (8x from 1 to 100); null space keeps it at float error.

Effect, measured on the quick shapes-world model instead (tests/test_uce_nullspace.py; 32 samples per
colour prompt, colour by the meter; shape agreement over all 16 captions, 8 samples each), erasing two
colours towards "" in the four shape templates with the other two preserved:

| model seed | erased        | preservation        | erased colours fall | others kept | largest preserved-token drift |
|-----------:|---------------|---------------------|--------------------:|------------:|------------------------------:|
| 1          | green, blue   | penalty             | 100%, 100%          | 100%, 100%  | (aggregate 0.048)             |
| 1          | green, blue   | null space 1e-3     | 7%, 91%             | 100%, 100%  | 0.083 (aggregate 0.015)       |
| 1          | blue, yellow  | null space 1e-6     | 84%, 28%            | 100%, 100%  | 0.0047                        |
| 1          | blue, yellow  | null space 1e-3     | 91%, 84%            | 100%, 100%  | 0.043                         |
| 0          | blue, yellow  | null space 1e-3     | 100%, 100%          | 100%, 100%  | 0.026; shapes 25% -> 25%      |

Seed 1 chose the threshold; seed 0 is the acceptance test's. A colour whose text embedding lies in the
span of the preserved colours' keys (green, between yellow and blue on the encoder's hue line) cannot be
erased without moving them, which is the null-space method's promise read the other way.

    OMP_NUM_THREADS=1 python benchmarks/editors_diffusion.py [--concepts 1,10,100] [--esd-iterations 10]
                                                            [--esd-latent 32] [--skip-sd1-esd]
                                                            [--preserved 500] [--only-preserve]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modelzoo.editors.esd import EsdEditor, EsdRequest, trainable
from modelzoo.editors.uce import UceEditor, UceRequest
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.families.diffusion import sd1_text_encoder, sd1_unet

SD1_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
"""Stable Diffusion 1.x's AutoencoderKL (83,653,863 parameters), for the parent's size only."""


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _sd1_model() -> LoadedModel:
    from transformers import CLIPTokenizer

    from modelzoo.registry.families.clip_tokenizer import clip_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in clip_tokenizer_files().items():
            (Path(tmp) / name).write_bytes(data)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    modules = {"unet": sd1_unet().eval(), "text_encoder": sd1_text_encoder().eval()}
    return LoadedModel(ref="sd1-random", family="diffusion", pipeline=None, modules=modules, tokenizer=tokenizer)


def bench_uce(model: LoadedModel, counts: list[int]) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae_bytes = _bytes(AutoencoderKL(**SD1_VAE))
    parent = _bytes(model.modules["unet"]) + _bytes(model.modules["text_encoder"]) + vae_bytes
    words = ["painting", "style", "artist", "portrait", "landscape", "river", "castle", "forest", "garden", "city"]
    runs = []
    for count in counts:
        concepts = tuple(f"{words[i % len(words)]} {words[(i // len(words)) % len(words)]} number {i}"
                         for i in range(count))
        started = time.perf_counter()
        result = UceEditor().edit(model, UceRequest(erase=concepts))
        seconds = time.perf_counter() - started
        child = sum(t.numel() * t.element_size() for t in result.changed.values())
        runs.append({
            "concepts": count, "seconds": round(seconds, 3), "edited_rows": result.metrics["concept_rows"]["edited"],
            "changed_tensors": len(result.changed), "child_bytes": child, "parent_bytes": parent,
            "child_fraction": round(child / parent, 5), "erase_residual": round(result.metrics["erase_residual"], 5),
        })
    return {"model": "SD-1.x UNet + CLIP ViT-L/14 text encoder, random weights, float32", "runs": runs}


def bench_uce_preserve(model: LoadedModel, counts: list[int], preserved: int) -> dict[str, Any]:
    """UCE's penalty against null-space preservation: seconds per edit and the preserved prompts' drift
    (the largest relative change of one token's output over all `preserved` x 77 keys, and the aggregate)."""
    unet = model.modules["unet"]
    names = [n for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    original = {n: unet.get_submodule(n).weight.detach().clone() for n in names}
    words = ["painting", "style", "artist", "portrait", "landscape", "river", "castle", "forest", "garden", "city"]
    keep = tuple(f"a photo of {words[i % 10]} {words[(i // 10) % 10]} item {i}" for i in range(preserved))
    runs = []
    for count in counts:
        concepts = tuple(f"{words[i % 10]} {words[(i // 10) % 10]} number {i}" for i in range(count))
        for mode in ("penalty", "nullspace"):
            started = time.perf_counter()
            result = UceEditor().edit(model, UceRequest(erase=concepts, preserve=keep, preserve_mode=mode))
            seconds = time.perf_counter() - started
            runs.append({"concepts": count, "preserved": preserved, "mode": mode, "seconds": round(seconds, 2),
                         **{k: result.metrics[k] for k in ("preserve_drift", "preserve_drift_max", "erase_residual",
                                                           "preserved_keys") if k in result.metrics},
                         "null_space_dim": result.metrics.get("null_space_dim")})
            print(json.dumps(runs[-1]), flush=True)
            with torch.no_grad():
                for n, w in original.items():
                    unet.get_submodule(n).weight.copy_(w)
    return {"model": "SD-1.x UNet + CLIP ViT-L/14 text encoder, random weights, float32", "runs": runs}


def bench_esd_tiny(iterations: int) -> dict[str, Any]:
    from modelzoo.demo.train_diffusion import PROFILES, train_pipeline

    pipe, _ = train_pipeline(dataclasses.replace(PROFILES["quick"], images=256, unet_steps=3), seed=0)
    model = LoadedModel(ref="shapes", family="diffusion", pipeline=pipe,
                        modules={"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tokenizer=pipe.tokenizer)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(done: int, total: int, figures: dict[str, float]) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    EsdEditor().edit(model, EsdRequest(erase=("a red circle",), iterations=iterations, seed=1), progress=tick)
    return {
        "model": "shapes-world pipeline (UNet 0.26M parameters, 16x16x3 latents)",
        "iterations": iterations, "seconds_per_iteration": round(statistics.mean(times), 4),
        "median_seconds": round(statistics.median(times), 4),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "trained_parameters": sum(p.numel() for p in trainable(pipe.unet, "xattn").values()),
    }


def _timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def bench_esd_sd1(model: LoadedModel, latent: int, repeats: int) -> dict[str, Any]:
    unet = model.modules["unet"]
    frozen = copy.deepcopy(unet).requires_grad_(False)
    unet.requires_grad_(False)
    params = trainable(unet, "xattn")
    for p in params.values():
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(list(params.values()), lr=1e-5)
    x = torch.randn(1, 4, latent, latent)
    t = torch.tensor(500)
    c, empty = torch.randn(1, 77, 768), torch.randn(1, 77, 768)

    @torch.no_grad()
    def sampler_step() -> None:
        unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([empty, c]))

    def train_step() -> None:
        with torch.no_grad():
            e_0 = frozen(x, t, encoder_hidden_states=empty).sample
            e_p = frozen(x, t, encoder_hidden_states=c).sample
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=c).sample, e_0 - (e_p - e_0))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    sample_s = _timed(sampler_step, repeats)
    train_s = _timed(train_step, repeats)
    return {
        "model": f"SD-1.x UNet, random weights, float32, {latent}x{latent}x4 latents, ESD-x",
        "sampler_step_seconds": round(sample_s, 3), "train_step_seconds": round(train_s, 3),
        "seconds_per_iteration": round(24.5 * sample_s + train_s, 2),
        "trained_parameters": sum(p.numel() for p in params.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", default="1,10,100", help="UCE concept counts, comma-separated")
    parser.add_argument("--esd-iterations", type=int, default=10, help="ESD iterations timed on the tiny model")
    parser.add_argument("--esd-latent", type=int, default=32, help="latent side for the SD-1.x ESD timing")
    parser.add_argument("--esd-repeats", type=int, default=1, help="timed repeats of each SD-1.x ESD part")
    parser.add_argument("--skip-sd1-esd", action="store_true", help="leave out the SD-1.x ESD timing")
    parser.add_argument("--preserved", type=int, default=500, help="UCE penalty against null space: prompts kept")
    parser.add_argument("--only-preserve", action="store_true", help="run only the UCE preservation comparison")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    counts = [int(n) for n in args.concepts.split(",")]
    if not args.only_preserve:
        report["esd_tiny"] = bench_esd_tiny(args.esd_iterations)
    model = _sd1_model()
    if not args.only_preserve:
        report["uce"] = bench_uce(model, counts)
    report["uce_preserve"] = bench_uce_preserve(model, counts, args.preserved)
    if not args.skip_sd1_esd and not args.only_preserve:
        report["esd_sd1"] = bench_esd_sd1(model, args.esd_latent, args.esd_repeats)
    del model
    gc.collect()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

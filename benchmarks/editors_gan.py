"""Speed of the GAN-warping editor: seconds per optimisation step and in total. Prints JSON.

- tiny: the shapes-world GAN shape (`demo.train_gan.GAN_CONFIG`, 32x32), the editor's default request
  (5 samples stretched x1.3, rank 32, 2,000 steps, style mixing), run in full through
  `WarpEditor.edit`: the total is measured.
- sg2-256: a StyleGAN2 config-f 256x256 generator (the shape of the official LSUN/AFHQ models the paper
  edits), random weights, the same request at the default layer (`synthesis.b64.conv1`, the reference's
  layer 8). A full run takes hours on a CPU, so `--steps-256` steps are timed after one warm-up step and
  the total for `--iterations` steps is projected from their median (marked "projected").

    python benchmarks/editors_gan.py [--iterations 2000] [--steps-256 3] [--device cuda] [--only tiny,sg2-256]
                                     [--threads 1]

One step = style-mixed latents for the batch, the frozen generator's images warped into targets (no
grad), the edited generator's images, the pixel loss, its backward pass through the layers after the
edited one, and an Adam step on the two low-rank factors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from modelzoo.demo.train_gan import GAN_CONFIG
from modelzoo.editors.warp import WarpEditor, WarpFit, WarpRequest, plan_warp
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.families.stylegan import Generator, StyleGanConfig, build

REQUEST = {"samples": [{"seed": s} for s in range(5)], "transform": {"scale_x": 1.3}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generator(config: StyleGanConfig, device: torch.device) -> Generator:
    G = build(config, seed=0).eval().requires_grad_(False).to(device)
    G.mapping.estimate_w_avg(num_samples=1000)
    return G


def describe(name: str, G: Generator, request: WarpRequest, layers: list[str]) -> dict[str, Any]:
    return {
        "model": name,
        "resolution": G.img_resolution,
        "parameters": sum(p.numel() for p in G.parameters()),
        "layers": layers,
        "rank": request.rank,
        "samples": len(request.samples),
        "batch": min(len(request.samples), request.batch_size),
    }


def full_run(name: str, config: StyleGanConfig, request: WarpRequest, device: torch.device) -> dict[str, Any]:
    """The whole edit through the editor plugin, step times read from its progress callback."""
    G = generator(config, device)
    model = LoadedModel(ref=name, family="gan", pipeline=G, modules={"": G})
    stamps: list[float] = []

    def progress(done: int, total: int, figures: dict[str, float]) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    synchronize(device)
    started = time.perf_counter()
    result = WarpEditor().edit(model, request, progress)
    synchronize(device)
    total = time.perf_counter() - started
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        **describe(name, G, request, result.params["layers"]),
        "iterations": request.iterations,
        "s_per_iteration": round(statistics.median(steps), 5),
        "total_s": round(total, 2),
        "projected": False,
        "fit_loss": [result.metrics["fit_loss_before"], result.metrics["fit_loss_after"]],
    }


def timed_steps(name: str, config: StyleGanConfig, request: WarpRequest, steps: int, device: torch.device
                ) -> dict[str, Any]:
    """One warm-up step and `steps` timed ones; the total for `request.iterations` is projected."""
    G = generator(config, device)
    synchronize(device)
    started = time.perf_counter()
    short = dataclasses.replace(request, iterations=steps + 1)
    plan = plan_warp(G, short)
    fit = WarpFit(G, plan, short)
    fit.fit_error(edited=False)
    synchronize(device)
    setup = time.perf_counter() - started
    stamps: list[float] = []

    def progress(done: int, total: int, figures: dict[str, float]) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    fit.run(progress)
    per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return {
        **describe(name, G, request, plan.layers),
        "iterations": request.iterations,
        "timed_steps": steps,
        "s_per_iteration": round(per_step, 4),
        "setup_s": round(setup, 2),
        "total_s": round(setup + per_step * request.iterations, 1),
        "projected": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="Steps of the edit (the editor's default).")
    parser.add_argument("--steps-256", type=int, default=3, help="Steps timed on the 256x256 generator.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="tiny,sg2-256", help="Comma-separated: tiny, sg2-256.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    request = WarpRequest.from_json({**REQUEST, "iterations": args.iterations})
    runs = []
    only = set(args.only.split(","))
    if "tiny" in only:
        runs.append(full_run("shapes-world-gan-32", GAN_CONFIG, request, device))
        print(json.dumps(runs[-1]), flush=True)
    if "sg2-256" in only:
        runs.append(timed_steps("stylegan2-256", StyleGanConfig.stylegan2_256(), request, args.steps_256, device))
        print(json.dumps(runs[-1]), flush=True)
    record = {
        "benchmark": "editors_gan",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "runs": runs,
    }
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

"""Sampling speed of the three families at real shapes, with random weights built from configs. Prints JSON.

- diffusion: seconds per UNet denoising step at Stable Diffusion 1.x shapes (860M-parameter UNet,
  64x64x4 latents, 77 x 768 text states, batch 1). One step is one UNet forward; classifier-free
  guidance runs it on a batch of 2, so a guided step costs up to twice this.
- lm: tokens per second of greedy generation with a GPT-2-XL-shaped model (1.5B parameters), 16 new
  tokens after an 8-token prompt, prefill included.
- gan: images per second of a StyleGAN2 config-f 256x256 generator, one seed per forward pass as
  `GanFamily.sample` runs it.

    python benchmarks/families.py [--quick] [--device cuda] [--dtype float16] [--only unet,lm,gan]

Each model is built, warmed up once, timed, and freed before the next is built. `free` runs the garbage
collector between parts so two full-size models are never in memory at once. The full-size run
needs about 10 GB of memory in float32.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import GPT2Config, GPT2LMHeadModel

from modelzoo.registry.families.stylegan import StyleGanConfig, build, latents_for_seeds

# Stable Diffusion 1.x UNet (runwayml/stable-diffusion-v1-5, unet/config.json), values that differ from
# diffusers' defaults spelled out.
SD1_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
QUICK_UNET: dict[str, Any] = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
GPT2_XL: dict[str, Any] = dict(n_layer=48, n_embd=1600, n_head=25)
QUICK_GPT2: dict[str, Any] = dict(n_layer=2, n_embd=64, n_head=2)
TEXT_TOKENS = 77
PROMPT_TOKENS = 8
NEW_TOKENS = 16


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_unet(config: dict[str, Any], device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)
    side = config["sample_size"]
    latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, config["cross_attention_dim"], device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    times = timed(lambda: unet(latents, t, encoder_hidden_states=text), device, repeats)
    return {
        "config": config, "params": parameters(unet),
        "latent_shape": list(latents.shape), "text_states_shape": list(text.shape),
        "seconds_per_step": statistics.median(times), "steps_timed": repeats, "times_s": times,
    }


@torch.no_grad()
def bench_lm(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device(device):
        lm = GPT2LMHeadModel(GPT2Config(**config)).to(dtype).eval()
    prompt = torch.randint(0, lm.config.vocab_size, (1, PROMPT_TOKENS), device=device)
    options = dict(do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=lm.config.eos_token_id)

    def generate(new_tokens: int) -> None:
        out = lm.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        assert out.shape[1] == PROMPT_TOKENS + new_tokens

    (seconds,) = timed(lambda: generate(NEW_TOKENS), device, repeats=1)
    return {
        "config": config, "params": parameters(lm),
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "seconds": seconds,
        "tokens_per_s": NEW_TOKENS / seconds,
    }


@torch.no_grad()
def bench_gan(config: StyleGanConfig, device: torch.device, repeats: int) -> dict[str, Any]:
    G = build(config, seed=0).to(device).eval()
    z = latents_for_seeds([0], config.z_dim).to(device)
    times = timed(lambda: G(z), device, repeats)
    return {
        "config": config.to_dict(), "params": parameters(G),
        "resolution": config.resolution, "batch": 1, "images_timed": repeats,
        "seconds_per_image": statistics.median(times), "images_per_s": 1 / statistics.median(times),
    }


@torch.no_grad()
def bench_smollm2(device: torch.device) -> dict[str, Any]:
    """The real LM: import throughput of SmolLM2-135M's Q4_1 GGUF file into a fresh registry, then greedy
    tokens/s of the imported (float32) version loaded through the lm family."""
    import shutil
    import tempfile
    from pathlib import Path

    import modelzoo
    from modelzoo.registry.families.gguf import smollm2_gguf_path

    gguf = smollm2_gguf_path(Path(tempfile.gettempdir()) / "modelzoo-smollm2")
    home = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    try:
        zoo = modelzoo.open(home)
        started = time.perf_counter()
        info = zoo.import_(gguf, "smollm2")
        import_s = time.perf_counter() - started
        model = zoo.load(info.ref, str(device))
        lm, tokenizer = model.pipeline, model.tokenizer
        prompt = tokenizer("The capital of France is", return_tensors="pt").to(device)
        options = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)

        def generate() -> None:
            out = lm.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)
            assert out.shape[1] == prompt["input_ids"].shape[1] + NEW_TOKENS

        (seconds,) = timed(generate, device, repeats=1)
        return {
            "gguf_mb": round(gguf.stat().st_size / 1e6, 1), "float32_mb": round(info.logical_bytes / 1e6, 1),
            "import_s": round(import_s, 2), "import_gguf_mb_s": round(gguf.stat().st_size / 1e6 / import_s, 1),
            "import_float32_mb_s": round(info.logical_bytes / 1e6 / import_s, 1),
            "new_tokens": NEW_TOKENS, "seconds": seconds, "tokens_per_s": NEW_TOKENS / seconds,
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="UNet and LM weights (the GAN always runs in float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", default="unet,lm,gan,smollm2", help="comma-separated subset of unet,lm,gan,smollm2")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    wanted = set(args.only.split(","))
    unknown = wanted - {"unet", "lm", "gan", "smollm2"}
    if unknown:
        parser.error(f"--only: unknown parts {sorted(unknown)}")

    shapes = "quick" if args.quick else "sd1-unet, gpt2-xl, stylegan2-256"
    report: dict[str, Any] = {**device_info(device), "dtype": args.dtype, "shapes": shapes}
    if "unet" in wanted:
        report["unet"] = bench_unet(QUICK_UNET if args.quick else SD1_UNET, device, dtype, repeats=3)
        free(device)
    if "lm" in wanted:
        report["lm"] = bench_lm(QUICK_GPT2 if args.quick else GPT2_XL, device, dtype)
        free(device)
    if "gan" in wanted:
        config = StyleGanConfig.tiny() if args.quick else StyleGanConfig.stylegan2_256()
        report["gan"] = bench_gan(config, device, repeats=5)
    if "smollm2" in wanted and not args.quick:
        report["smollm2"] = bench_smollm2(device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Causal language models: GPT-2, GPT-J, GPT-NeoX, Llama and the other transformers `*ForCausalLM`s.

A version stores transformers' own layout: `config.json` (with `generation_config.json` and the tokenizer
files when the source had them) as files, and the model's state-dict keys as tensor names
(`transformer.h.0.mlp.c_proj.weight`). `load` builds the architecture from the config with empty
parameters and assigns the registry's memory-mapped tensors to it: no weight is copied or written, and
a tied output embedding that the checkpoint leaves out (GPT-2's `lm_head.weight`) is tied back.

Sampling is per seed: `torch.manual_seed(seed)`, then `generate`, one sequence at a time, so a seed gives
the same text whatever batch it is asked in and whichever version of the model samples it. A version
without tokenizer files speaks token ids: prompts and texts are space-separated integers.

This module also holds the loading helpers the diffusion family shares (`empty_parameters`,
`assign_weights`, `written_files`, `without_progress_bars`, `check_seeds`): transformers models sit inside
diffusion pipelines too.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, Sample
from modelzoo.registry.store import Registry

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model"}
CARD = "README.md"
MAX_SEED = 2**63 - 1  # torch.manual_seed's range for signed seeds; negative seeds would wrap
_PATCH_LOCK = threading.RLock()


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules inside this block with every parameter on the meta device: no memory, no random init.

    Buffers stay real because a checkpoint leaves out the non-persistent ones (CLIP's position ids,
    rotary frequencies) that only the constructor computes. This is accelerate's
    `init_empty_weights(include_buffers=False)`: it swaps `nn.Module.register_parameter` for the duration,
    so other threads building modules at the same time would get meta parameters too.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kept = module._parameters[name]
            assert kept is not None
            extra = dict(kept.__dict__)
            extra["requires_grad"] = kept.requires_grad
            module._parameters[name] = type(kept)(kept.to("meta"), **extra)

    with _PATCH_LOCK:
        nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = register  # type: ignore[method-assign]


def checkpoint_renames(model: nn.Module, names: Iterable[str], what: str) -> dict[str, str]:
    """{checkpoint name: module key} for the tensors that transformers renames when it loads a checkpoint.

    transformers 5 keeps some checkpoints' historical names and renames them on load and back on save
    (GPT-NeoX's `embed_out.weight` is the module `lm_head`). Conversions beyond renaming (experts fused
    into one tensor) would break the one-tensor-per-name contract and are refused.
    """
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    if not isinstance(model, PreTrainedModel):
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    keys = model.state_dict()
    renames = {}
    for name in names:
        key, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, keys)
        if converted is not None:
            raise BadInput(f"{what}: transformers converts {name!r} on load ({converted}); only renames are supported")
        if key != name:
            renames[name] = key
    return renames


def speak_checkpoint_names(module: nn.Module, renames: Mapping[str, str]) -> None:
    """Make `module.state_dict()` and `module.load_state_dict()` use checkpoint names for renamed tensors.

    The registry's tensor names are the checkpoint's, and a `LoadedModel`'s modules must report them.
    """
    to_checkpoint = {key: name for name, key in renames.items()}

    def rename(state_dict: dict[str, Any], prefix: str, names: Mapping[str, str]) -> None:
        for old, new in names.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    module.register_state_dict_post_hook(lambda _m, sd, prefix, _meta: rename(sd, prefix, to_checkpoint))
    module.register_load_state_dict_pre_hook(lambda _m, sd, prefix, *_: rename(sd, prefix, renames))


def assign_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Make `tensors` the module's parameters and buffers themselves (no copy), then tie shared weights.

    A transformers model ties what its config says is shared (an output embedding the checkpoint left
    out), exactly as `from_pretrained` does; anything else left empty means the version does not fit
    its architecture. Tensors that transformers renames on load keep their checkpoint names in the
    module's state dict (`speak_checkpoint_names`).
    """
    renames = checkpoint_renames(module, tensors, what)
    if renames:
        speak_checkpoint_names(module, renames)
    result = module.load_state_dict(dict(tensors), strict=False, assign=True)
    if result.unexpected_keys:
        raise BadInput(f"{what} holds tensors its config's architecture has no place for: {result.unexpected_keys[:3]}")
    tie = getattr(module, "tie_weights", None)
    if callable(tie) and result.missing_keys:
        tie(missing_keys=set(result.missing_keys), recompute_mapping=True)
    empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:
        raise BadInput(f"{what} lacks tensors that its architecture needs: {empty[:3]}")


@contextmanager
def written_files(files: Mapping[str, bytes]) -> Iterator[Path]:
    """A temporary folder holding a version's small files (configs, tokenizers), for `from_pretrained`."""
    with tempfile.TemporaryDirectory(prefix="zoo-load-") as tmp:
        root = Path(tmp)
        for name, data in files.items():
            if name == CARD:
                continue
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield root


@contextmanager
def without_progress_bars(*loggings: ModuleType) -> Iterator[None]:
    """Silence the progress bars of libraries whose `utils.logging` module is given, then restore them.

    Library code never prints; transformers and diffusers draw bars while loading unless told not to.
    """
    enabled = [logging.is_progress_bar_enabled() for logging in loggings]
    for logging in loggings:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        for logging, was_enabled in zip(loggings, enabled, strict=True):
            if was_enabled:
                logging.enable_progress_bar()


def check_seeds(seeds: Sequence[int]) -> None:
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise BadInput(f"seeds must be integers in [0, 2**63), got {seed!r}")


def gpt2_xl_config() -> Any:
    """GPT-2 XL's shape (Radford et al. 2019): 48 layers, width 1600, 25 heads, 1,557,611,200 parameters."""
    from transformers import GPT2Config

    return GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)


def gpt2_xl() -> nn.Module:
    """A GPT-2 XL-shaped LM, randomly initialised; build it under `torch.device("meta")` for shapes only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(gpt2_xl_config())


class LanguageModelFamily:
    """The `lm` family adapter: a transformers causal LM and its tokenizer."""

    name: ClassVar[str] = "lm"
    takes_prompts: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = False

    def load(self, registry: Registry, ref: str, device: str = "cpu") -> LoadedModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        info = registry.info(ref)
        files = registry.load_files(info.ref)
        if "config.json" not in files:
            raise BadInput(f"{info.ref} has no config.json, so its architecture is unknown")
        tensors = registry.load_tensors(info.ref)
        with written_files(files) as root:
            config = AutoConfig.from_pretrained(root, local_files_only=True)
            with empty_parameters():
                lm = AutoModelForCausalLM.from_config(config)
            tokenizer = (
                AutoTokenizer.from_pretrained(root, local_files_only=True) if TOKENIZER_FILES & set(files) else None
            )
            if "generation_config.json" in files:
                lm.generation_config = GenerationConfig.from_pretrained(root, local_files_only=True)
        assign_weights(lm, tensors, info.ref)
        lm.eval().to(device)
        return LoadedModel(
            ref=info.ref, family=self.name, pipeline=lm, modules={"": lm}, tokenizer=tokenizer, config=info.config
        )

    def sample(
        self,
        model: LoadedModel,
        seeds: Sequence[int],
        prompt: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int = 50,
    ) -> list[Sample]:
        """One continuation per seed (the prompt itself is not repeated in `text`).

        `temperature=0` decodes greedily, so every seed gives the same text; `top_k=0` samples from the
        whole vocabulary. Other generation settings come from the version's `generation_config.json`, as
        they would for `from_pretrained`. No prompt (or an empty one) starts from the beginning-of-sequence
        token.
        """
        check_seeds(seeds)
        if max_new_tokens < 1 or temperature < 0 or top_k < 0:
            raise BadInput("max_new_tokens must be >= 1, temperature and top_k >= 0")
        lm = model.pipeline
        ids = self.encode(model, prompt).to(lm.device)
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            options.update(temperature=temperature, top_k=top_k)
        pad = lm.generation_config.pad_token_id
        if pad is None:
            pad = lm.generation_config.eos_token_id
        if isinstance(pad, list):  # several end tokens (Llama 3): pad with the first
            pad = pad[0]
        samples = []
        forked = [lm.device] if lm.device.type == "cuda" else []
        for seed in seeds:
            with torch.random.fork_rng(devices=forked), torch.no_grad():
                torch.manual_seed(seed)
                out = lm.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **options)
            samples.append(Sample(seed=seed, prompt=prompt, text=self.decode(model, out[0, ids.shape[1] :])))
        return samples

    def encode(self, model: LoadedModel, prompt: str | None) -> torch.Tensor:
        """The prompt's token ids, shape (1, n); the BOS token alone when there is no prompt."""
        ids: list[int] = []
        if prompt and model.tokenizer is not None:
            ids = list(model.tokenizer(prompt)["input_ids"])
        elif prompt:
            try:
                ids = [int(t) for t in prompt.split()]
            except ValueError:
                raise BadInput(f"{model.ref} has no tokenizer: give the prompt as space-separated token ids") from None
        if not ids:
            bos = model.pipeline.generation_config.bos_token_id
            if bos is None and model.tokenizer is not None:
                bos = model.tokenizer.bos_token_id
            if bos is None:
                raise BadInput(f"{model.ref} has no beginning-of-sequence token: pass a prompt")
            ids = [int(bos)]
        vocab = model.pipeline.get_input_embeddings().num_embeddings
        if not all(0 <= i < vocab for i in ids):
            raise BadInput(f"token ids {ids} fall outside {model.ref}'s vocabulary of {vocab}; pass another prompt")
        return torch.tensor([ids], dtype=torch.long)

    @staticmethod
    def decode(model: LoadedModel, ids: torch.Tensor) -> str:
        if model.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return str(model.tokenizer.decode(ids, skip_special_tokens=True))

    def editable_tensors(self, model: LoadedModel) -> list[str]:
        """Every attention and MLP projection weight inside the numbered transformer blocks.

        These are the linear maps (GPT-2's `Conv1D`s included) of each block: GPT-2's `attn.c_attn`,
        `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`; Llama's `q/k/v/o_proj` and `gate/up/down_proj`; GPT-J's
        `q/k/v/out_proj`, `fc_in`, `fc_out`; GPT-NeoX's `query_key_value`, `dense`, `dense_h_to_4h`,
        `dense_4h_to_h`. Embeddings, norms and the output head are not.
        """
        from transformers.pytorch_utils import Conv1D

        lm = model.modules[""]
        head = lm.get_output_embeddings()
        stored = set(lm.state_dict())
        return [
            f"{name}.weight"
            for name, module in lm.named_modules()
            if isinstance(module, nn.Linear | Conv1D)
            and module is not head
            and any(part.isdigit() for part in name.split("."))
            and f"{name}.weight" in stored
        ]

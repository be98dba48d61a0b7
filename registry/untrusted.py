"""Structure read from a user's files (JSON headers and configs), parsed once with bounded cost and
checked for type, so a malformed value is refused at import with one line instead of failing later in
whatever first uses it.

JSON: nesting depth is bounded, a key that appears twice is refused (readers disagree on which copy
wins), and NaN/Infinity are refused (PostgreSQL's JSON and most readers reject them). Configs: the size
fields that every architecture is built from (`n_layer`, `hidden_size`, ...) must be plain integers in
a sane range wherever they appear, `architectures` a list of names, and `family` a registered family.
"""

from __future__ import annotations

import json
from typing import Any

from modelzoo.registry.errors import BadInput

MAX_JSON_DEPTH = 64
MAX_CONFIG_BYTES = 16 * 2**20
MAX_SIZE_FIELD = 2**24  # larger than any vocabulary, context or width in use, small enough to allocate
# Integer hyper-parameters of transformers, diffusers, open_clip and StyleGAN configs that an
# architecture is allocated from; a list of them (diffusers' per-block values) is checked element-wise.
SIZE_FIELDS = frozenset({
    "n_layer", "n_head", "n_embd", "n_positions", "n_ctx", "n_inner", "vocab_size", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "max_position_embeddings", "head_dim", "num_layers", "d_model", "d_ff", "d_kv", "num_heads", "embed_dim",
    "layers", "width", "heads", "context_length", "image_size", "patch_size", "sample_size", "in_channels",
    "out_channels", "cross_attention_dim", "attention_head_dim", "layers_per_block", "norm_num_groups",
    "latent_channels", "z_dim", "w_dim", "c_dim", "img_resolution", "img_channels", "mapping_layers",
    "channel_base", "channel_max", "num_fp16_res", "rotary_dim", "block_out_channels",
})


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key[:80]!r} appears twice")
        result[key] = value
    return result


def parse_json(raw: bytes | str, what: str) -> Any:
    """Parse JSON from an untrusted source; BadInput naming `what` and the problem."""
    try:
        value = json.loads(raw, object_pairs_hook=_unique_object, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadInput(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise BadInput(f"{what}: malformed JSON ({str(e)[:200]})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise BadInput(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    value = parse_json(raw, what)
    if not isinstance(value, dict):
        raise BadInput(f"{what}: expected a JSON object, found {type(value).__name__}")
    return value


def check_config(config: dict[str, Any], what: str) -> dict[str, Any]:
    """Type-check the fields of a model config that code allocates from or dispatches on."""
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise BadInput(f"{what}: `architectures` must be a list of class names, not {architectures!r:.80}")
    for key in ("family", "model_type", "_class_name"):
        if key in config and not isinstance(config[key], str | None):
            raise BadInput(f"{what}: `{key}` must be a string, not {config[key]!r:.80}")
    _check_sizes(config, what)
    return config


def _check_sizes(value: Any, what: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                if key in SIZE_FIELDS:
                    _check_size(key, child, what)
                stack.append(child)


def _check_size(key: str, value: Any, what: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None and not isinstance(value, list):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SIZE_FIELD:
            raise BadInput(f"{what}: `{key}` must be an integer from 0 to {MAX_SIZE_FIELD}, not {value!r:.80}")

"""Which CLIP encoder turns samples and queries into features: one spec string names it.

    zoo:REF                       a registered `clip` version (e.g. the shapes world's `shapes-clip`)
    open_clip:ARCH:TAG            an open_clip architecture with a pretrained tag (open_clip's own cache
                                  or download), e.g. open_clip:ViT-B-32:laion2b_s34b_b79k
    open_clip:ARCH:/path/ckpt.pt  the same architecture with weights from a local checkpoint
    DIR                           a folder written by `save_clip`

All of them become a `ClipEncoder` (registry/families/clip.py): batched unit-length features, the
logit scale tau, and a `weights_hash` that every stored embedding carries, so moments from different
encoders are never compared.
"""

from __future__ import annotations

from pathlib import Path

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import get_family
from modelzoo.registry.families.clip import ClipConfig, ClipEncoder, clip_weights_hash, load_clip, tensor_sha
from modelzoo.registry.store import Registry

OPEN_CLIP_PREFIX = "open_clip:"
DEFAULT_ENCODER = "open_clip:ViT-B-32:laion2b_s34b_b79k"
"""What `zoo index` uses on a registry not yet indexed: the encoder Modelverse used, with open weights."""
ZOO_PREFIX = "zoo:"


def load_embedder(spec: str, registry: Registry, device: str = "cpu") -> ClipEncoder:
    spec = spec.strip()
    if not spec:
        raise BadInput("empty encoder spec; use zoo:REF, open_clip:ARCH:TAG or a CLIP folder")
    if spec.startswith(OPEN_CLIP_PREFIX):
        return _open_clip(spec, device)
    if spec.startswith(ZOO_PREFIX):
        info = registry.info(spec.removeprefix(ZOO_PREFIX))
        if info.family != "clip":
            raise BadInput(f"encoder {info.ref} is a {info.family} model, not a clip model")
        encoder: ClipEncoder = get_family("clip").load(registry, info.ref, device).pipeline
        encoder.id = f"{ZOO_PREFIX}{info.ref}"  # the spec that loads exactly this version again
        return encoder
    if Path(spec).is_dir():
        return load_clip(spec, device)
    raise BadInput(f"unknown encoder {spec!r}; use zoo:REF, open_clip:ARCH:TAG, open_clip:ARCH:/path or a CLIP folder")


def _open_clip(spec: str, device: str) -> ClipEncoder:
    import open_clip  # noqa: PLC0415 (heavy; only users of hub encoders pay for it)
    from open_clip.model import CLIP  # noqa: PLC0415

    arch, _, weights = spec.removeprefix(OPEN_CLIP_PREFIX).partition(":")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise BadInput(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    if not weights:
        raise BadInput(f"{spec}: name the weights, open_clip:{arch}:TAG or open_clip:{arch}:/path/to/checkpoint")
    try:
        model = open_clip.create_model(arch, pretrained=weights, device=device)
    except Exception as e:  # download failures, missing files, bad checkpoints: all one message
        raise BadInput(f"cannot load {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(model, CLIP):
        raise BadInput(f"{spec}: only open_clip CLIP models (with a text projection) are supported")
    model.eval()
    pre = model.visual.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    config = ClipConfig(model_cfg, size, tuple(pre["mean"]), tuple(pre["std"]))
    digests = {name: tensor_sha(t.detach().cpu()) for name, t in model.state_dict().items()}
    return ClipEncoder(model, config, spec, clip_weights_hash(config, digests))

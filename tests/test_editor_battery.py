"""The contract every editor keeps, run for every entry point in `modelzoo.editors` on a tiny model of each
family it edits: bad input changes nothing, only changed tensors come back, an edit is a function of its
request (the provenance alone reproduces it bit for bit), no hooks stay behind, an interrupted edit
registers nothing, and the edit runs in float32, float64 and bfloat16 on every device torch reports.

An editor without a case here fails `test_every_editor_has_a_case`: a new built-in editor brings its case.
Tolerance of the other dtypes against float32, on the edited model's outputs for fixed inputs: they lie
within `F64_TOLERANCE` (float64) or `BF16_TOLERANCE` (bfloat16) times the float32 edit's effect on those
outputs of the float32 edit's, plus twice what the dtype alone changes in the unedited model's outputs
(MEMIT's float64 tolerance is wider, see `MEMIT`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from test_editor_memit import FACTS, SMALL, _save_tiny_lm
from test_editor_warp import STRETCH

import modelzoo
from modelzoo.editors.base import editor_names, get_editor
from modelzoo.editors.requests import parse_request, request_json, validated
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, get_family

F64_TOLERANCE = 1e-3
BF16_TOLERANCE = 0.15
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


@dataclass(frozen=True)
class Case:
    family: str
    request: dict[str, Any]
    bad: dict[str, Any]
    """A request the editor must refuse before it loads the model."""
    f64_tolerance: float = F64_TOLERANCE


# Statistics of more tokens than the key dimension (128), so that C is not singular; z in the model's own
# precision (the default bfloat16 autocast, for speed, would make float32 and float64 differ by the autocast);
# no context templates, which are text the model samples, where near-ties of a random model's logits fall
# differently in other dtypes. The float64 tolerance is wider, measured at 0.35 of the edit's effect: z is
# fitted with Adam, whose first steps move every coordinate by about lr whatever the size of its gradient,
# so where a gradient is near zero float rounding picks the sign (the rank-1 change keeps its key direction
# to 1e-12 and its norm to 1e-8).
MEMIT = Case("lm", {"requests": FACTS[:1], "stats_samples": 1024,
                    "hparams": {**SMALL, "z_precision": "float32", "template_count": 0}}, {"requests": []},
             f64_tolerance=0.5)
CASES = {
    "uce": Case("diffusion", {"erase": ["cat"], "preserve": ["dog"]}, {"erase": []}),
    # lr 1e-3: at the paper's 1e-5 two steps change the weights by less than bfloat16 can represent
    "esd": Case("diffusion", {"erase": ["cat"], "iterations": 2, "ddim_steps": 3, "lr": 1e-3, "seed": 1},
                {"erase": ["cat"], "iterations": 0}),
    "memit": MEMIT,
    "alphaedit": MEMIT,
    "warp": Case("gan", {**STRETCH, "iterations": 3, "rank": 2, "batch_size": 2}, {**STRETCH, "rank": 0}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, sd_dir: Path, tiny_gan_dir: Path) -> dict[str, Path]:
    return {"diffusion": sd_dir, "gan": tiny_gan_dir, "lm": _save_tiny_lm(tmp_path_factory.mktemp("lm") / "lm")}


def _parent(zoo: modelzoo.Zoo, sources: dict[str, Path], family: str) -> str:
    return zoo.import_(sources[family], name=family).ref


def _request(name: str, data: dict[str, Any]) -> Any:
    return parse_request(get_editor(name).request_type, data, f"{name} request")


def test_every_editor_has_a_case() -> None:
    assert set(editor_names()) <= set(CASES), sorted(set(editor_names()) - set(CASES))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_request_is_refused_and_changes_nothing(name: str, zoo: modelzoo.Zoo, home: Path,
                                                      sources: dict[str, Path]) -> None:
    ref = _parent(zoo, sources, CASES[name].family)
    before = snapshot(home)
    with pytest.raises(BadInput):
        zoo.edit(ref, name, _request(name, CASES[name].bad))
    assert snapshot(home) == before


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_provenance_alone_reproduces_the_child_bit_for_bit(name: str, zoo: modelzoo.Zoo,
                                                                sources: dict[str, Path]) -> None:
    ref = _parent(zoo, sources, CASES[name].family)
    first = zoo.edit(ref, name, _request(name, CASES[name].request), name="first")
    recorded = first.params["request"]
    again = zoo.edit(ref, name, _request(name, recorded), name="again")
    assert zoo.diff(ref, first.ref).changed, "the edit changed nothing"
    assert not zoo.diff(first.ref, again.ref).changed
    assert request_json(_request(name, recorded)) == recorded


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_edit_interrupted_at_its_end_registers_nothing(name: str, zoo: modelzoo.Zoo, home: Path,
                                                          sources: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the editor returns and before the child is committed: the last moment it can come."""
    editor_type = type(get_editor(name))
    finished = editor_type.edit

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        finished(self, *args, **kwargs)
        raise KeyboardInterrupt

    ref = _parent(zoo, sources, CASES[name].family)
    before = _registered(home)
    monkeypatch.setattr(editor_type, "edit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.edit(ref, name, _request(name, CASES[name].request))
    assert _registered(home) == before
    assert zoo.verify().ok


def _registered(home: Path) -> list[str]:
    """The registry's rows but the caches that depend on the parent alone (MEMIT's statistics C, kept so that
    a rerun does not compute them again) and the blobs that hold them."""
    rows, _ = snapshot(home)
    return [r for r in rows if not r.startswith(('INSERT INTO "derived_tensors"', 'INSERT INTO "blobs"'))]


def _edited(zoo: modelzoo.Zoo, ref: str, name: str, device: str, dtype: torch.dtype,
            ) -> tuple[LoadedModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The editor run directly on the parent loaded at (device, dtype): the model, the parent's tensors
    and what the editor returned."""
    from modelzoo.editors.base import EditContext
    from modelzoo.registry.derived import DerivedTensors

    editor = get_editor(name)
    request = validated(_request(name, CASES[name].request))
    with_context = getattr(editor, "with_context", None)
    if with_context is not None:
        request = with_context(request, EditContext(zoo.get(ref), DerivedTensors(zoo.registry)))
    model = zoo.load(ref).to(device, dtype)
    parent = {n: t.detach().clone() for n, t in model.named_tensors().items()}
    return model, parent, editor.edit(model, request).changed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_only_changed_tensors_come_back_in_the_models_dtype_and_no_hook_stays(
    name: str, device: str, zoo: modelzoo.Zoo, sources: dict[str, Path]
) -> None:
    ref = _parent(zoo, sources, CASES[name].family)
    model, parent, changed = _edited(zoo, ref, name, device, torch.float32)
    assert changed
    for tensor_name, value in changed.items():
        assert value.dtype == parent[tensor_name].dtype and value.device.type == device, tensor_name
        assert not torch.equal(value, parent[tensor_name]), f"{tensor_name} came back unchanged"
    for module in model.modules.values():
        for sub in module.modules():
            hooks = (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks, sub._backward_pre_hooks)
            assert not any(hooks), f"{type(sub).__name__} keeps a hook"


def _outputs(model: LoadedModel) -> torch.Tensor:
    """What the model computes on fixed inputs, in float64: an LM's logits on a prompt, a UNet's prediction
    for fixed latents and text, a generator's images for fixed seeds."""
    with torch.no_grad():
        if model.family == "lm":
            ids = model.tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(model.device)
            out = model.pipeline(input_ids=ids).logits
        elif model.family == "diffusion":
            from modelzoo.editors.diffusion_text import text_side

            unet = model.modules["unet"]
            text = text_side(model).encode(["a cat"]).to(model.device, model.dtype)
            latents = torch.randn((1, unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(0))
            out = unet(latents.to(model.device, model.dtype), 500, encoder_hidden_states=text).sample
        else:
            from modelzoo.registry.families.stylegan import latents_for_seeds

            out = model.pipeline(latents_for_seeds(range(4), model.pipeline.z_dim).to(model.device))
    return out.double().cpu()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_edit_in_another_dtype_does_what_the_float32_edit_does(
    name: str, dtype: str, zoo: modelzoo.Zoo, sources: dict[str, Path]
) -> None:
    """Compared on what the edited model computes, not on its weights: where the edit's solve is
    ill-conditioned (MEMIT's C on a random tiny model), the weights differ along directions no input takes."""
    ref = _parent(zoo, sources, CASES[name].family)
    model32, _, changed32 = _edited(zoo, ref, name, "cpu", torch.float32)
    model, _, changed = _edited(zoo, ref, name, "cpu", DTYPES[dtype])
    assert set(changed) == set(changed32)
    assert all(value.dtype == DTYPES[dtype] for value in changed.values())
    parent32, parent = _outputs(zoo.load(ref)), _outputs(zoo.load(ref).to("cpu", DTYPES[dtype]))
    edited32, edited = _outputs(model32), _outputs(model)
    effect = float((edited32 - parent32).norm())
    noise = float((parent - parent32).norm())  # what the dtype alone changes in the unedited model
    tolerance = CASES[name].f64_tolerance if dtype == "float64" else BF16_TOLERANCE
    distance = float((edited - edited32).norm())
    assert distance <= tolerance * effect + 2 * noise, (distance, effect, noise)


def test_every_tensor_the_editors_search_and_families_create_says_where_it_lives() -> None:
    """torch.eye/randn/zeros/empty without `device=` put a tensor on the CPU beside a model that may be on a
    GPU. Allowed: a comment on the line or the line above saying why (a seeded CPU draw, a CPU-side solve),
    and the initial values of a module's parameters and buffers, which move with the module."""
    root = Path(__file__).parent.parent
    creation = re.compile(r"torch\.(eye|randn|zeros|empty)\(")
    unexplained = []
    for folder in ("editors", "search", "registry/families"):
        for path in sorted((root / folder).rglob("*.py")):
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                if not creation.search(line) or "device=" in line or "nn.Parameter(" in line:
                    continue
                if "register_buffer(" in line or "#" in line or (i and lines[i - 1].strip().startswith("#")):
                    continue
                unexplained.append(f"{path.relative_to(root)}:{i + 1}: {line.strip()}")
    assert not unexplained, "\n".join(unexplained)


PINNED = {  # editor: (first changed tensor, number changed, norms of its change's first 4 slices, the change's norm)
    "alphaedit": ("transformer.h.0.mlp.c_proj.weight", 2, [0.000275905, 0.000171868, 0.000313769, 0.000161895],
                  0.0027912),
    "esd": ("unet/down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", 20,
            [0.00776487, 0.00775487, 0.00755413, 0.00750326], 0.019956),
    "memit": ("transformer.h.0.mlp.c_proj.weight", 2, [0.000184853, 0.000871135, 0.000494509, 0.00136856], 0.0099088),
    "uce": ("unet/down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", 8,
            [0.526854, 0.579103, 0.271246, 0.273271], 1.1878570),
    "warp": ("synthesis.b4.conv1.weight", 1, [0.0843453, 0.067248, 0.0628271, 0.065363], 0.59594013),
}
"""Each case's change on its tiny model, float32 on the CPU (seeds fixed by the fixtures), so that a silent
change in an editor's math fails here. Measured on 1 and 2 threads, which agree to 1e-5 relative.

A slice is the change along the tensor's first axis (a row). For MEMIT's rank-one change k r^T of GPT-2's
(input, output) projection a row's norm is |k_i| |r|: it pins the key and the residual's size, not the
residual's direction, which on this random model float rounding decides (z's gradient is near zero in
most coordinates and Adam's first steps move each by about lr whatever its size, so where the head is
read in one call instead of one per sequence, or on another thread count, those coordinates flip)."""


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_editors_change_on_its_tiny_model_is_pinned(name: str, zoo: modelzoo.Zoo,
                                                        sources: dict[str, Path]) -> None:
    ref = _parent(zoo, sources, CASES[name].family)
    _, parent, changed = _edited(zoo, ref, name, "cpu", torch.float32)
    first, count, values, norm = PINNED[name]
    assert (sorted(changed)[0], len(changed)) == (first, count)
    delta = changed[first].double() - parent[first].double()
    assert delta.flatten(1).norm(dim=1)[:4].tolist() == pytest.approx(values, rel=1e-3, abs=1e-8)
    assert float(delta.norm()) == pytest.approx(norm, rel=1e-4)


# ---- the same battery over the family adapters and the CLI's placement flags ----------------------------

PROMPTS = {"diffusion": "a cat", "lm": "The capital of France is", "gan": None}
SAMPLE_OPTIONS: dict[str, dict[str, Any]] = {"diffusion": {"steps": 2}, "lm": {}, "gan": {}}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("family", sorted(PROMPTS))
def test_every_family_loads_and_samples_in_every_dtype(family: str, dtype: str, zoo: modelzoo.Zoo,
                                                        sources: dict[str, Path]) -> None:
    ref = _parent(zoo, sources, family)
    model = zoo.load(ref, "cpu", dtype)
    assert model.dtype == DTYPES[dtype]
    assert set(get_family(family).editable_tensors(model)) <= set(model.named_tensors())
    first, again = (zoo.sample(ref, [0, 1], PROMPTS[family], dtype=dtype, **SAMPLE_OPTIONS[family]) for _ in range(2))
    assert len(first) == 2
    for a, b in zip(first, again, strict=True):
        assert a.text == b.text and (a.image is None) == (b.image is None)
        assert a.image is None or np.array_equal(a.image, b.image)


def test_an_edit_in_bfloat16_stores_its_child_in_the_parents_dtype(capsys: pytest.CaptureFixture[str], home: Path,
                                                                    sd_dir: Path) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    result = zoo_cli(capsys, home, "edit", "uce", "sd", "--erase", "cat", "--dtype", "bfloat16", "--json")
    assert result.code == 0, result.err
    zoo = modelzoo.open(home)
    changed = zoo.diff("sd@1", "sd@2").changed
    assert changed and all(zoo.tensors("sd@2", [c.tensor])[c.tensor].dtype == torch.float32 for c in changed)


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float8"], "unknown dtype"),
    (["--device", "tpu:0"], "device"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]),
])
def test_a_placement_that_cannot_be_had_exits_2_and_registers_nothing(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path, flags: list[str], message: str
) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    before = snapshot(home)
    result = zoo_cli(capsys, home, "edit", "uce", "sd", "--erase", "cat", *flags)
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert snapshot(home) == before
    assert zoo_cli(capsys, home, "sample", "sd", "--prompt", "a cat", "--n", "1", *flags).code == 2


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_the_indexer_samples_in_another_dtype_to_the_float32_moments(dtype: str, tmp_path: Path,
                                                                      tiny_gan_dir: Path) -> None:
    """The version is sampled in `dtype`; its CLIP features' mean stays that of float32 sampling."""
    from sqlalchemy import select

    from modelzoo.demo.train_clip import CLIP_CONFIG
    from modelzoo.registry.families.clip import build_clip, save_clip
    from modelzoo.registry.schema import Embedding
    from modelzoo.search.indexer import decode_moments

    torch.manual_seed(0)
    clip_dir = save_clip(build_clip(CLIP_CONFIG.model_cfg), CLIP_CONFIG, tmp_path / "clip")
    means = {}
    for run in ("float32", dtype):
        zoo = modelzoo.open(tmp_path / run)
        zoo.import_(clip_dir, name="clip")
        zoo.import_(tiny_gan_dir, name="gan")
        (done,) = zoo.index(["gan"], encoder="zoo:clip", samples=8, rank=2, dtype=run)
        with zoo.registry.db.read() as session:
            means[run] = decode_moments(session.scalars(select(Embedding)).one()).mean
    distance = np.linalg.norm(means[dtype] - means["float32"]) / np.linalg.norm(means["float32"])
    assert distance < (1e-4 if dtype == "float64" else 0.05), distance

"""Composing edits of one parent: W = W_parent + sum_k s_k (W_k - W_parent), with every edit as a parent.

Fast tests compose short warp edits of an untrained generator; the slow test composes a stretch and a
shift of a trained red-circle GAN and measures both effects on unseen samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from test_editor_warp import UNSEEN, meter_readings, trained_red_circles

import modelzoo
from modelzoo.demo.train_gan import sample_images
from modelzoo.editors.compose import compose
from modelzoo.editors.warp import WarpRequest
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.gan import load_gan
from modelzoo.registry.records import VersionInfo

SEEDS = [{"seed": s} for s in range(5)]
STRETCH = {"samples": SEEDS, "transform": {"scale_x": 1.3}}
SHIFT = {"samples": SEEDS, "transform": {"shift_x": 0.15}}


@pytest.fixture
def parent(zoo: modelzoo.Zoo, tiny_gan_dir: Path) -> VersionInfo:
    return zoo.import_(tiny_gan_dir, name="circles")


def warp(zoo: modelzoo.Zoo, ref: str, request: dict[str, object], layer: str, name: str) -> VersionInfo:
    return zoo.edit(ref, "warp", WarpRequest.from_json({**request, "iterations": 5, "layer": layer, "rank": 4}),
                    name=name)


@pytest.fixture
def edits(zoo: modelzoo.Zoo, parent: VersionInfo) -> tuple[VersionInfo, VersionInfo]:
    """Two edits of `parent`: a stretch of the 8x8 conv and a shift of the 4x4 conv."""
    return warp(zoo, parent.ref, STRETCH, "b8.conv0", "wide"), warp(zoo, parent.ref, SHIFT, "b4.conv1", "moved")


def test_composition_adds_each_edits_delta_scaled_and_leaves_everything_else_alone(zoo, parent, edits):
    a, b = edits
    both = compose(zoo.registry, [a.ref, b.ref], name="both", scales=[1.0, 0.5])
    base, ta, tb, tc = (zoo.tensors(v.ref) for v in (parent, a, b, both))
    for name, W in base.items():
        expected = W + (ta[name] - W) + 0.5 * (tb[name] - W)
        assert torch.allclose(tc[name], expected, atol=1e-6), name
    changed = sorted(c.tensor for c in zoo.diff(parent.ref, both.ref).changed)
    assert changed == ["synthesis.b4.conv1.weight", "synthesis.b8.conv0.weight"]
    assert both.ref == "both@1" and both.method == "compose"
    assert both.params == {"refs": [a.ref, b.ref], "scales": [1.0, 0.5], "parent": parent.ref}


def test_edits_of_the_same_layer_sum_their_deltas(zoo, parent):
    a = warp(zoo, parent.ref, STRETCH, "b8.conv0", "wide")
    b = warp(zoo, parent.ref, SHIFT, "b8.conv0", "moved")
    both = compose(zoo.registry, [a.ref, b.ref], name="both")
    name = "synthesis.b8.conv0.weight"
    W, Wa, Wb, Wc = (zoo.tensors(v.ref, [name])[name] for v in (parent, a, b, both))
    assert torch.allclose(Wc, Wa + Wb - W, atol=1e-6)
    assert both.metrics["changed_by"] == {name: [a.ref, b.ref]}


def test_the_composition_has_both_edits_as_parents_in_its_lineage(zoo, parent, edits):
    a, b = edits
    both = compose(zoo.registry, [a.ref, b.ref], name="both")
    assert [(p.ref, p.relation) for p in both.parents] == [(a.ref, "compose"), (b.ref, "compose")]
    ancestors = {(n.ref, n.depth) for n in zoo.lineage(both.ref).ancestors}
    assert {(a.ref, 1), (b.ref, 1), (parent.ref, 2)} <= ancestors
    for edit in edits:
        assert both.ref in [n.ref for n in zoo.lineage(edit.ref).descendants]


def test_compose_without_a_name_adds_a_version_to_the_first_edits_model(zoo, edits):
    a, b = edits
    assert compose(zoo.registry, [a.ref, b.ref]).ref == "wide@2"


def test_what_cannot_be_composed_is_refused_and_nothing_is_registered(zoo, parent, edits):
    a, b = edits
    grandchild = warp(zoo, a.ref, SHIFT, "b4.conv1", "later")
    cases = [
        ([a.ref], None, "at least two"),
        ([a.ref, "wide@1"], None, "same version twice"),
        ([a.ref, grandchild.ref], None, "one shared parent"),
        ([parent.ref, a.ref], None, "has no parent"),
        ([a.ref, b.ref], [1.0], "one scale per composed version"),
        ([a.ref, b.ref], [1.0, 1.5], "in [0, 1]"),
        ([a.ref, b.ref], [0.0, 0.0], "every scale is 0"),
        ([a.ref, b.ref], [1.0, float("nan")], "in [0, 1]"),
    ]
    count = len(zoo.registry.versions("wide")) + len(zoo.registry.versions("moved"))
    for refs, scales, message in cases:
        with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("]", r"\]")):
            compose(zoo.registry, refs, name="both", scales=scales)
    assert len(zoo.registry.versions("wide")) + len(zoo.registry.versions("moved")) == count
    with pytest.raises(Exception, match="both"):
        zoo.get("both")


def test_zoo_compose_prints_json_and_refuses_bad_input_with_exit_2(capsys, home, tiny_gan_dir):
    zoo = modelzoo.open(home)
    parent = zoo.import_(tiny_gan_dir, name="circles")
    a, b = warp(zoo, parent.ref, STRETCH, "b8.conv0", "wide"), warp(zoo, parent.ref, SHIFT, "b4.conv1", "moved")
    before = snapshot(home)
    for args, message in [
        ([a.ref, "--name", "both"], "at least two"),
        ([a.ref, b.ref, "--name", "both", "--scale", "2", "--scale", "1"], "in [0, 1]"),
        ([a.ref, parent.ref, "--name", "both"], "has no parent"),
    ]:
        r = zoo_cli(capsys, home, "compose", *args)
        assert r.code == 2 and message in r.err, r.err
    assert snapshot(home) == before
    r = zoo_cli(capsys, home, "compose", a.ref, b.ref, "--name", "both", "--scale", "1", "--scale", "0.5", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["ref"] == "both@1" and out["params"]["scales"] == [1.0, 0.5]
    assert [p["ref"] for p in out["parents"]] == [a.ref, b.ref]
    r = zoo_cli(capsys, home, "lineage", "both", "--json")
    assert {n["ref"] for n in json.loads(r.out)["ancestors"]} >= {a.ref, b.ref, parent.ref}


# --- both effects on unseen samples (slow) --------------------------------------------------------------


def centre_x(images: np.ndarray) -> np.ndarray:
    """Horizontal centre of each image's foreground (pixels far from the border's median colour), as a
    fraction of the width."""
    x = images.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    contrast = np.linalg.norm(x - np.median(border, axis=1)[:, None, None], axis=-1)
    mask = contrast > 0.5 * np.percentile(contrast.reshape(len(x), -1), 99, axis=1)[:, None, None]
    xs = (np.arange(x.shape[2]) + 0.5) / x.shape[2]
    return (mask * xs).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)


@pytest.mark.slow
def test_a_composed_stretch_and_shift_show_both_effects_on_unseen_samples(zoo, tmp_path_factory):
    folder = trained_red_circles(tmp_path_factory.getbasetemp())
    parent = zoo.import_(folder, name="red-circles")
    wide = zoo.edit(parent.ref, "warp", WarpRequest.from_json(STRETCH), name="wide")
    moved = zoo.edit(parent.ref, "warp", WarpRequest.from_json(SHIFT), name="moved")
    both = compose(zoo.registry, [wide.ref, moved.ref], name="both")

    results = {}
    for label, G in [("parent", load_gan(folder))] + [(v.model, zoo.load(v.ref).pipeline) for v in (wide, moved, both)]:
        aspect, red = meter_readings(G, UNSEEN)
        results[label] = (aspect, red, float(centre_x(sample_images(G, UNSEEN)).mean()))
    read = np.all([np.isfinite(r[0]) for r in results.values()], axis=0)
    stretch = {k: (r[0][read].mean() / results["parent"][0][read].mean() - 1) / 0.3 for k, r in results.items()}
    shift = {k: (r[2] - results["parent"][2]) / 0.15 for k, r in results.items()}
    print("\n" + "\n".join(
        f"{k}: stretch carried {stretch[k]:.0%}, shift carried {shift[k]:.0%}, colour agreement {r[1]:.2f}"
        for k, r in results.items()))
    # Measured (seed 0, current GAN trainer): wide 84% / 6%, moved 24% / 88%, both 81% / 104% (stretch /
    # shift carried). A shift fitted on five samples widens the shapes a little too, hence the 0.3 bound.
    assert stretch["wide"] >= 0.6 and stretch["both"] >= 0.6 and abs(stretch["moved"]) < 0.3
    assert shift["moved"] >= 0.5 and shift["both"] >= 0.5 and abs(shift["wide"]) < 0.2
    assert all(r[1] >= 0.9 * results["parent"][1] for r in results.values())

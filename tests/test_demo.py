"""`zoo demo --quick` builds the shapes world offline, reports measured quality, and is cached."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cli_helpers import snapshot, zoo_cli
from test_editor_uce import shapes_pipeline_dir  # noqa: F401  (the quick shapes-world diffusion model, once)

import modelzoo
from modelzoo.demo.catalog import world_models


@pytest.mark.slow
def test_quick_demo_builds_every_model_with_its_measured_quality(quick_demo):
    result, world_home = quick_demo, quick_demo.home
    zoo = modelzoo.open(world_home)
    for model in world_models("quick"):
        info = zoo.get(model.name)
        assert info.method == "train" and info.params["profile"] == "quick"
        for metric, bar in model.thresholds.items():
            assert info.metrics[metric] >= bar, (model.name, metric, info.metrics[metric])
    grids = sorted(p.name for p in (world_home / "demo").glob("*.png"))
    assert "shapes-sd-v1.png" in grids and "shapes-gan-red-circle-v1.png" in grids
    assert "measured quality" in result.out and "search on the shapes world" in result.out
    assert "--reader meter" in result.out
    assert result.err == ""  # no third-party warnings or progress bars without -v


@pytest.mark.slow
def test_quick_world_search_ranks_each_slice_gan_first(quick_world):
    """Text and image queries drawn as the world draws them find their slice's GAN."""
    from modelzoo.demo.catalog import QUICK_GAN_SLICES
    from modelzoo.demo.search_eval import retrieval

    zoo = modelzoo.open(quick_world)
    among_gans = retrieval(zoo, QUICK_GAN_SLICES, family="gan")
    assert among_gans["text"]["top1"] >= 0.9 and among_gans["image"]["top1"] >= 0.9, among_gans
    among_all = retrieval(zoo, QUICK_GAN_SLICES)
    # The diffusion model, trained on every slice, may come first; the slice's GAN is still in the top 5.
    assert among_all["image"]["top5"] == 1.0 and among_all["text"]["top5"] == 1.0, among_all


@pytest.mark.slow
def test_second_demo_reuses_the_cached_world(quick_world, capsys):
    before = {m.name: m.latest for m in modelzoo.open(quick_world).list()}
    result = zoo_cli(capsys, quick_world, "demo", "--quick")
    assert result.code == 0, result.err
    assert "cached" in result.out
    assert {m.name: m.latest for m in modelzoo.open(quick_world).list()} == before


def test_demo_refuses_a_damaged_registry_and_changes_nothing(home, gpt2_dir, capsys):
    modelzoo.open(home).import_(gpt2_dir, "gpt2")
    victim = max((p for p in (home / "blobs").rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x10
    victim.write_bytes(bytes(data))
    before = snapshot(home)
    result = zoo_cli(capsys, home, "demo", "--quick")
    assert result.code == 2 and "damaged" in result.err
    assert snapshot(home) == before


def test_demo_refuses_a_registry_of_another_schema(tmp_path, capsys):
    home = tmp_path / "future"
    modelzoo.open(home)
    with sqlite3.connect(home / "registry.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'from_the_future'")
    before = snapshot(home)
    result = zoo_cli(capsys, home, "demo", "--quick")
    assert result.code == 2 and "newer than this modelzoo" in result.err
    assert snapshot(home) == before


def test_demo_balances_the_colour_of_a_circle_read_by_the_meter(
    zoo: modelzoo.Zoo, home: Path, shapes_pipeline_dir: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    """The library's debias reader is CLIP; the demo, whose images the analytic meter reads exactly, passes
    the meter, through the API and through `zoo edit uce --reader meter`."""
    from modelzoo.cli.demo import show_debias

    sd = zoo.import_(shapes_pipeline_dir, "shapes-sd")
    show_debias(zoo, sd.ref, quick=True)
    child = zoo.get("shapes-sd-balanced")
    assert child.params["reader"] == "meter" and "--reader meter" in capsys.readouterr().out
    assert child.metrics["ratio_history"][0] == [[1.0, 0.0]]  # the model draws "a circle" red
    assert abs(child.metrics["observed_ratios"][0][0] - 0.5) <= 0.1, child.metrics

    result = zoo_cli(capsys, home, "edit", "uce", sd.ref, "--debias", "a circle", "--attribute", "red",
                     "--attribute", "yellow", "--template", "a {} circle", "--reader", "meter",
                     "--max-iterations", "1", "--samples", "4", "--name", "cli-balanced", "--json")
    assert result.code == 0, result.err
    assert zoo.get("cli-balanced").params["reader"] == "meter"

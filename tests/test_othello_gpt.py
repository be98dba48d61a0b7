"""Othello-GPT, its probes and interventions: the quick model registered by `zoo demo othello --quick`,
a tokenizer that AutoTokenizer loads, probes that read a board planted in features, interventions that
make the probe read the edited board, and bad input refused with one line and nothing stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from PIL import Image
from transformers import AutoTokenizer

import modelzoo
from modelzoo.analyses.othello_board import board_labels, next_player
from modelzoo.analyses.othello_intervene import edit_to_board, random_cases, top_n_misses
from modelzoo.analyses.probe import accuracy, fit_probe
from modelzoo.cli.main import run
from modelzoo.demo.othello import BLACK, MOVE_SQUARES, SQUARES, START, WHITE, play, random_games
from modelzoo.demo.othello_gpt import OthelloProfile, train_othello_gpt

OPENING = "f5 d6 c3 d3 c4"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`zoo demo othello --quick` (othello-gpt@1), and a second, smaller model of another shape."""
    home = tmp_path_factory.mktemp("othello") / "zoo"
    with pytest.raises(SystemExit) as done:
        run(["--home", str(home), "demo", "othello", "--quick"])
    assert done.value.code in (0, None)
    other = home.parent / "other"
    train_othello_gpt(other, seed=1, profile=OthelloProfile(steps=2, batch_size=4, n_embd=32, n_layer=3, n_head=2,
                                                              eval_games=4, curve_points=1, curve_games=4))
    modelzoo.open(home).import_(other, name="other-gpt")
    return home, modelzoo.open(home).get("othello-gpt").metrics


def test_quick_demo_registers_the_model_with_its_training_and_curve(quick):
    home, metrics = quick
    info = modelzoo.open(home).get("othello-gpt")
    assert info.ref == "othello-gpt@1" and info.method == "train" and info.family == "lm"
    assert info.params["profile"] == "quick" and info.params["seed"] == 0
    # measured 0.27 for seed 0 after 1,920 games; a randomly initialised model: 0.002 (a uniform pick among
    # the empty squares would reach 0.41, the full build 0.95)
    assert metrics["legal_top1"] >= 0.2 and metrics["curve"][1][1] > metrics["curve"][0][1]
    assert [g for g, _ in metrics["curve"]] == [960, 1920] and metrics["games_seen"] == 1920
    assert metrics["loss"] > metrics["loss_floor"] > 1.0


def test_export_carries_a_tokenizer_of_moves_separated_by_spaces(quick, tmp_path):
    home, _ = quick
    modelzoo.open(home).export("othello-gpt", tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = tokenizer(OPENING)["input_ids"]
    assert len(ids) == 5 and 0 not in ids and len(set(ids)) == 5 and len(tokenizer) == 61
    assert tokenizer.decode(ids) == OPENING and tokenizer.pad_token_id == 0


def test_board_labels_turn_with_the_player_to_move():
    after_f5 = play(["f5"])[0]  # white to move
    black = np.array([after_f5.black], dtype=np.uint64)
    white = np.array([after_f5.white], dtype=np.uint64)
    colours = board_labels(black, white, np.array([WHITE]), "black-white")[0]
    mine = board_labels(black, white, np.array([WHITE]), "mine-theirs")[0]
    assert colours[37] == 1 and colours[27] == 2 and colours[0] == 0  # f5 black, d4 white, a1 empty
    assert mine[37] == 2 and mine[27] == 1 and mine[0] == 0
    start = board_labels(np.array([START.black], np.uint64), np.array([START.white], np.uint64), np.array([BLACK]),
                         "mine-theirs")
    assert (start == board_labels(np.array([START.black], np.uint64), np.array([START.white], np.uint64),
                                  np.array([BLACK]), "black-white")).all()
    games = random_games(3, np.random.default_rng(0))
    assert (next_player(games)[:, 0] == WHITE).all()


def test_probes_read_a_board_planted_linearly_and_not_one_that_is_absent():
    games = random_games(200, np.random.default_rng(1))
    played = np.arange(60)[None, :] < games.lengths[:, None]
    y = torch.from_numpy(board_labels(games.black, games.white, next_player(games), "black-white")[played])
    one_hot = torch.nn.functional.one_hot(y, 3).flatten(1).float()
    planted = one_hot @ torch.randn(192, 256) + 0.1 * torch.randn(len(y), 256)
    noise = torch.randn(len(y), 256)
    half = len(y) // 2
    for kind in ("linear", "mlp"):
        probe = fit_probe(planted[:half], y[:half], kind, width=256, steps=150, lr=1e-2, seed=0)
        assert accuracy(probe, planted[half:], y[half:]) > 0.95
        blind = fit_probe(noise[:half], y[:half], kind, width=64, steps=150, lr=1e-2, seed=0)
        majority = max(float((y[half:] == c).float().mean()) for c in range(3))
        assert accuracy(blind, noise[half:], y[half:]) < majority + 0.05


def test_editing_a_residual_makes_the_probe_read_the_edited_board():
    games = random_games(30, np.random.default_rng(2))
    played = np.arange(60)[None, :] < games.lengths[:, None]
    y = torch.from_numpy(board_labels(games.black, games.white, next_player(games), "black-white")[played])
    x = torch.nn.functional.one_hot(y, 3).flatten(1).float() @ torch.randn(192, 64)
    probe = fit_probe(x, y, "linear", width=1, steps=200, lr=1e-2, seed=0)
    cases = random_cases(8, seed=0)
    assert all(c.after.legal() and c.after.legal() != c.before.legal() for c in cases)
    assert all(c.before.owner(c.flip) != c.after.owner(c.flip) != -1 for c in cases)
    target = torch.stack([y[i] for i in range(8)])
    flipped = torch.tensor([c.flip for c in cases])
    target[torch.arange(8), flipped] = 3 - target[torch.arange(8), flipped].clamp(min=1)
    edited = edit_to_board(probe, x[:8], target, flipped, steps=300, lr=0.05, reg=0.2)
    assert (probe.logits(edited).argmax(-1) == target).float().mean() > 0.99
    assert (probe.logits(x[:8]).argmax(-1) == target).float().mean() < 1.0


def test_top_n_error_counts_legal_moves_missing_from_the_n_most_likely():
    probs = torch.zeros(61)
    ranked = ["c4", "d3", "a1", "e6", "f5"]  # most likely first; a1 is not legal below
    for i, name in enumerate(ranked):
        probs[MOVE_SQUARES.index(SQUARES.index(name)) + 1] = 0.5 - 0.1 * i
    probs[0] = 1.0  # padding is never a move
    assert top_n_misses(probs, {"c4", "d3", "e6", "f5"}) == 1  # a1 takes the place of f5
    assert top_n_misses(probs, {"c4", "d3"}) == 0
    assert top_n_misses(probs, {"e6"}) == 1
    assert top_n_misses(probs, set()) == 0


def test_zoo_analyze_probe_and_intervene_store_their_results(capsys, quick, tmp_path):
    home, _ = quick
    probe = zoo_cli(capsys, home, "analyze", "probe", "othello-gpt", "--layer", "0", "--games", "40",
                    "--test-games", "10", "--steps", "60", "--png", str(tmp_path / "probe.png"), "--json")
    assert probe.code == 0, probe.err
    p = json.loads(probe.out)
    assert {"id", "kind", "layer", "labels", "accuracy", "baseline_accuracy"} <= set(p)
    assert p["analysis"] == "probe" and p["kind"] == "linear" and p["layer"] == 0 and p["labels"] == "mine-theirs"
    assert p["layers"] == [0, 1]
    assert 0.3 < p["baseline_accuracy"] < 1 and 0.3 < p["accuracy"] <= 1
    truth = play(p["example"]["game"].split())[-1]
    assert p["example"]["board"] == [truth.owner(i) + 1 for i in range(64)]  # black 1, white 2, empty 0
    assert Image.open(tmp_path / "probe.png").size[0] > Image.open(tmp_path / "probe.png").size[1]
    png = tmp_path / "board.png"
    one = zoo_cli(capsys, home, "analyze", "intervene", "othello-gpt", "--probe", str(p["id"]), "--game", OPENING,
                  "--flip", "d4", "--steps", "100", "--lr", "0.05", "--png", str(png), "--json")
    assert one.code == 0, one.err
    r = json.loads(one.out)
    assert r["kind"] == r["analysis"] == "intervene" and r["count"] == 1 and r["probe_reads_edit"] == 1.0
    e = r["example"]
    assert e["game"] == OPENING and e["flip"] == "d4" and e["legal_before"] != e["legal_after"]
    assert e["board_before"][27] != e["board_after"][27] and e["probe_after"][27] == e["board_after"][27]
    assert Image.open(png).size[0] > 4 * Image.open(png).size[1] / 2
    batch = zoo_cli(capsys, home, "analyze", "intervene", "othello-gpt", "--probe", str(p["id"]), "--batch", "5",
                    "--steps", "100", "--lr", "0.05", "--json")
    b = json.loads(batch.out)
    assert b["count"] == 5 and b["error"] >= 0 and b["baseline_error"] > 0
    assert 0 <= b["top_n_error"] <= 60 and 0 <= b["top_n_baseline_error"] <= 60
    listed = zoo_cli(capsys, home, "analyses", "othello-gpt", "--json")
    assert [a["kind"] for a in json.loads(listed.out)][-3:] == ["probe", "intervene", "intervene"]


def test_probe_sweep_tables_every_layer_kind_and_label_set_and_plots_it(capsys, quick, tmp_path):
    home, _ = quick
    plot = tmp_path / "sweep.png"
    done = zoo_cli(capsys, home, "analyze", "probe", "othello-gpt", "--sweep", "--games", "20", "--test-games", "5",
                   "--steps", "20", "--png", str(plot), "--json")
    assert done.code == 0, done.err
    r = json.loads(done.out)
    cells = {(c["layer"], c["kind"], c["labels"]) for c in r["table"]}
    assert cells == {(layer, kind, labels) for layer in (0, 1) for kind in ("linear", "mlp")
                     for labels in ("mine-theirs", "black-white")}
    best = max((c for c in r["table"] if (c["kind"], c["labels"]) == ("linear", "mine-theirs")),
               key=lambda c: c["accuracy"])
    assert (r["layer"], r["accuracy"], r["baseline_accuracy"]) == (best["layer"], best["accuracy"],
                                                                   best["baseline_accuracy"])
    assert Image.open(plot).size == (640, 400)


@pytest.fixture(scope="module")
def full_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`zoo demo othello` with the full profile: about 23 minutes on 2 cores."""
    home = tmp_path_factory.mktemp("othello-full") / "zoo"
    with pytest.raises(SystemExit) as done:
        run(["--home", str(home), "demo", "othello"])
    assert done.value.code in (0, None)
    return home


@pytest.mark.slow
def test_full_build_predicts_legal_moves(full_build):
    """Measured: 0.966 on 1,000 new games, 0.943 at the worst move number."""
    assert modelzoo.open(full_build).get("othello-gpt").metrics["legal_top1"] >= 0.95


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: best probe 0.856 (bar 0.90) against 0.649; interventions 4.15 "
                   "against 5.15 (bar: half); the model has seen 1% of the paper's games")
def test_full_build_probes_read_the_board_and_interventions_move_the_predictions(capsys, full_build):
    home = full_build
    sweep = json.loads(zoo_cli(capsys, home, "analyze", "probe", "othello-gpt", "--sweep", "--json").out)
    assert sweep["accuracy"] >= sweep["baseline_accuracy"] + 0.2
    probe = json.loads(zoo_cli(capsys, home, "analyze", "probe", "othello-gpt", "--layer", str(sweep["layer"]),
                               "--json").out)
    batch = json.loads(zoo_cli(capsys, home, "analyze", "intervene", "othello-gpt", "--probe", str(probe["id"]),
                               "--batch", "100", "--json").out)
    assert batch["count"] == 100
    assert sweep["accuracy"] >= 0.90 and batch["error"] < batch["baseline_error"] / 2


@pytest.mark.parametrize("case", ["illegal move", "unknown square", "empty square", "other version's probe",
                                  "layer out of range", "unknown probe", "not othello", "no flip"])
def test_bad_board_input_is_one_line_exit_2_and_stores_nothing(capsys, quick, gpt2_dir, case):
    home, _ = quick
    zoo = modelzoo.open(home)
    mine = [a.id for a in zoo.analyses("othello-gpt", "probe") if a.metrics.get("layers")]
    if not mine:
        zoo_cli(capsys, home, "analyze", "probe", "othello-gpt", "--layer", "1", "--games", "10", "--test-games", "4",
                "--steps", "5")
        mine = [a.id for a in zoo.analyses("othello-gpt", "probe")]
    if not zoo.analyses("other-gpt", "probe"):
        zoo_cli(capsys, home, "analyze", "probe", "other-gpt", "--layer", "2", "--games", "10", "--test-games", "4",
                "--steps", "5")
    if "gpt2" not in [m.name for m in zoo.list()]:
        zoo.import_(gpt2_dir, name="gpt2")
    theirs = zoo.analyses("other-gpt", "probe")[0].id
    intervene = ["analyze", "intervene", "othello-gpt", "--probe", str(mine[0])]
    args = {
        "illegal move": [*intervene, "--game", "f5 f5", "--flip", "d4"],
        "unknown square": [*intervene, "--game", "f5 d6", "--flip", "i9"],
        "empty square": [*intervene, "--game", "f5 d6", "--flip", "a1"],
        "other version's probe": ["analyze", "intervene", "othello-gpt", "--probe", str(theirs), "--game", "f5",
                                  "--flip", "d4"],
        "layer out of range": ["analyze", "probe", "othello-gpt", "--layer", "2"],
        "unknown probe": [*intervene[:3], "--probe", "9999", "--game", "f5", "--flip", "d4"],
        "not othello": ["analyze", "probe", "gpt2", "--layer", "0"],
        "no flip": [*intervene, "--game", "f5 d6"],
    }[case]
    before = snapshot(home)
    result = zoo_cli(capsys, home, *args)
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and result.err.startswith("error: "), result.err
    assert snapshot(home) == before

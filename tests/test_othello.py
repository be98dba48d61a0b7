"""The Othello engine: hand-played positions with known legal moves and flips, passes and game ends, and
random games checked square by square against a plain one-board implementation of the rules."""

from __future__ import annotations

import numpy as np
import pytest

from modelzoo.demo.othello import (
    BLACK,
    MAX_MOVES,
    NOBODY,
    SQUARE_INDEX,
    SQUARES,
    START,
    WHITE,
    Position,
    parse_game,
    play,
    random_games,
    squares_of,
)
from modelzoo.registry.errors import BadInput


def board(black: str, white: str, to_move: int) -> Position:
    return Position(sum(1 << SQUARE_INDEX[s] for s in black.split()),
                    sum(1 << SQUARE_INDEX[s] for s in white.split()), to_move)


def test_start_position_and_first_moves():
    assert squares_of(START.black) == ["e4", "d5"] and squares_of(START.white) == ["d4", "e5"]
    assert sorted(squares_of(START.legal())) == ["c4", "d3", "e6", "f5"]


def test_hand_played_opening_has_the_known_legal_moves_and_flips():
    after_f5, after_d6, after_c3 = play(["f5", "d6", "c3"])
    # f5 turns e5 over; white may answer perpendicular (d6), parallel (f4) or diagonal (f6)
    assert squares_of(after_f5.black) == ["e4", "d5", "e5", "f5"] and squares_of(after_f5.white) == ["d4"]
    assert after_f5.to_move == WHITE and sorted(squares_of(after_f5.legal())) == ["d6", "f4", "f6"]
    # d6 turns d5 over; black then has the five c-file moves
    assert squares_of(after_d6.white) == ["d4", "d5", "d6"] and after_d6.to_move == BLACK
    assert sorted(squares_of(after_d6.legal())) == ["c3", "c4", "c5", "c6", "c7"]
    # c3 turns d4 over along the diagonal
    assert squares_of(after_c3.black) == ["c3", "d4", "e4", "e5", "f5"] and squares_of(after_c3.white) == ["d5", "d6"]


def test_a_move_turns_over_runs_in_several_directions_at_once():
    position = board("a1 c1 e3 c5", "b2 d2 d3 c4", BLACK)
    (after,) = play(["c3"], position)
    # closed runs: north-west b2 (by a1), east d3 (by e3), south c4 (by c5); north-east d2 is open (e1 empty)
    assert squares_of(after.white) == ["d2"]
    assert squares_of(after.black) == ["a1", "c1", "b2", "c3", "d3", "e3", "c4", "c5"]


def test_a_player_without_a_move_passes_and_the_game_ends_when_neither_can_move():
    position = board("a1 a8", "b1 b8", BLACK)
    after_c1, after_c8 = play(["c1", "c8"], position)
    assert squares_of(after_c1.white) == ["b8"] and after_c1.to_move == BLACK  # white cannot move: passes
    assert squares_of(after_c1.legal()) == ["c8"]
    assert after_c8.white == 0 and after_c8.to_move == NOBODY and after_c8.legal() == 0
    with pytest.raises(BadInput, match="already over"):
        play(["c1", "c8", "d1"], position)


def test_illegal_moves_and_unknown_squares_are_refused_by_name():
    with pytest.raises(BadInput, match=r"move 2 \(f5\) is illegal for white; legal: f4 d6 f6"):
        play(["f5", "f5"])
    with pytest.raises(BadInput, match="move 1 .* illegal for black"):
        play(["a1"])
    with pytest.raises(BadInput, match="unknown square 'z9'"):
        parse_game("f5 z9")
    with pytest.raises(BadInput, match="unknown square 'd'"):
        play(["d"])
    assert parse_game(" F5  d6 ") == ["f5", "d6"]


def _naive_after(black: set[int], white: set[int], mover: int, move: int) -> tuple[set[int], set[int]]:
    own, opp = (set(black), set(white)) if mover == BLACK else (set(white), set(black))
    r, c = divmod(move, 8)
    turned: set[int] = set()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == dc == 0:
                continue
            run, rr, cc = [], r + dr, c + dc
            while 0 <= rr < 8 and 0 <= cc < 8 and rr * 8 + cc in opp:
                run.append(rr * 8 + cc)
                rr, cc = rr + dr, cc + dc
            if run and 0 <= rr < 8 and 0 <= cc < 8 and rr * 8 + cc in own:
                turned |= set(run)
    if move in own | opp or not turned:
        return set(), set()  # illegal
    own, opp = own | turned | {move}, opp - turned
    return (own, opp) if mover == BLACK else (opp, own)


def _naive_legal(black: set[int], white: set[int], mover: int) -> set[int]:
    return {m for m in range(64) if _naive_after(black, white, mover, m)[0]}


def test_random_games_follow_the_rules_square_by_square():
    games = random_games(40, np.random.default_rng(7))
    assert ((games.lengths >= 9) & (games.lengths <= MAX_MOVES)).all()
    for g in range(len(games)):
        black, white, mover = {27 + 8, 28}, {27, 36}, BLACK
        assert {SQUARES[i] for i in black} == {"d5", "e4"}
        for t in range(games.lengths[g]):
            move = int(games.moves[g, t])
            assert move in _naive_legal(black, white, mover)
            black, white = _naive_after(black, white, mover, move)
            assert squares_of(int(games.black[g, t])) == [SQUARES[i] for i in sorted(black)]
            assert squares_of(int(games.white[g, t])) == [SQUARES[i] for i in sorted(white)]
            if _naive_legal(black, white, 1 - mover):
                mover = 1 - mover
            elif not _naive_legal(black, white, mover):
                mover = NOBODY
            assert games.to_move[g, t] == mover
            expected = _naive_legal(black, white, mover) if mover != NOBODY else set()
            assert squares_of(int(games.legal[g, t])) == [SQUARES[i] for i in sorted(expected)]
        assert mover == NOBODY and (games.moves[g, games.lengths[g]:] == -1).all()


def test_random_games_are_seeded_and_replay_through_play():
    a, b = random_games(20, np.random.default_rng(3)), random_games(20, np.random.default_rng(3))
    assert (a.moves == b.moves).all() and not (a.moves == random_games(20, np.random.default_rng(4)).moves).all()
    for g in range(20):
        positions = play([SQUARES[m] for m in a.moves[g, : a.lengths[g]]])
        assert [p.black for p in positions] == [int(x) for x in a.black[g, : a.lengths[g]]]
        assert positions[-1].to_move == NOBODY
    # uniformly random: the four first moves come up about equally often
    first = random_games(4000, np.random.default_rng(5)).moves[:, 0]
    counts = np.bincount(first, minlength=64)[[SQUARE_INDEX[s] for s in ("c4", "d3", "e6", "f5")]]
    assert counts.sum() == 4000 and counts.min() > 850

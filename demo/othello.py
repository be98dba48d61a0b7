"""Othello on bitboards, vectorised over many games at once with numpy.

Conventions (those of Othello-GPT, Li et al. 2023, arXiv 2210.13382): columns a-h from left to right,
rows 1-8 from top to bottom; square `c4` is column c, row 4. A board is two uint64 bitboards, bit
`8 * row + column` (both from 0), one for black's discs and one for white's. The start position has white
on d4 and e5, black on d5 and e4, and black moves first, so the legal first moves are c4, d3, e6 and f5.
A player without a legal move passes implicitly (the other moves again); the game ends when neither can
move, so a game has at most 60 moves.

Synthetic games choose a uniformly random legal move at every turn. A batch of games advances one ply
at a time with whole-array operations: legal moves by shifting the mover's discs through runs of the
opponent's in each of the 8 directions, the k-th set bit of a move mask by a binary search on
population counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelzoo.registry.errors import BadInput

COLUMNS = "abcdefgh"
SQUARES = [f"{COLUMNS[i % 8]}{i // 8 + 1}" for i in range(64)]
SQUARE_INDEX = {name: i for i, name in enumerate(SQUARES)}
CENTRE = frozenset(SQUARE_INDEX[s] for s in ("d4", "e4", "d5", "e5"))
MOVE_SQUARES = [i for i in range(64) if i not in CENTRE]
"""The 60 squares a move can be played on, in board order; a move's token id is 1 + its place here."""
MAX_MOVES = len(MOVE_SQUARES)
TOKEN_OF_SQUARE = np.zeros(64, dtype=np.int64)
TOKEN_OF_SQUARE[MOVE_SQUARES] = np.arange(1, MAX_MOVES + 1)
BLACK, WHITE, NOBODY = 0, 1, -1
START_BLACK = (1 << SQUARE_INDEX["d5"]) | (1 << SQUARE_INDEX["e4"])
START_WHITE = (1 << SQUARE_INDEX["d4"]) | (1 << SQUARE_INDEX["e5"])

_U64 = np.uint64
_NOT_A = _U64(0xFEFEFEFEFEFEFEFE)  # every square but column a
_NOT_H = _U64(0x7F7F7F7F7F7F7F7F)  # every square but column h
_ALL = _U64(0xFFFFFFFFFFFFFFFF)
# (shift, left?, mask after the shift): a step east is +1 column, so bit + 1, and must not wrap onto column a
_DIRECTIONS = (
    (_U64(1), True, _NOT_A), (_U64(1), False, _NOT_H),  # east, west
    (_U64(8), True, _ALL), (_U64(8), False, _ALL),  # south (row + 1), north
    (_U64(9), True, _NOT_A), (_U64(7), True, _NOT_H),  # south-east, south-west
    (_U64(7), False, _NOT_A), (_U64(9), False, _NOT_H),  # north-east, north-west
)


def _step(x: np.ndarray, shift: np.uint64, left: bool, mask: np.uint64) -> np.ndarray:
    return ((x << shift) if left else (x >> shift)) & mask


def legal_moves(own: np.ndarray, opp: np.ndarray) -> np.ndarray:
    """The squares where the player with discs `own` may move, as bitboards (one per game)."""
    empty = ~(own | opp)
    legal = np.zeros_like(own)
    for shift, left, mask in _DIRECTIONS:
        run = _step(own, shift, left, mask) & opp
        for _ in range(5):  # a run of the opponent's discs is at most 6 long
            run |= _step(run, shift, left, mask) & opp
        legal |= _step(run, shift, left, mask) & empty
    return legal


def flips(own: np.ndarray, opp: np.ndarray, move: np.ndarray) -> np.ndarray:
    """The opponent's discs turned over by playing the single-bit boards `move`."""
    turned = np.zeros_like(own)
    for shift, left, mask in _DIRECTIONS:
        run = _step(move, shift, left, mask) & opp
        for _ in range(5):
            run |= _step(run, shift, left, mask) & opp
        closed = (_step(run, shift, left, mask) & own) != 0
        turned |= np.where(closed, run, _U64(0))
    return turned


def _kth_bit(mask: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The index of the k-th (from 0) set bit of each mask, by halving the window with population counts."""
    low = np.zeros(mask.shape, dtype=np.int64)
    k = k.astype(np.int64)
    for width in (32, 16, 8, 4, 2, 1):
        window = (mask >> low.astype(_U64)) & _U64((1 << width) - 1)
        below = np.bitwise_count(window).astype(np.int64)
        upper = k >= below
        k = np.where(upper, k - below, k)
        low = np.where(upper, low + width, low)
    return low


@dataclass(frozen=True)
class Games:
    """A batch of games, each padded to 60 plies. Row g, ply t: the state after the game's (t+1)-th move.

    `moves`: square index of each move, -1 after the game's end. `black`, `white`: the bitboards after the
    move. `to_move`: who moves next (BLACK, WHITE, or NOBODY once the game is over). `legal`: the next
    mover's legal squares (0 once over)."""

    moves: np.ndarray  # (n, 60) int8
    lengths: np.ndarray  # (n,) int64
    black: np.ndarray  # (n, 60) uint64
    white: np.ndarray  # (n, 60) uint64
    to_move: np.ndarray  # (n, 60) int8
    legal: np.ndarray  # (n, 60) uint64

    def __len__(self) -> int:
        return len(self.lengths)


def random_games(n: int, rng: np.random.Generator) -> Games:
    """`n` games of uniformly random legal moves."""
    if n < 0:
        raise BadInput(f"a number of games must be >= 0, got {n}")
    black = np.full(n, START_BLACK, dtype=_U64)
    white = np.full(n, START_WHITE, dtype=_U64)
    mover = np.zeros(n, dtype=np.int8)  # BLACK moves first
    legal = legal_moves(black, white)
    shape = (n, MAX_MOVES)
    out = Games(np.full(shape, -1, np.int8), np.zeros(n, np.int64), np.zeros(shape, _U64), np.zeros(shape, _U64),
                np.full(shape, NOBODY, np.int8), np.zeros(shape, _U64))
    for t in range(MAX_MOVES):
        playing = legal != 0
        if not playing.any():
            break
        count = np.bitwise_count(legal)
        choice = _kth_bit(legal, (rng.random(n) * count).astype(np.int64))
        move = np.where(playing, _U64(1) << choice.astype(_U64), _U64(0))
        is_black = mover == BLACK
        own, opp = np.where(is_black, black, white), np.where(is_black, white, black)
        turned = flips(own, opp, move)
        own, opp = own | move | turned, opp & ~turned
        # The opponent moves next if it can, else the mover again, else nobody.
        theirs, again = legal_moves(opp, own), legal_moves(own, opp)
        passes = theirs == 0
        mover = np.where(passes, mover, 1 - mover).astype(np.int8)
        legal = np.where(passes, again, theirs)
        black, white = np.where(is_black, own, opp), np.where(is_black, opp, own)
        out.moves[:, t] = np.where(playing, choice, -1)
        out.black[:, t], out.white[:, t], out.legal[:, t] = black, white, legal
        out.to_move[:, t] = np.where(legal != 0, mover, NOBODY)
        out.lengths[:] += playing
    return out


def move_tokens(moves: np.ndarray) -> np.ndarray:
    """Token ids of square indices: 1 + the square's place among the 60 move squares; -1 (after a game's
    end) becomes 0, padding."""
    return np.where(moves >= 0, TOKEN_OF_SQUARE[np.maximum(moves, 0).astype(np.int64)], 0)


def squares_of(board: int) -> list[str]:
    """The names of a bitboard's squares, in board order."""
    return [SQUARES[i] for i in range(64) if board >> i & 1]


def bits_of(boards: np.ndarray) -> np.ndarray:
    """(..., 64) booleans of (...) bitboards, square i at index i."""
    as_bytes = np.ascontiguousarray(boards, dtype="<u8").view(np.uint8).reshape(*boards.shape, 8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little").astype(bool)


def square(name: str) -> int:
    """A square's index from its name (`c4`); BadInput for anything else."""
    index = SQUARE_INDEX.get(name.strip().lower())
    if index is None:
        raise BadInput(f"unknown square {name!r}: squares are a1 to h8 (columns a-h, rows 1-8)")
    return index


@dataclass(frozen=True)
class Position:
    """A single board: the discs of each colour and who moves next (NOBODY when the game is over)."""

    black: int
    white: int
    to_move: int

    def discs(self, player: int) -> tuple[int, int]:
        """(the player's discs, the opponent's)."""
        return (self.black, self.white) if player == BLACK else (self.white, self.black)

    def legal(self) -> int:
        if self.to_move == NOBODY:
            return 0
        own, opp = self.discs(self.to_move)
        return int(legal_moves(np.array([own], _U64), np.array([opp], _U64))[0])

    def owner(self, index: int) -> int:
        return BLACK if self.black >> index & 1 else WHITE if self.white >> index & 1 else NOBODY

    def flipped(self, index: int) -> Position:
        """The same position with the disc on square `index` turned to the other colour; the same player
        moves next."""
        if self.owner(index) == NOBODY:
            raise BadInput(f"{SQUARES[index]} is empty; only a disc can be flipped")
        bit = 1 << index
        return Position(self.black ^ bit, self.white ^ bit, self.to_move)


START = Position(START_BLACK, START_WHITE, BLACK)


def play(moves: Sequence[str | int], position: Position = START) -> list[Position]:
    """The positions after each move of a game given as square names or indices (passes implicit);
    BadInput naming the first unknown square or illegal move."""
    positions = []
    for n, move in enumerate(moves, start=1):
        index = square(move) if isinstance(move, str) else int(move)
        if position.to_move == NOBODY:
            raise BadInput(f"move {n} ({SQUARES[index]}): the game is already over")
        legal = position.legal()
        if not legal >> index & 1:
            who = "black" if position.to_move == BLACK else "white"
            raise BadInput(f"move {n} ({SQUARES[index]}) is illegal for {who}; legal: {' '.join(squares_of(legal))}")
        own, opp = position.discs(position.to_move)
        move_bit = 1 << index
        turned = int(flips(np.array([own], _U64), np.array([opp], _U64), np.array([move_bit], _U64))[0])
        own, opp = own | move_bit | turned, opp & ~turned
        black, white = (own, opp) if position.to_move == BLACK else (opp, own)
        mover = position.to_move
        after = Position(black, white, 1 - mover)
        if not after.legal():
            after = Position(black, white, mover)
            if not after.legal():
                after = Position(black, white, NOBODY)
        position = after
        positions.append(position)
    return positions


def parse_game(text: str) -> list[str]:
    """A game as moves separated by spaces (`"f5 d6 c3"`), each checked to be a square name."""
    moves = text.split()
    for move in moves:
        square(move)
    return [m.lower() for m in moves]

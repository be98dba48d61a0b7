"""Othello-GPT (Li et al. 2023, arXiv 2210.13382): a GPT-2 trained on move sequences of synthetic Othello
games, with no knowledge of the rules, that learns to predict legal moves.

The vocabulary is the 60 squares a move can be played on plus padding (id 0); a game is its moves
separated by spaces (`"f5 d6 c3 ..."`), read by a word-level tokenizer that `AutoTokenizer` loads. The
model reads a game's moves and at every position predicts the next one.

Games are drawn fresh for every step (`modelzoo.demo.othello.random_games`), so no game is seen twice. The
target at each position is the generator's own next-move distribution, uniform over the legal moves,
rather than the one move it happened to draw: the expected loss is the same as the next-token loss on the
drawn games, and its variance much lower, which is what lets a CPU train the model in minutes. The model
still sees nothing but moves.

Success is the top-1 legal-move rate: the share of positions (every position of every game until its
end) where the model's most likely next token is a legal move, on new games.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from modelzoo.demo.othello import MAX_MOVES, MOVE_SQUARES, SQUARES, Games, bits_of, move_tokens, random_games
from modelzoo.demo.train_facts_lm import torch_threads, warmup_cosine
from modelzoo.demo.world import WorldModel
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.lm import without_progress_bars

Progress = Callable[[int, int, float], None]
"""Called after every training step with (steps done, total steps, the step's loss)."""

PAD = "<pad>"


@dataclass(frozen=True)
class OthelloProfile:
    """The model's shape and its training; `PROFILES` holds the named ones. Steps, not seconds, bound
    training, so a seed gives the same model on a busy or an idle machine."""

    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    eval_games: int = 1000
    curve_points: int = 8
    """How often (evenly over training) the legal-move rate is measured on `curve_games` new games."""
    curve_games: int = 200
    threads: int | None = 1

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.eval_games, self.curve_points, self.curve_games) < 1:
            raise BadInput(f"an Othello profile needs positive steps, batch, games and curve points: {self}")
        if self.n_embd % self.n_head:
            raise BadInput(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


PROFILES: dict[str, OthelloProfile] = {
    "full": OthelloProfile(steps=7000, batch_size=32, warmup=100, threads=2),
    "quick": OthelloProfile(steps=60, batch_size=32, lr=3e-3, warmup=10, n_embd=64, n_layer=2, n_head=2,
                            eval_games=100, curve_points=2, curve_games=50),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: one token per square name, split on spaces; id 0 is padding (and stands for anything
    that is not a move square, so callers check moves with `othello.play` first)."""
    vocab = {PAD: 0, **{SQUARES[s]: i + 1 for i, s in enumerate(MOVE_SQUARES)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, unk_token=PAD,
                                   model_max_length=MAX_MOVES)


def build_model(profile: OthelloProfile) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=MAX_MOVES + 1, n_positions=MAX_MOVES, n_embd=profile.n_embd,
                        n_layer=profile.n_layer, n_head=profile.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def game_tokens(games: Games) -> Tensor:
    """(n, 60) token ids of the games' moves, padding after each game's end."""
    return torch.from_numpy(move_tokens(games.moves))


def legal_tokens(games: Games) -> Tensor:
    """(n, 60, 61) booleans: after move t, which tokens are legal next moves (none once the game is over)."""
    squares = bits_of(games.legal)  # (n, 60, 64)
    return torch.from_numpy(np.concatenate([np.zeros((*squares.shape[:2], 1), bool), squares[..., MOVE_SQUARES]],
                                           axis=-1))


def move_logits(model: GPT2LMHeadModel, tokens: Tensor) -> Tensor:
    """Next-move logits after every move (padding ruled out as a prediction)."""
    logits = model(input_ids=tokens, attention_mask=(tokens != 0).long()).logits
    return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == 0, float("-inf"))


@torch.no_grad()
def legal_move_rate(model: GPT2LMHeadModel, games: Games, batch_size: int = 250) -> tuple[float, np.ndarray]:
    """(share of positions whose top-1 predicted move is legal, that share at each move number 1-59)."""
    hits, counts = np.zeros(MAX_MOVES), np.zeros(MAX_MOVES)
    device = next(model.parameters()).device
    for start in range(0, len(games), batch_size):
        part = Games(*(getattr(games, f)[start:start + batch_size] for f in Games.__dataclass_fields__))
        tokens, legal = game_tokens(part).to(device), legal_tokens(part).to(device)
        top = move_logits(model, tokens).argmax(-1)
        live = legal.any(-1)  # positions where the game goes on
        hit = legal.gather(-1, top[..., None])[..., 0] & live
        hits += hit.sum(0).cpu().numpy()
        counts += live.sum(0).cpu().numpy()
    per_move = np.divide(hits, counts, out=np.full(MAX_MOVES, np.nan), where=counts > 0)
    return float(hits.sum() / counts.sum()), per_move


def train_othello_gpt(out_dir: Path, seed: int = 0, profile: str | OthelloProfile = "full",
                      progress: Progress | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train Othello-GPT, save model and tokenizer into `out_dir` (a transformers folder), return metrics:
    `legal_top1` on `eval_games` new games (the bar: 0.95 for the full profile), `legal_top1_worst_move`
    (the lowest rate at any one move number), `curve` ([games seen, rate on `curve_games` new games]),
    `games_seen`, `seconds` (training only), `loss` (mean of the last 20 steps), `loss_floor` (a perfect
    model's), `parameters`, `profile`. `device` is where it trains: the demo trains on the CPU, experiments
    with larger shapes (benchmarks/othello_scaling.py) on a GPU."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise BadInput(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    rng = np.random.default_rng([seed, 24])
    curve_games = random_games(profile.curve_games, np.random.default_rng([seed, 25]))
    checkpoints = {round(profile.steps * (i + 1) / profile.curve_points) for i in range(profile.curve_points)}
    with torch_threads(profile.threads):
        torch.manual_seed(seed)
        model = build_model(profile).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=profile.lr, betas=(0.9, 0.98), weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, profile.warmup, profile.steps))
        losses: list[float] = []
        curve: list[list[float]] = []
        started = time.perf_counter()
        for step in range(1, profile.steps + 1):
            games = random_games(profile.batch_size, rng)
            tokens, legal = game_tokens(games).to(device), legal_tokens(games).to(device)
            live = legal.any(-1)
            target = legal.float() / legal.sum(-1, keepdim=True).clamp(min=1)
            logits = move_logits(model, tokens)
            loss = -(target * logits.log_softmax(-1).clamp(min=-1e4)).sum(-1)[live].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step in checkpoints:
                model.eval()
                curve.append([step * profile.batch_size, round(legal_move_rate(model, curve_games)[0], 4)])
                model.train()
            if progress is not None:
                progress(step, profile.steps, losses[-1])
        seconds = time.perf_counter() - started
        model.eval()
        eval_games = random_games(profile.eval_games, np.random.default_rng([seed, 26]))
        rate, per_move = legal_move_rate(model, eval_games)
    out = Path(out_dir)
    with without_progress_bars(transformers_logging):
        model.cpu().save_pretrained(out)
        build_tokenizer().save_pretrained(out)
    return {
        "legal_top1": round(rate, 4), "legal_top1_worst_move": round(float(np.nanmin(per_move)), 4),
        "curve": curve, "games_seen": profile.steps * profile.batch_size, "eval_games": profile.eval_games,
        "seconds": round(seconds, 1), "loss": float(np.mean(losses[-20:])),
        "loss_floor": round(next_move_loss_floor(eval_games), 4),
        "parameters": sum(p.numel() for p in model.parameters()), "profile": asdict(profile),
    }


def next_move_loss_floor(games: Games) -> float:
    """The entropy of the generator's next move (log of the number of legal moves), averaged over the
    positions: the loss a perfect model reaches, for reading `loss` against."""
    counts = np.bitwise_count(games.legal)
    return float(np.log(counts[counts > 0]).mean())



LEGAL_TOP1_BARS = {"full": 0.95, "quick": 0.2}


def world_model(profile: str) -> WorldModel:
    """Othello-GPT as a model of the demo world (`zoo demo othello`): registered with its training
    provenance, tagged, cached per profile and seed."""
    return WorldModel("othello-gpt", train_othello_gpt,
                      {"data": "synthetic Othello games, uniformly random legal moves"},
                      {"legal_top1": LEGAL_TOP1_BARS[profile]}, {"world": "othello"},
                      "Othello-GPT: a GPT-2 trained on random Othello games that predicts legal moves")

"""Sampling parameters (vLLM-compatible names) and the batched sampler."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polarsparse.errors import PolarsparseError


class SamplingParamsError(PolarsparseError, ValueError):
    """Invalid sampling parameters; the message names the field and the allowed range."""


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 disable those filters. ``seed`` makes one
    request's samples reproducible whatever else is in the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    MAX_N = 16

    def __post_init__(self) -> None:
        self.stop_strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str):
            raise SamplingParamsError(msg)

        if not isinstance(self.n, int) or not 1 <= self.n <= self.MAX_N:
            bad(f"n must be an integer in [1, {self.MAX_N}], got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            bad(f"top_k must be an integer (-1 or 0 disables it), got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


class Sampler:
    """Picks one token per row of logits [B, V] under per-row parameters.

    Sampling uses the exponential-race form (argmax of p / E, E ~ Exp(1)), so a row with its own
    generator draws only from that generator: its tokens do not depend on the rest of the batch.
    """

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """logits: [B, V] fp32 -> tokens [B] int64."""
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        tokens = logits.argmax(dim=-1)
        if bool(greedy.all()):
            return tokens
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
        probs = _filtered_probs(logits / temps[:, None], params)
        noise = self._exponential_noise(probs, params, generators)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, tokens, sampled)

    def _exponential_noise(self, probs, params, generators) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None and not params[i].greedy:
                noise[i].exponential_(generator=g)
        return noise


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Softmax after top-k / top-p filtering (only when some row asks for it)."""
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
    if bool((top_k == vocab).all()) and bool((top_p == 1).all()):
        return logits.softmax(dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits).softmax(dim=-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g

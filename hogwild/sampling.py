"""Sampling of the next token per worker: greedy, temperature, top-k, top-p, banned tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError

# Below this a temperature samples as greedy: the limit such temperatures tend to (logits divided
# by a tinier one overflow float32, and inf - inf is nan in the softmax).
GREEDY_BELOW_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 (or below ``GREEDY_BELOW_TEMPERATURE``) means
    greedy (argmax); top_p keeps at least the most likely token, however small it is."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    banned_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Turns next-token logits [workers, vocab] into token ids, reproducibly for a given seed.

    Sampling runs on the logits' device with a generator of that device (seeded once), so that a
    GPU pass ends with one small copy to the host: the token ids.
    """

    def __init__(self, params: SamplingParams, seed: int | None = None):
        self.params = params
        self.seed = 0 if seed is None else seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._banned: dict[torch.device, torch.Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def _allowed(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().clone()
        if self.params.banned_token_ids:
            if logits.device not in self._banned:
                ids = torch.tensor(self.params.banned_token_ids, dtype=torch.long)
                self._banned[logits.device] = ids.to(logits.device)
            logits.index_fill_(1, self._banned[logits.device], float("-inf"))
        return logits

    def greedy(self, logits: torch.Tensor) -> list[int]:
        """Argmax over the allowed tokens, whatever the temperature."""
        return self._allowed(logits).argmax(-1).tolist()

    def __call__(self, logits: torch.Tensor) -> list[int]:
        p = self.params
        logits = self._allowed(logits)
        if p.temperature < GREEDY_BELOW_TEMPERATURE:
            return logits.argmax(-1).tolist()
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the first token past top_p
            drop[:, 0] = False  # and always the most likely one (a top_p that is 0 in float32 drops all)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self._generator(probs.device)).squeeze(-1).tolist()

"""The Sampler at the edges: a top_p that is 0 in float32 and temperatures so small that the
logits divided by them overflow must not turn into NaN probabilities."""

from __future__ import annotations

import pytest
import torch

from hogwild.sampling import GREEDY_BELOW_TEMPERATURE, Sampler, SamplingParams


def logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 10


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-12])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    assert torch.tensor(5e-324, dtype=torch.float32).item() == 0.0  # the case that dropped every token
    x = logits()
    for seed in range(5):
        assert Sampler(SamplingParams(temperature=1.0, top_p=top_p), seed=seed)(x) == x.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [5e-324, 1e-30, GREEDY_BELOW_TEMPERATURE / 2])
def test_a_tiny_temperature_is_greedy(temperature):
    x = logits()
    x[0, 7] = x[0].max() + 1e-3  # a near tie: greedy must still pick it
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=0.5, top_k=3), seed=1)
    assert sampler(x) == x.argmax(-1).tolist() and sampler(x)[0] == 7


def test_temperatures_just_above_greedy_sample_valid_tokens():
    x = logits(rows=8, vocab=1000)
    x[:, 3] = float("-inf")  # as a banned token
    for temperature in (GREEDY_BELOW_TEMPERATURE, 1e-3, 2.0):
        tokens = Sampler(SamplingParams(temperature=temperature, top_p=1e-9), seed=3)(x)
        assert tokens == x.argmax(-1).tolist()  # top_p that small keeps only the top token
        tokens = Sampler(SamplingParams(temperature=temperature, top_k=5), seed=3)(x)
        top5 = torch.topk(x, 5).indices
        assert all(t in top5[i].tolist() for i, t in enumerate(tokens)), tokens

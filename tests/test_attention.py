"""Concurrent attention (query rotation, blocks read once) equals the materialising reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild.cache import SharedCache
from hogwild.engine.runner import WorkerStep, plan_pass
from hogwild.layers.reference_attention import reference_attention
from hogwild.layers.torch_attention import TorchBackend, concurrent_attention

HEAD_DIM = 64
KV_HEADS = 2
GROUPS = 3  # grouped-query attention: 6 query heads share 2 K/V heads
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))


def random_pass(seed: int, workers: int, dtype: torch.dtype, gather_below: int = 20, device="cpu",
                inv_freq: torch.Tensor = INV_FREQ):
    """A cache of random shared blocks, views with shared and repeated blocks and other workers'
    blocks (seen with the tokens they are fed in this pass), new tokens padded.

    Random numbers come from a CPU generator (the same on every device), then move to ``device``.
    inv_freq: [R/2] or per layer [2, R/2] (R < HEAD_DIM: partial rotary).
    """
    g = torch.Generator().manual_seed(seed)
    cache = SharedCache(  # small pages: blocks grow page by page, interleaved, across page boundaries
        2, KV_HEADS, HEAD_DIM, inv_freq, dtype=dtype, device=device, capacity_tokens=4096, page_size=4,
        initial_capacity=4,
    )

    def fill(block, n):
        cache.reserve(block, block.length + n)
        for layer in range(2):
            k = torch.randn(KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
            v = torch.randn(KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
            cache.write(block, layer, block.length, k, v)
        cache.commit(block, [0] * n)

    shared = []
    for i in range(int(torch.randint(1, 5, (1,), generator=g))):
        block = cache.new_block(f"shared{i}")
        fill(block, int(torch.randint(0, 40, (1,), generator=g)))  # may be empty
        shared.append(block)
    owns = []
    for w in range(workers):
        owns.append(cache.new_block(f"own{w}"))
        fill(owns[-1], int(torch.randint(0, 6, (1,), generator=g)))
    steps, news = [], []
    for own in owns:
        picks = torch.randint(0, len(shared), (int(torch.randint(0, 5, (1,), generator=g)),), generator=g)
        view = [shared[int(i)] for i in picks]  # repeats allowed
        for other in owns:  # other workers' blocks, written in this same pass, anywhere before the own block
            if other is not own and int(torch.randint(0, 2, (1,), generator=g)):
                view.insert(int(torch.randint(0, len(view) + 1, (1,), generator=g)), other)
        n_new = int(torch.randint(1, 5, (1,), generator=g))
        steps.append(WorkerStep([0] * n_new, view + [own]))
        news.append(n_new)
    plan = plan_pass(steps, cache, HEAD_DIM**-0.5, dtype, 100000, TorchBackend(gather_below))
    # Write the new tokens' K/V as the model's cache update would (padding never stored).
    T = plan.T
    query = torch.randn(workers, KV_HEADS * GROUPS, T, HEAD_DIM, generator=g).to(device, dtype)
    key = torch.randn(workers, KV_HEADS, T, HEAD_DIM, generator=g).to(device, dtype)
    for i, row in enumerate(plan.rows):
        for layer in range(2):
            cache.write(row.write, layer, row.start, key[i, :, : row.n_new], key[i, :, : row.n_new] * 0.5)
    return plan, query, key, news


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), workers=st.integers(1, 5), gather_below=st.sampled_from([0, 20, 1000]))
def test_concurrent_equals_reference_fp32(seed, workers, gather_below, device):
    """gather_below 0: every block read in place; 1000: all gathered; 20: a mix."""
    plan, query, key, news = random_pass(seed, workers, torch.float32, gather_below, device)
    fast = concurrent_attention(plan, 1, query, key)
    ref = reference_attention(plan, 1, query, key, HEAD_DIM**-0.5)
    for i, n in enumerate(news):
        a, b = fast[i, :n], ref[i, :n]
        assert float((a - b).norm() / b.norm()) < 1e-5
    assert torch.isfinite(fast).all()  # padding rows stay finite too


@pytest.mark.parametrize("seed", range(8))
def test_concurrent_equals_reference_bf16(seed, device):
    plan, query, key, news = random_pass(seed, 4, torch.bfloat16, device=device)
    fast = concurrent_attention(plan, 0, query, key)
    ref = reference_attention(plan, 0, query, key, HEAD_DIM**-0.5)
    for i, n in enumerate(news):
        a, b = fast[i, :n].float(), ref[i, :n].float()
        assert float((a - b).norm() / b.norm()) < 2e-2  # bf16 has 8 bits of mantissa


@pytest.mark.parametrize("gather_below", [0, 20])
def test_each_block_is_read_once(gather_below):
    """A block in several views is read once per layer: it lies in exactly one group, with all its pairs."""
    plan, *_ = random_pass(3, 5, torch.float32, gather_below)
    ids = [block.id for g in plan.meta.groups for block, _ in g.segments]
    assert len(ids) == len(set(ids))
    readers = {}
    for row in plan.rows:
        for entry in row.entries:
            if entry.visible:
                readers[entry.block.id] = readers.get(entry.block.id, 0) + 1
    assert len(plan.meta.pair_row) == sum(readers.values())
    if gather_below == 0:
        assert len(plan.meta.groups) == len(readers)

"""The paged pool: blocks as pages, contiguous runs where possible, moves with one rotation, a full
pool refused cleanly."""

import pytest
import torch

from hogwild import CacheFullError
from hogwild.cache import SharedCache
from hogwild.cli import main
from hogwild.rope import rotate_by

INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))


def make_cache(tokens=256, page_size=4, initial_capacity=4) -> SharedCache:
    return SharedCache(2, 2, 16, INV_FREQ, capacity_tokens=tokens, page_size=page_size,
                       initial_capacity=initial_capacity)


def fill(cache: SharedCache, block, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append n random tokens to every layer; returns their K, V [layers, heads, n, D]."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g)
    cache.reserve(block, block.length + n)
    for layer in range(2):
        cache.write(block, layer, block.length, k[layer], v[layer])
    cache.commit(block, list(range(n)))
    return k, v


def read_all(cache, block):
    pairs = [cache.read(block, layer, block.length) for layer in range(2)]
    return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])


def test_a_block_written_in_one_go_is_one_run_of_slots():
    cache = make_cache()
    small = cache.new_block("small")
    prompt = cache.new_block("prompt", capacity=40)
    assert prompt.contiguous(40) is not None and len(prompt.pages) == 10
    k, v = fill(cache, prompt, 40, 0)
    keys, values = read_all(cache, prompt)
    assert keys.data_ptr() != k.data_ptr() and torch.equal(keys, k) and torch.equal(values, v)
    assert cache.read(prompt, 0, 40)[0]._base is not None  # read in place, not gathered
    assert 0 not in small.pages + prompt.pages  # page 0 takes the padding of passes


def test_interleaved_growth_scatters_pages_and_reads_stay_right():
    cache = make_cache()
    a, b = cache.new_block("a"), cache.new_block("b")
    written = {a: [], b: []}
    for i in range(6):
        for block in (a, b):
            written[block].append(fill(cache, block, 3, seed=10 * i + block.id))
    assert a.contiguous(a.length) is None  # its pages are not one run
    for block in (a, b):
        keys, values = read_all(cache, block)
        assert torch.equal(keys, torch.cat([k for k, _ in written[block]], 2))
        assert torch.equal(values, torch.cat([v for _, v in written[block]], 2))


def test_move_prefix_rotates_moved_and_kept_keys_once():
    cache = make_cache()
    history, own = cache.new_block("history"), cache.new_block("own")
    fill(cache, history, 9, 1)
    k, v = fill(cache, own, 7, 2)
    before, _ = read_all(cache, history)
    cache.move_prefix(history, own, 5)
    keys, values = read_all(cache, history)
    assert history.length == 14 and own.length == 2
    assert torch.equal(keys[:, :, :9], before)
    assert torch.allclose(keys[:, :, 9:], rotate_by(k[:, :, :5], INV_FREQ, 9), atol=1e-6)
    assert torch.equal(values[:, :, 9:], v[:, :, :5])
    own_keys, own_values = read_all(cache, own)
    assert torch.allclose(own_keys, rotate_by(k[:, :, 5:], INV_FREQ, -5), atol=1e-6)
    assert torch.equal(own_values, v[:, :, 5:])


def test_free_returns_pages_and_byte_counts_follow():
    cache = make_cache()
    free = cache.free_tokens
    block = cache.new_block("a", capacity=20)
    fill(cache, block, 18, 3)
    assert cache.nbytes() == 18 * cache.bytes_per_token
    assert cache.allocated_nbytes() == 20 * cache.bytes_per_token
    cache.free(block)
    assert cache.free_tokens == free and cache.nbytes() == 0 and cache.free_pages == sorted(cache.free_pages)


def test_a_full_pool_refuses_and_changes_nothing():
    cache = make_cache(tokens=32)
    block = cache.new_block("a", capacity=24)
    pages, free = list(block.pages), list(cache.free_pages)
    with pytest.raises(CacheFullError, match="KV cache is full"):
        cache.reserve(block, 48)
    with pytest.raises(CacheFullError):
        cache.new_block("b", capacity=16)
    assert block.pages == pages and cache.free_pages == free


def test_solve_with_too_small_a_pool_is_a_clear_error(capsys):
    code = main(["solve", "What is 2 + 2?", "--kv-memory", "0.01", "--budget", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "KV cache" in err and "--kv-memory" in err

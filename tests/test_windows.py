"""Sliding windows, attention sinks, logit soft-capping, per-layer and partial RoPE: the spec
(reference attention) on cases with known answers, and the torch backend against the spec."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import GROUPS, HEAD_DIM, KV_HEADS, random_pass

from hogwild.cache import SharedCache
from hogwild.engine.runner import WorkerStep, plan_pass
from hogwild.layers.attention import layer_options
from hogwild.layers.reference_attention import ReferenceBackend
from hogwild.layers.torch_attention import TorchBackend
from hogwild.rope import rotate_by

SCALE = HEAD_DIM**-0.5


def inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


#: Two layers with different bases (Gemma 3's local and global), full or partial rotary (Phi-4-mini: 0.75).
TABLES = {
    "one table": inv_freq(HEAD_DIM, 1e4),
    "per layer": torch.stack([inv_freq(HEAD_DIM, 1e4), inv_freq(HEAD_DIM, 1e6)]),
    "partial": inv_freq(48, 1e4),
    "per layer partial": torch.stack([inv_freq(48, 1e4), inv_freq(48, 5e5)]),
}


def attend(backend, plan, query, key, layer, **options):
    """One layer by ``backend`` (an ``AttentionBackend`` class) with transformers' keyword options."""
    window, sinks, softcap = layer_options(options)
    return backend().forward(plan, layer, query, key, key, SCALE, window, sinks, softcap)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000), workers=st.integers(1, 5), gather_below=st.sampled_from([0, 20, 1000]),
    window=st.sampled_from([None, 1, 2, 3, 7, 20, 64]), sinks=st.booleans(), softcap=st.sampled_from([None, 2.0]),
    tables=st.sampled_from(list(TABLES)), layer=st.integers(0, 1),
)
def test_torch_equals_reference_with_windows_and_sinks(seed, workers, gather_below, window, sinks, softcap, tables,
                                                       layer, device):
    plan, query, key, news = random_pass(seed, workers, torch.float32, gather_below, device, TABLES[tables])
    options = dict(sliding_window=window, softcap=softcap)
    if sinks:
        options["s_aux"] = torch.randn(KV_HEADS * GROUPS, generator=torch.Generator().manual_seed(seed)).to(device) * 2
    fast = attend(TorchBackend, plan, query, key, layer, **options)
    ref = attend(ReferenceBackend, plan, query, key, layer, **options)
    for i, n in enumerate(news):
        a, b = fast[i, :n], ref[i, :n]
        assert float((a - b).norm() / b.norm()) < 1e-5
    assert torch.isfinite(fast).all()  # tokens whose window hides whole blocks, and padding, stay finite


def one_row(n_keys: int, n_new: int, seed: int = 0):
    """One worker: a shared block of n_keys random keys, then its own block with n_new new tokens."""
    g = torch.Generator().manual_seed(seed)
    cache = SharedCache(1, KV_HEADS, HEAD_DIM, TABLES["one table"], capacity_tokens=512, page_size=4)
    shared, own = cache.new_block("shared"), cache.new_block("own")
    cache.reserve(shared, n_keys)
    cache.write(shared, 0, 0, torch.randn(KV_HEADS, n_keys, HEAD_DIM, generator=g),
                torch.randn(KV_HEADS, n_keys, HEAD_DIM, generator=g))
    cache.commit(shared, [0] * n_keys)
    plan = plan_pass([WorkerStep([0] * n_new, [shared, own])], cache, SCALE, torch.float32, 10_000)
    query = torch.randn(1, KV_HEADS * GROUPS, n_new, HEAD_DIM, generator=g)
    key = torch.randn(1, KV_HEADS, n_new, HEAD_DIM, generator=g)
    value = torch.randn(1, KV_HEADS, n_new, HEAD_DIM, generator=g)
    cache.write(own, 0, 0, key[0], value[0])
    return plan, query, key, value


def test_spec_window_of_one_sees_only_the_token_itself():
    plan, query, key, value = one_row(9, 3)
    out = attend(ReferenceBackend, plan, query, key, 0, sliding_window=1)  # [1, T, Hq, D]
    expected = value[0].repeat_interleave(GROUPS, 0).transpose(0, 1)  # each query's own value
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_spec_window_covering_the_view_changes_nothing_and_a_shorter_one_does():
    plan, query, key, _ = one_row(9, 3)
    full = attend(ReferenceBackend, plan, query, key, 0)
    assert torch.equal(attend(ReferenceBackend, plan, query, key, 0, sliding_window=12), full)
    assert (attend(ReferenceBackend, plan, query, key, 0, sliding_window=11) - full).abs().max() > 1e-4


def test_spec_window_is_the_last_w_view_positions():
    """Window W equals full attention over a view that holds only the last W - 1 keys before the token."""
    plan, query, key, value = one_row(9, 1)
    windowed = attend(ReferenceBackend, plan, query, key, 0, sliding_window=4)
    cache, (shared, own) = plan.cache, [e.block for e in plan.rows[0].entries]
    short = cache.new_block("short")
    k, v = cache.read(shared, 0, 9)
    cache.reserve(short, 3)
    cache.write(short, 0, 0, rotate_by(k[:, 6:], cache.inv_freq, -6), v[:, 6:])  # keys 6..8, moved to 0..2
    cache.commit(short, [0] * 3)
    cache.truncate(own, 0)
    plan2 = plan_pass([WorkerStep([0], [short, own])], cache, SCALE, torch.float32, 10_000)
    cache.write(own, 0, 0, key[0], value[0])
    assert torch.allclose(windowed, attend(ReferenceBackend, plan2, query, key, 0), atol=1e-6)


def test_spec_sinks_take_mass_from_the_denominator():
    plan, query, key, _ = one_row(9, 2)
    full = attend(ReferenceBackend, plan, query, key, 0)
    heads = KV_HEADS * GROUPS
    low = attend(ReferenceBackend, plan, query, key, 0, s_aux=torch.full((heads,), -1e4))
    assert torch.allclose(low, full, atol=1e-6)  # a sink that never wins changes nothing
    high = attend(ReferenceBackend, plan, query, key, 0, s_aux=torch.full((heads,), 1e4))
    assert high.abs().max() < 1e-6  # a sink that always wins takes all the mass, and has no value
    mid = attend(ReferenceBackend, plan, query, key, 0, s_aux=torch.zeros(heads))
    assert (mid.norm(dim=-1) < full.norm(dim=-1)).all()  # some mass goes to the sink: outputs shrink


@pytest.mark.parametrize("tables", ["per layer", "per layer partial"])
def test_move_prefix_rotates_each_layer_with_its_own_table(tables):
    table = TABLES[tables]
    cache = SharedCache(2, KV_HEADS, HEAD_DIM, table, capacity_tokens=256, page_size=4)
    assert cache.layer_rope == [0, 1] and len(cache.rope_tables) == 2
    history, step = cache.new_block("history"), cache.new_block("step")
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, KV_HEADS, 11, HEAD_DIM, generator=g)
    for block, n in ((history, 5), (step, 6)):
        cache.reserve(block, n)
        for layer in range(2):
            part = keys[layer, :, :5] if block is history else keys[layer, :, 5:]
            cache.write(block, layer, 0, part, part)
        cache.commit(block, [0] * n)
    cache.move_prefix(history, step, 4)  # 4 of the step's 6 tokens move; 2 stay, shifted to 0..1
    for layer in range(2):
        k, _ = cache.read(history, layer, 9)
        expected = rotate_by(keys[layer, :, 5:9], table[layer], 5)
        assert torch.allclose(k[:, 5:], expected, atol=1e-5)
        assert torch.equal(k[:, :5], keys[layer, :, :5])
        kept, _ = cache.read(step, layer, 2)
        assert torch.allclose(kept, rotate_by(keys[layer, :, 9:], table[layer], -4), atol=1e-5)
    if "partial" in tables:  # the dims past the rotary part never change
        assert torch.equal(cache.read(history, 1, 9)[0][..., 48:], keys[1, :, :9, 48:])


@settings(max_examples=24, deadline=None)
@given(
    seed=st.integers(0, 10_000), workers=st.integers(1, 4), window=st.sampled_from([None, 1, 2, 5, 17, 64]),
    sinks=st.booleans(), softcap=st.sampled_from([None, 2.0]), tables=st.sampled_from(list(TABLES)),
    layer=st.integers(0, 1), layout=st.sampled_from([(16, 16), (16, 64)]),
)
def test_triton_equals_reference_with_windows_sinks_softcap_and_tables(seed, workers, window, sinks, softcap, tables,
                                                                       layer, layout, device):
    """The triton kernels (Triton's interpreter on the CPU) with each layer's extras equal the spec:
    16-key chunks put windows across chunk boundaries (whole chunks hidden from every query of an item)."""
    from hogwild.layers.triton_attention import DeviceMeta, build_meta, triton_attention

    chunk, block_m = layout
    plan, query, key, news = random_pass(seed, workers, torch.float32, 20, device, TABLES[tables])
    cache = plan.cache
    options = dict(sliding_window=window, softcap=softcap)
    if sinks:
        options["s_aux"] = torch.randn(KV_HEADS * GROUPS, generator=torch.Generator().manual_seed(seed)).to(device) * 2
    host = build_meta(plan.rows, plan.T, GROUPS, cache.page_size, cache.host_rope_tables, chunk, block_m,
                      cache.head_dim)
    meta = DeviceMeta.from_host(host, KV_HEADS * GROUPS, device)
    out = triton_attention(query, cache.keys[layer], cache.values[layer], meta, SCALE, window=window,
                           sinks=options.get("s_aux"), softcap=softcap, table=cache.layer_rope[layer])
    ref = attend(ReferenceBackend, plan, query, key, layer, **options)
    for i, n in enumerate(news):
        a, b = out[i, :n], ref[i, :n]
        assert float((a - b).norm() / b.norm()) < 1e-5, (i, float((a - b).norm() / b.norm()))
        assert not out[i, n:].any()  # padding tokens: zeros
    assert torch.isfinite(out).all()

"""The fused Triton backend equals ``reference_attention``; on the CPU it runs in Triton's interpreter."""

import os

if os.environ.get("HOGWILD_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hogwild.cache import SharedCache  # noqa: E402
from hogwild.engine.runner import WorkerStep, plan_pass  # noqa: E402
from hogwild.layers.reference_attention import ReferenceBackend, reference_attention  # noqa: E402
from hogwild.layers.tiles import CANDIDATES, DeviceLimits, attention_tiles, shared_bytes  # noqa: E402
from hogwild.layers.triton_attention import DeviceMeta, build_meta, triton_attention  # noqa: E402


def inv_freq(head_dim: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def new_cache(kv_heads, head_dim, page_size, dtype, device, tokens=8192):
    return SharedCache(1, kv_heads, head_dim, inv_freq(head_dim), dtype=dtype, device=device, capacity_tokens=tokens,
                       page_size=page_size, initial_capacity=page_size)


def random_pass(seed, workers, sessions, kv_heads, groups, head_dim, max_new, page_size, dtype, device, cache=None):
    """Sessions of workers over shared blocks grown in interleaved appends (scattered pages).

    A view holds some of its session's shared blocks (repeats and empty blocks allowed), maybe
    the other workers' blocks, then its own block. Returns the plan, the query and the layer's
    K/V writes done as the model's cache update would do them (in ``cache``, or a new one).
    """
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):  # lo..hi inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    if cache is None:
        cache = new_cache(kv_heads, head_dim, page_size, dtype, device)

    def append(block, n):
        cache.reserve(block, block.length + n)
        k = torch.randn(kv_heads, n, head_dim, generator=g).to(device, dtype)
        v = torch.randn(kv_heads, n, head_dim, generator=g).to(device, dtype)
        cache.write(block, 0, block.length, k, v)
        cache.commit(block, [0] * n)

    steps = []
    for s in range(sessions):
        shared = [cache.new_block(f"s{s}shared{i}") for i in range(randint(1, 3))]
        owns = [cache.new_block(f"s{s}own{w}") for w in range(max(1, workers // sessions))]
        targets = {b: randint(0, 70) for b in shared} | {b: randint(0, 12) for b in owns}
        while any(b.length < n for b, n in targets.items()):  # interleaved growth: pages mix
            for b, n in targets.items():
                if b.length < n:
                    append(b, min(n - b.length, randint(1, 9)))
        for own in owns:
            picks = [shared[randint(0, len(shared) - 1)] for _ in range(randint(0, 4))]
            others = [b for b in owns if b is not own and randint(0, 1)]
            steps.append(WorkerStep([0] * randint(1, max_new), picks + others + [own]))
    plan = plan_pass(steps, cache, head_dim**-0.5, dtype, 100000, backend=ReferenceBackend())
    B, T = len(steps), plan.T
    query = torch.randn(B, kv_heads * groups, T, head_dim, generator=g).to(device, dtype)
    key = torch.randn(B, kv_heads, T, head_dim, generator=g).to(device, dtype)
    for i, row in enumerate(plan.rows):
        cache.write(row.write, 0, row.start, key[i, :, : row.n_new], key[i, :, : row.n_new] * 0.5)
    return plan, query, key


def check(plan, query, key, out, tolerance):
    scaling = query.shape[-1] ** -0.5
    ref = reference_attention(plan, 0, query, key, scaling)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    for i, row in enumerate(plan.rows):
        a, b = out[i, : row.n_new].float(), ref[i, : row.n_new].float()
        assert float((a - b).norm() / b.norm()) < tolerance, (i, float((a - b).norm() / b.norm()))
        assert not out[i, row.n_new :].any()  # padding tokens: zeros


def run(plan, query, groups, page_size, chunk, block_m=64, meta=None):
    host = build_meta(plan.rows, plan.T, groups, page_size, plan.cache.host_inv_freq, chunk, block_m)
    if meta is None:
        meta = DeviceMeta.from_host(host, query.shape[1], query.device)
    else:
        meta.fill(host)
    keys, values = plan.cache.keys[0], plan.cache.values[0]
    return triton_attention(query, keys, values, meta, query.shape[-1] ** -0.5), host


@settings(max_examples=14, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    workers=st.integers(1, 8),
    sessions=st.integers(1, 3),
    groups=st.sampled_from([1, 3, 7]),
    head_dim=st.sampled_from([64, 128]),
    max_new=st.sampled_from([1, 1, 12]),
    layout=st.sampled_from([(4, 16), (4, 40), (32, 256)]),
    block_m=st.sampled_from([16, 64, 128]),
)
def test_triton_equals_reference_fp32(seed, workers, sessions, groups, head_dim, max_new, layout, block_m, device):
    """Small pages and chunks (4 keys, 16 or 40 keys) put every length across their boundaries;
    block_m 16 splits a prefill into many token tiles and the readers of a block into many runs."""
    page_size, chunk = layout
    kv_heads = 1 if groups == 7 else 2
    plan, query, key = random_pass(
        seed, workers, sessions, kv_heads, groups, head_dim, max_new, page_size, torch.float32, device
    )
    out, _ = run(plan, query, groups, page_size, chunk, block_m)
    check(plan, query, key, out, 1e-5)


@pytest.mark.parametrize("tiles", [(32, 2), (16, 2), (16, 1)])
def test_tiles_sized_for_a_small_device_equal_reference(tiles, device):
    """A simulated device with just the shared memory of smaller tiles (``tiles.attention_tiles``) gets
    them, and the same attention; one with too little for any tile gets a clear error, not a launch."""
    shared = shared_bytes(4, 64, 64, 64, *tiles, 86)
    chosen = attention_tiles(DeviceLimits("small", 86, shared, True), torch.float32, 64, 3)
    assert (chosen.block_n, chosen.stages) == tiles
    plan, query, key = random_pass(11, 4, 2, 2, 3, 64, 9, 4, torch.float32, device)
    host = build_meta(plan.rows, plan.T, 3, 4, plan.cache.host_inv_freq, 256, 64)
    meta = DeviceMeta.from_host(host, query.shape[1], query.device)
    keys, values = plan.cache.keys[0], plan.cache.values[0]
    out = triton_attention(query, keys, values, meta, 64**-0.5, limits=DeviceLimits("small", 86, shared, True))
    check(plan, query, key, out, 1e-5)
    if tiles == CANDIDATES[-1]:
        with pytest.raises(ValueError, match=f"more than the {shared - 1} B of small"):
            triton_attention(query, keys, values, meta, 64**-0.5, limits=DeviceLimits("small", 86, shared - 1, True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype, device):
    plan, query, key = random_pass(5, 4, 2, 2, 3, 64, 5, 4, dtype, device)
    out, _ = run(plan, query, 3, 4, 16)
    assert out.dtype == dtype
    check(plan, query, key, out, 2e-2)


def test_fill_reuses_capacity_buffers(device):
    """Passes of different shapes through one set of capacity-sized buffers equal fresh buffers."""
    meta = DeviceMeta.allocate(rows=8, items=32, pairs=48, pcs=64, pages=48, T=8, q_heads=6, groups=3,
                               head_dim=64, page_size=4, device=device, chunk=16)
    shapes = [(2, 1, 1), (8, 2, 1), (6, 1, 8), (1, 1, 1)]  # fewer rows, then more items, then fewer
    counts = []
    for seed, (workers, sessions, max_new) in enumerate(shapes):
        plan, query, key = random_pass(seed, workers, sessions, 2, 3, 64, max_new, 4, torch.float32, device)
        fresh, host = run(plan, query, 3, 4, 16)
        reused, _ = run(plan, query, 3, 4, 16, meta=meta)
        counts.append(len(host.items))
        torch.testing.assert_close(reused, fresh, rtol=1e-6, atol=1e-6)
        check(plan, query, key, reused, 1e-5)
    assert counts[1] > counts[0] and counts[3] < counts[2]
    big, query, _ = random_pass(0, 12, 1, 2, 3, 64, 1, 4, torch.float32, device)
    with pytest.raises(ValueError, match="rows 12 > 8"):
        run(big, query, 3, 4, 16, meta=meta)


def test_shared_block_read_once_per_chunk(device):
    """k rows reading one long block: one work item per chunk (not k), and the right result."""
    head_dim, groups, page_size, chunk = 64, 7, 4, 16
    cache = new_cache(1, head_dim, page_size, torch.float32, device, 1024)
    g = torch.Generator().manual_seed(0)
    prompt = cache.new_block("prompt", 100)
    kv = torch.randn(2, 1, 100, head_dim, generator=g).to(device)
    cache.write(prompt, 0, 0, kv[0], kv[1])
    cache.commit(prompt, [0] * 100)
    k = 8
    steps = [WorkerStep([0], [prompt, cache.new_block(f"own{w}")]) for w in range(k)]
    plan = plan_pass(steps, cache, 1.0, torch.float32, 1000, backend=ReferenceBackend())
    query = torch.randn(k, groups, 1, head_dim, generator=g).to(device)
    key = torch.randn(k, 1, 1, head_dim, generator=g).to(device)
    for i, row in enumerate(plan.rows):
        cache.write(row.write, 0, row.start, key[i], key[i] * 0.5)
    out, host = run(plan, query, groups, page_size, chunk)
    prompt_items = host.items[host.items[:, 1] == k]  # items over the 8 readers of the prompt
    assert len(prompt_items) == -(-100 // chunk) == len(host.items) - k  # plus one per own block
    assert sorted(prompt_items[:, 6].tolist()) == list(range(-(-100 // chunk)))
    assert len(host.pages) == 25 + k  # the prompt's pages once
    check(plan, query, key, out, 1e-5)


def test_cuda_graph_replays_refilled_passes(device):
    """One captured launch pair replays passes of different shapes refilled into the same buffers.

    On the CPU (no CUDA graphs) the same launch, with the same buffers and query tensor, runs again
    after each refill: what a replay does, minus the capture."""
    cache = new_cache(2, 64, 4, torch.float32, device, 16384)
    meta = DeviceMeta.allocate(rows=8, items=64, pairs=64, pcs=128, pages=cache.num_pages, T=1, q_heads=6, groups=3,
                               head_dim=64, page_size=4, device=device, chunk=16)
    passes = [random_pass(seed, w, s, 2, 3, 64, 1, 4, torch.float32, device, cache)
              for seed, (w, s) in enumerate([(8, 2), (2, 1), (5, 3), (1, 1)])]
    query = torch.zeros(8, 6, 1, 64, device=device)
    keys, values = cache.keys[0], cache.values[0]
    meta.fill(build_meta(passes[0][0].rows, 1, 3, 4, cache.host_inv_freq, 16))
    out = triton_attention(query, keys, values, meta, 0.125)  # compile before capturing
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = triton_attention(query, keys, values, meta, 0.125)
    for plan, q, key in passes:
        meta.fill(build_meta(plan.rows, 1, 3, 4, cache.host_inv_freq, 16))
        query.zero_()
        query[: len(q)] = q
        if device.type == "cuda":
            graph.replay()
        else:
            out = triton_attention(query, keys, values, meta, 0.125)
        check(plan, q, key, out[: len(q)], 1e-5)
        assert not out[len(q) :].any()  # rows past the pass: zeros

"""The device-limit decisions (``hogwild/layers/tiles.py``) on simulated devices: tiles that fit every
listed architecture, the dtype default and refusal, the triton backend's fallback and refusal."""

import logging
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild.errors import InputError
from hogwild.layers.tiles import (
    ARCH_LIMITS,
    CANDIDATES,
    FAMILY_SHAPES,
    DeviceLimits,
    attention_tiles,
    block_m,
    fast_path,
    model_dtype,
    shared_bytes,
    triton_refusal,
)

T4 = DeviceLimits.of(SimpleNamespace(name="Tesla T4", major=7, minor=5, shared_memory_per_block_optin=65536))
RTX4090 = DeviceLimits.of(SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9,
                                          shared_memory_per_block_optin=101376))
LISTED = [DeviceLimits.for_arch(arch) for arch in ARCH_LIMITS]


def test_limits_from_device_properties():
    assert (T4.arch, T4.shared_memory, T4.bf16) == (75, 65536, False)
    assert T4.dtypes() == (torch.float16, torch.float32)
    assert (RTX4090.arch, RTX4090.bf16, RTX4090.dtypes()[0]) == (89, True, torch.bfloat16)
    assert DeviceLimits.for_arch(80).shared_memory == 166912 and DeviceLimits.for_arch(90).shared_memory == 232448
    with pytest.raises(ValueError, match="sm_70"):
        DeviceLimits.for_arch(70)


@pytest.mark.parametrize("limits", LISTED, ids=lambda limits: f"sm_{limits.arch}")
def test_every_family_fits_every_listed_architecture(limits):
    """Every family in every dtype the architecture runs gets tiles within its limit, except Gemma 3's
    head_dim 256 on a 64 KB T4 and in float32 on 99 KB devices (the torch backend runs it there); the
    tiles of before (64 keys, 2 stages; 32 keys for fp32 at head_dim 256) stay on H100/H200/B200 and
    for 16-bit dtypes on sm_80 and newer (but head_dim 256 on 99 KB devices: 32 keys)."""
    for dtype in limits.dtypes():
        for name, (hq, hkv, head_dim, rotary) in FAMILY_SHAPES.items():
            tiles = attention_tiles(limits, dtype, head_dim, hq // hkv, rotary)
            if head_dim == 256 and (limits.arch == 75 or (dtype == torch.float32 and limits.shared_memory < 100 << 10)):
                assert tiles is None and "more than the" in triton_refusal(limits, dtype, head_dim, hq // hkv)
                continue
            assert tiles is not None and tiles.shared <= limits.shared_memory, (name, dtype)
            if limits.shared_memory > 200 << 10:
                assert (tiles.block_n, tiles.stages) == (32 if dtype == torch.float32 and head_dim == 256 else 64, 2)
            if head_dim == 64 and limits.shared_memory >= 99 << 10:
                assert (tiles.block_n, tiles.stages) == (64, 2), (name, dtype)
            if dtype != torch.float32 and limits.arch >= 80 and (head_dim < 256 or limits.shared_memory > 160 << 10):
                assert (tiles.block_n, tiles.stages) == (64, 2), (name, dtype)  # 16-bit on sm_80+: as before


@settings(max_examples=200, deadline=None)
@given(
    limits=st.sampled_from(LISTED + [T4, DeviceLimits("small", 86, 24 << 10, True)]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    head_dim=st.sampled_from([32, 64, 80, 96, 128, 160, 192, 256]),
    rotary_part=st.sampled_from([1.0, 0.75, 0.5, 0.25]),
    groups=st.integers(1, 16),
)
def test_tiles_fit_or_refuse(limits, dtype, head_dim, rotary_part, groups):
    """Over head sizes, partial rotary and group sizes: the tiles fit the limit and are the first
    candidate that does; no tiles only when even the smallest candidate does not fit."""
    rotary = 2 * max(1, int(head_dim * rotary_part) // 2)
    tiles = attention_tiles(limits, dtype, head_dim, groups, rotary)
    element = torch.empty(0, dtype=dtype).element_size()
    rows = block_m(groups)
    fits = [c for c in CANDIDATES
            if shared_bytes(element, head_dim, rotary, rows, *c, limits.arch) <= limits.shared_memory]
    if tiles is None:
        assert not fits
        assert triton_refusal(limits, dtype, head_dim, groups, rotary) is not None
        return
    assert (tiles.block_n, tiles.stages) == fits[0] and tiles.shared <= limits.shared_memory
    assert tiles.block_m == block_m(groups) >= groups and tiles.block_m & (tiles.block_m - 1) == 0
    bigger = DeviceLimits("bigger", limits.arch, 2 * limits.shared_memory, limits.bf16)
    more = attention_tiles(bigger, dtype, head_dim, groups, rotary)
    assert CANDIDATES.index((more.block_n, more.stages)) <= CANDIDATES.index((tiles.block_n, tiles.stages))


def test_no_limit_and_short_chunks():
    assert attention_tiles(None, torch.float32, 256, 4).block_n == 64  # the interpreter: no limit
    assert attention_tiles(None, torch.float16, 64, 1, chunk=16).block_n == 16  # no longer than a chunk


def test_dtype_default_and_refusal():
    assert model_dtype(None, None) == torch.float32 and model_dtype("auto", None) == torch.float32  # the CPU
    assert model_dtype("auto", T4) == torch.float16 and model_dtype(None, RTX4090) == torch.bfloat16
    assert model_dtype("float32", T4) == torch.float32 and model_dtype(torch.float16, T4) == torch.float16
    for asked in ("bfloat16", torch.bfloat16):
        with pytest.raises(InputError) as refused:
            model_dtype(asked, T4)
        message = str(refused.value)
        assert "Tesla T4" in message and "sm_75" in message and "--dtype float16" in message and "\n" not in message
    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        model_dtype("float8", RTX4090)


def test_bfloat16_refused_before_any_weight_loads(monkeypatch):
    """load_model asks the device first: on a T4, bfloat16 is refused before the config or weights."""
    from hogwild.models import loading

    monkeypatch.setattr(loading, "device_limits", lambda device: T4)
    monkeypatch.setattr(loading, "resolve", lambda name: pytest.fail("the model was looked up"))
    with pytest.raises(InputError, match="Tesla T4 .* has no bfloat16 support; use --dtype float16"):
        loading.load_model("some/model", device="cuda", dtype=torch.bfloat16)


def test_fast_path_falls_back_or_refuses(caplog):
    """auto runs the torch backend with one logged line where the kernel cannot run; triton refuses."""
    small = DeviceLimits("NVIDIA Tiny", 86, 16 << 10, True)
    assert fast_path("auto", RTX4090, torch.bfloat16, 256, 4) == "triton"
    assert fast_path("triton", None, torch.float32, 256, 4) == "triton"  # the interpreter
    cases = [(small, torch.bfloat16, "needs"), (T4, torch.bfloat16, "has no bfloat16"),
             (T4, torch.float16, "more than the 65536 B"),
             (DeviceLimits("Tesla V100", 70, 98304, False), torch.float16, "compute capability 7.5")]
    for limits, dtype, why in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hogwild.layers.tiles"):
            assert fast_path("auto", limits, dtype, 256, 4) == "torch"
        assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()
        assert limits.name in caplog.records[0].getMessage()
        with pytest.raises(InputError, match=f"--attention triton cannot run here: .*{why}.*; use --attention torch"):
            fast_path("triton", limits, dtype, 256, 4)

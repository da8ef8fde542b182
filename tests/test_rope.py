"""Query rotation by an offset equals recomputing RoPE at the target position."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hogwild.rope import RotationRows, apply_rotation, rotate_by, rotation

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
    "yarn": {
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768,
    },
}


def rotary(rope_type: str, head_dim: int) -> LlamaRotaryEmbedding:
    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=131072, rope_parameters=ROPE_PARAMETERS[rope_type],
    )
    return LlamaRotaryEmbedding(config)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_delta_rotation_equals_rope_at_target(rope_type, head_dim):
    emb = rotary(rope_type, head_dim)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, head_dim, generator=generator)  # [heads, tokens, D]
    local = torch.arange(5)  # the model rotates new tokens at block-local positions
    cos, sin = emb(x, local[None])
    rotated_locally = apply_rotation(x, cos[0], sin[0])  # fp32, attention factor included, like the model
    for delta in [0, 1, 17, 511, 4096, 8193, 20000]:
        ours = rotate_by(rotated_locally, emb.inv_freq, delta)
        # Ground truth: RoPE recomputed at the target position, angles in float64.
        cos64, sin64 = rotation(emb.inv_freq, local + delta, torch.float64)
        truth = emb.attention_scaling * apply_rotation(x.double(), cos64, sin64)
        assert relative_error(ours.double(), truth) < 1e-5, (rope_type, head_dim, delta)


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_model_rotation_matches_ours(rope_type):
    """Our float64 angles agree with transformers' own cos/sin where fp32 is still exact enough."""
    emb = rotary(rope_type, 64)
    positions = torch.arange(0, 64)
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), positions[None])
    ours_cos, ours_sin = rotation(emb.inv_freq, positions, torch.float32)
    assert torch.allclose(cos[0], ours_cos * emb.attention_scaling, atol=2e-5)  # fp32 angles: ulp(63) ~ 4e-6
    assert torch.allclose(sin[0], ours_sin * emb.attention_scaling, atol=2e-5)  # fp32 angles: ulp(63) ~ 4e-6


def test_rotations_compose():
    inv_freq = rotary("default", 64).inv_freq
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    assert torch.allclose(rotate_by(rotate_by(x, inv_freq, 300), inv_freq, -120), rotate_by(x, inv_freq, 180))


def test_rotation_rows_are_float64_angles_kept_per_delta():
    """The triton backend's per-pair cos/sin: float64 angles cast once, per table, kept per delta."""
    import numpy as np

    tables = [1.0 / (base ** (torch.arange(0, 64, 2).double() / 64)) for base in (1e4, 1e6)]
    rows = RotationRows(tables, keep=4)
    deltas = np.array([8191, -3, 0, 8191, 32767])
    got = rows(deltas)  # [tables, n, 2, R/2]
    angles = torch.tensor(deltas, dtype=torch.float64)[None, :, None] * torch.stack(tables)[:, None, :]
    want = torch.stack([angles.cos(), angles.sin()], 2).float()
    assert got.shape == (2, 5, 2, 32) and got.dtype == np.float32
    assert torch.equal(torch.from_numpy(got), want)
    assert len(rows._rows) == 4  # one entry per distinct delta
    fresh = RotationRows(tables)(np.array([5, 6]))
    assert np.array_equal(rows(np.array([5, 6])), fresh)
    assert len(rows._rows) == 2  # past ``keep``: the kept rows start over
    assert rows(np.array([], dtype=np.int64)).shape == (2, 0, 2, 32)

"""RoPE as pure rotations, so that rotations compose: R(a) R(b) = R(a + b).

Keys are stored rotated at block-local positions; a query is rotated further by the offset
between its own block and the block it reads (``delta``). All angles are computed in float64
(an fp32 angle at position 8192 is off by ~1e-3 rad) and the cos/sin are cast to the data type.
YaRN's attention factor is a scale, not a rotation: it is applied once by the model and never here.

Partial rotary (``partial_rotary_factor`` < 1, e.g. Phi-4-mini): inv_freq has R/2 < D/2 entries and
only the first R dims of a head rotate ("rotate half" within them, as transformers' Phi3 does); the
other D - R dims pass through unchanged. The rotary width is always ``2 * len(inv_freq)``.
"""

from __future__ import annotations

import numpy as np
import torch

#: RoPE types whose inv_freq does not depend on the current sequence length, so rotations compose.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The "rotate half" pairing used by Llama, Mistral and Qwen: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotation(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotating by ``positions``.

    inv_freq: [D/2] (any float type); positions: [...] integer positions (may be negative).
    Returns cos, sin: [..., D] in ``dtype``, on inv_freq's device.
    """
    angles = positions.to(inv_freq.device, torch.float64)[..., None] * inv_freq.to(torch.float64)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., D] by the angles behind cos, sin ([..., R], broadcastable; R < D: partial rotary,
    the first R dims rotate and the rest pass through)."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        rot, rest = x[..., :R], x[..., R:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
    return x * cos + rotate_half(x) * sin


def rotate_by(x: torch.Tensor, inv_freq: torch.Tensor, delta: int) -> torch.Tensor:
    """Rotate every vector of x [..., D] by the same position offset ``delta`` (first 2 * len(inv_freq) dims)."""
    cos, sin = rotation(inv_freq.to(x.device), torch.tensor(delta, device=x.device), x.dtype)
    return apply_rotation(x, cos, sin)


class RotationRows:
    """cos and sin of ``delta * inv_freq`` per RoPE table, for the triton backend's pass metadata.

    tables: float64 [tables, R/2] (one row per distinct RoPE table). Each delta's rows are computed
    once from float64 angles and kept (decode passes read the same deltas pass after pass; at most
    ``keep`` are kept), so a pass pays a dictionary lookup per (row, view entry) pair.
    """

    def __init__(self, inv_freq, keep: int = 1 << 14):
        """inv_freq: [R/2] or [tables, R/2] (tensor or array), or a list of [R/2] tables."""
        if isinstance(inv_freq, (list, tuple)):
            inv_freq = np.stack([np.asarray(x, dtype=np.float64) for x in inv_freq])
        tables = np.asarray(inv_freq, dtype=np.float64)
        self.tables = tables[None] if tables.ndim == 1 else tables
        self.keep = keep
        self._rows: dict[int, np.ndarray] = {}

    def __call__(self, deltas: np.ndarray) -> np.ndarray:
        """deltas: int [n] -> float32 [tables, n, 2, R/2] (cos, sin)."""
        deltas = deltas.tolist()
        rows = self._rows
        missing = sorted({d for d in deltas if d not in rows})
        if missing:
            if len(rows) + len(missing) > self.keep:
                rows.clear()
            angles = np.array(missing, dtype=np.float64)[:, None, None] * self.tables[None]  # [m, tables, R/2]
            fresh = np.stack([np.cos(angles), np.sin(angles)], 2).astype(np.float32)  # [m, tables, 2, R/2]
            rows.update(zip(missing, fresh, strict=True))
        if not deltas:
            return np.zeros((len(self.tables), 0, 2, self.tables.shape[-1]), dtype=np.float32)
        return np.stack([rows[d] for d in deltas], 1)

"""Fused elementwise Triton kernels for the lean decoder (``hogwild/layers/lean.py``).

A transformers decoder layer runs about 40 small kernels per token batch (RMSNorm alone is seven:
cast, square, mean, add, rsqrt, multiply, cast, weight); replayed from a CUDA graph each still
costs a few microseconds, which at 28 layers is milliseconds per decode step. These kernels do the
same math in one launch each:

- ``rms_norm``: RMSNorm of rows, optionally after adding the residual stream (the residual add of
  the previous sub-layer, written back in place);
- ``rope_store``: RoPE on the new queries and keys at their positions (partial rotary: the first R
  dims), and the keys and values written into the paged K/V pool through the pass's slot mapping
  (the cache write);
- ``silu_mul``: the gated MLP's ``silu(gate) * up`` (also over the two halves of a fused gate/up
  projection).

Each rounds to the model's dtype where transformers' eager modules do (after the residual add,
after normalising and before the weight, after each RoPE product, after SiLU), so bf16 results
match the modules' up to the order of a reduction. Arithmetic is float32; on CPU tensors
(Triton's interpreter) the roundings are skipped for bf16, which the interpreter does not compute
(tests run float32 and float16 there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _tile_elements(x: torch.Tensor) -> int:
    """Elements one program handles at most: a few thousand on a GPU (enough programs for small
    batches), many more in Triton's interpreter, whose cost is per program."""
    return 1 << 16 if x.device.type == "cpu" else 4096


def _rounds(x: torch.Tensor) -> bool:
    """Round intermediates to x's dtype? Not for float32 (a no-op) nor bf16 in the interpreter."""
    return x.dtype != torch.float32 and not (x.device.type == "cpu" and x.dtype == torch.bfloat16)


@triton.jit
def _round(x, dtype: tl.constexpr, ROUND: tl.constexpr):
    """x (float32) rounded to ``dtype`` and back, as a torch op in that dtype would leave it."""
    if ROUND:
        x = x.to(dtype).to(tl.float32)
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, n_rows, n_cols, eps, stride_x, stride_res, stride_out,
    RESIDUAL: tl.constexpr, ROUND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """ROWS rows: (residual += x; x = residual); out = w * round(x * rsqrt(mean(x^2) + eps))."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(res_ptr + rows * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, res_ptr.dtype.element_ty, ROUND)
        tl.store(res_ptr + rows * stride_res + cols, x.to(res_ptr.dtype.element_ty), mask=mask)
    variance = tl.sum(x * x, axis=1)[:, None] / n_cols
    y = _round(x / tl.sqrt(variance + eps), out_ptr.dtype.element_ty, ROUND)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm as Llama, Mistral and Qwen2/3 compute it (``weight * norm(x).to(dtype)``).

    x: [rows, n] (last dim contiguous); weight: [n]; residual: [rows, n] contiguous, or None. With a
    residual, ``residual += x`` first (in place: the residual stream after this sub-layer) and the
    sum is normalised. Returns [rows, n] in x's dtype.
    """
    n_rows, n = x.shape
    if x.stride(-1) != 1 or (residual is not None and (residual.shape != x.shape or not residual.is_contiguous())):
        raise ValueError("rms_norm needs a row-major x and a contiguous residual of the same shape")
    out = torch.empty_like(x)
    res = x if residual is None else residual  # not read without RESIDUAL
    block = triton.next_power_of_2(n)
    rows = max(1, min(triton.next_power_of_2(n_rows), _tile_elements(x) // block))
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, res, weight, out, n_rows, n, eps, x.stride(0), res.stride(0), out.stride(0),
        RESIDUAL=residual is not None, ROUND=_rounds(x), ROWS=rows, BLOCK=block,
    )
    return out


@triton.jit
def _rotate(x_ptr, c1, c2, s1, s2, dtype: tl.constexpr, ROUND: tl.constexpr, HALF: tl.constexpr, mask):
    """One head's rotated halves for a tile of tokens: transformers' ``x * cos + rotate_half(x) * sin``
    with each product and the sum rounded to ``dtype``. x_ptr: [tokens, HALF_P] pointers to the
    first half."""
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = _round(_round(x1 * c1, dtype, ROUND) - _round(x2 * s1, dtype, ROUND), dtype, ROUND)
    y2 = _round(_round(x2 * c2, dtype, ROUND) + _round(x1 * s2, dtype, ROUND), dtype, ROUND)
    return y1, y2


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_pool_ptr, v_pool_ptr, n_tokens,
    stride_q, stride_k, stride_v, stride_cos, stride_kp_h, stride_kp_s, stride_vp_h, stride_vp_s,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    PARTIAL: tl.constexpr, REST_P: tl.constexpr, TOKENS: tl.constexpr, ROUND: tl.constexpr,
):
    """One head (query heads first, then K/V heads) x TOKENS tokens: rotate the query head into
    q_out, or rotate the key head into the pool at each token's slot and copy the value head there.
    The first 2 * HALF dims rotate; with PARTIAL the rest (REST_P >= HEAD_DIM - 2 * HALF of them,
    padded) pass through."""
    h = tl.program_id(0)
    t = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)[:, None]
    d = tl.arange(0, HALF_P)[None, :]
    mask = (t < n_tokens) & (d < HALF)
    rest = 2 * HALF + tl.arange(0, REST_P)[None, :]  # pass-through dims
    rest_mask = (t < n_tokens) & (rest < HEAD_DIM)
    trig = t * stride_cos + d
    c1 = tl.load(cos_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    if h < Q_HEADS:  # (each branch names its own values: nothing needs merging after the if)
        q_dtype = q_out_ptr.dtype.element_ty
        q_src = q_ptr + t * stride_q + h * HEAD_DIM
        q1, q2 = _rotate(q_src + d, c1, c2, s1, s2, q_dtype, ROUND, HALF, mask)
        q_dst = q_out_ptr + (t * Q_HEADS + h) * HEAD_DIM
        tl.store(q_dst + d, q1.to(q_dtype), mask=mask)
        tl.store(q_dst + HALF + d, q2.to(q_dtype), mask=mask)
        if PARTIAL:
            tl.store(q_dst + rest, tl.load(q_src + rest, mask=rest_mask, other=0.0).to(q_dtype), mask=rest_mask)
    else:
        g = (h - Q_HEADS).to(tl.int64)  # g * stride of a large pool may pass 2**31
        kv_dtype = k_pool_ptr.dtype.element_ty
        k_src = k_ptr + t * stride_k + g * HEAD_DIM
        k1, k2 = _rotate(k_src + d, c1, c2, s1, s2, kv_dtype, ROUND, HALF, mask)
        slot = tl.load(slot_ptr + t, mask=t < n_tokens, other=0)
        k_dst = k_pool_ptr + g * stride_kp_h + slot * stride_kp_s
        tl.store(k_dst + d, k1.to(kv_dtype), mask=mask)
        tl.store(k_dst + HALF + d, k2.to(kv_dtype), mask=mask)
        if PARTIAL:
            tl.store(k_dst + rest, tl.load(k_src + rest, mask=rest_mask, other=0.0).to(kv_dtype), mask=rest_mask)
        e = tl.arange(0, D_P)[None, :]
        v_mask = (t < n_tokens) & (e < HEAD_DIM)
        v_src = v_ptr + t * stride_v + g * HEAD_DIM + e
        v_dst = v_pool_ptr + g * stride_vp_h + slot * stride_vp_s + e
        tl.store(v_dst, tl.load(v_src, mask=v_mask, other=0.0).to(kv_dtype), mask=v_mask)


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, pool_keys: torch.Tensor, pool_values: torch.Tensor,
) -> torch.Tensor:
    """RoPE on a pass's new queries and keys, and the cache write, in one launch.

    q: [tokens, q_heads * D]; k, v: [tokens, kv_heads * D] (rows may be strided, each row
    contiguous); cos, sin: [tokens, R] of each token's position (the model's rotary embedding,
    attention scaling included; R = D, or R < D for partial rotary: the last D - R dims pass
    through); slot_mapping: [tokens] long, each token's pool slot; pool_keys, pool_values: one layer
    of the pool, [kv_heads, slots, D]. Writes the rotated keys and the values at their slots;
    returns the rotated queries [tokens, q_heads, D].
    """
    tokens, R = cos.shape
    Hkv, D = pool_keys.shape[0], pool_keys.shape[-1]
    Hq = q.shape[1] // D
    if R % 2 or R > D or k.shape != (tokens, Hkv * D) or v.shape != k.shape or q.shape != (tokens, Hq * D):
        raise ValueError(f"rope_store: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos "
                         f"{tuple(cos.shape)} do not match {tokens} tokens, a pool of {Hkv} K/V heads of head_dim "
                         f"{D}, {R} rotary dims")
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, sin, pool_keys, pool_values)) or sin.stride() != cos.stride():
        raise ValueError("rope_store needs rows with a contiguous last dimension (and cos, sin alike)")
    q_out = torch.empty(tokens, Hq, D, dtype=q.dtype, device=q.device)
    d_p = triton.next_power_of_2(D)
    per_program = max(1, min(triton.next_power_of_2(tokens), _tile_elements(q) // (2 * d_p)))
    _rope_store_kernel[(Hq + Hkv, triton.cdiv(tokens, per_program))](
        q, k, v, cos, sin, slot_mapping, q_out, pool_keys, pool_values, tokens,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        pool_keys.stride(0), pool_keys.stride(1), pool_values.stride(0), pool_values.stride(1),
        Q_HEADS=Hq, HEAD_DIM=D, D_P=d_p, HALF=R // 2, HALF_P=triton.next_power_of_2(R // 2),
        PARTIAL=R < D, REST_P=triton.next_power_of_2(max(1, D - R)), TOKENS=per_program, ROUND=_rounds(q),
    )
    return q_out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, n_cols, stride_gate, stride_up, ROUND: tl.constexpr,
                     BLOCK: tl.constexpr):
    """BLOCK elements of out [rows, n_cols] (contiguous) from gate and up rows (strided)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    row, col = i // n_cols, i % n_cols
    g = tl.load(gate_ptr + row * stride_gate + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + col, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    a = _round(g / (1.0 + tl.exp(-g)), dtype, ROUND)
    tl.store(out_ptr + i, (a * u).to(dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (SiLU rounded to the dtype first, as ``act_fn(gate) * up`` does).

    gate, up: [rows, n] of one shape, each row contiguous (e.g. the two halves of a fused gate/up
    projection). Returns a contiguous [rows, n].
    """
    if gate.shape != up.shape or gate.dim() != 2 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"silu_mul needs gate and up of one [rows, n] shape with contiguous rows, got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    block = min(_tile_elements(gate) // 4, triton.next_power_of_2(n))
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, gate.shape[1], gate.stride(0), up.stride(0),
                                               ROUND=_rounds(gate), BLOCK=block)
    return out

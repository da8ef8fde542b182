"""The lean decoder (hogwild/layers/lean.py: fused per-layer kernels over transformers' weights)
against transformers' own modules, and each fused kernel (hogwild/layers/fused.py) against the
torch ops it replaces. On the CPU the kernels run in Triton's interpreter, in float32 and float16
(the interpreter does not compute bf16); on CUDA in float32 and bf16."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import CONFIGS, PROMPT, TINY, byte_tokenizer, tiny_model
from test_families import tiny_family
from transformers import AutoModelForCausalLM, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as partial_rotary

from hogwild import InputError, Runner, WorkerStep, load_model
from hogwild.layers.fused import rms_norm, rope_store, silu_mul

KERNELS = settings(max_examples=12, deadline=None, database=None)


def half_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float16


def close(have: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to float32 rounding, or one unit in the last place of a 16-bit dtype."""
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    return float((have.float() - want.float()).abs().max()) <= tol * max(1.0, float(want.float().abs().max()))


@pytest.mark.parametrize("half", [False, True])
@KERNELS
@given(rows=st.integers(1, 40), n=st.sampled_from([16, 64, 96, 200]), residual=st.booleans())
def test_rms_norm_equals_the_module(device, half, rows, n, residual):
    dtype = half_dtype(device) if half else torch.float32
    torch.manual_seed(rows * n)
    x = torch.randn(rows, n, device=device).to(dtype)
    res = torch.randn(rows, n, device=device).to(dtype) if residual else None
    module = LlamaRMSNorm(n, eps=1e-6).to(device)
    module.weight.data = torch.randn(n, device=device).to(dtype)
    summed = res + x if residual else x  # the residual add in the dtype, as the decoder layer does it
    with torch.no_grad():
        want = module(summed)
    have = rms_norm(x, module.weight, 1e-6, res)
    assert have.dtype == dtype and close(have, want, dtype)
    if residual:
        assert torch.equal(res, summed)  # the residual stream updated in place


@pytest.mark.parametrize("half", [False, True])
@KERNELS
@given(tokens=st.integers(1, 24), kv_heads=st.integers(1, 3), groups=st.sampled_from([1, 3, 7]),
       head_dim=st.sampled_from([16, 64, 128]), rotary=st.sampled_from([1.0, 0.75, 0.5]))
def test_rope_store_equals_rotation_and_cache_write(device, half, tokens, kv_heads, groups, head_dim, rotary):
    """Full and partial rotary (the first R dims rotate, the rest pass through, as Phi-3 does)."""
    dtype = half_dtype(device) if half else torch.float32
    torch.manual_seed(tokens * head_dim + groups)
    D, R, Hq = head_dim, int(head_dim * rotary) // 2 * 2, kv_heads * groups
    qkv = torch.randn(tokens, (Hq + 2 * kv_heads) * D, device=device).to(dtype)  # strided rows, as a fused qkv
    q, k, v = qkv.split([Hq * D, kv_heads * D, kv_heads * D], dim=1)
    positions = torch.randint(0, 5000, (tokens,), device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, R, 2, device=device).float() / R))
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # [tokens, R]
    slots = torch.randperm(4 * tokens, device=device)[:tokens]
    keys = torch.zeros(kv_heads, 4 * tokens, D, dtype=dtype, device=device)
    values = torch.zeros_like(keys)

    rotated = rope_store(q, k, v, cos, sin, slots, keys, values)

    want_q, want_k = partial_rotary(q.reshape(1, tokens, Hq, D).transpose(1, 2),
                                    k.reshape(1, tokens, kv_heads, D).transpose(1, 2), cos[None], sin[None])
    if R == D:  # the same as Llama's rotation
        torch.testing.assert_close(want_q, apply_rotary_pos_emb(q.reshape(1, tokens, Hq, D).transpose(1, 2),
                                                                want_k, cos[None], sin[None])[0], rtol=0, atol=0)
    if half:  # each product and the sum rounded to the dtype, as transformers' ops do: the same bits
        assert torch.equal(rotated, want_q[0].transpose(0, 1)) and torch.equal(keys[:, slots], want_k[0])
    assert close(rotated, want_q[0].transpose(0, 1), dtype)
    assert close(keys[:, slots], want_k[0], dtype)
    assert torch.equal(values[:, slots], v.reshape(tokens, kv_heads, D).transpose(0, 1))
    others = torch.ones(4 * tokens, dtype=torch.bool, device=device)
    others[slots] = False
    assert not keys[:, others].any() and not values[:, others].any()  # nothing written elsewhere


@pytest.mark.parametrize("half", [False, True])
@KERNELS
@given(shape=st.sampled_from([(1, 7), (3, 128), (5, 1536), (2, 5000)]), fused=st.booleans())
def test_silu_mul_equals_the_mlp_activation(device, half, shape, fused):
    """Separate gate and up, or the strided halves of one fused projection (Phi-3)."""
    dtype = half_dtype(device) if half else torch.float32
    rows, n = shape
    if fused:
        gate, up = torch.randn(rows, 2 * n, device=device).mul(4).to(dtype).chunk(2, dim=-1)
    else:
        gate, up = (torch.randn(shape, device=device).mul(4).to(dtype) for _ in range(2))
    assert close(silu_mul(gate, up), F.silu(gate) * up, dtype)


#: Phi-3 (Phi-4's family: fused q/k/v and gate/up projections), full and partial rotary, no window.
PHI3 = {"phi3": 1.0, "phi3-partial-rotary": 0.5}


def tiny(name: str, folder, device):
    if name not in PHI3:
        return tiny_model(name, folder, device)
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": PHI3[name]}
    config = Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rope)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return load_model(str(folder), device=device)


def lean_and_modules(name: str, folder, device, dtype: torch.dtype) -> dict:
    """A prefill, a pass of rows with 3 and 1 new tokens, and two decode passes on the triton
    backend with and without the lean decoder: every pass's logits, and each block's K/V."""
    loaded = tiny(name, folder, device)
    loaded.model.to(dtype)
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids[:40]
    runs = {}
    for lean in (True, False):
        runner = Runner.for_model(loaded, "triton", kv_memory=16 << 20, lean=lean)
        assert (runner.lean is not None) == lean
        cache = runner.cache
        p, a, b = cache.new_block("prompt", capacity=len(prompt)), cache.new_block("a"), cache.new_block("b")
        logits = [runner.prefill([p], prompt)[None]]
        logits.append(runner.forward([WorkerStep([5, 6, 7], [p, a]), WorkerStep([9], [p, a, b])]).logits)
        for _ in range(2):
            logits.append(runner.forward([WorkerStep([3], [p, b, a]), WorkerStep([4], [p, a, b])]).logits)
        kv = [cache.read(block, layer, block.length) for block in (p, a, b) for layer in range(loaded.num_layers)]
        runs[lean] = logits, kv
    return runs


@pytest.mark.parametrize("name", [*CONFIGS, *PHI3])
def test_lean_decoder_equals_transformers_modules(name, device, tmp_path):
    """Llama (llama3 RoPE), Mistral, Qwen2 (yarn: attention scaling in cos/sin), Qwen3 (q/k norms) and
    Phi-3 (fused projections; full and partial rotary): the same logits and the same K/V in the
    pool, in float32 (CUDA: decode passes as graphs)."""
    runs = lean_and_modules(name, tmp_path, device, torch.float32)
    (lean_logits, lean_kv), (logits, kv) = runs[True], runs[False]
    for have, want in zip(lean_logits, logits, strict=True):
        assert close(have, want, torch.float32)
    for (have_k, have_v), (want_k, want_v) in zip(lean_kv, kv, strict=True):
        assert close(have_k, want_k, torch.float32) and close(have_v, want_v, torch.float32)


def test_lean_decoder_in_half_precision(device, tmp_path):
    """bf16 on CUDA (float16 in the interpreter): the fused kernels round where the modules do, so
    the logits differ only by the order of reductions, and greedy picks the same tokens."""
    dtype = half_dtype(device)
    runs = lean_and_modules("qwen2-yarn", tmp_path, device, dtype)
    for have, want in zip(runs[True][0], runs[False][0], strict=True):
        assert float((have - want).abs().max()) <= 0.02 * float(want.abs().max())
        assert torch.equal(have.argmax(-1), want.argmax(-1))


def test_lean_decoder_where_it_runs(device, tmp_path):
    """Chosen by default on the triton backend for Llama-shaped models; other families keep
    transformers' modules (with the same attention kernels), and asking for it there is refused."""
    llama = tiny_model("llama-llama3", tmp_path / "llama", device)
    assert Runner.for_model(llama, "triton", kv_memory=16 << 20).lean is not None
    assert Runner.for_model(llama, "triton", kv_memory=16 << 20, lean=False).lean is None
    with pytest.raises(InputError, match="lean decoder cannot run .*triton backend only"):
        Runner.for_model(llama, "torch", kv_memory=16 << 20, lean=True)
    moe = tiny_family("qwen3_moe", tmp_path / "moe", device)
    assert Runner.for_model(moe, "triton", kv_memory=16 << 20).lean is None
    with pytest.raises(InputError, match="model type 'qwen3_moe' is not one of llama, mistral, qwen2, qwen3, phi3"):
        Runner.for_model(moe, "triton", kv_memory=16 << 20, lean=True)
    windowed = tiny_family("mistral-window", tmp_path / "window", device)
    with pytest.raises(InputError, match="it needs sliding windows"):
        Runner.for_model(windowed, "triton", kv_memory=16 << 20, lean=True)

"""Every Triton kernel variant hogwild launches compiles down to a cubin for the GPU architectures
users have, with the tiles chosen for each one's shared memory, on this machine without a GPU
(``scripts/compile_kernels.py``): the interpreter that runs the kernels in the other tests accepts
code the GPU compiler rejects, and knows no shared-memory limit.

One architecture takes 1.5-2.5 minutes on 2 CPU cores, so CI checks three: sm_75 in float16 (T4:
the smallest limit, no bf16), sm_86 in float32 (99 KB: where fp32 tiles shrink) and sm_90 in
bfloat16 (H100/H200). ``HOGWILD_COMPILE_CHECK=all`` checks every listed architecture in the dtype
users run there (bfloat16; float16 on sm_75) and sm_86 in float32 (about 15 minutes).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "compile_kernels.py"
SUBSET = [(75, "float16"), (86, "float32"), (90, "bfloat16")]
EVERY = [(75, "float16"), (80, "bfloat16"), (86, "bfloat16"), (86, "float32"), (89, "bfloat16"), (90, "bfloat16"),
         (100, "bfloat16"), (120, "bfloat16")]
CHECKED = EVERY if os.environ.get("HOGWILD_COMPILE_CHECK") == "all" else SUBSET


@pytest.mark.parametrize(("arch", "dtype"), CHECKED, ids=[f"sm_{a}-{d}" for a, d in CHECKED])
def test_every_kernel_variant_compiles(arch, dtype):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch), "--dtypes", dtype, "--table"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for kernel in ("_partial_kernel", "_merge_kernel", "_rms_norm_kernel", "_rope_store_kernel", "_silu_mul_kernel"):
        assert any(line.startswith(f"sm_{arch} {kernel}[") and ": ok (" in line for line in lines), kernel
    assert any("PARTIAL=True" in line for line in lines)  # partial rotary
    assert any("SINKS=True" in line for line in lines)  # gpt-oss
    assert any(line.startswith("| ") and f"| sm_{arch} |" in line and f"| {dtype}" in line for line in lines)
    assert f"{dtype} kernel variants compiled for sm_{arch}" in done.stdout and "FAILED" not in done.stdout
    if arch == 90:  # Gemma 3 at head_dim 256 with window and soft-cap runs the triton kernel there
        assert any("HEAD_DIM=256" in line and "WINDOW=True, SOFTCAP=True" in line for line in lines)

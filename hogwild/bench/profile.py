"""``hogwild bench --profile``: torch.profiler over a few decode steps of every method of the
largest cell (CPU ops, and CUDA kernels on CUDA), and the cost of moving a finished step into the
history (``SharedCache.append_block``).

Per method it writes a Chrome trace, ``profile-<method>.json`` (open it in chrome://tracing or
https://ui.perfetto.dev), and returns the top ops by self time; ``profile_text`` lays out the
full ``key_averages`` tables for ``profile.txt``.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from .. import LoadedModel, SharedCache
from .methods import synchronize

log = logging.getLogger(__name__)

PROFILE_STEPS = 3  # decode steps profiled per method
TOP_OPS = 15  # ops per method in bench.json
TABLE_ROWS = 30  # ops per method in profile.txt


def profile_decoders(decoders: dict, workers: int, context: int, device: torch.device, out: Path) -> dict:
    """Profile ``PROFILE_STEPS`` steps of each decoder. Returns, per method: wall ms per step while
    profiled, device (CUDA) or CPU self ms per step in total and for the top ops, the trace file,
    and the ``key_averages`` table (text)."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # microseconds
    out.mkdir(parents=True, exist_ok=True)
    methods = {}
    for name, decoder in decoders.items():
        try:
            methods[name] = profile_steps(name, decoder, activities, key, out)
        except Exception as exc:  # a profile must not cost the measurements
            log.error("profiling %s failed", name, exc_info=exc)
            methods[name] = {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
    return {
        "workers": workers, "context": context, "steps": PROFILE_STEPS,
        "time": "CUDA kernel self time" if cuda else "CPU self time", "methods": methods,
    }


def profile_steps(name: str, decoder, activities, key: str, out: Path) -> dict:
    from torch.profiler import profile, record_function

    wall = 0.0
    with profile(activities=activities) as prof:
        for i in range(PROFILE_STEPS):
            with record_function(f"{name} step {i}"):
                wall += decoder.step()
    trace = out / f"profile-{name}.json"
    prof.export_chrome_trace(str(trace))
    averages = [e for e in prof.key_averages() if not e.key.startswith(f"{name} step")]
    ops = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    return {
        "wall_ms_per_step": round(wall * 1e3 / PROFILE_STEPS, 3),
        "self_ms_per_step": round(sum(getattr(e, key) for e in averages) / 1e3 / PROFILE_STEPS, 3),
        "top_ops_ms_per_step": {e.key: round(getattr(e, key) / 1e3 / PROFILE_STEPS, 4) for e in ops[:TOP_OPS]},
        "trace": trace.name,
        "table": prof.key_averages().table(sort_by=key, row_limit=TABLE_ROWS),
    }


def history_move_ms(model: LoadedModel, context: int, step_tokens: int = 64, repeats: int = 5) -> dict:
    """Median ms of ``append_block``: a ``step_tokens``-token finished step moved onto a
    ``context``-token history (keys rotated once, values copied), in a pool of its own."""
    cache = SharedCache(
        model.num_layers, model.num_kv_heads, model.head_dim, model.inv_freq, model.dtype, model.device,
        capacity_tokens=context + step_tokens * (repeats + 1),
    )
    history = cache.new_block("history", capacity=context + step_tokens * repeats)
    step = cache.new_block("step", capacity=step_tokens)
    kv = torch.randn((model.num_kv_heads, context, model.head_dim), dtype=model.dtype, device=model.device)
    for layer in range(model.num_layers):
        cache.write(history, layer, 0, kv, kv)
        cache.write(step, layer, 0, kv[:, :step_tokens], kv[:, :step_tokens])
    cache.commit(history, [0] * context)
    cache.commit(step, [0] * step_tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cache.append_block(history, step)
        synchronize(model.device)
        times.append((time.perf_counter() - start) * 1e3)
    del cache, kv
    return {"context": context, "step_tokens": step_tokens, "median_ms": round(statistics.median(times), 4)}


def profile_text(profile: dict) -> str:
    """profile.txt: per method, the step time while profiled and the ``key_averages`` table."""
    lines = [
        f"torch.profiler, N={profile['workers']}, L={profile['context']}, {profile['steps']} decode steps "
        f"per method; tables sorted by {profile['time']} (totals over the steps).",
    ]
    for name, m in profile["methods"].items():
        if "error" in m:
            lines += ["", f"## {name}: profiling failed: {m['error']}"]
            continue
        lines += [
            "",
            f"## {name}: {m['wall_ms_per_step']:.2f} ms per step profiled, {m['self_ms_per_step']:.2f} ms of "
            f"{profile['time']} per step; trace: {m['trace']}",
            "",
            m["table"],
        ]
    move = profile.get("history_move") or {}
    if "median_ms" in move:
        lines += ["", f"history move: {move['median_ms']:.3f} ms to append a {move['step_tokens']}-token step "
                      f"to a {move['context']}-token history (SharedCache.append_block)"]
    return "\n".join(lines)

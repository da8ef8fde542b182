"""The grid: every (workers N, context L) cell, the methods alternating step by step in one process.

For each context the prompt (random token ids, seeded) is prefilled once per method family; for
each N every method starts a decoder, then ``warmup`` untimed and ``steps`` timed rounds run, one
step of each method per round in a rotating order, so drifting machine load hits every method
alike. A method that cannot run a cell (out of memory, a full K/V pool, too long a context) is
recorded as skipped with the reason, an unexpected exception as an error; the run goes on and
memory is freed between cells.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .. import CacheFullError, ContextOverflowError, InputError, LoadedModel, Runner
from .methods import (
    HOGWILD_RUNNERS,
    METHODS,
    RUNNER_OPTIONS,
    STATS_SUFFIX,
    CompiledCall,
    Decoder,
    HogwildMethod,
    HogwildPrompt,
    TransformersMethod,
    TransformersPrompt,
    bytes_per_token,
)
from .profile import PROFILE_STEPS, history_move_ms, profile_decoders

log = logging.getLogger(__name__)

CPU_METHODS = ("hogwild-torch", "transformers", "materialize")
CUDA_METHODS = ("hogwild-triton", "hogwild-torch", "transformers", "transformers-compiled")
WARMUP_PROMPT = 16  # tokens of the prompt of the process warm-up


def default_methods(device: torch.device | str) -> tuple[str, ...]:
    return CUDA_METHODS if torch.device(device).type == "cuda" else CPU_METHODS


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. steps: timed decode steps per method and cell, after ``warmup`` untimed
    ones; kv_memory: bytes of each hogwild runner's pool (None: sized for the grid);
    compile_backend: torch.compile backend of transformers-compiled."""

    workers: tuple[int, ...] = (1, 2, 4)
    contexts: tuple[int, ...] = (512, 2048)
    methods: tuple[str, ...] = CPU_METHODS
    steps: int = 20
    warmup: int = 3
    prefill_chunk: int = 512
    seed: int = 0
    profile: bool = False
    kv_memory: int | None = None
    compile_backend: str = "inductor"

    @property
    def extra_tokens(self) -> int:
        """Tokens each worker decodes after the prompt in a cell (first, warm-up, timed, profiled)."""
        return 1 + self.warmup + self.steps + (PROFILE_STEPS if self.profile else 0)

    def validate(self, max_positions: int) -> None:
        if not self.workers or min(self.workers) < 1:
            raise InputError(f"--workers needs counts >= 1, got {list(self.workers)}")
        if not self.contexts or min(self.contexts) < 1:
            raise InputError(f"--context needs lengths >= 1, got {list(self.contexts)}")
        if self.steps < 1 or self.warmup < 0:
            raise InputError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InputError(f"unknown --methods {unknown or '(none)'}; choose from {', '.join(METHODS)}")
        if self.kv_memory is not None and self.kv_memory <= 0:
            raise InputError(f"--kv-memory must be a positive number of GiB, got {self.kv_memory} bytes")
        extra = self.extra_tokens
        longest = max(self.contexts) + extra
        if longest > max_positions:
            raise ContextOverflowError(
                f"context {max(self.contexts)} plus {extra} decoded tokens needs {longest} positions, more than "
                f"the model's {max_positions}; use --context {max_positions - extra} or less"
            )


# -- results ------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """One method in one cell. Times: ms per decode step (median, quartiles of ``samples_ms``);
    tokens_per_s: N / median step; bytes of K/V after the first decoded token; prefill_s: the
    prompt once (one row for the transformers methods); setup_s: starting the cell (copying the
    prompt's K/V, the first pass, any compilation); max_abs_logit_diff: first pass against
    transformers'; vs_*: median over that method's median (vs_no_stats: a ``+stats`` method over the
    same method without statistics, in the same cell)."""

    status: str  # "ok", "skipped" (cannot run: memory, context, K/V pool) or "error"
    reason: str | None = None
    median_ms: float | None = None
    iqr_ms: list[float] | None = None
    tokens_per_s: float | None = None
    kv_bytes: int | None = None
    kv_allocated_bytes: int | None = None
    prefill_s: float | None = None
    setup_s: float | None = None
    max_abs_logit_diff: float | None = None
    vs_transformers: float | None = None
    vs_transformers_compiled: float | None = None
    vs_no_stats: float | None = None
    samples_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Cell:
    workers: int
    context: int
    one_copy_kv_bytes: int  # K/V of one copy of the prompt plus one token per worker
    results: dict[str, MethodResult]

    def to_json(self) -> dict:
        return {
            "workers": self.workers, "context": self.context, "one_copy_kv_bytes": self.one_copy_kv_bytes,
            "results": {name: r.to_json() for name, r in self.results.items()},
        }


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    machine: dict
    config: dict
    methods: list[str]
    cells: list[Cell]
    warmup_s: dict[str, float] = field(default_factory=dict)  # per method, compilation included
    kv_pool_bytes: dict[str, int] = field(default_factory=dict)  # per hogwild runner (HOGWILD_RUNNERS)
    tp: int = 1  # tensor-parallel ranks (--tp); K/V bytes are then rank 0's: its share of the K/V heads
    quantization: str | None = None  # --quantize or the checkpoint's quant_method; None: dense weights
    weight_bytes: int = 0  # the model's weights as stored (rank 0's shards under --tp)
    compile: dict | None = None
    profile: dict | None = None
    wall_s: float = 0.0
    complete: bool = False  # False in the files written while the run goes on
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM: the cells done so far

    def skipped(self) -> list[dict]:
        """What did not run: one entry per method, status and reason, with its cells [[N, L], ...]."""
        groups: dict[tuple, list] = {}
        for c in self.cells:
            for name, r in c.results.items():
                if not r.ok:
                    groups.setdefault((name, r.status, r.reason), []).append([c.workers, c.context])
        return [{"method": m, "status": s, "reason": r, "cells": cells} for (m, s, r), cells in groups.items()]

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "cells"}
        out["cells"] = [c.to_json() for c in self.cells]
        out["skipped"] = self.skipped()
        return out


# -- failures and memory ------------------------------------------------------------------------
def failure(exc: BaseException, where: str = "") -> MethodResult:
    """A skipped (cannot run) or error result from an exception."""
    text = str(exc).strip().split("\n")[0][:300]
    prefix = f"{where}: " if where else ""
    out_of_memory = isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in text.lower()
    )
    if out_of_memory:
        return MethodResult("skipped", f"{prefix}out of memory ({text})")
    if isinstance(exc, CacheFullError):
        return MethodResult("skipped", f"{prefix}K/V pool full, see --kv-memory ({text})")
    if isinstance(exc, ContextOverflowError):
        return MethodResult("skipped", f"{prefix}context too long ({text})")
    log.error("%s%s failed", prefix, type(exc).__name__, exc_info=exc)
    return MethodResult("error", f"{prefix}{type(exc).__name__}: {text}")


def free_memory(device: torch.device, collect: bool = True) -> None:
    """Hand cached device memory back; ``collect`` first frees what only reference cycles hold
    (a caught exception's frames), which takes a fraction of a second."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take: free device memory plus the allocator's cached blocks on
    CUDA, MemAvailable on a Linux CPU, None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_shortfall(device: torch.device, needed: int) -> str | None:
    """Why ``needed`` bytes do not fit (with 1 GiB to spare for activations), or None if they do."""
    available = available_bytes(device)
    if needed == 0 or available is None or needed + (1 << 30) <= available:
        return None
    return f"out of memory: needs {needed / 2**30:.1f} GiB of K/V, {available / 2**30:.1f} GiB free"


def pool_bytes(model: LoadedModel, config: BenchConfig, readers: int) -> int:
    """A hogwild pool for the grid: the longest prompt plus ``readers`` x max N worker blocks."""
    per_worker = max(64, config.extra_tokens) + 64  # the initial block capacity, pages rounded up
    tokens = max(config.contexts) + 64 + readers * max(config.workers) * per_worker
    return tokens * bytes_per_token(model)


# -- methods ------------------------------------------------------------------------------------
def build_methods(model: LoadedModel, config: BenchConfig) -> tuple[dict, dict[str, MethodResult]]:
    """The method objects of ``config.methods``, and those that could not be built as failures.

    Each hogwild backend gets one runner with its own pool (materialize shares the torch one);
    the transformers methods share one prefilled prompt."""
    methods: dict = {}
    broken: dict[str, MethodResult] = {}
    prompts: dict[str, HogwildPrompt | Exception] = {}
    transformers_prompt = None
    for name in config.methods:
        reason = tp_refusal(model, name, config.methods)
        if reason:
            broken[name] = MethodResult("skipped", reason)
            continue
        try:
            if name in HOGWILD_RUNNERS:
                backend = HOGWILD_RUNNERS[name]
                if backend not in prompts:
                    readers = sum(HOGWILD_RUNNERS.get(m) == backend for m in config.methods)
                    kv_memory = config.kv_memory or pool_bytes(model, config, readers)
                    try:
                        runner = Runner.for_model(model, kv_memory=kv_memory, **RUNNER_OPTIONS[backend])
                        prompts[backend] = HogwildPrompt(runner, config.prefill_chunk)
                    except Exception as exc:
                        prompts[backend] = exc
                prompt = prompts[backend]
                if isinstance(prompt, Exception):
                    raise prompt
                methods[name] = HogwildMethod(name, prompt, reference=name == "materialize",
                                              collab_stats=name.endswith(STATS_SUFFIX))
            else:
                transformers_prompt = transformers_prompt or TransformersPrompt(model, config.prefill_chunk)
                compiled = CompiledCall(model, config.compile_backend) if name == "transformers-compiled" else None
                methods[name] = TransformersMethod(name, transformers_prompt, compiled)
        except Exception as exc:
            broken[name] = failure(exc, "set-up")
    return methods, broken


def tp_refusal(model: LoadedModel, name: str, names: tuple[str, ...]) -> str | None:
    """Why ``name`` cannot run under ``--tp`` (None: it can, or no tensor parallelism). The follower
    ranks mirror rank 0's hogwild passes on the newest runner's pool only: one hogwild backend per
    run (the first named), and no transformers method (its own forward's all-reduces would wait for
    ranks that never run it)."""
    if model.tp is None:
        return None
    if name not in HOGWILD_RUNNERS:
        return ("not under --tp: the other ranks mirror only hogwild passes, not transformers' own forward "
                "(its all-reduces would wait for them); compare with a run of one process")
    first = next(HOGWILD_RUNNERS[m] for m in names if m in HOGWILD_RUNNERS)
    if HOGWILD_RUNNERS[name] != first:
        return (f"not under --tp with the {first} backend in the same run: the other ranks mirror one runner "
                f"at a time; run it in a bench of its own")
    return None


def warm_up(methods: dict, broken: dict[str, MethodResult], prompt_ids: list[int], config: BenchConfig,
            device: torch.device) -> dict[str, float]:
    """Run every method once on a short prompt, for one and for two workers when the grid has
    them: the first passes of a process are slow, compiled calls compile, CUDA graphs capture. A
    method that fails here is taken out of the run (``broken``). Returns seconds per method."""
    seconds = {}
    for name, method in list(methods.items()):
        start = time.perf_counter()
        try:
            method.prepare(prompt_ids)
            for n in sorted({min(n, 2) for n in config.workers}):
                decoder = method.start(n, config.extra_tokens)
                try:
                    for _ in range(2):
                        decoder.step()
                finally:
                    decoder.free()
        except Exception as exc:
            broken[name] = failure(exc, "warm-up")
            del methods[name]
        finally:
            method.release()
        free_memory(device, collect=name in broken)
        seconds[name] = round(time.perf_counter() - start, 2)
        log.info("warm-up of %s: %.1f s", name, seconds[name])
    return seconds


def measure_cell(model: LoadedModel, methods: dict, prepared: dict, workers: int, context: int,
                 config: BenchConfig, profiler=None) -> Cell:
    """Time every prepared method at ``workers`` over the current ``context``-token prompt.

    prepared: every method of the run -> its prefill seconds, or a MethodResult that says why it
    cannot run this context; profiler: ``f(decoders)`` run on the live decoders after the timing."""
    device = model.device
    results: dict[str, MethodResult] = {}
    decoders: dict[str, Decoder] = {}
    setup: dict[str, float] = {}
    for name, ready in prepared.items():
        if isinstance(ready, MethodResult):
            results[name] = replace(ready)
            continue
        method = methods[name]
        shortfall = memory_shortfall(device, method.needs_bytes(workers, context + config.extra_tokens))
        if shortfall:
            results[name] = MethodResult("skipped", shortfall)
            continue
        start = time.perf_counter()
        try:
            decoders[name] = method.start(workers, config.extra_tokens)
            setup[name] = time.perf_counter() - start
        except Exception as exc:
            results[name] = failure(exc, "start")
        if name not in decoders:
            free_memory(device)

    samples: dict[str, list[float]] = {name: [] for name in decoders}
    for i in range(config.warmup + config.steps):
        order = list(decoders)
        k = i % max(1, len(order))  # who goes first rotates
        for name in order[k:] + order[:k]:
            try:
                seconds = decoders[name].step()
            except Exception as exc:
                results[name] = failure(exc, f"step {i}")
                decoders.pop(name).free()
            if name not in decoders:
                free_memory(device)
                continue
            if i >= config.warmup:
                samples[name].append(seconds * 1e3)
    if profiler is not None and decoders:
        profiler(decoders)

    reference = decoders.get("transformers")
    for name, decoder in decoders.items():
        ms = samples[name]
        median = statistics.median(ms)
        quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0], 0, ms[0]]
        diff = None
        if reference is not None and decoder is not reference:
            diff = float((decoder.first_logits - reference.first_logits).abs().max())
        results[name] = MethodResult(
            "ok", median_ms=round(median, 3), iqr_ms=[round(quartiles[0], 3), round(quartiles[2], 3)],
            tokens_per_s=round(workers * 1e3 / median, 2), kv_bytes=decoder.kv_bytes,
            kv_allocated_bytes=decoder.kv_allocated_bytes, prefill_s=round(prepared[name], 4),
            setup_s=round(setup[name], 3), max_abs_logit_diff=diff, samples_ms=[round(x, 3) for x in ms],
        )
        decoder.free()
    decoders.clear()
    free_memory(device, collect=False)
    for base, key in (("transformers", "vs_transformers"), ("transformers-compiled", "vs_transformers_compiled")):
        if base in results and results[base].ok:
            for name, r in results.items():
                if r.ok and name != base:
                    setattr(r, key, round(r.median_ms / results[base].median_ms, 4))
    for name, r in results.items():  # the cost of collaboration statistics: the same runner without them
        base = results.get(name.removesuffix(STATS_SUFFIX))
        if name.endswith(STATS_SUFFIX) and r.ok and base is not None and base.ok:
            r.vs_no_stats = round(r.median_ms / base.median_ms, 4)
    ordered = {m: results[m] for m in config.methods if m in results}
    return Cell(workers, context, bytes_per_token(model) * (context + workers), ordered)


def run_bench(model: LoadedModel, config: BenchConfig, out: Path | None = None, on_cell=None) -> BenchResult:
    """Measure every (workers, context) of ``config``; with ``config.profile``, profile the largest
    cell and write its traces to ``out``. on_cell: called with the result so far (``complete``
    False) after the warm-up and after every cell, e.g. to write partial files."""
    config.validate(model.max_positions)
    started = time.perf_counter()
    device = model.device
    result = BenchResult(
        model=model.name, device=str(device), dtype=str(model.dtype).removeprefix("torch."),
        machine=machine_info(device), methods=list(config.methods), cells=[],
        config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        tp=1 if model.tp is None else model.tp.size, quantization=model.quantization, weight_bytes=model.weight_bytes,
    )

    def update(complete: bool = False, notify: bool = True) -> None:
        result.complete = complete
        result.wall_s = round(time.perf_counter() - started, 1)
        result.machine["load_average_end"] = load_average()
        if "transformers-compiled" in config.methods:
            result.compile = compile_stats(config, methods)
        if on_cell is not None and notify:
            on_cell(result)

    methods: dict = {}
    try:
        generator = torch.Generator().manual_seed(config.seed)
        vocab = (model.model.get_output_embeddings().out_features if model.tp is None  # may be a shard
                 else model.model.config.vocab_size)
        methods, broken = build_methods(model, config)
        result.kv_pool_bytes = {
            HOGWILD_RUNNERS[name]: m.prompt.runner.cache.pool_nbytes() for name, m in methods.items()
            if isinstance(m, HogwildMethod)
        }
        warmup_ids = torch.randint(0, vocab, (WARMUP_PROMPT,), generator=generator).tolist()
        result.warmup_s = warm_up(methods, broken, warmup_ids, config, device)
        update()
        for context in config.contexts:
            prompt_ids = torch.randint(0, vocab, (context,), generator=generator).tolist()
            measure_context(model, methods, broken, prompt_ids, config, result, out, update)
        if result.profile is not None and model.tp is not None:  # a pool of its own is not mirrored
            result.profile["history_move"] = {"error": "not under --tp (a pool outside the runner's)"}
        elif result.profile is not None:
            try:
                result.profile["history_move"] = history_move_ms(model, max(config.contexts))
            except Exception as exc:
                result.profile["history_move"] = {"error": failure(exc).reason}
            free_memory(device)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under ``hogwild bench``: report the cells done
        log.warning("interrupted after %d cells; reporting those", len(result.cells))
        result.interrupted = True
        update(notify=False)
        return result
    update(complete=True, notify=False)
    return result


def measure_context(model: LoadedModel, methods: dict, broken: dict, prompt_ids: list[int], config: BenchConfig,
                    result: BenchResult, out: Path | None, update) -> None:
    """Prefill one context for every method, then measure a cell per worker count (``result.cells``)."""
    device, context = model.device, len(prompt_ids)
    prepared: dict = dict(broken)
    for name, method in methods.items():
        try:
            prepared[name] = method.prepare(prompt_ids)
        except Exception as exc:
            prepared[name] = failure(exc, "prefill")
            method.release()
            free_memory(device)
    for workers in config.workers:
        profiler = None
        if config.profile and (workers, context) == (max(config.workers), max(config.contexts)) and not result.profile:
            def profiler(decoders, workers=workers):
                result.profile = profile_decoders(decoders, workers, context, device, out or Path("."))

        result.cells.append(measure_cell(model, methods, prepared, workers, context, config, profiler))
        update()
    for method in methods.values():
        method.release()
    free_memory(device)


def compile_stats(config: BenchConfig, methods: dict) -> dict:
    """torch.compile's facts for transformers-compiled: backend, mode, whether the batch size was
    traced size-obliviously (one graph) or shapes are static (compiled per cell), graphs compiled
    (since the last recompile), CUDA-graph skips."""
    compiled = getattr(methods.get("transformers-compiled"), "compiled", None)
    stats: dict = {
        "backend": config.compile_backend, "mode": "reduce-overhead" if config.compile_backend == "inductor" else None,
        "size_oblivious": getattr(compiled, "oblivious", None),
        "shapes": None if compiled is None else "static, compiled per cell" if compiled.static else "dynamic",
    }
    try:
        from torch._dynamo.utils import counters

        stats["graphs"] = int(counters["stats"]["unique_graphs"])
        stats["cudagraph_skips"] = int(sum(v for k, v in counters["inductor"].items() if "cudagraph_skip" in k))
    except Exception:  # private counters: report what is there
        pass
    return stats


# -- machine ------------------------------------------------------------------------------------
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(device: torch.device) -> dict:
    """Platform, versions (torch, transformers, triton, CUDA), GPU or CPU name, git commit."""
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": package_version("triton"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),  # 1, 5, 15 min
        "git": git_revision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it (None outside a checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
            text=True, timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None

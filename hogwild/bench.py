"""``hogwild bench``: decode-step speed and K/V memory of concurrent attention, against ordinary
batched decoding and against materialising every view.

For every (workers N, shared context L) the same L-token prompt (random token ids, seeded) is
decoded three ways, alternating step by step in one process so that drifting machine load hits
every method alike:

- ``hogwild``: the prompt is prefilled once into one block; each worker owns a block holding one
  token, and every step feeds one token per worker through ``Runner.forward`` (query rotation,
  each block's K/V read once for all workers that see it);
- ``baseline``: transformers' ordinary batched decoding of N sequences that each hold the prompt
  (N identical rows prefilled in one batch, ``DynamicCache``, sdpa attention);
- ``materialize``: the hogwild state again, but every layer of every step copies each worker's
  view into one tensor with its keys re-rotated (``reference=True``), as the research code does.

A step's time covers the forward pass and the next-token logits of all N workers (greedy tokens
are fed back). K/V bytes are counted after the first decoded token (prompt + one token per
worker); prefill times are of the shared prompt once (hogwild) against N rows (baseline). Results
go to stdout (a Markdown table, or one JSON object with ``--json``) and to ``bench.json`` and
``bench.png`` in the output folder; ``--profile`` adds a breakdown of one hogwild step.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config

from .cache import Block, SharedCache
from .engine.runner import PassCache, Runner, WorkerStep
from .errors import ContextOverflowError, InputError
from .layers import attention as attention_module
from .model import ATTENTION_NAME, LoadedModel, check_supported, load_model, ordinary_attention

log = logging.getLogger(__name__)

METHODS = ("hogwild", "baseline", "materialize")

#: Hand-built random-weight configurations (no download): shapes of real models for GPU runs.
RANDOM_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    # Same family, a few MB: lets the tests cover the random-config path.
    "tiny-qwen2": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1024, max_position_embeddings=4096, rope_theta=1e6,
    ),
}


# -- configuration and results ------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What to measure. steps: timed decode steps per method and row (after ``warmup`` untimed)."""

    workers: tuple[int, ...] = (1, 2, 4)
    contexts: tuple[int, ...] = (512, 2048)
    steps: int = 20
    warmup: int = 3
    prefill_chunk: int = 512
    seed: int = 0
    profile: bool = False
    history_step_tokens: int = 64

    def validate(self, max_positions: int) -> None:
        if not self.workers or min(self.workers) < 1:
            raise InputError(f"--workers needs counts >= 1, got {list(self.workers)}")
        if not self.contexts or min(self.contexts) < 1:
            raise InputError(f"--context needs lengths >= 1, got {list(self.contexts)}")
        if self.steps < 1 or self.warmup < 0:
            raise InputError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        longest = max(self.contexts) + self.steps + self.warmup + 1
        if longest > max_positions:
            raise ContextOverflowError(
                f"context {max(self.contexts)} plus {self.steps + self.warmup + 1} decoded tokens needs "
                f"{longest} positions, more than the model's {max_positions}; use --context "
                f"{max_positions - self.steps - self.warmup - 1} or less"
            )


@dataclass
class Timing:
    """Wall times of one method's decode steps, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> tuple[float, float]:
        """First and third quartiles (the spread reported next to the median)."""
        if len(self.samples_ms) < 2:
            return (self.samples_ms[0],) * 2
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[0], q[2]


@dataclass
class BenchRow:
    """One (workers, context) cell. Times in ms per decode step (median), bytes of K/V held."""

    workers: int
    context: int
    hogwild_ms: float
    baseline_ms: float
    materialize_ms: float
    ratio: float  # hogwild_ms / baseline_ms
    hogwild_kv_bytes: int
    baseline_kv_bytes: int
    materialize_ratio: float  # materialize_ms / hogwild_ms
    hogwild_iqr_ms: tuple[float, float]
    baseline_iqr_ms: tuple[float, float]
    materialize_iqr_ms: tuple[float, float]
    hogwild_tokens_per_s: float
    baseline_tokens_per_s: float
    materialize_tokens_per_s: float
    one_copy_kv_bytes: int  # K/V of one copy of the prompt plus one token per worker
    hogwild_allocated_kv_bytes: int
    hogwild_prefill_s: float  # the shared prompt, once
    baseline_prefill_s: float  # N rows of the prompt, one batch
    steps: int


@dataclass
class ProfileReport:
    """Where one hogwild decode step goes, at ``workers`` x ``context``.

    step_ms: median untraced step; parts_ms: traced step split by code region (ms per step);
    ops_ms: torch.profiler self CPU time per step of the heaviest aten ops; history_move_ms: one
    ``append_block`` of a ``history_step_tokens``-token step onto the ``context``-token history.
    """

    workers: int
    context: int
    step_ms: float
    traced_step_ms: float
    parts_ms: dict[str, float]
    ops_ms: dict[str, float]
    history_move_ms: float
    history_step_tokens: int
    history_share: float  # amortised moves per step / step_ms (every worker moves a step every K tokens)
    rotation_share: float  # query rotation / traced step
    op_table: str = ""


@dataclass
class BenchResult:
    rows: list[BenchRow]
    device: str
    dtype: str
    model: str
    machine: dict
    config: dict
    profile: ProfileReport | None = None

    def to_json(self) -> dict:
        out = {
            "rows": [asdict(r) for r in self.rows],
            "device": self.device,
            "dtype": self.dtype,
            "model": self.model,
            "machine": self.machine,
            "config": self.config,
        }
        if self.profile is not None:
            out["profile"] = {k: v for k, v in asdict(self.profile).items() if k != "op_table"}
        return out


# -- models ------------------------------------------------------------------------------------
def random_model(preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """A random-weight model from a hand-built config (``RANDOM_CONFIGS``), built on ``device``."""
    if preset not in RANDOM_CONFIGS:
        raise InputError(f"unknown --random-config {preset!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    config = Qwen2Config(**RANDOM_CONFIGS[preset])
    check_supported(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
    model.eval()
    attention = model.get_decoder().layers[0].self_attn
    return LoadedModel(
        model=model,
        tokenizer=None,
        name=f"random {preset}",
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=attention.head_dim,
        inv_freq=model.get_decoder().rotary_emb.inv_freq.detach().float().cpu().clone(),
        max_positions=config.max_position_embeddings,
        scaling=attention.scaling,
    )


def vocab_size(model: LoadedModel) -> int:
    return model.model.get_output_embeddings().weight.shape[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the three decoders ------------------------------------------------------------------------
class HogwildDecoder:
    """N workers over one prompt block, each writing its own block; ``reference`` = materialise."""

    def __init__(self, runner: Runner, prompt: Block, first_tokens: list[int], reference: bool = False):
        self.runner = runner
        self.prompt = prompt
        self.reference = reference
        kind = "materialize" if reference else "hogwild"
        self.own = [runner.cache.new_block(f"{kind}-worker{i}") for i in range(len(first_tokens))]
        self.tokens = first_tokens
        self.step()  # the first token of every worker goes to its own block (untimed)

    def step(self) -> float:
        """One pass (one token per worker); returns its wall time in seconds."""
        steps = [WorkerStep([t], [self.prompt, own]) for t, own in zip(self.tokens, self.own)]
        device = self.runner.model.device
        start = time.perf_counter()
        logits = self.runner.forward(steps, reference=self.reference)  # [N, vocab]
        synchronize(device)
        elapsed = time.perf_counter() - start
        self.tokens = logits.argmax(-1).tolist()
        return elapsed

    def free(self) -> None:
        for block in self.own:
            self.runner.cache.free(block)


def prefill_prompt(runner: Runner, prompt_ids: list[int], chunk: int) -> tuple[Block, int, float]:
    """Prefill the shared prompt once. Returns (block, greedy next token, seconds)."""
    block = runner.cache.new_block("prompt", capacity=len(prompt_ids))
    start = time.perf_counter()
    logits = runner.prefill([block], prompt_ids, chunk=chunk)
    synchronize(runner.model.device)
    return block, int(logits.argmax()), time.perf_counter() - start


def dynamic_cache_nbytes(cache: DynamicCache) -> int:
    """Bytes of the K and V tensors a DynamicCache holds (all layers, all rows)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class BaselineDecoder:
    """transformers' ordinary batched decoding: N rows that each hold the prompt (DynamicCache, sdpa)."""

    def __init__(self, model: LoadedModel, prompt_ids: list[int], workers: int, chunk: int):
        self.model = model
        self.decoder = model.model.get_decoder()
        self.cache = DynamicCache()
        self.cache_kwargs = {model.cache_argument: self.cache}
        rows = torch.tensor([prompt_ids] * workers, device=model.device)  # [N, L]
        start = time.perf_counter()
        with torch.inference_mode(), ordinary_attention(model.model):
            for i in range(0, rows.shape[1], chunk):
                hidden = self.decoder(input_ids=rows[:, i : i + chunk], use_cache=True, **self.cache_kwargs)
            logits = model.logits(hidden.last_hidden_state[:, -1])
            synchronize(model.device)
        if self.cache.get_seq_length() != len(prompt_ids):
            raise RuntimeError("the baseline's DynamicCache was not filled: the cache keyword was ignored")
        self.prefill_s = time.perf_counter() - start
        self.tokens = logits.argmax(-1).tolist()

    def step(self) -> float:
        """One batched decode step (one token per row); returns its wall time in seconds."""
        input_ids = torch.tensor(self.tokens, device=self.model.device)[:, None]  # [N, 1]
        with torch.inference_mode(), ordinary_attention(self.model.model):
            start = time.perf_counter()
            hidden = self.decoder(input_ids=input_ids, use_cache=True, **self.cache_kwargs).last_hidden_state
            logits = self.model.logits(hidden[:, -1])  # [N, vocab]
            synchronize(self.model.device)
            elapsed = time.perf_counter() - start
        self.tokens = logits.argmax(-1).tolist()
        return elapsed

    def nbytes(self) -> int:
        return dynamic_cache_nbytes(self.cache)


def measure_row(
    model: LoadedModel, runner: Runner, prompt: Block, first_token: int, prefill_s: float,
    prompt_ids: list[int], workers: int, config: BenchConfig,
) -> BenchRow:
    """Time the three methods for ``workers`` over an already prefilled prompt block."""
    L = len(prompt_ids)
    hog = HogwildDecoder(runner, prompt, [first_token] * workers)
    hog_bytes, hog_alloc = runner.cache.nbytes(), runner.cache.allocated_nbytes()
    mat = HogwildDecoder(runner, prompt, [first_token] * workers, reference=True)
    base = BaselineDecoder(model, prompt_ids, workers, config.prefill_chunk)
    base.step()  # the first token of every row, as for the workers (untimed)
    base_bytes = base.nbytes()
    decoders: dict[str, Callable[[], float]] = {"hogwild": hog.step, "baseline": base.step, "materialize": mat.step}
    timings = {name: Timing() for name in METHODS}
    for i in range(config.warmup + config.steps):
        order = METHODS[i % 3 :] + METHODS[: i % 3]  # rotate who goes first
        for name in order:
            seconds = decoders[name]()
            if i >= config.warmup:
                timings[name].samples_ms.append(seconds * 1e3)
    hog.free()
    mat.free()
    med = {name: timings[name].median_ms for name in METHODS}
    return BenchRow(
        workers=workers,
        context=L,
        hogwild_ms=round(med["hogwild"], 3),
        baseline_ms=round(med["baseline"], 3),
        materialize_ms=round(med["materialize"], 3),
        ratio=round(med["hogwild"] / med["baseline"], 4),
        hogwild_kv_bytes=hog_bytes,
        baseline_kv_bytes=base_bytes,
        materialize_ratio=round(med["materialize"] / med["hogwild"], 4),
        hogwild_iqr_ms=tuple(round(x, 3) for x in timings["hogwild"].iqr_ms),
        baseline_iqr_ms=tuple(round(x, 3) for x in timings["baseline"].iqr_ms),
        materialize_iqr_ms=tuple(round(x, 3) for x in timings["materialize"].iqr_ms),
        hogwild_tokens_per_s=round(workers * 1e3 / med["hogwild"], 2),
        baseline_tokens_per_s=round(workers * 1e3 / med["baseline"], 2),
        materialize_tokens_per_s=round(workers * 1e3 / med["materialize"], 2),
        one_copy_kv_bytes=runner.cache.bytes_per_token * (L + workers),
        hogwild_allocated_kv_bytes=hog_alloc,
        hogwild_prefill_s=round(prefill_s, 4),
        baseline_prefill_s=round(base.prefill_s, 4),
        steps=config.steps,
    )


def warm_up(model: LoadedModel, prompt_ids: list[int]) -> None:
    """Touch every weight and kernel once (the first pass of a process is several times slower)."""
    runner = Runner.for_model(model)
    prompt, token, _ = prefill_prompt(runner, prompt_ids, chunk=len(prompt_ids))
    for reference in (False, True):
        HogwildDecoder(runner, prompt, [token, token], reference=reference).step()
    BaselineDecoder(model, prompt_ids, 2, chunk=len(prompt_ids)).step()


def run_bench(model: LoadedModel, config: BenchConfig) -> BenchResult:
    """Measure every (workers, context) of ``config``; the prompt of each context is prefilled once."""
    config.validate(model.max_positions)
    machine = machine_info(model.device)
    generator = torch.Generator().manual_seed(config.seed)
    vocab = vocab_size(model)
    warm_up(model, torch.randint(0, vocab, (16,), generator=generator).tolist())
    rows = []
    for L in config.contexts:
        prompt_ids = torch.randint(0, vocab, (L,), generator=generator).tolist()
        runner = Runner.for_model(model)
        prompt, token, prefill_s = prefill_prompt(runner, prompt_ids, config.prefill_chunk)
        log.info("context %d: shared prompt prefilled in %.2f s", L, prefill_s)
        for N in config.workers:
            row = measure_row(model, runner, prompt, token, prefill_s, prompt_ids, N, config)
            log.info(
                "N=%d L=%d: hogwild %.1f ms, baseline %.1f ms, materialize %.1f ms (ratio %.3f)",
                N, L, row.hogwild_ms, row.baseline_ms, row.materialize_ms, row.ratio,
            )
            rows.append(row)
        runner.cache.free(prompt)
    profile = None
    if config.profile:
        profile = profile_step(model, max(config.workers), max(config.contexts), config)
    return BenchResult(
        rows=rows,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        model=model.name,
        machine={**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        profile=profile,
    )


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    info["git"] = git_revision()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def git_revision() -> str | None:
    """The checkout's commit, with "+dirty" when files differ from it (None outside a checkout)."""
    root = Path(__file__).resolve().parent.parent
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


# -- profile -----------------------------------------------------------------------------------
class LineTimer:
    """Wall time per source line of chosen functions, and per call of others (``sys.settrace``).

    For diagnosis only: tracing slows every Python call a little, so compare shares, not times.
    """

    def __init__(self, by_line: list[Callable], whole: list[Callable]):
        self.line_codes = {f.__code__ for f in by_line}
        self.whole_codes = {f.__code__ for f in whole}
        self.lines: collections.Counter = collections.Counter()  # (code, line) -> seconds
        self.calls: collections.Counter = collections.Counter()  # code -> seconds

    def _trace(self, frame, event, arg):
        code = frame.f_code
        if event != "call" or (code not in self.line_codes and code not in self.whole_codes):
            return None
        state = {"line": None, "since": time.perf_counter(), "entered": time.perf_counter()}
        by_line = code in self.line_codes

        def local(frame, event, arg):
            now = time.perf_counter()
            if by_line and state["line"] is not None:
                self.lines[(code, state["line"])] += now - state["since"]
            if event == "line":
                state["line"] = frame.f_lineno
            elif event == "return":
                self.calls[code] += now - state["entered"]
                state["line"] = None
            state["since"] = time.perf_counter()
            return local

        return local

    def __enter__(self) -> LineTimer:
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)


def attention_line_parts(func: Callable) -> dict[int, str]:
    """Map each source line of ``concurrent_attention`` to a part of the step, by what it does."""
    lines, first = inspect.getsourcelines(func)
    parts, region = {}, "attention: setup"
    for number, text in enumerate(lines, first):
        stripped = text.strip()
        indent = len(text) - len(text.lstrip())
        if stripped.startswith("for ") and "groups" in stripped:
            region = "attention: per-block scores, softmax, values"
        elif region.startswith("attention: per-block") and stripped and indent <= 4:
            region = "attention: log-sum-exp merge of blocks"
        part = region
        rotates = any(word in stripped for word in ("plan.cos", "plan.rotation", "index_select"))
        if region == "attention: setup" and rotates:
            part = "attention: query rotation"
        parts[number] = part
    return parts


def profile_step(model: LoadedModel, workers: int, context: int, config: BenchConfig) -> ProfileReport:
    """Profile hogwild decode steps at ``workers`` x ``context``: code regions and aten ops."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    prompt_ids = torch.randint(0, vocab_size(model), (context,), generator=generator).tolist()
    runner = Runner.for_model(model)
    prompt, token, _ = prefill_prompt(runner, prompt_ids, config.prefill_chunk)
    hog = HogwildDecoder(runner, prompt, [token] * workers)
    for _ in range(config.warmup):
        hog.step()
    n = max(config.steps, 3)
    step_ms = statistics.median(hog.step() * 1e3 for _ in range(n))

    attn = attention_module.concurrent_attention
    gather = getattr(attention_module.Group, "keys_values", None)  # small blocks gathered per layer
    whole = [Runner.forward, Runner.plan, PassCache.update] + ([gather] if gather else [])
    with LineTimer(by_line=[attn], whole=whole) as timer:
        traced_ms = sum(hog.step() for _ in range(n)) * 1e3 / n
    line_part = attention_line_parts(attn)
    parts: collections.Counter = collections.Counter()
    for (_code, line), seconds in timer.lines.items():
        parts[line_part.get(line, "attention: other")] += seconds * 1e3 / n
    if gather is not None:  # runs inside a per-block line: report it apart
        gather_ms = timer.calls[gather.__code__] * 1e3 / n
        parts["attention: per-block scores, softmax, values"] -= gather_ms
        parts["attention: reading K/V (gathering small blocks)"] = gather_ms
    parts["pass plan (offsets, masks, rotations)"] = timer.calls[Runner.plan.__code__] * 1e3 / n
    parts["cache writes of new K/V"] = timer.calls[PassCache.update.__code__] * 1e3 / n
    forward_ms = timer.calls[Runner.forward.__code__] * 1e3 / n
    parts["rest of the model (linear layers, norms, MLP, RoPE, lm_head)"] = forward_ms - sum(parts.values())
    parts["outside Runner.forward (argmax, timing)"] = max(0.0, traced_ms - forward_ms)

    # On a GPU the line times above are launch times; the device time per op is what counts.
    activities = [torch.profiler.ProfilerActivity.CPU]
    time_key = "self_cpu_time_total"
    if model.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        time_key = "self_device_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            hog.step()
    averages = prof.key_averages()
    ops = sorted(averages, key=lambda e: getattr(e, time_key), reverse=True)
    ops_ms = {e.key: round(getattr(e, time_key) / 1e3 / n, 3) for e in ops[:15]}
    op_table = averages.table(sort_by=time_key, row_limit=25)
    hog.free()
    runner.cache.free(prompt)

    move_ms = history_move_ms(model, context, config.history_step_tokens)
    # Every worker finishes a step every K tokens: N moves per K passes.
    history_share = workers * move_ms / config.history_step_tokens / step_ms
    rotation_ms = parts.get("attention: query rotation", 0.0)
    return ProfileReport(
        workers=workers,
        context=context,
        step_ms=round(step_ms, 3),
        traced_step_ms=round(traced_ms, 3),
        parts_ms={k: round(v, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        ops_ms=ops_ms,
        history_move_ms=round(move_ms, 3),
        history_step_tokens=config.history_step_tokens,
        history_share=round(history_share, 5),
        rotation_share=round(rotation_ms / traced_ms, 5),
        op_table=op_table,
    )


def history_move_ms(model: LoadedModel, context: int, step_tokens: int, repeats: int = 7) -> float:
    """Median ms of ``append_block``: a ``step_tokens`` step moved onto a ``context``-token history."""
    cache = SharedCache(
        model.num_layers, model.num_kv_heads, model.head_dim, model.inv_freq, model.dtype, model.device
    )
    history = cache.new_block("history", capacity=context + step_tokens * repeats)
    step = cache.new_block("step", capacity=step_tokens)
    shape = (model.num_kv_heads, context, model.head_dim)
    for layer in range(model.num_layers):
        kv = torch.randn(shape, dtype=model.dtype, device=model.device)
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
    return statistics.median(times)


# -- output ------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown_table(result: BenchResult) -> str:
    """The rows as a Markdown table (ms per decode step, median [quartiles]; MiB of K/V)."""
    head = (
        "| N | L | hogwild ms | baseline ms | materialize ms | ratio | hogwild tok/s | baseline tok/s "
        "| K/V hogwild MiB | K/V baseline MiB | K/V one copy MiB | prefill hogwild s | prefill baseline s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.rows:
        def cell(ms: float, iqr: tuple[float, float]) -> str:
            return f"{ms:.1f} [{iqr[0]:.1f}-{iqr[1]:.1f}]"

        lines.append(
            f"| {r.workers} | {r.context} | {cell(r.hogwild_ms, r.hogwild_iqr_ms)} "
            f"| {cell(r.baseline_ms, r.baseline_iqr_ms)} | {cell(r.materialize_ms, r.materialize_iqr_ms)} "
            f"| {r.ratio:.3f} | {r.hogwild_tokens_per_s:.1f} | {r.baseline_tokens_per_s:.1f} "
            f"| {_mib(r.hogwild_kv_bytes)} | {_mib(r.baseline_kv_bytes)} | {_mib(r.one_copy_kv_bytes)} "
            f"| {r.hogwild_prefill_s:.2f} | {r.baseline_prefill_s:.2f} |"
        )
    title = f"{result.model}, {result.dtype}, {result.device} ({result.machine.get('threads')} threads)"
    return f"**{title}**\n\n" + "\n".join(lines)


def profile_text(p: ProfileReport) -> str:
    lines = [
        f"hogwild decode step, N={p.workers}, L={p.context}: {p.step_ms:.1f} ms untraced, "
        f"{p.traced_step_ms:.1f} ms traced",
        "",
        "| part of the step (traced) | ms | share |",
        "|---|---|---|",
    ]
    for name, ms in p.parts_ms.items():
        lines.append(f"| {name} | {ms:.2f} | {ms / p.traced_step_ms:.1%} |")
    lines += [
        "",
        f"history move: {p.history_move_ms:.2f} ms per {p.history_step_tokens}-token step onto "
        f"{p.context} tokens; amortised over {p.history_step_tokens} passes for {p.workers} workers: "
        f"{p.history_share:.2%} of a step",
        f"query rotation: {p.rotation_share:.2%} of a step; rotation + history moves: "
        f"{p.rotation_share + p.history_share:.2%}",
        "",
        "torch.profiler, self time of the ops over the profiled steps (CPU, or the GPU on cuda):",
        "",
        p.op_table,
    ]
    return "\n".join(lines)


def plot(result: BenchResult, path: Path) -> None:
    """bench.png: step time (ms) against context, one line per method and worker count."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    styles = {"hogwild": ("-", "o"), "baseline": ("--", "s"), "materialize": (":", "^")}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    workers = sorted({r.workers for r in result.rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, n in enumerate(workers):
        rows = sorted((r for r in result.rows if r.workers == n), key=lambda r: r.context)
        xs = [r.context for r in rows]
        for method, (style, marker) in styles.items():
            ys = [getattr(r, f"{method}_ms") for r in rows]
            ax.plot(xs, ys, style, marker=marker, color=colors[k % len(colors)], label=f"{method}, N={n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shared context L (tokens)")
    ax.set_ylabel("decode step (ms, median)")
    threads = result.machine.get("threads")
    ax.set_title(f"{result.model}, {result.dtype}, {result.device} ({threads} threads): decode step time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(workers))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(result: BenchResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    plot(result, out / "bench.png")
    if result.profile is not None:
        (out / "profile.txt").write_text(profile_text(result.profile) + "\n")


# -- command line ------------------------------------------------------------------------------
def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def register(sub) -> None:
    p = sub.add_parser("bench", help="decode-step speed and K/V memory: hogwild vs batched decoding")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
    p.add_argument(
        "--random-config", default=None, choices=sorted(RANDOM_CONFIGS),
        help="random weights from a hand-built config instead of --model (e.g. qwen2.5-7b, for GPUs)",
    )
    p.add_argument("--workers", type=int_list, default=(1, 2, 4), help="worker counts N (default 1,2,4)")
    p.add_argument("--context", type=int_list, default=(512, 2048), help="shared prompt lengths L (default 512,2048)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per method and cell (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="also profile one hogwild step at the largest N and L")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json, bench.png")
    p.set_defaults(func=run_bench_command)


def run_bench_command(args) -> int:
    config = BenchConfig(
        workers=args.workers, contexts=args.context, steps=args.steps, warmup=args.warmup,
        seed=args.seed, profile=args.profile,
    )
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.random_config and args.model:
        raise InputError("give either --model or --random-config, not both")
    if args.random_config:
        model = random_model(args.random_config, args.device, dtype, args.seed)
    else:
        model = load_model(args.model, device=args.device, dtype=dtype)
    result = run_bench(model, config)
    write_outputs(result, args.out)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(markdown_table(result))
        if result.profile is not None:
            print()
            print(profile_text(result.profile))
        print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0

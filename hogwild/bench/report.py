"""What ``hogwild bench`` writes: bench.json, a Markdown table, bench.png (and profile.txt)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from .measure import BenchResult
from .methods import STATS_SUFFIX
from .profile import profile_text

log = logging.getLogger(__name__)


def result_json(result: BenchResult) -> dict:
    """bench.json's object (the profile's text tables go to profile.txt only)."""
    out = result.to_json()
    if out.get("profile"):
        methods = {k: {f: v for f, v in m.items() if f != "table"} for k, m in out["profile"]["methods"].items()}
        out["profile"] = {**out["profile"], "methods": methods}
    return out


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def title(result: BenchResult) -> str:
    m = result.machine
    where = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m.get('threads')} threads"
    ranks = f", --tp {result.tp} (rank 0's K/V)" if result.tp > 1 else ""
    weights = f"{result.quantization} weights" if result.quantization else "weights"
    weights += f" {_mib(result.weight_bytes)} MiB"
    return f"{result.model}, {result.dtype}, {weights}, {result.device} ({where}){ranks}"


def markdown_table(result: BenchResult) -> str:
    """One row per cell and method: ms per decode step, median [quartiles]; worker tokens/s; ratios
    of medians (vs transformers, vs transformers-compiled, a +stats method vs its method); MiB of K/V
    held; prefill s. A method that could not run a cell shows "-"; the reasons follow the table."""
    compiled = "transformers-compiled" in result.methods
    stats = any(m.endswith(STATS_SUFFIX) for m in result.methods)
    head = ["N", "L", "method", "ms/step [quartiles]", "worker tok/s", "vs transformers"]
    head += ["vs compiled"] if compiled else []
    head += ["vs no stats"] if stats else []
    head += ["K/V MiB", "prefill s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in result.cells:
        for name, r in cell.results.items():
            if r.ok:
                row = [f"{r.median_ms:.2f} [{r.iqr_ms[0]:.2f}-{r.iqr_ms[1]:.2f}]", f"{r.tokens_per_s:.1f}",
                       _ratio(r.vs_transformers)] + ([_ratio(r.vs_transformers_compiled)] if compiled else [])
                row += [_ratio(r.vs_no_stats)] if stats else []
                row += [_mib(r.kv_bytes), f"{r.prefill_s:.3f}"]
            else:
                row = ["-"] * (len(head) - 3)
            lines.append(f"| {cell.workers} | {cell.context} | {name} | " + " | ".join(row) + " |")
    text = f"**{title(result)}**\n\n" + "\n".join(lines)
    if stats:
        text += ("\n\n(+stats: the same runner with collaboration statistics on every pass; vs no stats: "
                 "its median over the same method's without them.)")
    if compiled:
        text += "\n\n(transformers-compiled decodes from transformers' one-row prefill: the same prefill time.)"
    skipped = result.skipped()
    if skipped:
        text += "\n\nNot run:\n" + "\n".join(f"- {not_run_line(s, len(result.cells))}" for s in skipped)
    return text


def not_run_line(entry: dict, cells: int) -> str:
    """One entry of ``BenchResult.skipped()`` in words."""
    where = "every cell" if len(entry["cells"]) == cells else ", ".join(f"N={n} L={L}" for n, L in entry["cells"])
    return f"{entry['method']} ({where}): {entry['status']}, {entry['reason']}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(result: BenchResult, path: Path) -> None:
    """bench.png: median step time (ms) against context, one line per method and worker count."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]
    markers = ["o", "s", "^", "D", "v"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    workers = sorted({c.workers for c in result.cells})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, n in enumerate(workers):
        cells = sorted((c for c in result.cells if c.workers == n), key=lambda c: c.context)
        for j, method in enumerate(result.methods):
            ys = [c.results[method].median_ms if method in c.results and c.results[method].ok else math.nan
                  for c in cells]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot([c.context for c in cells], ys, linestyle=styles[j % len(styles)], marker=markers[j % len(markers)],
                    color=colors[k % len(colors)], label=f"{method}, N={n}")
    ax.set_xscale("log", base=2)
    contexts = sorted({c.context for c in result.cells})
    if contexts:
        ax.set_xticks(contexts, [str(L) for L in contexts])
        ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("shared context L (tokens)")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"{title(result)}: decode step time", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=6, ncol=max(1, len(workers)))
    else:
        ax.text(0.5, 0.5, "no cell measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def progress_line(result: BenchResult) -> str:
    """The warm-up times, or the last cell: what a run's log shows as it goes."""
    if not result.cells:
        return "warm-up: " + ", ".join(f"{m} {s:.1f} s" for m, s in result.warmup_s.items()) + f" ({result.wall_s} s)"
    cell = result.cells[-1]
    parts = [f"{m} {r.median_ms:.2f} ms" if r.ok else f"{m} {r.status}" for m, r in cell.results.items()]
    return f"N={cell.workers} L={cell.context}: " + ", ".join(parts) + f" ({result.wall_s} s)"


def write_json(result: BenchResult, out: Path) -> None:
    """bench.json in ``out``, replaced whole (a run killed while writing leaves the previous one)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(result_json(result), indent=2) + "\n")
    os.replace(tmp, out / "bench.json")


def write_outputs(result: BenchResult, out: Path) -> None:
    """bench.json, bench.png and, with a profile, profile.txt in ``out``."""
    write_json(result, out)
    try:
        plot(result, out / "bench.png")
    except Exception as exc:  # e.g. no matplotlib on a bare GPU machine: the numbers matter more
        log.warning("no bench.png: %s: %s", type(exc).__name__, exc)
    if result.profile is not None:
        (out / "profile.txt").write_text(profile_text(result.profile) + "\n")

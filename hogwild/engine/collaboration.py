"""Measures of collaboration: where each worker's attention goes, and how much work is duplicated.

Attention shares (``--collab-stats``): the attention backends record, per pass, the share of each
row's attention mass on each entry of its view (``AttentionStats``); here the entries become block
kinds. A share dict is ``{"prompt": x, "history": x, "protocol": x, "own": x, "others": {name: x}}``
(``protocol``: the small header and marker blocks); a kind the layout lacks is 0 and the shares
of one worker in one pass sum to 1. Duplication is measured on the finished steps' text alone.
Definitions and how to read them: docs/collaboration.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..cache import Block
from ..protocol.layouts import SharedBlocks
from .events import HistoryStep

KINDS = ("prompt", "history", "protocol", "own")
#: Word n-grams for "repeats another worker" (duplication) and for "changed course" (after a check).
DUPLICATE_N = 8
COURSE_N = 4
#: A check answered "yes" changed course when at most this fraction of the next step's word 4-grams
#: are in the worker's step before the check.
COURSE_THRESHOLD = 0.5
#: Lines shorter than this many words are not compared (e.g. "So:", a lone number).
MIN_LINE_WORDS = 3


# -- attention shares ---------------------------------------------------------------------------
def empty_shares(others: Sequence[str], value=0.0) -> dict:
    """A share dict with every kind at ``value`` (a float, or e.g. a list per layer)."""
    return {**{kind: value for kind in KINDS}, "others": {name: value for name in others}}


def block_labels(shared: SharedBlocks, steps: dict[str, Block]) -> dict[int, str]:
    """Block id -> kind ("prompt", "history", "protocol") or, for a worker's step block, its name."""
    labels = {shared.prompt.id: "prompt"}
    if shared.history is not None:
        labels[shared.history.id] = "history"
    for block in (shared.others_header, shared.marker, shared.own_header):
        if block is not None:
            labels[block.id] = "protocol"
    labels.update({block.id: name for name, block in steps.items()})
    return labels


def view_shares(entries: torch.Tensor, view: Sequence[Block], labels: dict[int, str], worker: str,
                others: Sequence[str]) -> dict:
    """Per-layer shares of one worker in one pass. entries: float32 [layers, len(view)], the shares of
    each view entry (``PassOutput.shares``); returns a share dict of lists (one value per layer)."""
    by_kind = {kind: torch.zeros(entries.shape[0]) for kind in (*KINDS, *others)}
    for j, block in enumerate(view):
        label = labels[block.id]
        by_kind["own" if label == worker else label] += entries[:, j]
    out = empty_shares(others)
    for kind in KINDS:
        out[kind] = by_kind[kind].tolist()
    out["others"] = {name: by_kind[name].tolist() for name in others}
    return out


def layer_mean(per_layer: dict) -> dict:
    """A share dict of per-layer lists -> the same dict of means over layers."""
    return {**{k: sum(per_layer[k]) / len(per_layer[k]) for k in KINDS},
            "others": {n: sum(v) / len(v) for n, v in per_layer["others"].items()}}


def add_shares(total: dict, shares: dict) -> None:
    """total += shares (share dicts of floats)."""
    for kind in KINDS:
        total[kind] += shares[kind]
    for name, x in shares["others"].items():
        total["others"][name] += x


def scaled(shares: dict, factor: float, digits: int = 6) -> dict:
    """shares * factor, rounded (for averages)."""
    return {**{k: round(shares[k] * factor, digits) for k in KINDS},
            "others": {n: round(x * factor, digits) for n, x in shares["others"].items()}}


def on_others(shares: dict) -> float:
    """The share on the other workers' current steps together."""
    return sum(shares["others"].values())


def who_reads_whom(shares: dict[str, dict], names: Sequence[str]) -> list[list[float]]:
    """Matrix [reader][writer] over ``names``: the reader's share on the writer's current step (its
    own step on the diagonal); readers without shares get a row of zeros."""
    matrix = []
    for reader in names:
        s = shares.get(reader)
        matrix.append([0.0 if s is None else s["own"] if w == reader else s["others"].get(w, 0.0) for w in names])
    return matrix


def server_payload(event, names: Sequence[str]) -> dict:
    """What a server streams for a ``CollabEvent``: JSON-ready, with the "who reads whom" matrix
    (rows: readers, columns: writers, in ``names`` order) for the page's live table."""
    return {
        "type": "collaboration",
        "forward_passes": event.forward_passes,
        "names": list(names),
        "shares": event.shares,
        "matrix": [[round(x, 4) for x in row] for row in who_reads_whom(event.shares, names)],
    }


# -- duplicated work ----------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lower-cased words (runs of letters, digits and underscores)."""
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def lines(text: str) -> list[str]:
    """Lines worth comparing: whitespace-normalised, lower-cased, at least ``MIN_LINE_WORDS`` words."""
    out = [" ".join(line.lower().split()) for line in text.splitlines()]
    return [line for line in out if len(line.split()) >= MIN_LINE_WORDS]


def redundancy_check_reply(text: str, question: str) -> str | None:
    """For a step that opens with the redundancy check question: its reply, "yes", "no" or "unclear";
    else None."""
    body = text.lstrip()
    if not body.startswith(question.strip()):
        return None
    answer = words(body[len(question.strip()) :])[:1]
    return answer[0] if answer and answer[0] in ("yes", "no") else "unclear"


def duplication(history: Sequence[HistoryStep], names: Sequence[str], question: str,
                forced: Sequence[str] = ()) -> dict[str, dict]:
    """Per worker, over its finished steps in the order they were finished (``history``):

    - ``ngram_overlap``: sum over its steps of |G(s) & E(s)| / sum of |G(s)|, where G(s) are the word
      8-grams of step s and E(s) those of every other worker's steps finished before s (0 without
      8-grams);
    - ``repeated_lines`` of ``lines``: its lines equal to an earlier line of another worker;
    - ``mentions``: per other worker, how many times its name appears in the worker's steps;
    - ``checks``: redundancy checks (steps opening with ``question``), ``checks_yes``,
      ``changed_course``: checks answered "yes" after which the worker's next step shares at most
      ``COURSE_THRESHOLD`` of its word 4-grams with its step before the check.

    ``forced``: protocol texts a step may open with (seeded words, the question), left out of the
    comparisons so that the protocol's own words never count as duplication.
    """
    prefixes = sorted((p.strip() for p in (*forced, question) if p.strip()), key=len, reverse=True)

    def body(text: str) -> str:
        text = text.strip()
        for p in prefixes:
            if text.startswith(p):
                return text[len(p) :]
        return text

    seen_grams: dict[str, set] = {n: set() for n in names}  # each worker's 8-grams so far
    seen_lines: dict[str, set] = {n: set() for n in names}
    stats = {n: {"steps": 0, "ngrams": 0, "repeated_ngrams": 0, "lines": 0, "repeated_lines": 0,
                 "mentions": {m: 0 for m in names if m != n}, "checks": 0, "checks_yes": 0,
                 "changed_course": 0} for n in names}
    own_steps: dict[str, list[str]] = {n: [] for n in names}
    for step in history:
        s = stats[step.worker]
        text = body(step.text)
        grams = ngrams(text, DUPLICATE_N)
        earlier = set().union(*(g for n, g in seen_grams.items() if n != step.worker))
        earlier_lines = set().union(*(x for n, x in seen_lines.items() if n != step.worker))
        step_lines = lines(text)
        s["steps"] += 1
        s["ngrams"] += len(grams)
        s["repeated_ngrams"] += len(grams & earlier)
        s["lines"] += len(step_lines)
        s["repeated_lines"] += sum(line in earlier_lines for line in step_lines)
        for other in s["mentions"]:
            s["mentions"][other] += len(re.findall(rf"\b{re.escape(other)}\b", text))
        seen_grams[step.worker] |= grams
        seen_lines[step.worker] |= set(step_lines)
        own_steps[step.worker].append(step.text)
    for name, texts in own_steps.items():
        for k, text in enumerate(texts):
            answer = redundancy_check_reply(text, question)
            if answer is None:
                continue
            stats[name]["checks"] += 1
            if answer == "yes":
                stats[name]["checks_yes"] += 1
                if 0 < k < len(texts) - 1:
                    stats[name]["changed_course"] += changed_course(body(texts[k - 1]), body(texts[k + 1]))
    out = {}
    for name, s in stats.items():
        n, repeated = s.pop("ngrams"), s.pop("repeated_ngrams")
        out[name] = {"ngram_overlap": round(repeated / n, 6) if n else 0.0, **s}
    return out


def changed_course(before: str, after: str) -> bool:
    """Does ``after`` have word 4-grams, at most ``COURSE_THRESHOLD`` of them shared with ``before``?"""
    grams = ngrams(after, COURSE_N)
    return bool(grams) and len(grams & ngrams(before, COURSE_N)) / len(grams) <= COURSE_THRESHOLD

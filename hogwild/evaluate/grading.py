"""Grading: is an answer (a ``\\boxed{}`` content) equivalent to the reference (math-verify, after
trimming punctuation, thousands separators and unit words), and the majority vote of several
answers, equivalent answers counted together."""

from __future__ import annotations

import re
from collections.abc import Sequence

THOUSANDS = re.compile(r"^(-?)(\d{1,3}(?:,\d{3})+)(\.\d+)?$")
#: "18 dollars", "$12 per hour": a number followed by plain words only.
NUMBER_THEN_WORDS = re.compile(r"^(\\?\$?\s*-?\d[\d,]*(?:\.\d+)?)\s*((?:[A-Za-z]+\.?\s*)+)$")
MATH_WORDS = {"pi", "sqrt", "log", "ln", "sin", "cos", "tan", "e", "i", "x", "y", "n", "and", "or"}


def normalize_answer(answer: str) -> str:
    """Trim an answer for parsing: trailing punctuation, thousands separators, unit words."""
    text = answer.strip().rstrip(".;:,").strip()
    match = NUMBER_THEN_WORDS.match(text)
    if match and not any(word.lower().rstrip(".") in MATH_WORDS for word in match.group(2).split()):
        text = match.group(1).strip()
    match = THOUSANDS.match(text)
    if match:
        text = match.group(1) + match.group(2).replace(",", "") + (match.group(3) or "")
    return text


def parse_answer(answer: str | None) -> list:
    """math-verify's parse of an answer (a \\boxed{} content, LaTeX or plain); [] if none."""
    from math_verify import parse  # (imports sympy: only when something is graded)

    if answer is None:
        return []
    text = normalize_answer(answer)
    if not text:
        return []
    return parse(f"${text}$") or parse(text)


def _shown(parsed: list) -> str | None:
    """The parsed answer as a string (math-verify's own string form when it gives one)."""
    if not parsed:
        return None
    return str(parsed[1]) if len(parsed) > 1 else str(parsed[0])


def check_answer(answer: str | None, reference: str) -> tuple[bool, str | None]:
    """(correct, extracted): is ``answer`` equivalent to ``reference``? A missing answer is wrong."""
    from math_verify import verify

    predicted = parse_answer(answer)
    if not predicted:
        return False, None
    gold = parse_answer(reference)
    if not gold:  # a reference math-verify cannot read: compare the texts
        return normalize_answer(answer or "") == normalize_answer(reference), _shown(predicted)
    return bool(verify(gold, predicted)), _shown(predicted)


def equivalent(a: str, b: str) -> bool:
    """Do two answers mean the same (math-verify, else the same normalised text)?"""
    from math_verify import verify

    pa, pb = parse_answer(a), parse_answer(b)
    if pa and pb:
        return bool(verify(pa, pb)) or bool(verify(pb, pa))
    return normalize_answer(a) == normalize_answer(b)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer, equivalent answers counted together; ties go to the group seen
    first; missing answers do not vote. Returns the group's first answer as written."""
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None or not answer.strip():
            continue
        for group in groups:
            if equivalent(group[0], answer):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None
    return max(groups, key=len)[0]  # max keeps the first of equal-sized groups

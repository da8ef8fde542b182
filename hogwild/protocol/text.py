"""Text rules of the protocol: where a step ends and what the final answer is."""

from __future__ import annotations

import re

ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "cf.", "approx.", "Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "St.", "No.")
SENTENCE_END = re.compile(r"""[.!?]["')\]]*$""")
LIST_MARKER = re.compile(r"(^|\n)[ \t]*(\d+|[a-zA-Z])\.$")  # "1." alone on a line
PLACEHOLDER = re.compile(r"[\s.<>…]*")  # "", "...", "<...>": a copied marker, not an answer


def in_open_fence(text: str) -> bool:
    """True inside an unclosed ``` code fence or $$ display-math fence."""
    code = text.count("```")
    if code % 2:
        return True
    outside_code = "".join(part for i, part in enumerate(text.split("```")) if i % 2 == 0)
    return outside_code.count("$$") % 2 == 1


def is_step_end(text: str) -> bool:
    """A step ends at a paragraph break ("\\n\\n") that follows a sentence end, outside fences."""
    if not text.rstrip(" \t").endswith("\n\n"):
        return False
    body = text.rstrip()
    if not body or in_open_fence(body):
        return False
    if not SENTENCE_END.search(body):
        return False
    last_word = body.split()[-1]
    return last_word not in ABBREVIATIONS and not LIST_MARKER.search(body)


def is_answer(text: str | None) -> bool:
    """False for nothing and for placeholders such as ``...`` or ``<...>`` (a small model copies
    the unfinished-step marker into ``\\boxed{}``)."""
    return text is not None and not PLACEHOLDER.fullmatch(text)


def boxed_answers(text: str) -> list[str]:
    r"""The contents of every complete \boxed{...} in text that hold an answer (not a
    placeholder), nested braces handled, in order."""
    answers = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    content = text[start:i].strip()
                    if is_answer(content):
                        answers.append(content)
                    break
    return answers


def final_answer(text: str) -> str | None:
    r"""The last complete \boxed{...} answer, or None."""
    answers = boxed_answers(text)
    return answers[-1] if answers else None


def close_finisher(text: str) -> str:
    r"""The answer decoded after an open "\boxed{": up to its matching brace (or all of it)."""
    depth = 1
    for i, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[:i].strip()
    return text.strip()

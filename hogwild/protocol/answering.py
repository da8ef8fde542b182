"""The words of "answer while thinking": what the thinkers and the writer are told, as data.

The thinkers reason; the writer streams the answer at the same time, over the same cache. Each
role reads the other's output block where its own prompt puts it:

- a thinker sees ``[thinker prompt, writer output, thinker split, (other thinkers), own output]``:
  the writer's partial answer reads as a draft that will be continued from its thoughts;
- the writer sees ``[writer prompt, thinker output(s), writer split, own output]``: the thinkers'
  tokens read as its own thinking section, closed by a note that more thoughts will appear there.

A probe (a temporary block after a thinker's view, never part of its thoughts) asks whether the
thoughts are far enough ahead of the draft for one more paragraph: P(yes) > P(no) lets the writer
go on. For models whose chat template has reasoning markers (``<think>``), the thinking sections
use them; otherwise the plain-text markers below.
"""

from __future__ import annotations

from dataclasses import dataclass

THINKER_SYSTEM = """\
You are thinking about a problem while a writer, who reads your thoughts, writes the answer for the \
user at the same time. Below the problem you see the answer drafted so far; it will be continued \
from what you think next. Reason step by step in short paragraphs, stay ahead of the draft, and \
fix what it gets wrong by thinking it through. When your reasoning is complete, end it with {end}."""

THINKERS_SYSTEM = """\
You are one of {count} thinkers ({names}) reasoning about a problem together while a writer, who \
reads all your thoughts, writes the answer for the user at the same time. You see the answer drafted \
so far, then the other thinkers' thoughts as they write them, then your own. Split the work, check \
each other, and do not repeat what someone else is doing. Reason in short paragraphs. When the \
reasoning is complete, end it with {end}."""

WRITER_SYSTEM = """\
Answer the user's problem. Your thoughts appear in your thinking section while you write; write the \
answer from them, one paragraph at a time, clearly and without repeating the thoughts. Put the final \
answer inside \\boxed{}."""


@dataclass(frozen=True)
class AnsweringProtocol:
    """Everything the two roles are told and the markers between their blocks.

    ``{end}``, ``{count}`` and ``{names}`` in the system prompts are filled in; ``think_open`` and
    ``think_close`` are used where the chat template has no reasoning markers of its own.
    ``probe`` is asked in a thinker's own voice; ``yes``/``no`` are the words whose next-token
    probabilities decide it.
    """

    thinker_system: str = THINKER_SYSTEM
    thinkers_system: str = THINKERS_SYSTEM
    writer_system: str = WRITER_SYSTEM
    draft_intro: str = "Answer drafted so far (it is being continued):\n\n"
    thinker_split: str = "\n\n(The draft continues from my thoughts.)\n\nMy thoughts:\n"
    thinker_header: str = "**{name}:** "
    writer_split: str = "\n\n(More of my thoughts will appear above as I think.)\n"
    think_open: str = "Thoughts:\n"
    think_close: str = "\n\nAnswer:\n"
    end_of_thinking: str = "</think>"
    probe: str = (
        "\n\nQuick check: are my thoughts far enough ahead of the drafted answer for it to go on by one "
        "more paragraph? (yes/no):"
    )
    yes: str = " yes"
    no: str = " no"
    probe_every: int = 20  # passes between probes while the writer waits
    finisher: str = "\n\nGiven the limited time, I have to answer now. The final answer is \\boxed{"
    finisher_tokens: int = 24  # the finisher's answer is decoded up to its closing brace or this many tokens

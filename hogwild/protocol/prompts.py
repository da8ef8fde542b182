"""The words of the protocol, in one typed, configurable place (written in our own words)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi",
    "Ivan", "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil",
)

SYSTEM_PROMPT = """\
You are one of {count} workers ({names}) solving a problem together, all writing at the same time \
into one shared workspace. Everyone sees everything the others have written, even unfinished sentences.

The workspace shows three parts:
- "### Past steps": steps that are finished, in the order they were finished.
- "### Work in progress (others)": what the other workers are writing right now; an unfinished step \
ends with {marker}.
- "### Work in progress (own)": your own current step, always last.

Write in short steps of one paragraph, each starting with your name and step number. Plan together, \
split the work, and check each other's results. If you notice that you are doing the same thing as \
someone else, say so and switch to something useful. Whoever is sure of the final answer puts it \
inside \\boxed{{}}."""

SOLO_SYSTEM_PROMPT = """\
Solve the problem step by step, in short paragraphs. Put the final answer inside \\boxed{}."""

FEW_SHOT = """\
Example of good collaboration (a different problem):
**Alice [1]:** Hi, I'm Alice. Here's how we can split it: I compute the area, Bob checks the perimeter.
**Bob [1]:** Hi, I'm Bob. Agreed, I take the perimeter: 2 * (3 + 4) = 14.
**Alice [2]:** The area is 3 * 4 = 12. Bob, your perimeter matches mine, so we are done: \\boxed{12}."""


@dataclass(frozen=True)
class ProtocolConfig:
    """Everything the workers are told, and the markers that shape the shared workspace.

    Text fields may use ``{name}``, ``{step}``, ``{count}``, ``{names}`` and ``{marker}`` where
    noted. ``collab_every`` is in generated tokens per worker (0 = never ask).
    """

    system_prompt: str = SYSTEM_PROMPT
    solo_system_prompt: str = SOLO_SYSTEM_PROMPT
    few_shot: str | None = None
    names: tuple[str, ...] = DEFAULT_NAMES
    first_steps: tuple[str, ...] = ("Hi, I'm Alice. Here's how we can", "Hi, I'm Bob.")
    first_step_default: str = "Hi, I'm {name}."
    step_header: str = "**{name} [{step}]:**"
    unfinished_marker: str = " <...>\n\n"
    history_header: str = "### Past steps\n\n"
    others_header: str = "### Work in progress (others)\n\n"
    own_header: str = "### Work in progress (own)\n\n"
    collab_question: str = "Quick check: am I doing redundant work? (yes/no): "
    collab_every: int = 512
    finisher: str = (
        "\n\n### Final answer\n\nGiven the limited time, we have to answer now. "
        "Based on all the work above, the final answer is \\boxed{"
    )
    finisher_tokens: int = 16
    banned_strings: tuple[str, ...] = ("</think>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")

    def name(self, worker: int) -> str:
        return self.names[worker]

    def system(self, workers: int, solo: bool) -> str:
        if solo:
            return self.solo_system_prompt
        names = ", ".join(self.names[:workers])
        text = self.system_prompt.format(count=workers, names=names, marker=self.unfinished_marker.strip())
        return text + ("\n\n" + self.few_shot if self.few_shot else "")

    def header(self, worker: int, step: int, collab_check: bool) -> str:
        """The forced start of a step: its header, then the seeded first words or the check question.

        The header has no trailing space: the model writes the space with its first word, as BPE
        tokenizers expect.
        """
        text = self.step_header.format(name=self.name(worker), step=step)
        if step == 1:
            seeds = self.first_steps
            seed = seeds[worker] if worker < len(seeds) else self.first_step_default.format(name=self.name(worker))
            text += " " + seed
        elif collab_check:
            text += " " + self.collab_question.rstrip()
        return text

"""Unit tests of the protocol's text rules: step boundaries, answers, headers and the finisher."""

import pytest

from hogwild.protocol.prompts import ProtocolConfig
from hogwild.protocol.text import close_finisher, final_answer, in_open_fence, is_answer, is_step_end


@pytest.mark.parametrize(
    "text, ends",
    [
        ("We add 3 and 4 to get 7.\n\n", True),
        ("Is it 7?\n\n", True),
        ("That works!\n\n", True),
        ('He said "done."\n\n', True),
        ("(We check it.)\n\n", True),
        ("We add 3 and 4 to get 7.\n", False),  # a line break is not a paragraph break
        ("We add 3 and 4 to get 7.", False),
        ("We add 3 and 4\n\n", False),  # no sentence end
        ("Use a tool, e.g.\n\n", False),  # abbreviation
        ("Ask Dr.\n\n", False),
        ("The steps are:\n1.\n\n", False),  # a list marker, not a sentence
        ("Code:\n```python\nx = 1.\n\n", False),  # inside an open code fence
        ("Code:\n```python\nx = 1\n```\nDone.\n\n", True),  # the fence is closed
        ("Math:\n$$\nx = 1.\n\n", False),  # inside open display math
        ("Math:\n$$x = 1$$\nSo x is one.\n\n", True),
        ("   \n\n", False),
        ("We are done.\n\n  ", True),
    ],
)
def test_step_end(text, ends):
    assert is_step_end(text) is ends


def test_fences():
    assert in_open_fence("```\ncode")
    assert not in_open_fence("```\ncode\n```")
    assert in_open_fence("$$ x")
    assert not in_open_fence("```\n$$\n```")  # $$ inside code does not count


@pytest.mark.parametrize(
    "text, answer",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}} is it", r"\frac{1}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the last answer wins
        (r"\boxed{ {a}_{b} }", "{a}_{b}"),
        (r"an open \boxed{12", None),  # not complete yet
        (r"\boxed{3} and an open \boxed{4", "3"),
        ("no answer here", None),
        (r"\boxed{...}", None),  # a copied placeholder is not an answer
        (r"\boxed{12} then \boxed{<...>}", "12"),
        (r"\boxed{}", None),
    ],
)
def test_final_answer(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize("text", ["...", "<...>", "<...>\n\n<...>", "", " … "])
def test_placeholders_are_not_answers(text):
    assert not is_answer(text)


@pytest.mark.parametrize("text", ["0", "x = 3", r"\emptyset", "-1.5", r"\frac{1}{2}"])
def test_answers_are_answers(text):
    assert is_answer(text)


def test_close_finisher():
    assert close_finisher("72} dollars.") == "72"
    assert close_finisher(r"\frac{1}{2}}.") == r"\frac{1}{2}"
    assert close_finisher(" 7") == "7"  # ran out of tokens before the brace


def test_headers_and_finisher_text():
    p = ProtocolConfig()
    assert p.header(0, 1, False) == "**Alice [1]:** Hi, I'm Alice. Here's how we can"
    assert p.header(1, 1, False) == "**Bob [1]:** Hi, I'm Bob."
    assert p.header(2, 1, False) == "**Carol [1]:** Hi, I'm Carol."
    assert p.header(0, 3, False) == "**Alice [3]:**"
    assert p.header(3, 5, True) == "**Dave [5]:** Quick check: am I doing redundant work? (yes/no):"
    assert p.finisher.rstrip().endswith("\\boxed{")
    assert "limited time" in p.finisher
    assert len(p.names) == 16 and len(set(p.names)) == 16
    system = p.system(3, solo=False)
    assert "Alice, Bob, Carol" in system and "<...>" in system and "\\boxed{}" in system

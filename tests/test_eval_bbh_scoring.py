"""BBH answer extraction and scoring: kallm.eval.bbh.is_correct and friends."""

from __future__ import annotations

import pytest

from kallm.eval.bbh import answer_choices, answer_kind, canonical, extract_answer, is_correct, normalize

SHAPES = (
    "This SVG path element <path d=\"M 55.57,80.69 L 57.38,65.80\"/> draws a\n"
    "Options:\n(A) circle\n(B) heptagon\n(C) hexagon\n(D) kite\n(E) line"
)
RUIN = (
    "Which of the following is a humorous edit of this artist or movie name: 'rain man'?\n"
    "Options:\n(A) ruin man\n(B) rains man\n(C) rain men\n(D) rainmman"
)
DYCK = "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: [ { ( < >"


@pytest.mark.parametrize("target, kind", [
    ("(A)", "choice"), ("(K)", "choice"), ("True", "binary"), ("False", "binary"), ("Yes", "binary"),
    ("no", "binary"), ("valid", "binary"), ("invalid", "binary"), ("7", "number"), ("-12", "number"),
    (") ] }", "brackets"), (">", "brackets"), ("apple banana cherry", "text"), ("Monsters, Inc", "text"),
    ("12/25/1937", "text"),
])
def test_answer_kind(target, kind):
    assert answer_kind(target) == kind


@pytest.mark.parametrize("response, target", [
    ("(B)", "(B)"),
    ("The answer is (B).", "(B)"),
    ("So the answer is (C) hexagon.", "(C)"),
    ("**Answer:** (D)", "(D)"),
    ("Answer: B", "(B)"),
    ("B", "(B)"),
    ("B. heptagon", "(B)"),
    ("(B) heptagon, because the path has seven sides. (A) would need a curve.", "(B)"),
    ("Let's look at each option. (A) is round, (C) has six sides, so the shape is (B).", "(B)"),
    ("The correct option is option B", "(B)"),
    ("I think the answer would be (E) line, since it is a single segment. (A) is wrong.", "(E)"),
    ("(C) is the shape. My answer:", "(C)"),  # nothing after the marker: the reply's own rule applies
])
def test_choice_correct(response, target):
    assert is_correct(response, target)


@pytest.mark.parametrize("response, target", [
    ("The answer is (A).", "(B)"),
    ("(A) circle", "(B)"),
    ("A circle is drawn.", "(A)"),  # an article, not the option letter
    ("I am not sure.", "(B)"),
    ("", "(B)"),
    ("The answer is (b).", "(B)"),
])
def test_choice_incorrect(response, target):
    assert not is_correct(response, target)


def test_choice_by_option_text_needs_the_question():
    assert is_correct("The shape is a heptagon.", "(B)", SHAPES)
    assert not is_correct("The shape is a heptagon.", "(B)")
    assert not is_correct("The shape is a hexagon.", "(B)", SHAPES)
    # Naming two options is no answer.
    assert not is_correct("It is either a heptagon or a hexagon.", "(B)", SHAPES)
    # An option contained in a longer named option does not make the reply ambiguous.
    assert extract_answer("The humorous edit is 'rainmman'.", "(D)", RUIN) == "(D)"
    assert extract_answer("ruin man", "(A)", RUIN) == "(A)"


@pytest.mark.parametrize("response, target", [
    ("True", "True"),
    ("true.", "True"),
    ("So the answer is True.", "True"),
    ("not ( True ) and ( True ) evaluates to False", "False"),
    ("False. Because not True is False and False and True is False.", "False"),
    ("**Answer:** valid", "valid"),
    ("The argument is deductively invalid.", "invalid"),
    ("Yes, the black wire caused the short circuit.", "Yes"),
    ("No. Taking the steps you end up 3 steps left of where you started, so the answer is: No", "No"),
    ("Based on the premises, the answer is valid. Invalid arguments would need a gap.", "valid"),
    ("yes", "yes"),
    ("True. That is my final answer:", "True"),
])
def test_binary_correct(response, target):
    assert is_correct(response, target)


@pytest.mark.parametrize("response, target", [
    ("False", "True"),
    ("The argument is invalid.", "valid"),  # "valid" inside "invalid" does not count
    ("The argument is valid.", "invalid"),
    ("It depends.", "Yes"),
    ("Yes", "No"),
    ("The answer is No, although yes would be tempting.", "Yes"),
])
def test_binary_incorrect(response, target):
    assert not is_correct(response, target)


@pytest.mark.parametrize("response, target", [
    ("7", "7"),
    ("You have 7 musical instruments.", "7"),
    ("A flute (1), a piano (2), two violins (4). So the answer is 4.", "4"),
    ("1 + 2 + 3 = 6", "6"),
    ("There are seven vegetables.", "7"),
    ("The result is -12.", "-12"),
    ("The answer is 1,024", "1024"),
    ("The answer is 12.0", "12"),
])
def test_number_correct(response, target):
    assert is_correct(response, target)


@pytest.mark.parametrize("response, target", [
    ("8", "7"),
    ("The answer is 12, not 7.", "7"),
    ("I cannot count them.", "7"),
    ("5 - 3 = 2", "-3"),
])
def test_number_incorrect(response, target):
    assert not is_correct(response, target)


@pytest.mark.parametrize("response, target", [
    (") ] }", ") ] }"),
    ("The answer is ) ] }.", ") ] }"),
    ("`> ) } ]`", "> ) } ]"),
    ("To close the sequence we need: > ) } ]", "> ) } ]"),
    (")]}", ") ] }"),
])
def test_dyck_correct(response, target):
    assert is_correct(response, target)


@pytest.mark.parametrize("response", [
    ".", "!", "...", "?!", "", "I don't know.", "The sequence is complete.", ") ]", "} ] )", ") ] } >",
])
def test_dyck_punctuation_only_target_is_not_matched_by_any_punctuation(response):
    # A normalization that strips punctuation would turn the target into "" and match
    # every punctuation-only (or empty) reply.
    assert not is_correct(response, ") ] }")


def test_dyck_target_never_normalizes_to_nothing():
    assert normalize(") ] }") == ""  # why the brackets are matched as tokens instead
    assert canonical(") ] }") == ") ] }"
    assert canonical(">") == ">"


def test_dyck_reply_repeating_the_input_counts_with_the_question():
    full = "[ { ( < > ) } ]"
    assert is_correct(full, ") } ]", DYCK)
    assert not is_correct(full, ") } ]")  # without the question the whole sequence is the answer
    assert not is_correct("[ { ( < > ]", ") } ]", DYCK)


@pytest.mark.parametrize("response, target", [
    ("apple banana cherry", "apple banana cherry"),
    ("Apple, banana, cherry.", "apple banana cherry"),
    ("The answer is apple banana cherry.\nI sorted them alphabetically.", "apple banana cherry"),
    ("So the answer is Monsters, Inc. It is a family film.", "Monsters, Inc"),
    ("The answer is: the Monsters Inc", "Monsters, Inc"),
    ("01/04/1938", "01/04/1938"),
])
def test_text_correct(response, target):
    assert is_correct(response, target)


@pytest.mark.parametrize("response, target", [
    ("banana apple cherry", "apple banana cherry"),
    ("apple banana", "apple banana cherry"),
    ("", "apple banana cherry"),
    ("...", "apple banana cherry"),
])
def test_text_incorrect(response, target):
    assert not is_correct(response, target)


def test_punctuation_only_text_target_is_compared_by_symbols():
    assert is_correct("- - +", "- - +")
    assert not is_correct("+ - -", "- - +")
    assert not is_correct("", "- - +")
    assert not is_correct("...", "- - +")


def test_normalize():
    assert normalize("  The Quick, brown FOX!  ") == "quick brown fox"
    assert normalize("an apple a day") == "apple day"
    assert normalize("theatre") == "theatre"  # articles only as whole words


def test_answer_choices():
    assert answer_choices({"input": SHAPES, "target": "(B)"}) == ["(A)", "(B)", "(C)", "(D)", "(E)"]
    assert answer_choices({"input": "x", "target": "False"}) == ["True", "False"]
    assert answer_choices({"input": "x", "target": "No"}) == ["Yes", "No"]
    assert answer_choices({"input": "x", "target": "yes"}) == ["yes", "no"]
    assert answer_choices({"input": "x", "target": "invalid"}) == ["valid", "invalid"]
    # Free-form answers, and a target outside the listed options, have no closed set.
    assert answer_choices({"input": "x", "target": "7"}) is None
    assert answer_choices({"input": DYCK, "target": ") } ]"}) is None
    assert answer_choices({"input": SHAPES, "target": "(F)"}) is None
    assert answer_choices({"input": SHAPES, "target": "Monsters, Inc"}) is None

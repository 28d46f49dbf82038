"""VQA answer normalisation (the official rules and the evaluation page's examples) and accuracy."""

from __future__ import annotations

import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.eval.vqa_metrics import answer_accuracy, normalize_answer, vqa_scores


@pytest.mark.parametrize("raw, normalised", [
    # the evaluation page's examples
    ("dont", "don't"),
    ("100,978", "100978"),
    ("girl's", "girl's"),      # apostrophes stay (possessives)
    ("2:50 pm", "2:50 pm"),    # colons stay (times)
    # lower case, periods unless a digit follows, articles, number words zero..ten
    ("Yes.", "yes"),
    ("3.5", "3.5"),
    ("u.s.", "us"),
    ("A dog", "dog"),
    ("the  Red   car", "red car"),
    ("an apple", "apple"),
    ("Two", "2"),
    ("ten", "10"),
    ("none", "0"),
    ("twenty two", "twenty 2"),  # word by word: the map knows zero..ten, not "twenty"
    ("eleven", "eleven"),
    ("isnt", "isn't"),
    ("yes\n", "yes"),
    # punctuation: next to a space it is deleted, inside a word it becomes a space ...
    ("black-and-white", "black and white"),
    ("red, blue", "red blue"),
    ("red,blue", "red blue"),
    ("yes/no", "yes no"),
    ("(left)", "left"),
    # ... unless the text has a comma between digits: then every mark is deleted
    ("1,000/2", "10002"),
])
def test_official_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize("matching, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_annotator_rule(matching, accuracy):
    """Leave one of 10 out, min(matches among the other 9 / 3, 1), averaged.

    k matching answers: the k subsets without a match score min((k-1)/3, 1), the 10-k others
    min(k/3, 1); e.g. k = 1: 9 * 1/3 / 10 = 0.3, k = 3: (3 * 2/3 + 7) / 10 = 0.9.
    """
    answers = ["red"] * matching + ["blue"] * (10 - matching)
    assert answer_accuracy("Red.", answers) == pytest.approx(accuracy, abs=1e-12)


def test_ground_truth_answers_are_normalised_too():
    assert answer_accuracy("2", ["Two", "two.", "2", "TWO"] + ["three"] * 6) == pytest.approx(1.0)


def test_single_answer_is_exact_match_after_normalisation():
    assert answer_accuracy("The dog.", ["dog"]) == 1.0
    assert answer_accuracy("dogs", ["dog"]) == 0.0
    with pytest.raises(LaVITError, match="no ground-truth answers"):
        answer_accuracy("dog", [])


def test_overall_and_per_answer_type():
    answers = {1: ["yes"] * 10, 2: ["2"] + ["3"] * 9, 3: ["red"] * 2 + ["blue"] * 8, 4: ["cat"]}
    predictions = {1: "Yes", 2: "two", 3: "red", 4: "dog"}
    types = {1: "yes/no", 2: "number", 3: "other", 4: "other"}
    result = vqa_scores(predictions, answers, answer_types=types)
    assert result["per_question"] == pytest.approx({1: 100.0, 2: 30.0, 3: 60.0, 4: 0.0})
    assert result["overall"] == pytest.approx((100 + 30 + 60 + 0) / 4)
    assert result["per_answer_type"] == pytest.approx({"number": 30.0, "other": 30.0, "yes/no": 100.0})
    assert result["count"] == 4
    assert "per_answer_type" not in vqa_scores(predictions, answers)


def test_mismatched_questions_are_one_line_errors():
    with pytest.raises(LaVITError, match=r"no prediction for 1 of 2 questions \(first: 2\)"):
        vqa_scores({1: "yes"}, {1: ["yes"], 2: ["no"]})
    with pytest.raises(LaVITError, match="1 predictions have no ground-truth answers"):
        vqa_scores({1: "yes", 3: "no"}, {1: ["yes"]})
    with pytest.raises(LaVITError, match="no questions"):
        vqa_scores({}, {})

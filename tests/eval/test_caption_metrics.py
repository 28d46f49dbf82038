"""Caption metrics against values computed by hand from the BLEU, ROUGE-L and CIDEr-D definitions."""

from __future__ import annotations

import math
import sys

import pytest

from lavit_mlx.errors import LaVITError, MissingDependencyError

pytest.importorskip("pycocoevalcap", reason="needs the [eval] extra")

from lavit_mlx.eval.caption_metrics import (  # noqa: E402
    caption_scores,
    java_available,
    ptb_tokenize,
    python_tokenize,
)

HAS_JAVA = java_available()
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="no Java runtime (METEOR and the PTB jar need one)")

# Two images, one reference each. Raw text: case and punctuation must not matter.
BLEU_REFS = {1: ["A cat sits on the mat."], 2: ["A dog runs in the park."]}
BLEU_PREDS = {1: ["a cat sits on a mat"], 2: ["The dog runs!"]}


def expected_bleu():
    """Corpus BLEU (coco-caption: clipped n-gram counts summed over images, closest ref length).

    image 1: "a cat sits on a mat" vs "a cat sits on the mat"; image 2: "the dog runs" vs
    "a dog runs in the park". Matches / candidate n-grams, summed:
    1-grams 5/6 + 3/3 = 8/9 ("a" twice, clipped to once); 2-grams 3/5 + 1/2 = 4/7;
    3-grams 2/4 + 0/1 = 2/5; 4-grams 1/3 + 0/0 = 1/3. Lengths 9 vs 12: BP = exp(1 - 12/9).
    """
    precisions = [8 / 9, 4 / 7, 2 / 5, 1 / 3]
    brevity = math.exp(1 - 12 / 9)
    return [brevity * math.prod(precisions[:n]) ** (1 / n) for n in range(1, 5)]


def expected_rouge():
    """ROUGE-L F with beta 1.2: LCS 5 of 6/6 words (image 1), 2 of 3/6 (image 2)."""
    def f_measure(precision, recall, beta=1.2):
        return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
    return (f_measure(5 / 6, 5 / 6) + f_measure(2 / 3, 2 / 6)) / 2


def test_bleu_and_rouge_match_hand_computation_without_java():
    result = caption_scores(BLEU_REFS, BLEU_PREDS, use_java=False)
    assert result["tokenizer"] == "python"
    for name, value in zip(("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"), expected_bleu()):
        assert result["scores"][name] == pytest.approx(value, rel=1e-6), name
    assert result["scores"]["ROUGE-L"] == pytest.approx(expected_rouge(), rel=1e-9)
    assert "METEOR" not in result["scores"]
    assert set(result["per_image"]) == {1, 2}


def test_cider_d_matches_hand_computation():
    """Two images: n-grams shared by both images' references have IDF log(2/2) = 0.

    Image 2 (prediction = reference "a dog runs"): cosine 1 for n = 1..3, 0 for n = 4 (no
    4-grams): 10 * 3/4 = 7.5. Image 1 ("a cat" vs "a cat sits"): n = 1 and n = 2 cosines are
    1/sqrt(2) (the "a" weight is 0), n = 3, 4 are 0, and the length penalty is
    exp(-1/(2 * 6^2)): 10 * (2 / sqrt(2)) / 4 * exp(-1/72).
    """
    references = {1: ["a cat sits"], 2: ["a dog runs"]}
    predictions = {1: "a cat", 2: ["a dog runs"]}
    result = caption_scores(references, predictions, use_java=False)
    image_1 = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert result["per_image"][2]["CIDEr"] == pytest.approx(7.5, rel=1e-12)
    assert result["per_image"][1]["CIDEr"] == pytest.approx(image_1, rel=1e-12)
    assert result["scores"]["CIDEr"] == pytest.approx((image_1 + 7.5) / 2, rel=1e-12)


def test_single_image_notes_that_cider_needs_a_set():
    result = caption_scores({"x": ["a cat"]}, {"x": "a cat"}, use_java=False)
    assert result["scores"]["CIDEr"] == 0.0
    assert any("single image" in note for note in result["notes"])


def test_without_java_on_path_reports_the_java_free_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java anywhere
    assert not java_available()
    result = caption_scores(BLEU_REFS, BLEU_PREDS)
    assert result["tokenizer"] == "python"
    assert set(result["scores"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert any("apt-get install default-jre-headless" in note and "brew install openjdk" in note
               for note in result["notes"])
    with pytest.raises(LaVITError, match="Java runtime.*apt-get install default-jre-headless"):
        caption_scores(BLEU_REFS, BLEU_PREDS, use_java=True)


def test_python_tokenizer_follows_ptb_rules():
    assert python_tokenize("A man's hat (red), isn't it?") == "a man 's hat -lrb- red -rrb- is n't it"
    assert python_tokenize('"Hello," she said -- 1,000 dogs at 2:50.') == "hello she said 1,000 dogs at 2:50"
    assert python_tokenize("The U.S. flag on Main St.") == "the u.s. flag on main st."
    assert python_tokenize("I cannot see 3.5 black-and-white cats...") == "i can not see 3.5 black-and-white cats"


# Sentences whose PTB tokenisation (Stanford CoreNLP 3.4.1, coco-caption's jar) the
# pure-Python tokenizer must reproduce token for token.
PTB_SENTENCES = [
    "A dog. A cat sits on a mat.",
    "[brackets] {braces} 'single quoted' it's o'clock",
    "Two men's hats -- and a woman; one: yes? no! wow",
    "the dogs' toys, mr. smith and dr. who at st. louis in the u.s",
    "a #1 fan & friend @ home with 100-200 people/day",
    "I'm you're we've they'll she'd wanna gotta can't won't",
    "\"Hello,\" she said - it's 'fine'.",
    "pens, pencils, etc.",
    "mr. u.s. 50% $5.00 hello!!! what?!",
    "a man\u2019s hat \u201cquoted\u201d don\u2019t",
    "the U.S. flag. word- -word plan a.",
    "A man is holding a frisbee (red) in the park...",
    "there are 3.5 cups; isn't that a lot?",
]


@needs_java
def test_python_tokenizer_agrees_with_the_ptb_jar():
    java = ptb_tokenize(PTB_SENTENCES)
    assert [python_tokenize(sentence) for sentence in PTB_SENTENCES] == java


@needs_java
@pytest.mark.slow
def test_java_path_gives_meteor_and_the_same_bleu():
    references = dict(BLEU_REFS)
    predictions = dict(BLEU_PREDS)
    references[3] = ["Two giraffes stand in a field."]
    predictions[3] = "two giraffes stand in a field"
    result = caption_scores(references, predictions, use_java=True)
    assert result["tokenizer"] == "ptb-java"
    meteor = {key: scores["METEOR"] for key, scores in result["per_image"].items()}
    assert 0 < meteor[2] < meteor[1] < meteor[3] <= 1.0  # exact match scores highest
    assert 0 < result["scores"]["METEOR"] < 1  # from the summed statistics, not a mean of the three
    python = caption_scores(references, predictions, use_java=False)
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert result["scores"][name] == pytest.approx(python["scores"][name], rel=1e-12), name


def test_mismatched_ids_and_bad_values_are_one_line_errors():
    with pytest.raises(LaVITError, match=r"no prediction for 1 of 2 images \(first: 2\)"):
        caption_scores(BLEU_REFS, {1: "a cat"}, use_java=False)
    with pytest.raises(LaVITError, match="1 predictions have no reference captions"):
        caption_scores(BLEU_REFS, {**BLEU_PREDS, 9: "x"}, use_java=False)
    with pytest.raises(LaVITError, match="must be one string, got 2 items"):
        caption_scores(BLEU_REFS, {1: ["a", "b"], 2: "c"}, use_java=False)
    with pytest.raises(LaVITError, match="non-empty list of strings"):
        caption_scores({1: []}, {1: "a"}, use_java=False)


def test_missing_pycocoevalcap_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap.tokenizer", None)
    with pytest.raises(MissingDependencyError, match=r"lavit-mlx\[eval\]"):
        caption_scores(BLEU_REFS, BLEU_PREDS, use_java=False)

"""VQA accuracy as the official VQA evaluation computes it (GT-Vision-Lab/VQA, vqaEval.py).

Answers are normalised as the evaluation page (visualqa.org/evaluation.html) and script
describe: newlines/tabs to spaces, punctuation except apostrophe and colon removed (a mark
next to a space, or anywhere once the text has a comma between digits, is deleted;
otherwise it becomes a space, so 100,978 -> 100978 and "black-and-white" -> "black and
white"), periods removed unless a digit follows, lower case, number words zero..ten (and
"none") to digits, articles a/an/the dropped, missing apostrophes restored ("dont" ->
"don't"). The page says the same processing is applied to the ground-truth answers, so
both sides are always normalised here (the released annotations are already in that form).

With several answers per question, accuracy is the 10-annotator rule: for each answer
left out, min(#matches among the others / 3, 1), averaged over the leave-one-out subsets.
With a single answer (GQA style) it is exact match after normalisation. Accuracies are
percentages, as the official script reports them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, Hashable, List, Mapping, Optional, Sequence

from ..errors import LaVITError

# The official punctuation list: apostrophe and colon are not in it.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Missing apostrophes the official script restores, applied to lower-cased words (its
# entries with capitals, such as "Im", can never match there and are left out).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # sic: the official map turns "somebody'd" into "somebodyd"
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a look-ahead where a look-behind was
# meant, so only the next character decides: "3.5" keeps its period, "5." and "u.s." do not.
_PERIOD = re.compile(r"\.(?!\d)")


def strip_punctuation(text: str) -> str:
    """The official processPunctuation step (see the module docstring)."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The official test looks at the original text, not at the text being edited.
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_words(text: str) -> str:
    """The official processDigitArticle step: lower case, digits, no articles, apostrophes."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it.

    Args:
        answer: a predicted or ground-truth answer.

    Returns:
        The normalised answer ("Two dogs." -> "2 dogs", "dont" -> "don't", "a dog" -> "dog").
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(text))


def answer_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction, in [0, 1].

    Args:
        prediction: the model's answer (raw).
        answers: the ground-truth answers (raw): VQA's ten, or a single one (GQA).

    Returns:
        The 10-annotator rule averaged over the leave-one-out subsets when there are
        several answers; 1.0 or 0.0 (exact match after normalisation) for a single one.
    """
    if not answers:
        raise LaVITError("a question has no ground-truth answers")
    predicted = normalize_answer(prediction)
    truths = [normalize_answer(answer) for answer in answers]
    if len(truths) == 1:
        return float(predicted == truths[0])
    matches = sum(truth == predicted for truth in truths)
    # Leaving out a matching answer leaves matches - 1 among the others, any other leaves matches.
    total = sum(min((matches - (truth == predicted)) / 3.0, 1.0) for truth in truths)
    return total / len(truths)


def vqa_scores(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]],
               answer_types: Optional[Mapping[Hashable, str]] = None) -> dict:
    """VQA accuracy over a question set, overall and per answer type.

    Args:
        predictions: {question id: predicted answer}.
        answers: {question id: [ground-truth answers]}, the same ids.
        answer_types: {question id: "yes/no" | "number" | "other" | ...}, optional.

    Returns:
        {"overall": percent, "per_answer_type": {type: percent} (when types are given),
         "per_question": {question id: percent}, "count": number of questions}.
    """
    if not answers:
        raise LaVITError("no questions to evaluate")
    missing = [key for key in answers if key not in predictions]
    if missing:
        raise LaVITError(f"no prediction for {len(missing)} of {len(answers)} questions (first: {missing[0]!r})")
    extra = [key for key in predictions if key not in answers]
    if extra:
        raise LaVITError(f"{len(extra)} predictions have no ground-truth answers (first: {extra[0]!r})")
    per_question: Dict[Hashable, float] = {}
    by_type: Dict[str, List[float]] = defaultdict(list)
    for key, truths in answers.items():
        if isinstance(truths, str):
            truths = [truths]
        prediction = predictions[key]
        if not isinstance(prediction, str):
            raise LaVITError(f"prediction of question {key!r} must be a string")
        accuracy = 100.0 * answer_accuracy(prediction, truths)
        per_question[key] = accuracy
        if answer_types is not None and answer_types.get(key) is not None:
            by_type[answer_types[key]].append(accuracy)
    result = {"overall": sum(per_question.values()) / len(per_question), "count": len(per_question),
              "per_question": per_question}
    if answer_types is not None:
        result["per_answer_type"] = {name: sum(values) / len(values) for name, values in sorted(by_type.items())}
    return result

"""Caption metrics as the MS-COCO caption evaluation computes them.

Follows coco-caption (tylin/coco-caption, on PyPI as `pycocoevalcap`, extra `[eval]`):
captions are tokenised with Stanford's PTBTokenizer (`-preserveLines -lowerCase`, the
tokens of its PUNCTUATIONS list dropped) and scored by its Bleu (n = 4, closest reference
length), Meteor 1.5, Rouge (ROUGE-L, beta 1.2) and Cider (CIDEr-D, sigma 6). SPICE is never
run (it downloads models). The tokenizer and METEOR are Java programs: without a Java
runtime, `python_tokenize` (the PTB rules that matter for captions) stands in for the
tokenizer and METEOR is left out, with a note saying how to get Java.

Scores are on coco-caption's scale: BLEU/METEOR/ROUGE-L in [0, 1], CIDEr 1.340 for the
paper's "CIDEr 134.0".
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Union

from ..errors import LaVITError, MissingDependencyError

JAVA_HINT = (
    "METEOR and the official PTB tokenizer need a Java runtime "
    "(Debian/Ubuntu: apt-get install default-jre-headless; macOS: brew install openjdk)"
)
INSTALL_HINT = "caption metrics need pycocoevalcap: pip install 'lavit-mlx[eval]'"
PTB_JAR = "stanford-corenlp-3.4.1.jar"
BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")

Prediction = Union[str, Sequence[str]]


def java_available() -> bool:
    """True when `java -version` runs and succeeds (macOS's stub without a JDK fails it)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ptb_module():
    """coco-caption's tokenizer module (its PUNCTUATIONS list, the jar beside it)."""
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    return ptbtokenizer


def _punctuations() -> frozenset:
    return frozenset(_ptb_module().PUNCTUATIONS)


def _one_line(caption: str) -> str:
    """A caption on one line (PTB runs with -preserveLines: one input line, one output line)."""
    return " ".join(caption.splitlines())


def _drop_punctuation(tokens: Sequence[str], punctuations: frozenset) -> str:
    return " ".join(token for token in tokens if token not in punctuations)


def ptb_tokenize(captions: Sequence[str]) -> List[str]:
    """Tokenise captions with coco-caption's Stanford PTBTokenizer (needs Java).

    Args:
        captions: raw caption strings.

    Returns:
        One lower-cased, space-separated, punctuation-free string per caption.
    """
    jar = Path(_ptb_module().__file__).parent / PTB_JAR
    if not jar.is_file():
        raise LaVITError(f"pycocoevalcap has no {jar.name} (reinstall it: pip install 'lavit-mlx[eval]')")
    java = shutil.which("java")
    if java is None:
        raise LaVITError(JAVA_HINT)
    # stdin instead of coco-caption's temporary file inside site-packages (may be read-only);
    # UTF-8 explicitly, since Java otherwise decodes with the locale's charset.
    command = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "UTF-8"]
    text = "".join(_one_line(caption) + "\n" for caption in captions)
    try:
        result = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaVITError(f"the PTB tokenizer (Java) did not run: {exc}") from None
    if result.returncode != 0:
        detail = (result.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
        raise LaVITError(f"the PTB tokenizer (Java) failed: {detail}")
    lines = result.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(captions):
        raise LaVITError(f"the PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    punctuations = _punctuations()
    return [_drop_punctuation(line.rstrip().split(" "), punctuations) for line in lines]


# The pure-Python stand-in: Stanford PTBTokenizer's behaviour on caption-like text
# (checked token for token against the jar in tests/eval/test_caption_metrics.py).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs mt prof gen gov sen rep capt col lt sgt inc ltd co corp bros etc".split()
)
_ACRONYM = re.compile(r"(?:[a-z]\.)+[a-z]\.?")  # u.s., e.g., a.m. (not a lone "a.")
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_SYMBOLS = re.compile(r"\.\.\.+|--|[?!]+|[;$#%*\\]")
_COMMA = re.compile(r"(?<!\d),|,(?!\d)")  # not inside 1,000
_COLON = re.compile(r"(?<!\d):|:(?!\d)")  # not inside 2:50


def _split_word(word: str) -> List[str]:
    if word in _BRACKETS.values() or _SYMBOLS.fullmatch(word) or word in ("''", ","):
        return [word]
    front: List[str] = []
    back: List[str] = []
    while len(word) > 1 and word[0] in "'`-" and not _CLITIC.fullmatch("x" + word) \
            and not re.match(r"'\d", word):
        front.append("`" if word[0] != "-" else "-")
        word = word[1:]
    if len(word) > 1 and word.endswith(".") and not (word[:-1] in _ABBREVIATIONS or _ACRONYM.fullmatch(word)):
        back.insert(0, ".")
        word = word[:-1]
    while len(word) > 1 and word[-1] in "'-":
        back.insert(0, word[-1])
        word = word[:-1]
    if word in _SPLIT_WORDS:
        return front + list(_SPLIT_WORDS[word]) + back
    clitic = _CLITIC.fullmatch(word)
    if clitic:
        return front + [clitic.group(1), clitic.group(2)] + back
    return front + [word] + back


def python_tokenize(caption: str) -> str:
    """coco-caption's tokenisation without Java: PTB rules, lower-case, PUNCTUATIONS dropped.

    Splits punctuation and clitics as PTBTokenizer does ("don't" -> "do n't", "man's" ->
    "man 's", "(" -> "-lrb-", kept as coco-caption keeps it), keeps numbers such as 1,000,
    3.5 and 2:50, abbreviations such as "st." and "u.s.", and hyphenated words whole.

    Args:
        caption: one raw caption.

    Returns:
        The tokens joined by single spaces.
    """
    text = _one_line(caption).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace('"', " '' ")
    text = _SYMBOLS.sub(lambda match: f" {match.group()} ", text)
    text = _COMMA.sub(" , ", text)
    text = _COLON.sub(" : ", text)
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    tokens = [token for word in text.split() for token in _split_word(word)]
    return _drop_punctuation(tokens, _punctuations())


def _check_pairs(references: Mapping[Hashable, Sequence[str]],
                 predictions: Mapping[Hashable, Prediction]) -> Dict[Hashable, str]:
    """The one prediction per id; one-line errors on mismatched ids or bad values."""
    if not references:
        raise LaVITError("no reference captions to evaluate")
    missing = [key for key in references if key not in predictions]
    if missing:
        raise LaVITError(f"no prediction for {len(missing)} of {len(references)} images (first: {missing[0]!r})")
    extra = [key for key in predictions if key not in references]
    if extra:
        raise LaVITError(f"{len(extra)} predictions have no reference captions (first: {extra[0]!r})")
    single: Dict[Hashable, str] = {}
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(ref, str) for ref in refs):
            raise LaVITError(f"references of {key!r} must be a non-empty list of strings")
        prediction = predictions[key]
        if not isinstance(prediction, str):
            if not isinstance(prediction, (list, tuple)) or len(prediction) != 1 or not isinstance(prediction[0], str):
                found = f"{len(prediction)} items" if isinstance(prediction, (list, tuple)) else type(prediction).__name__
                raise LaVITError(f"prediction of {key!r} must be one string, got {found}")
            prediction = prediction[0]
        single[key] = prediction
    return single


def _close_meteor(meteor) -> None:
    """Stop METEOR's Java process now rather than at garbage collection."""
    if meteor.lock.locked():  # a failed compute_score keeps it, and __del__ would wait forever
        meteor.lock.release()
    process = meteor.meteor_p
    if process.poll() is None:
        process.stdin.close()
        process.kill()
        process.wait()


def _meteor(gts: Dict, res: Dict):
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)
    except (ValueError, OSError) as exc:  # the Java process died: readline() gave b""
        process = meteor.meteor_p
        detail = process.stderr.read().decode("utf-8", "replace").strip().splitlines() if process.poll() is not None else []
        raise LaVITError(f"METEOR (Java) failed: {detail[-1] if detail else exc}") from None
    finally:
        _close_meteor(meteor)


def caption_scores(references: Mapping[Hashable, Sequence[str]],
                   predictions: Mapping[Hashable, Prediction],
                   use_java: Optional[bool] = None) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of predicted captions, as coco-caption computes them.

    Args:
        references: {image id: [reference captions]} (raw text).
        predictions: {image id: [caption]} (or {image id: caption}), the same ids.
        use_java: True: the official PTB tokenizer and METEOR (fails without Java);
            False: the pure-Python tokenisation, no METEOR; None: Java when it runs.

    Returns:
        {"scores": {"BLEU-1".."BLEU-4", "METEOR" (Java only), "ROUGE-L", "CIDEr"},
         "per_image": {id: {metric: score}}, "tokenizer": "ptb-java" | "python",
         "notes": [one-line remarks, e.g. how to get Java]}.
    """
    single = _check_pairs(references, predictions)
    _ptb_module()
    notes: List[str] = []
    if use_java is None:
        use_java = java_available()
        if not use_java:
            notes.append(f"no Java: python tokenizer, no METEOR; {JAVA_HINT}")
    elif use_java and not java_available():
        raise LaVITError(JAVA_HINT)

    ids = list(references)
    raw = [caption for key in ids for caption in references[key]] + [single[key] for key in ids]
    tokenized = ptb_tokenize(raw) if use_java else [python_tokenize(caption) for caption in raw]
    gts: Dict[Hashable, List[str]] = {}
    position = 0
    for key in ids:
        count = len(references[key])
        gts[key] = tokenized[position:position + count]
        position += count
    res = {key: [tokenized[position + index]] for index, key in enumerate(ids)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: Dict[str, float] = {}
    per_image: Dict[Hashable, Dict[str, float]] = {key: {} for key in ids}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for name, value, values in zip(BLEU_NAMES, bleu, bleu_per_image):
        scores[name] = float(value)
        for key, image_value in zip(ids, values):
            per_image[key][name] = float(image_value)
    named = []
    if use_java:
        named.append(("METEOR", _meteor))
    named += [("ROUGE-L", Rouge().compute_score), ("CIDEr", Cider().compute_score)]
    for name, scorer in named:
        value, values = scorer(gts, res)
        scores[name] = float(value)
        for key, image_value in zip(ids, values):
            per_image[key][name] = float(image_value)
    if len(ids) == 1:
        notes.append("CIDEr is 0 for a single image: its IDF weights come from the whole set")
    return {"scores": scores, "per_image": per_image,
            "tokenizer": "ptb-java" if use_java else "python", "notes": notes}

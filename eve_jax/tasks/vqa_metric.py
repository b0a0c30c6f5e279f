"""The VQA metric and answers: the official evaluation's normalization and
accuracy, and the classifier's answer vocabulary and soft targets.

Pure Python / numpy, no JAX: these run on host over gathered predictions.

  VQA: answer normalization and the 10-annotator accuracy of the official
       VQA evaluation script (GT-Vision-Lab/VQA, vqaEval.py: the
       `contractions` table, `manualMap`, `articles`, `punct`, the
       `periodStrip` / `commaStrip` regexes, `processPunctuation`,
       `processDigitArticle`, and the leave-one-annotator-out average), as
       today's script (2021) applies them or, by name, as the 2016 one
       did (`VQA_RULES`).
  Answer vocabulary and soft targets: the VQAv2 classifier fine-tuning rule
       of ViLT / VLMo / BEiT-3-style code (answers seen at least 9 times,
       score 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ annotators).

All rates are fractions in [0, 1], not percent.
"""

from __future__ import annotations

import collections
import fractions
import re
from typing import Iterable, Sequence

import numpy as np

# ---------------------------------------------------------------------------
# VQA answer normalization (official vqaEval.py)
# ---------------------------------------------------------------------------

# The official table, entry for entry, quirks included: keys are looked up
# AFTER lowercasing, so the capitalized keys ("Im", "Ive", "Id've", "I'dve")
# can never match; "she's" maps to itself (there is no "shes" key and no
# plain "id" key); "somebody'd" maps the wrong way, to "somebodyd". Fixing
# any of these would change scores relative to the leaderboard.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# Number words -> digits ("manualMap"); only zero..ten, and "none" -> "0".
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# The official list, in its order. Not in it: "." (handled by the period
# regex), "'" (so "don't" survives), ":" , "#", "&", "%", "$", "*", "~".
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# Verbatim from the official script. "(?!<=\d)" was presumably meant as a
# lookbehind "(?<!\d)" but is a lookahead that can never fail in front of a
# ".", so in effect this removes every "." that is not followed by a digit:
# "3.5" and ".5" keep theirs, "5." and "yes." lose theirs.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the third
# positional argument of `sub` is `count`, so at most re.UNICODE == 32
# periods are removed. Kept for exactness (it never matters for real
# answers).
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`.

  For each mark p of PUNCTUATION: if "p " or " p" occurs in the ORIGINAL
  text, or the text contains a comma between two digits anywhere, every p is
  deleted; otherwise every p becomes a space ("hot-dog" -> "hot dog",
  "1,000" -> "1000"; note the digit-comma test is global, so "1,000 hot-dog"
  -> "1000 hotdog"). Then periods not followed by a digit are deleted.
  Case is not changed.
  """
  out = text
  has_digit_comma = _COMMA_STRIP.search(text) is not None
  for p in PUNCTUATION:
    # Tested on `text`, not `out`: the official script looks at the input.
    if (p + " " in text or " " + p in text) or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`.

  Lowercase, split on whitespace, map number words to digits, drop
  articles, then replace words found in CONTRACTIONS; join with one space.
  """
  words = []
  for word in text.lower().split():
    word = NUMBER_WORDS.get(word, word)
    if word not in ARTICLES:
      words.append(word)
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _strip(text: str) -> str:
  """Newlines and tabs -> spaces, surrounding spaces removed."""
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
  """The official script's full normalization of one answer.

  Newlines and tabs -> spaces, strip, `process_punctuation`, then
  `process_digit_article`. E.g. "Two" -> "2", "the red ball!" -> "red
  ball", "Yes." -> "yes", "isnt" -> "isn't", "3.5" -> "3.5". Which side of
  a comparison gets it, and when, is the metric's rule (`VQA_RULES`).
  """
  return process_digit_article(process_punctuation(_strip(text)))


# ---------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------

# What the official vqaEval.py (github GT-Vision-Lab/VQA) does to the two
# sides of a comparison, per question, by version of the script:
#   "vqa2021" (today's script, commit "Fixed processing answers bug", March
#     2021): newlines/tabs/surrounding spaces stripped from the prediction
#     and from every GT answer; then, only if those GT answers are NOT all
#     identical, the full `normalize_answer` on every GT answer AND on the
#     prediction. Unanimous GT answers are compared with the stripped raw
#     prediction ("2" x10 vs "two": 0; "yes" x10 vs "Yes": 0).
#   "vqa2016" (the v2.0 release, still shipped by some libraries): the
#     prediction always fully normalized; the GT answers untouched when
#     unanimous, else `process_punctuation` only ("2" x10 vs "two": 1;
#     "Two" x10 vs "two": 0).
VQA_RULES = ("vqa2021", "vqa2016")
DEFAULT_VQA_RULE = "vqa2021"


def _compared(
    prediction: str, gt_answers: list[str], rule: str
) -> tuple[str, list[str]]:
  """(prediction, GT answers) as the `rule`'s script compares them."""
  if rule == "vqa2021":
    pred, gts = _strip(prediction), [_strip(a) for a in gt_answers]
    if len(set(gts)) > 1:
      pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
    return pred, gts
  if rule == "vqa2016":
    gts = gt_answers
    if len(set(gts)) > 1:
      gts = [process_punctuation(a) for a in gts]
    return normalize_answer(prediction), gts
  raise ValueError(f"VQA metric rule {rule!r}: expected one of {VQA_RULES}")


def vqa_accuracy(
    prediction: str, gt_answers: Sequence[str], *, rule: str = DEFAULT_VQA_RULE
) -> float:
  """The official VQA accuracy of one prediction, in [0, 1].

  With n GT answers (10 in VQAv2), leave each annotator i out in turn:
  acc_i = min(1, #{j != i : gt_j == prediction} / 3), and return the mean
  over i. With m matching answers out of 10 this is 0, 0.3, 0.6, 0.9 for
  m = 0, 1, 2, 3 and 1.0 for m >= 4. With n == 1 there is nothing to
  leave out (the official formula would always give 0), so the result is
  min(1, m / 3) over the single answer: 0 or 1/3.

  Args:
    prediction: the model's answer string.
    gt_answers: [n] the annotators' answers, n >= 1, duplicates kept.
    rule: which version of the official script's answer processing
      (`VQA_RULES`; the comment above them says what each does).

  Returns:
    The accuracy as a float; exact multiples of 1/(3n) computed with
    fractions, so e.g. one match in ten gives exactly 0.3.
  """
  gt_answers = list(gt_answers)
  n = len(gt_answers)
  if n == 0:
    raise ValueError("vqa_accuracy needs at least one GT answer")
  pred, gts = _compared(prediction, gt_answers, rule)
  match = [g == pred for g in gts]
  total = sum(match)
  if n == 1:
    return float(fractions.Fraction(min(total, 3), 3))
  # Leaving annotator i out leaves total - match[i] matches among the rest.
  acc = sum(fractions.Fraction(min(total - int(mi), 3), 3) for mi in match)
  return float(acc / n)


def mean_vqa_accuracy(
    predictions: Sequence[str],
    gt_answer_lists: Sequence[Sequence[str]],
    *,
    rule: str = DEFAULT_VQA_RULE,
) -> float:
  """Mean `vqa_accuracy` over questions ([Q] predictions, [Q] GT lists)."""
  if len(predictions) != len(gt_answer_lists):
    raise ValueError(
        f"{len(predictions)} predictions for "
        f"{len(gt_answer_lists)} questions"
    )
  if not predictions:
    raise ValueError("mean_vqa_accuracy of no questions")
  return float(
      np.mean(
          [
              vqa_accuracy(p, g, rule=rule)
              for p, g in zip(predictions, gt_answer_lists)
          ]
      )
  )


# ---------------------------------------------------------------------------
# Answer vocabulary and soft targets (VQAv2 classifier fine-tuning)
# ---------------------------------------------------------------------------

# Written as a table, not min(1, 0.3 * c): 0.3 * 3 is 0.8999999999999999.
_SOFT_SCORE = {1: 0.3, 2: 0.6, 3: 0.9}


def soft_score(count: int) -> float:
  """Target score of an answer given by `count` annotators (0 for 0)."""
  if count <= 0:
    return 0.0
  return _SOFT_SCORE.get(count, 1.0)


def build_answer_vocab(
    answer_lists: Iterable[Sequence[str]], min_count: int = 9
) -> list[str]:
  """The answers (normalized) seen at least `min_count` times.

  Every string of every sequence is normalized with `normalize_answer` and
  counted once per occurrence. Order: descending count, then alphabetical,
  so the label ids do not depend on the data's order. (ViLT / BEiT-3 keep
  first-appearance order instead, so their label ids differ from these;
  the set of answers is the same.)

  Which strings to pass decides the vocabulary. The published 3,129-answer
  VQAv2 vocabulary (train + val, min_count 9, as in ViLT, BEiT-3 and
  bottom-up-attention) counts ONE answer per question, the annotation's
  `multiple_choice_answer`: pass `[[q["multiple_choice_answer"]] for q in
  annotations]`. Passing all ten annotator answers per question counts each
  question up to ten times and gives a larger vocabulary. (Not testable
  here without the data set.)

  Args:
    answer_lists: per question, the answers to count.
    min_count: keep answers counted at least this many times.

  Returns:
    The vocabulary, a list of distinct normalized answers.
  """
  counts = collections.Counter(
      normalize_answer(a) for answers in answer_lists for a in answers
  )
  kept = [(a, c) for a, c in counts.items() if c >= min_count]
  kept.sort(key=lambda ac: (-ac[1], ac[0]))
  return [a for a, _ in kept]


def answer_index(vocab: Sequence[str]) -> dict[str, int]:
  """{answer: label id} for a vocabulary from `build_answer_vocab`."""
  return {a: i for i, a in enumerate(vocab)}


def soft_scores(
    gt_answers: Sequence[str], vocab_index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
  """Sparse soft targets of one question.

  Each annotator's answer is normalized; each distinct one that is in the
  vocabulary gets `soft_score(count)` (0.3, 0.6, 0.9, 1.0 for 1, 2, 3, 4+
  annotators). Answers outside the vocabulary are dropped (the question
  may end with no target at all, as in ViLT).

  Args:
    gt_answers: [n] the annotators' answers (10 in VQAv2).
    vocab_index: {normalized answer: label id}.

  Returns:
    (indices int32 [m], scores float32 [m]), sorted by label id.
  """
  counts = collections.Counter(normalize_answer(a) for a in gt_answers)
  pairs = sorted(
      (vocab_index[a], soft_score(c))
      for a, c in counts.items()
      if a in vocab_index
  )
  indices = np.array([i for i, _ in pairs], dtype=np.int32)
  scores = np.array([s for _, s in pairs], dtype=np.float32)
  return indices, scores


def soft_target_vector(
    gt_answers: Sequence[str], vocab_index: dict[str, int], num_answers: int
) -> np.ndarray:
  """`soft_scores` as a dense float32 [num_answers] vector (zeros elsewhere)."""
  indices, scores = soft_scores(gt_answers, vocab_index)
  if indices.size and indices.max() >= num_answers:
    raise ValueError(f"label id {indices.max()} >= num_answers {num_answers}")
  target = np.zeros((num_answers,), np.float32)
  target[indices] = scores
  return target

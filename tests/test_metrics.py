"""Downstream metrics against hand-worked values (no JAX involved).

Every expected number below was worked out by hand from the official rules
(written out in the comments), not produced by the code under test.
"""

import numpy as np
import pytest

from eve_jax.data import downstream
from eve_jax.tasks import metrics as M
from eve_jax.tasks import vqa_metric as V
from eve_jax.tasks import vqa as vqa_task

# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # lowercase, then manualMap
        ("two", "2"),
        ("  ten  ", "10"),  # strip, manualMap
        ("none", "0"),  # manualMap: none -> 0
        ("eleven", "eleven"),  # manualMap stops at ten
        ("a dog", "dog"),  # article dropped
        ("An apple", "apple"),
        ("isnt", "isn't"),  # contractions table
        ("WHATS", "what's"),  # lowercased before the table lookup
        ("don't", "don't"),  # "'" is not in the punctuation list
        ("Yes.", "yes"),  # period not followed by a digit: deleted
        ("yes!", "yes"),  # "!" with no space around -> " ", split
        ("the red ball!", "red ball"),
        ("1,000", "1000"),  # digit,digit -> every mark deleted
        ("3.5", "3.5"),  # period followed by a digit: kept
        ("5.", "5"),
        (".5", ".5"),  # the broken lookbehind: only lookahead
        ("hot-dog", "hot dog"),  # "-" without spaces -> " "
        ("left - right", "left right"),  # " -" present -> "-" deleted
        ("1,000 hot-dog", "1000 hotdog"),  # digit comma anywhere: all deleted
        ("x/y", "x y"),
        ("red\tball\n", "red ball"),  # tabs / newlines -> spaces
        ("Im", "im"),  # table key "Im" never matches (lowered)
        ("shes", "shes"),  # the official table has no "shes" key
        ("she's", "she's"),
        ("somebody'd", "somebodyd"),  # the official table's reversed entry
    ],
)
def test_normalize_answer(raw, expected):
  assert V.normalize_answer(raw) == expected


def test_punctuation_keeps_case_and_digit_article_lowercases():
  assert V.process_punctuation("Yes!") == "Yes "
  assert V.process_digit_article("The  Two  DOGS") == "2 dogs"


def test_common_contractions():
  expected = {
      "aint": "ain't",
      "arent": "aren't",
      "cant": "can't",
      "couldve": "could've",
      "couldnt": "couldn't",
      "didnt": "didn't",
      "doesnt": "doesn't",
      "dont": "don't",
      "hadnt": "hadn't",
      "hasnt": "hasn't",
      "havent": "haven't",
      "hed": "he'd",
      "hes": "he's",
      "howd": "how'd",
      "howll": "how'll",
      "hows": "how's",
      "isnt": "isn't",
      "itd": "it'd",
      "itll": "it'll",
      "let's": "let's",
      "maam": "ma'am",
      "mightnt": "mightn't",
      "mightve": "might've",
      "mustnt": "mustn't",
      "mustve": "must've",
      "neednt": "needn't",
      "notve": "not've",
      "oclock": "o'clock",
      "oughtnt": "oughtn't",
      "shant": "shan't",
      "shouldve": "should've",
      "shouldnt": "shouldn't",
      "someoned": "someone'd",
      "somethingd": "something'd",
      "thats": "that's",
      "thered": "there'd",
      "therere": "there're",
      "theres": "there's",
      "theyd": "they'd",
      "theyll": "they'll",
      "theyre": "they're",
      "theyve": "they've",
      "twas": "'twas",
      "wasnt": "wasn't",
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
      "wholl": "who'll",
      "whos": "who's",
      "whove": "who've",
      "whyll": "why'll",
      "whyre": "why're",
      "whys": "why's",
      "wont": "won't",
      "wouldve": "would've",
      "wouldnt": "wouldn't",
      "yall": "y'all",
      "youd": "you'd",
      "youll": "you'll",
      "youre": "you're",
      "youve": "you've",
      # apostrophe-variant keys
      "couldn'tve": "couldn't've",
      "couldnt've": "couldn't've",
      "y'allll": "y'all'll",
      "'ows'at": "'ow's'at",
  }
  for raw, want in expected.items():
    assert V.normalize_answer(raw) == want, raw
  # The official table has 120 entries (some unreachable: "Im", "Ive",
  # "Id've", "I'dve" are capitalized and lookups happen after lower()).
  assert len(V.CONTRACTIONS) == 120
  assert V.CONTRACTIONS["Im"] == "I'm" and V.CONTRACTIONS["Ive"] == "I've"


# ---------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------


def _ten(matching, n_match, other="other"):
  return [matching] * n_match + [other] * (10 - n_match)


def test_vqa_accuracy_leave_one_out_table():
  # m matches out of 10. Leaving out a matching annotator leaves m - 1,
  # leaving out another one leaves m; acc_i = min(1, that / 3).
  # m = 0: all subsets 0.
  assert V.vqa_accuracy("cat", _ten("cat", 0)) == 0.0
  # m = 1: 9 subsets keep it (1/3), 1 drops it (0): (9 * 1/3) / 10 = 0.3.
  assert V.vqa_accuracy("cat", _ten("cat", 1)) == pytest.approx(
      (9 * (1 / 3) + 1 * 0) / 10, abs=1e-12
  )
  assert V.vqa_accuracy("cat", _ten("cat", 1)) == pytest.approx(0.3)
  # m = 2: 8 subsets with 2 (2/3), 2 with 1 (1/3): (16/3 + 2/3)/10 = 0.6.
  assert V.vqa_accuracy("cat", _ten("cat", 2)) == pytest.approx(0.6)
  # m = 3: 7 subsets with 3 (1), 3 with 2 (2/3): (7 + 2) / 10 = 0.9.
  assert V.vqa_accuracy("cat", _ten("cat", 3)) == pytest.approx(0.9)
  # m = 4: 6 subsets with 4 (1), 4 with 3 (1): 1.0.
  assert V.vqa_accuracy("cat", _ten("cat", 4)) == 1.0
  assert V.vqa_accuracy("cat", _ten("cat", 10)) == 1.0
  # Exact (computed with fractions), so one match in ten is exactly 0.3.
  assert V.vqa_accuracy("cat", _ten("cat", 1)) == 0.3


def test_vqa_accuracy_2021_rule_hand_worked():
  """Today's official script (the default): unanimous GT answers are
  compared with the stripped raw prediction; when annotators disagree both
  sides are fully normalized."""
  assert V.DEFAULT_VQA_RULE == "vqa2021"
  assert V.vqa_accuracy("two", ["2"] * 10) == 0.0
  assert V.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
  assert V.vqa_accuracy("yes.", ["yes"] * 10) == 0.0
  assert V.vqa_accuracy("dog", ["the dog"] * 10) == 0.0
  assert V.vqa_accuracy("2", ["Two"] * 4 + ["three"] * 6) == 1.0
  # Only newlines, tabs and surrounding spaces go, on both sides.
  assert V.vqa_accuracy(" yes\n", ["yes\t"] * 10) == 1.0
  assert V.vqa_accuracy("Dog.", ["the dog"] * 2 + ["cat"] * 8) == (
      pytest.approx(0.6)
  )
  assert V.vqa_accuracy("hot dog", ["hot-dog"] * 3 + ["x"] * 7) == (
      pytest.approx(0.9)
  )
  assert V.vqa_accuracy("two", ["2"] * 10, rule="vqa2021") == 0.0


def test_vqa_accuracy_2016_rule_hand_worked():
  """The 2016 script: the prediction always fully normalized, unanimous GT
  answers raw, disagreeing ones punctuation-processed only."""
  assert V.vqa_accuracy("two", ["2"] * 10, rule="vqa2016") == 1.0
  assert V.vqa_accuracy("two", ["Two"] * 10, rule="vqa2016") == 0.0
  # "yes." -> "yes" (3 matches: 0.9) but "the dog" keeps its article.
  gts = ["yes."] * 3 + ["no"] * 7
  assert V.vqa_accuracy("Yes", gts, rule="vqa2016") == pytest.approx(0.9)
  gts = ["the dog"] * 4 + ["cat"] * 6
  assert V.vqa_accuracy("dog", gts, rule="vqa2016") == 0.0
  assert V.vqa_accuracy("dog", gts, rule="vqa2021") == 1.0
  with pytest.raises(ValueError, match="vqa2016"):
    V.vqa_accuracy("dog", gts, rule="vqa2017")


def test_vqa_accuracy_per_answer_type_hand_worked():
  """yes/no: one right, one wrong -> 0.5; number: "2" against five "two"
  and five "2" (they disagree, so both normalized) -> 1.0; other: 2 of 10
  annotators said "red" -> leave-one-out (2 x 1/3 + 8 x 2/3) / 10 = 0.6;
  an example without a type counts in none."""
  examples = [
      _vqa_ex(["yes"] * 10, "yes/no"),
      _vqa_ex(["yes"] * 10, "yes/no"),
      _vqa_ex(["two"] * 5 + ["2"] * 5, "number"),
      _vqa_ex(["red"] * 2 + ["blue"] * 8, "other"),
      _vqa_ex(["blue"] * 10, None),
  ]
  got = vqa_task.accuracy_per_answer_type(
      ["yes", "no", "2", "red", "blue"], examples
  )
  assert got.keys() == {"vqa_acc_yes_no", "vqa_acc_number", "vqa_acc_other"}
  np.testing.assert_allclose(
      [got["vqa_acc_yes_no"], got["vqa_acc_number"], got["vqa_acc_other"]],
      [0.5, 1.0, 0.6],
  )
  # The rule reaches the per-type numbers: "two" vs ten "2".
  examples = [_vqa_ex(["2"] * 10, "number")]
  assert vqa_task.accuracy_per_answer_type(["two"], examples) == {
      "vqa_acc_number": 0.0
  }
  assert vqa_task.accuracy_per_answer_type(
      ["two"], examples, rule="vqa2016"
  ) == {"vqa_acc_number": 1.0}


def test_vqa_answer_types_that_read_alike_keep_separate_keys():
  """ "yes/no" and "yes no" would both be "yes_no": each gets its own key
  (the characters escaped) instead of one merged accuracy."""
  examples = [
      _vqa_ex(["yes"] * 10, "yes/no"),
      _vqa_ex(["no"] * 10, "yes no"),
      _vqa_ex(["red"] * 10, "other"),
  ]
  got = vqa_task.accuracy_per_answer_type(["yes", "yes", "red"], examples)
  assert got == {
      "vqa_acc_yes_x2f_no": 1.0,
      "vqa_acc_yes_x20_no": 0.0,
      "vqa_acc_other": 1.0,
  }


def _vqa_ex(answers, answer_type):
  return downstream.VQAExample(0, 0, "x.jpg", "q", tuple(answers), answer_type)


def test_vqa_accuracy_other_n():
  # n = 1: no leave-one-out, min(1, m / 3).
  assert V.vqa_accuracy("cat", ["cat"]) == pytest.approx(1 / 3)
  assert V.vqa_accuracy("cat", ["dog"]) == 0.0
  # n = 3, m = 2: leave a "cat" out -> 1/3 (twice); leave "dog" out ->
  # 2/3: (1/3 + 1/3 + 2/3) / 3 = 4/9.
  assert V.vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
  with pytest.raises(ValueError):
    V.vqa_accuracy("cat", [])


def test_mean_vqa_accuracy():
  # (0 + 0.3) / 2 today; (1.0 + 0.3) / 2 by the 2016 script.
  gts = [["2"] * 10, _ten("cat", 1)]
  assert V.mean_vqa_accuracy(["two", "cat"], gts) == pytest.approx(0.15)
  assert V.mean_vqa_accuracy(["two", "cat"], gts, rule="vqa2016") == (
      pytest.approx(0.65)
  )


# ---------------------------------------------------------------------------
# Answer vocabulary and soft targets
# ---------------------------------------------------------------------------


def test_soft_score_table():
  assert [V.soft_score(c) for c in (0, 1, 2, 3, 4, 7, 10)] == [
      0.0,
      0.3,
      0.6,
      0.9,
      1.0,
      1.0,
      1.0,
  ]
  assert V.soft_score(3) == 0.9  # not 0.8999999999999999


def test_soft_scores_and_dense_vector():
  vocab_index = {"2": 0, "yes": 1, "no": 2, "red ball": 3, "blue": 4}
  # "2" x4 (after normalization) -> 1.0; "yes" x2 -> 0.6;
  # "red ball" x3 -> 0.9; "purple" x1 is not in the vocab -> dropped.
  gts = [
      "Two",
      "2",
      "two",
      "2",
      "yes",
      "yes",
      "the red ball!",
      "red ball",
      "Red ball",
      "purple",
  ]
  idx, scores = V.soft_scores(gts, vocab_index)
  assert idx.dtype == np.int32 and scores.dtype == np.float32
  np.testing.assert_array_equal(idx, [0, 1, 3])
  np.testing.assert_array_equal(scores, np.array([1.0, 0.6, 0.9], np.float32))
  dense = V.soft_target_vector(gts, vocab_index, 5)
  assert dense.dtype == np.float32 and dense.shape == (5,)
  np.testing.assert_array_equal(
      dense, np.array([1.0, 0.6, 0.0, 0.9, 0.0], np.float32)
  )
  # "no" x7 -> 1.0, "blue" x1 -> 0.3, "green" x2 not in vocab.
  idx, scores = V.soft_scores(
      ["no"] * 7 + ["blue"] + ["green"] * 2, vocab_index
  )
  np.testing.assert_array_equal(idx, [2, 4])
  np.testing.assert_array_equal(scores, np.array([1.0, 0.3], np.float32))
  # Nothing in the vocab: empty targets.
  idx, scores = V.soft_scores(["green"] * 10, vocab_index)
  assert idx.shape == (0,) and scores.shape == (0,)
  np.testing.assert_array_equal(
      V.soft_target_vector(["green"], vocab_index, 5), np.zeros(5)
  )


def test_build_answer_vocab():
  questions = [
      ["yes"] * 5 + ["two"] * 5,  # yes 5, 2 5
      ["Yes"] * 5 + ["2"] * 4 + ["red"],  # yes 10, 2 9, red 1
      ["no"] * 9 + ["red"],  # no 9, red 2
      ["red"] * 5 + ["the red", "blue"],  # red 8, blue 1
  ]
  # yes 10, then the 9s alphabetically ("2" < "no"); red (8) is dropped.
  assert V.build_answer_vocab(questions) == ["yes", "2", "no"]
  assert V.build_answer_vocab(questions[::-1]) == ["yes", "2", "no"]
  assert V.build_answer_vocab(questions, min_count=8) == [
      "yes",
      "2",
      "no",
      "red",
  ]
  assert V.build_answer_vocab(questions, min_count=1) == [
      "yes",
      "2",
      "no",
      "red",
      "blue",
  ]
  assert V.answer_index(["yes", "2"]) == {"yes": 0, "2": 1}


# ---------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------

# 3 images x 15 texts; texts 5i..5i+4 are image i's captions.
_SIMS = np.array(
    [
        # own: t0-t4                 wrong
        [5, 9, 4, 3, 2, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        # wrong          own: t5-t9        wrong
        [7, 0, 0, 0, 3, 7, 1, 1, 1, 1, 2, 0, 0, 0, 0],
        # wrong                          own: t10-t14
        [4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 3, 3, 3, 3, 3],
    ],
    np.float32,
)
_T2I = [0] * 5 + [1] * 5 + [2] * 5

# Hand ranks (0-based = number of wrong items with score >= the correct):
# TR image 0: best own caption is its 2nd (t1 = 9); no wrong >= 9 -> 0.
# TR image 1: best own t5 = 7 ties with wrong t0 = 7 -> rank 1.
# TR image 2: best own 3; wrong t0..t5 = 4 are above -> rank 6.
# IR, column (img0, img1, img2) -> rank:
#   t0 (5,7,4) -> 1   t1 (9,0,4) -> 0   t2 (4,0,4) -> 1 (tie)
#   t3 (3,0,4) -> 1   t4 (2,3,4) -> 2   t5 (8,7,4) -> 1
#   t6..t9 (0,1,0) -> 0   t10 (0,2,3) -> 0   t11..t14 (0,0,3) -> 0
# -> IR ranks: ten 0s, four 1s, one 2.


def test_retrieval_recall_hand_matrix():
  got = M.retrieval_recall(_SIMS, _T2I)
  want = {
      "tr_r1": 1 / 3,  # image 0 only
      "tr_r5": 2 / 3,  # images 0, 1
      "tr_r10": 1.0,  # all (rank 6 < 10)
      "ir_r1": 10 / 15,  # the ten rank-0 texts
      "ir_r5": 1.0,  # only 3 images: every rank <= 2
      "ir_r10": 1.0,
      # (1/3 + 2/3 + 1 + 2/3 + 1 + 1) / 6 = (14/3) / 6
      "r_mean": 7 / 9,
  }
  assert got.keys() == want.keys()
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key


def test_retrieval_recall_other_ks():
  got = M.retrieval_recall(_SIMS, _T2I, ks=(1, 2, 3))
  assert got["tr_r2"] == pytest.approx(2 / 3)  # ranks 0, 1 < 2
  assert got["tr_r3"] == pytest.approx(2 / 3)  # rank 6 still out
  assert got["ir_r2"] == pytest.approx(14 / 15)  # t4 (rank 2) misses
  assert got["ir_r3"] == 1.0


def test_retrieval_ties_do_not_depend_on_order():
  # Moving the texts around must not change anything: ties are resolved by
  # the rule, not by which index comes first.
  perm = np.array([14, 3, 7, 0, 11, 5, 9, 1, 13, 2, 6, 10, 4, 12, 8])
  got = M.retrieval_recall(_SIMS[:, perm], np.asarray(_T2I)[perm])
  assert got == M.retrieval_recall(_SIMS, _T2I)
  # All scores equal: every correct item is tied with a wrong one -> 0.
  flat = np.ones((2, 4), np.float32)
  got = M.retrieval_recall(flat, [0, 0, 1, 1], ks=(1,))
  assert got == {"tr_r1": 0.0, "ir_r1": 0.0, "r_mean": 0.0}


def test_retrieval_tie_between_own_captions_is_a_hit():
  # Image 0's two captions tie at the top: either is right -> hit.
  sims = np.array([[5, 5, 1], [0, 0, 9]], np.float32)
  got = M.retrieval_recall(sims, [0, 0, 1], ks=(1,))
  assert got == {"tr_r1": 1.0, "ir_r1": 1.0, "r_mean": 1.0}


def test_retrieval_validation():
  with pytest.raises(ValueError):
    M.retrieval_recall(np.zeros((2, 3)), [0, 0, 0])  # image 1 has no text
  with pytest.raises(ValueError):
    M.retrieval_recall(np.array([[np.nan, 0.0]]), [0, 0])
  with pytest.raises(ValueError):
    M.retrieval_recall(np.zeros((1, 2)), [0])


def test_rerank_topk():
  itc = np.array([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.4]], np.float32)
  calls = []

  def score_fn(row, candidates):
    calls.append((row, list(candidates)))
    return np.array([100.0 * row + c for c in candidates])

  got = M.rerank_topk(itc, 2, score_fn)
  # Row 0's top 2 by ITC: t1 (0.9), t2 (0.5); row 1's: t0 (0.8), t2 (0.7).
  assert calls == [(0, [1, 2]), (1, [0, 2])]
  want = np.array(
      [[-np.inf, 1.0, 2.0, -np.inf], [100.0, -np.inf, 102.0, -np.inf]],
      np.float32,
  )
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32
  # Transposed use (the other direction): columns become the queries.
  got_t = M.rerank_topk(itc.T, 1, lambda row, c: np.array([7.0]))
  # Column 0: max at row 1; 1: row 0; 2: row 1; 3: row 1.
  want_t = np.full((4, 2), -np.inf, np.float32)
  want_t[[0, 1, 2, 3], [1, 0, 1, 1]] = 7.0
  np.testing.assert_array_equal(got_t, want_t)
  # k larger than the row: everything is rescored.
  got = M.rerank_topk(itc, 10, lambda row, c: np.zeros(len(c)))
  np.testing.assert_array_equal(got, np.zeros((2, 4)))
  with pytest.raises(ValueError):
    M.rerank_topk(itc, 2, lambda row, c: np.zeros(3))


# ---------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------


def test_nlvr2_accuracy():
  # Matches at positions 0 and 2: 2 / 4.
  assert M.nlvr2_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
  assert M.nlvr2_accuracy([True, False], [1, 0]) == 1.0
  with pytest.raises(ValueError):
    M.nlvr2_accuracy([1, 0], [1])
  with pytest.raises(ValueError):
    M.nlvr2_accuracy([], [])

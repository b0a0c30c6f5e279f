"""Downstream data: the official-format loaders and the EVE-Shapes tasks.

Small EVE-Shapes VQA / NLVR2 / retrieval sets are written to disk with
`shapes_tasks.write_all` and read back with the loaders of
`eve_jax.data.downstream`; every answer, label and caption is recomputed
here from `shapes.generate` with a separate reading of the question and
statement grammar. Malformed files written here must fail with a one-line
`DataError` naming the file and the field or line.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eve_jax.data import (
    downstream,
    downstream_vqa,
    shapes,
    shapes_tasks,
    shapes_tasks_common,
)
from eve_jax.data.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (40, 40, 40)
IMAGE_SIZE = 64
NUMBERS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> shapes_tasks.TaskFiles:
  out = tmp_path_factory.mktemp("shapes_tasks")
  return shapes_tasks.write_all(
      str(out), image_size=IMAGE_SIZE, sizes=SIZES, seed=0
  )


def _read_image(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _normalize(answer: str) -> str:
  """The parts of VQA's answer normalization the generated variants use."""
  words = answer.lower().replace(".", "").split()
  words = [str(NUMBERS.get(w, w)) for w in words if w not in ("a", "an", "the")]
  return " ".join(words)


def _has(objects, color, shape) -> bool:
  return any(o.shape == shape and color in (None, o.color) for o in objects)


# --------------------------------------------------------------------------
# VQA.


def _vqa_answer(question: str, objects) -> str:
  """The answer of a generated question, read independently of the writer."""
  if m := re.fullmatch(r"what color is the (\w+)", question):
    (obj,) = [o for o in objects if o.shape == m[1]]
    return obj.color
  if m := re.fullmatch(r"what size is the (\w+)", question):
    (obj,) = [o for o in objects if o.shape == m[1]]
    return obj.size
  if m := re.fullmatch(r"what shape is (\w+)", question):
    (obj,) = [o for o in objects if o.color == m[1]]
    return obj.shape
  if question == "how many objects":
    return str(len(objects))
  if m := re.fullmatch(r"is there a (\w+) (\w+)", question):
    return "yes" if _has(objects, m[1], m[2]) else "no"
  raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize(
    "position,subtype", list(enumerate(shapes_tasks_common.SPLITS["vqa"]))
)
def test_vqa_answers_match_the_images(files, position, subtype):
  annotations = files.vqa_annotations.get(subtype)
  examples = downstream_vqa.load_vqa(
      files.vqa_questions[subtype], annotations, image_dir=files.vqa_images
  )
  assert len({e.image_id for e in examples}) == SIZES[position]
  per_image = collections.Counter(e.image_id for e in examples)
  assert set(per_image.values()) <= {2, 3}
  assert downstream.check_images(examples) == SIZES[position]
  stream = shapes_tasks.stream_seed(0, "vqa", subtype)
  generated = {}
  for e in examples:
    assert e.image_id // shapes_tasks.VQA_ID_STRIDE == position + 1
    assert e.question_id // 1000 == e.image_id
    assert os.path.basename(e.image_path) == (
        f"COCO_{subtype}_{e.image_id:012d}.jpg"
    )
    assert len(e.question.split()) <= 6
    if e.image_id not in generated:
      generated[e.image_id] = shapes.generate(
          stream, e.image_id % shapes_tasks.VQA_ID_STRIDE, IMAGE_SIZE
      )
    example = generated[e.image_id]
    expected = _vqa_answer(e.question, example.objects)
    if annotations is None:
      assert e.answers is None and e.answer_type is None
      continue
    assert len(e.answers) == 10
    assert e.answer_type == (
        "yes/no"
        if e.question.startswith("is ")
        else "number"
        if e.question.startswith("how many")
        else "other"
    ), e
    votes = collections.Counter(_normalize(a) for a in e.answers)
    answer, count = votes.most_common(1)[0]
    assert answer == _normalize(expected) and count >= 6, (e, expected)
  # The JPEG on disk is the generator's image (quality 95, 4:4:4).
  for image_id, example in list(generated.items())[:5]:
    path = os.path.join(
        files.vqa_images, downstream_vqa.vqa_image_name(subtype, image_id)
    )
    diff = np.abs(_read_image(path).astype(int) - example.image.astype(int))
    assert diff.mean() < 2.0


def test_vqa_annotations_exercise_soft_scores(files):
  with open(files.vqa_annotations["train2014"]) as f:
    annotations = json.load(f)["annotations"]
  raw_disagree = wrong = 0
  for ann in annotations:
    answers = [a["answer"] for a in ann["answers"]]
    assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
    assert (
        ann["multiple_choice_answer"]
        == collections.Counter(answers).most_common(1)[0][0]
    )
    # Canonical answers are already normalized, as VQAv2's are: today's
    # official metric compares unanimous answers unnormalized.
    assert _normalize(ann["multiple_choice_answer"]) == (
        ann["multiple_choice_answer"]
    )
    assert ann["answer_type"] in ("yes/no", "number", "other")
    normalized = {_normalize(a) for a in answers}
    raw_disagree += len(set(answers)) > 1
    wrong += len(normalized) > 1
  n = len(annotations)
  # Variant spellings on most questions, a wrong annotator on ~15%.
  assert raw_disagree > n / 3
  assert 0 < wrong < n / 3
  types = collections.Counter(ann["question_type"] for ann in annotations)
  assert len(types) == 5
  yes_no = collections.Counter(
      ann["multiple_choice_answer"]
      for ann in annotations
      if ann["answer_type"] == "yes/no"
  )
  assert yes_no["yes"] > 0 and yes_no["no"] > 0


def test_vqa_predictions_round_trip(tmp_path):
  path = str(tmp_path / "results.json")
  predictions = [(np.int64(5), "two"), (3, "red"), (1_000_000_001, "yes")]
  assert downstream_vqa.write_vqa_predictions(path, predictions) == path
  with open(path) as f:
    assert json.load(f) == [
        {"question_id": 5, "answer": "two"},
        {"question_id": 3, "answer": "red"},
        {"question_id": 1_000_000_001, "answer": "yes"},
    ]
  assert downstream_vqa.load_vqa_predictions(path) == {
      5: "two",
      3: "red",
      1_000_000_001: "yes",
  }
  with pytest.raises(DataError, match="question_id 3 given twice"):
    downstream_vqa.write_vqa_predictions(
        str(tmp_path / "dup.json"), [(3, "a"), (3, "b")]
    )
  assert not os.path.exists(tmp_path / "dup.json")


def test_vqa_test_dev_and_visual_genome(tmp_path):
  questions = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
  questions.write_text(
      json.dumps(
          {
              "data_subtype": "test-dev2015",
              "questions": [
                  {"image_id": 7, "question": "What?", "question_id": 7000}
              ],
          }
      )
  )
  (example,) = downstream_vqa.load_vqa(str(questions), image_dir="test2015")
  # test-dev images are test2015 files.
  assert example == downstream.VQAExample(
      7000,
      7,
      os.path.join("test2015", "COCO_test2015_000000000007.jpg"),
      "What?",
      None,
  )
  vg = tmp_path / "question_answers.json"
  vg.write_text(
      json.dumps(
          [
              {
                  "id": 1,
                  "qas": [
                      {
                          "qa_id": 10,
                          "image_id": 1,
                          "question": "What color?",
                          "answer": "Red.",
                      }
                  ],
              },
              {"id": 2, "qas": []},
          ]
      )
  )
  (example,) = downstream_vqa.load_vg_qa(str(vg), "VG")
  assert example.image_path == os.path.join("VG", "1.jpg")
  assert example.answers == ("Red.",) * 10 and example.question_id == 10


# --------------------------------------------------------------------------
# NLVR2.


def _nlvr2_label(sentence: str, left, right) -> tuple[bool, str]:
  """A statement's truth and family, read independently of the writer."""
  pair = (left, right)
  if m := re.fullmatch(r"both images have a (\w+)", sentence):
    return all(_has(objs, None, m[1]) for objs in pair), "both_have"
  if m := re.fullmatch(r"one image has a (?:(\w+) )?(\w+)", sentence):
    return sum(_has(objs, m[1], m[2]) for objs in pair) == 1, "one_has"
  if m := re.fullmatch(r"no image has a (?:(\w+) )?(\w+)", sentence):
    return not any(_has(objs, m[1], m[2]) for objs in pair), "none_has"
  if m := re.fullmatch(r"the (left|right) image has more objects", sentence):
    return (
        (len(left) > len(right)) == (m[1] == "left") and len(left) != len(right)
    ), "more"
  if m := re.fullmatch(r"there are (\w+) objects in total", sentence):
    return len(left) + len(right) == NUMBERS[m[1]], "total"
  if m := re.fullmatch(r"both images have (\w+) objects?", sentence):
    return len(left) == len(right) == NUMBERS[m[1]], "both_count"
  raise AssertionError(f"unexpected statement {sentence!r}")


@pytest.fixture(scope="module")
def files_all_families(tmp_path_factory) -> shapes_tasks.TaskFiles:
  out = tmp_path_factory.mktemp("shapes_tasks_all")
  return shapes_tasks.write_all(
      str(out),
      image_size=IMAGE_SIZE,
      seed=0,
      sizes={"vqa": (1, 1, 1), "nlvr2": SIZES, "retrieval": (1, 1, 1)},
      nlvr2_families=shapes_tasks.NLVR2_FAMILIES,
  )


@pytest.mark.parametrize("families", ["count", "all"])
@pytest.mark.parametrize(
    "position,split", list(enumerate(shapes_tasks_common.SPLITS["nlvr2"]))
)
def test_nlvr2_labels_match_the_images(request, families, position, split):
  """Every label recomputed from the generator's scenes; the default
  statements are the count families, every family can be asked for."""
  files = request.getfixturevalue(
      "files" if families == "count" else "files_all_families"
  )
  examples = downstream.load_nlvr2(
      files.nlvr2[split], files.nlvr2_images[split]
  )
  n = SIZES[position]
  assert len(examples) == n
  assert sum(e.label for e in examples) == n // 2  # balanced
  assert downstream.check_images(examples) == 2 * n
  stream = shapes_tasks.stream_seed(0, "nlvr2", split)
  seen = collections.Counter()
  for k, e in enumerate(examples):
    m = re.fullmatch(rf"{split}-(\d+)-0-0", e.identifier)
    assert m, e.identifier
    j = int(m[1])
    left, right = (
        shapes.generate(stream, 2 * j + i, IMAGE_SIZE) for i in (0, 1)
    )
    label, family = _nlvr2_label(e.sentence, left.objects, right.objects)
    assert e.label == label, e
    seen[family, label] += 1
    assert len(e.sentence.split()) <= 6
    folder = files.nlvr2_images[split]
    if split == "train":
      folder = os.path.join(
          folder, str(j % shapes_tasks_common.NLVR2_DIRECTORIES)
      )
    assert e.image_paths == (
        os.path.join(folder, f"{split}-{j}-0-img0.png"),
        os.path.join(folder, f"{split}-{j}-0-img1.png"),
    )
    if k < 5:  # PNG is lossless: the generator's pixels exactly
      np.testing.assert_array_equal(_read_image(e.image_paths[0]), left.image)
      np.testing.assert_array_equal(_read_image(e.image_paths[1]), right.image)
  want = (
      shapes_tasks.COUNT_FAMILIES
      if families == "count"
      else shapes_tasks.NLVR2_FAMILIES
  )
  assert {f for f, _ in seen} == set(want), seen
  if families == "count":  # 40 statements: every family both true and false
    assert len(seen) == 2 * len(want), seen


def test_nlvr2_families_are_checked(tmp_path):
  with pytest.raises(ValueError, match="families must be some of"):
    shapes_tasks.write_all(
        str(tmp_path), sizes=(1, 1, 1), nlvr2_families=("more", "fewer")
    )
  with pytest.raises(ValueError, match="families must be some of"):
    shapes_tasks.write_all(str(tmp_path), sizes=(1, 1, 1), nlvr2_families=())


# --------------------------------------------------------------------------
# Retrieval.


@pytest.mark.parametrize(
    "position,split", list(enumerate(shapes_tasks_common.SPLITS["retrieval"]))
)
def test_retrieval_captions_describe_the_images(files, position, split):
  images = downstream.load_karpathy(
      files.retrieval, files.retrieval_images, split
  )
  assert len(images) == SIZES[position]
  assert downstream.check_images(images) == len(images)
  stream = shapes_tasks.stream_seed(0, "retrieval", split)
  for image in images:
    m = re.fullmatch(rf"shapes_{split}_(\d+)", image.image_id)
    example = shapes.generate(stream, int(m[1]), IMAGE_SIZE)
    assert len(image.captions) == 5 and len(set(image.captions)) == 5
    assert image.captions[0] == example.caption
    for caption in image.captions:
      words = re.findall(r"\w+", caption)
      assert sorted(w for w in words if w in shapes.COLORS) == sorted(
          o.color for o in example.objects
      ), caption
      assert sorted(w for w in words if w in shapes.SHAPES) == sorted(
          o.shape for o in example.objects
      ), caption
  if split != "train":  # scenes are told apart by their captions
    assert len({image.captions[0] for image in images}) == len(images)


def test_karpathy_flickr_layout_and_restval(tmp_path):
  path = tmp_path / "dataset_flickr30k.json"
  sentences = [{"raw": " A dog runs. ", "tokens": ["a", "dog", "runs"]}]
  path.write_text(
      json.dumps(
          {
              "dataset": "flickr30k",
              "images": [
                  {
                      "filename": "100.jpg",
                      "imgid": 0,
                      "split": "train",
                      "sentences": sentences,
                  },
                  {
                      "filename": "101.jpg",
                      "imgid": 1,
                      "split": "restval",
                      "sentences": sentences,
                  },
                  {
                      "filename": "102.jpg",
                      "imgid": 2,
                      "split": "test",
                      "sentences": sentences,
                  },
                  {
                      "filepath": "val2014",
                      "filename": "x.jpg",
                      "cocoid": 42,
                      "imgid": 3,
                      "split": "val",
                      "sentences": sentences,
                  },
              ],
          }
      )
  )
  train = downstream.load_karpathy(str(path), "root", "train")
  assert [i.image_id for i in train] == ["100", "101"]
  assert train[0] == downstream.RetrievalImage(
      "100", os.path.join("root", "100.jpg"), ("A dog runs.",)
  )
  assert [
      i.image_id for i in downstream.load_karpathy(str(path), "r", "restval")
  ] == ["101"]
  (val,) = downstream.load_karpathy(str(path), "root", "val")
  assert val.image_id == "42"
  assert val.image_path == os.path.join("root", "val2014", "x.jpg")
  with pytest.raises(ValueError, match="split must be one of"):
    downstream.load_karpathy(str(path), "root", "dev")


# --------------------------------------------------------------------------
# Determinism and the command line.


def _tree(root: str) -> dict[str, bytes]:
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_same_seed_writes_identical_files(tmp_path):
  sizes = {"vqa": (4, 3, 2), "nlvr2": (6, 3, 3), "retrieval": (5, 3, 3)}
  a = shapes_tasks.write_all(str(tmp_path / "a"), sizes=sizes, seed=3)
  shapes_tasks.write_all(str(tmp_path / "b"), sizes=sizes, seed=3)
  shapes_tasks.write_all(str(tmp_path / "c"), sizes=sizes, seed=4)
  tree_a, tree_b = _tree(str(tmp_path / "a")), _tree(str(tmp_path / "b"))
  # 5 VQA + 3 NLVR2 + 1 Karpathy JSON files and every image.
  assert len(tree_a) == 9 + sum(sizes["vqa"]) + 2 * sum(sizes["nlvr2"]) + sum(
      sizes["retrieval"]
  )
  assert tree_a == tree_b
  tree_c = _tree(str(tmp_path / "c"))
  assert (
      tree_c[os.path.relpath(a.retrieval, a.root)]
      != tree_a[os.path.relpath(a.retrieval, a.root)]
  )


def test_default_sizes(tmp_path):
  """The defaults every fine-tuning run uses: counts, balance, all images."""
  files = shapes_tasks.write_all(str(tmp_path))
  vqa, nlvr2, retrieval = (
      shapes_tasks.DEFAULT_SIZES[t] for t in shapes_tasks.TASKS
  )
  for subtype, n in zip(shapes_tasks_common.SPLITS["vqa"], vqa):
    examples = downstream_vqa.load_vqa(
        files.vqa_questions[subtype],
        files.vqa_annotations.get(subtype),
        image_dir=files.vqa_images,
    )
    assert downstream.check_images(examples) == n
  for split, n in zip(shapes_tasks_common.SPLITS["nlvr2"], nlvr2):
    examples = downstream.load_nlvr2(
        files.nlvr2[split], files.nlvr2_images[split]
    )
    assert len(examples) == n and sum(e.label for e in examples) == n // 2
    assert downstream.check_images(examples) == 2 * n
  for split, n in zip(shapes_tasks_common.SPLITS["retrieval"], retrieval):
    images = downstream.load_karpathy(
        files.retrieval, files.retrieval_images, split
    )
    assert downstream.check_images(images) == n
  assert files.counts["vqa_images"] == sum(vqa)
  assert files.counts["nlvr2_images"] == 2 * sum(nlvr2)
  assert files.counts["retrieval_captions"] == 5 * sum(retrieval)


def test_command_line(tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.data.shapes_tasks",
          "--out",
          str(out),
          "--train",
          "3",
          "--val",
          "2",
          "--test",
          "1",
          "--image_size",
          "32",
          "--seed",
          "1",
          "--nlvr2_families",
          "more,one_has",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "nlvr2: 6 statements, 12 images" in result.stdout
  expected = shapes_tasks.write_all(
      str(tmp_path / "api"),
      image_size=32,
      sizes=(3, 2, 1),
      seed=1,
      nlvr2_families=("more", "one_has"),
  )
  assert _tree(str(out)) == _tree(expected.root)
  bad = subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.data.shapes_tasks",
          "--out",
          str(tmp_path / "bad"),
          "--nlvr2_families",
          "more,fewer",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert bad.returncode == 2
  assert bad.stderr.count("\n") == 1 and "families must be" in bad.stderr
  (example,) = downstream_vqa.load_vqa(
      str(out / "vqa" / "v2_OpenEnded_mscoco_test2015_questions.json"),
      image_dir=str(out / "vqa" / "images"),
  )[:1]
  assert _read_image(example.image_path).shape == (32, 32, 3)


# --------------------------------------------------------------------------
# Malformed inputs: one line naming the file and the field or line.

QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


def _question(i):
  return {"image_id": i, "question": f"q{i}", "question_id": 100 + i}


def _annotation(i, image_id=None):
  return {
      "question_id": 100 + i,
      "image_id": i if image_id is None else image_id,
      "answers": [
          {"answer": "yes", "answer_confidence": "yes", "answer_id": k + 1}
          for k in range(10)
      ],
      "multiple_choice_answer": "yes",
      "answer_type": "yes/no",
      "question_type": "is",
  }


def _write(path, obj) -> str:
  with open(path, "w") as f:
    f.write(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


def _no_question_id(d):
  questions = [_question(i) for i in range(5)]
  del questions[3]["question_id"]
  q = _write(d / QUESTIONS, {"data_subtype": "val2014", "questions": questions})
  return (
      lambda: downstream_vqa.load_vqa(q, None, image_dir=str(d)),
      QUESTIONS,
      "questions[3] has no 'question_id'",
  )


def _other_image_id(d):
  q = _write(
      d / QUESTIONS,
      {
          "data_subtype": "val2014",
          "questions": [_question(i) for i in range(3)],
      },
  )
  a = _write(
      d / ANNOTATIONS,
      {
          "data_subtype": "val2014",
          "annotations": [
              _annotation(0),
              _annotation(1, image_id=99),
              _annotation(2),
          ],
      },
  )
  return (
      lambda: downstream_vqa.load_vqa(q, a, image_dir=str(d)),
      ANNOTATIONS,
      "annotations[1] (question_id 101) has image_id 99, but questions[1]",
  )


def _no_annotation(d):
  q = _write(
      d / QUESTIONS,
      {
          "data_subtype": "val2014",
          "questions": [_question(i) for i in range(3)],
      },
  )
  a = _write(
      d / ANNOTATIONS,
      {
          "data_subtype": "val2014",
          "annotations": [_annotation(0), _annotation(2)],
      },
  )
  return (
      lambda: downstream_vqa.load_vqa(q, a, image_dir=str(d)),
      ANNOTATIONS,
      "no annotation for question_id 101",
  )


def _nlvr2_line(i, label="True"):
  return json.dumps(
      {
          "identifier": f"dev-{i}-0-0",
          "sentence": "s",
          "label": label,
          "left_url": "",
          "right_url": "",
      }
  )


def _bad_json_line_3(d):
  p = _write(
      d / "dev.json",
      "\n".join(
          [
              _nlvr2_line(0),
              _nlvr2_line(1),
              '{"identifier": "dev-2-0-0", ',
              _nlvr2_line(3),
          ]
      ),
  )
  return (
      lambda: downstream.load_nlvr2(p, str(d)),
      "dev.json",
      "line 3: not valid JSON",
  )


def _label_maybe(d):
  p = _write(
      d / "dev.json", "\n".join([_nlvr2_line(0), _nlvr2_line(1, "maybe")])
  )
  return (
      lambda: downstream.load_nlvr2(p, str(d)),
      "dev.json",
      'line 2: label is "maybe", expected "True" or "False"',
  )


def _train_without_directory(d):
  line = json.dumps(
      {"identifier": "train-5-0-1", "sentence": "s", "label": "False"}
  )
  p = _write(d / "train.json", line + "\n")
  return (
      lambda: downstream.load_nlvr2(p, str(d)),
      "train.json",
      "line 1 has no 'directory'",
  )


def _karpathy_no_sentences(d):
  sentences = [{"raw": "a cat", "tokens": ["a", "cat"]}]
  p = _write(
      d / "dataset_coco.json",
      {
          "dataset": "coco",
          "images": [
              {
                  "filepath": "val2014",
                  "filename": "a.jpg",
                  "split": "test",
                  "sentences": sentences,
                  "cocoid": 1,
              },
              {
                  "filepath": "val2014",
                  "filename": "b.jpg",
                  "split": "test",
                  "cocoid": 2,
              },
          ],
      },
  )
  return (
      lambda: downstream.load_karpathy(p, str(d), "test"),
      "dataset_coco.json",
      "images[1] has no 'sentences'",
  )


def _missing_file(d):
  p = str(d / "nowhere" / "test1.json")
  return lambda: downstream.load_nlvr2(p, str(d)), p, "no such file"


def _missing_questions_file(d):
  p = str(d / QUESTIONS)
  return lambda: downstream_vqa.load_vqa(p, image_dir=str(d)), p, "no such file"


def _missing_image(d):
  images = [
      downstream.RetrievalImage("1", str(d / "1.jpg"), ("a",)),
      downstream.RetrievalImage("2", str(d / "2.jpg"), ("b",)),
  ]
  _write(d / "1.jpg", "x")
  return (
      lambda: downstream.check_images(images),
      str(d / "2.jpg"),
      "no such image (needed by image_id 2; 1 of 2 images missing)",
  )


def _not_json(d):
  p = _write(d / "dataset_flickr30k.json", '{"images": [\n')
  return (
      lambda: downstream.load_karpathy(p, str(d), "val"),
      "dataset_flickr30k.json",
      "not valid JSON",
  )


@pytest.mark.parametrize(
    "case",
    [
        _no_question_id,
        _other_image_id,
        _no_annotation,
        _bad_json_line_3,
        _label_maybe,
        _train_without_directory,
        _karpathy_no_sentences,
        _missing_file,
        _missing_questions_file,
        _missing_image,
        _not_json,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_malformed_inputs_raise_one_line_errors(tmp_path, case):
  load, file_name, what = case(tmp_path)
  with pytest.raises(DataError) as info:
    load()
  message = str(info.value)
  assert "\n" not in message
  assert file_name in message and what in message, message
  assert isinstance(info.value, ValueError)


def test_evaluation_images_are_decoded_at_full_size():
  """Fine-tuning evaluation, `predict` and `convert run` read images through
  `read_image`: on a real JPEG photo its pixels equal a plain full-size PIL
  decode + bicubic resize exactly (a reduced-scale JPEG draft, the training
  pipeline's speed trick, differs visibly at this size)."""
  skimage_data = pytest.importorskip("skimage.data")
  from eve_jax.data import finetune_data, transforms
  from eve_jax.data.transforms import normalize_image

  path = os.path.join(
      os.path.dirname(skimage_data.__file__), "hubble_deep_field.jpg"
  )
  for size in (64, 224):
    got = finetune_data.read_image(path, size)
    with Image.open(path) as img:
      plain = np.asarray(
          img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC),
          np.uint8,
      )
    np.testing.assert_array_equal(got, normalize_image(plain))
  # The draft the training path takes is a different picture.
  with open(path, "rb") as f:
    data = f.read()
  with Image.open(path) as img:
    img.draft("RGB", (64, 64))
    drafted = np.asarray(
        img.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC), np.uint8
    )
  full = transforms.decode(data, 64, None)
  assert np.abs(drafted.astype(int) - full.astype(int)).max() > 8

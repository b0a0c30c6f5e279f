"""EVE-Shapes VQA in the VQAv2 format: questions, ten annotator answers
each, images named as COCO's (eve_jax/data/shapes_tasks.py).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from eve_jax.data import shapes
from eve_jax.data.downstream_vqa import vqa_image_name
from eve_jax.data.shapes_tasks_common import (
    COLOR_NAMES,
    NUMBER_WORDS,
    SPLITS,
    VQA_ID_STRIDE,
    has,
    save_image,
    stream_seed,
    write_json,
)

# Third entropy word of the per-image / per-split RNGs (shapes_tasks_common).
_VQA_SALT = 1

# --------------------------------------------------------------------------
# VQA.


class VQAQuestion(NamedTuple):
  """A question the image answers, before annotators.

  Attributes:
    question: e.g. "what color is the circle".
    answer: the canonical answer, normalized as the VQA metric would,
      e.g. "red", "2", "yes".
    answer_type: "yes/no", "number" or "other" (VQAv2's types).
    question_type: the question's opening words, as VQAv2's question_type.
    wrong: answers of the same kind that are wrong for this image.
  """

  question: str
  answer: str
  answer_type: str
  question_type: str
  wrong: tuple[str, ...]


def vqa_questions(
    objects: Sequence[shapes.ShapeObject], rng: np.random.Generator
) -> list[VQAQuestion]:
  """2-3 questions with distinct templates whose answer the image determines.

  Templates: the color / size of a shape present exactly once, the shape of
  a color present exactly once, the object count, and the presence of a
  color + shape (yes and no equally likely; a "no" names an absent pair).

  Args:
    objects: the image's objects (`Example.objects`).
    rng: the image's generator.

  Returns:
    The questions, in template order.
  """
  shape_count = collections.Counter(o.shape for o in objects)
  color_count = collections.Counter(o.color for o in objects)
  lone_shape = [o for o in objects if shape_count[o.shape] == 1]
  lone_color = [o for o in objects if color_count[o.color] == 1]

  def color_of_shape() -> VQAQuestion:
    o = lone_shape[rng.integers(len(lone_shape))]
    return VQAQuestion(
        f"what color is the {o.shape}",
        o.color,
        "other",
        "what color is the",
        tuple(c for c in COLOR_NAMES if c != o.color),
    )

  def size_of_shape() -> VQAQuestion:
    o = lone_shape[rng.integers(len(lone_shape))]
    return VQAQuestion(
        f"what size is the {o.shape}",
        o.size,
        "other",
        "what size is the",
        tuple(s for s in shapes.SIZES if s != o.size),
    )

  def shape_of_color() -> VQAQuestion:
    o = lone_color[rng.integers(len(lone_color))]
    return VQAQuestion(
        f"what shape is {o.color}",
        o.shape,
        "other",
        "what shape is",
        tuple(s for s in shapes.SHAPES if s != o.shape),
    )

  def count() -> VQAQuestion:
    n = len(objects)
    # Digits, as VQAv2's annotations hold them: the official metric
    # compares unanimous answers unnormalized ("two" x10 never matches the
    # normalized prediction "2").
    return VQAQuestion(
        "how many objects",
        str(n),
        "number",
        "how many",
        tuple(str(k) for k in range(1, 4) if k != n),
    )

  def presence() -> VQAQuestion:
    if rng.random() < 0.5:
      o = objects[rng.integers(len(objects))]
      color, shape, answer = o.color, o.shape, "yes"
    else:
      # Uniform over the absent pairs, so a pair's text says nothing of
      # the answer (present pairs are drawn ~uniformly too).
      absent = [
          (c, s)
          for c in COLOR_NAMES
          for s in shapes.SHAPES
          if not has(objects, c, s)
      ]
      color, shape = absent[rng.integers(len(absent))]
      answer = "no"
    return VQAQuestion(
        f"is there a {color} {shape}",
        answer,
        "yes/no",
        "is there a",
        ("no",) if answer == "yes" else ("yes",),
    )

  makers: list[Callable[[], VQAQuestion]] = []
  if lone_shape:
    makers += [color_of_shape, size_of_shape]
  if lone_color:
    makers.append(shape_of_color)
  makers += [count, presence]
  k = min(int(rng.integers(2, 4)), len(makers))
  chosen = sorted(rng.choice(len(makers), size=k, replace=False))
  return [makers[m]() for m in chosen]


def _answer_forms(q: VQAQuestion) -> list[str]:
  """Other spellings that VQA's answer normalization maps to q.answer.

  The official evaluation lowercases, strips punctuation and articles and
  turns number words into digits: "Red", "red.", "two", "a circle" all
  count as the canonical answer (which is already in normalized form).
  """
  forms = [q.answer.capitalize(), q.answer + "."]
  if q.answer_type == "number":
    forms.append(NUMBER_WORDS[int(q.answer)])
  if q.answer in shapes.SHAPES:
    forms.append("a " + q.answer)
  return forms


def annotator_answers(
    q: VQAQuestion, rng: np.random.Generator
) -> list[dict[str, object]]:
  """The 10 annotator answers of one question, in VQAv2's `answers` format.

  0-2 annotators write another form of the right answer; on 10% of the
  questions one annotator, on 5% two, give a wrong answer: the canonical
  form keeps a majority of at least 6, and soft scores (min(#humans / 3, 1))
  and leave-one-out accuracy meet partial agreement.

  Args:
    q: the question.
    rng: the image's generator.

  Returns:
    10 dicts {"answer", "answer_confidence", "answer_id"} (ids 1..10).
  """
  answers = [q.answer] * 10
  confidence = ["yes"] * 10
  slots = rng.permutation(10)
  n_forms = int(rng.integers(0, 3))
  u = rng.random()
  n_wrong = 2 if u < 0.05 else 1 if u < 0.15 else 0
  forms = _answer_forms(q)
  for slot in slots[:n_forms]:
    answers[slot] = forms[rng.integers(len(forms))]
  for slot in slots[n_forms : n_forms + n_wrong]:
    answers[slot] = q.wrong[rng.integers(len(q.wrong))]
    confidence[slot] = "maybe"
  return [
      {
          "answer": answers[k],
          "answer_confidence": confidence[k],
          "answer_id": k + 1,
      }
      for k in range(10)
  ]


def write_vqa(
    out_dir: str, image_size: int, sizes: Sequence[int], seed: int
) -> tuple[dict[str, str], dict[str, str], str, int, int]:
  root = os.path.join(out_dir, "vqa")
  image_dir = os.path.join(root, "images")
  os.makedirs(image_dir, exist_ok=True)
  questions_files, annotations_files = {}, {}
  n_images = n_questions = 0
  for position, (subtype, n) in enumerate(zip(SPLITS["vqa"], sizes)):
    stream = stream_seed(seed, "vqa", subtype)
    questions, annotations = [], []
    for index in range(n):
      example = shapes.generate(stream, index, image_size)
      image_id = VQA_ID_STRIDE * (position + 1) + index
      save_image(
          example.image,
          os.path.join(image_dir, vqa_image_name(subtype, image_id)),
      )
      # Per-image RNG: an image's questions do not depend on the others.
      rng = np.random.default_rng([stream, index, _VQA_SALT])
      for k, q in enumerate(vqa_questions(example.objects, rng)):
        question_id = image_id * 1000 + k
        questions.append(
            {
                "image_id": image_id,
                "question": q.question,
                "question_id": question_id,
            }
        )
        answers = annotator_answers(q, rng)
        majority = collections.Counter(
            a["answer"] for a in answers
        ).most_common(1)[0][0]
        assert majority == q.answer, (q, answers)
        annotations.append(
            {
                "question_type": q.question_type,
                "multiple_choice_answer": majority,
                "answers": answers,
                "image_id": image_id,
                "answer_type": q.answer_type,
                "question_id": question_id,
            }
        )
    n_images += n
    n_questions += len(questions)
    info = {
        "description": "EVE-Shapes VQA in the VQAv2 format",
        "version": "1.0",
        "contributor": "eve_jax.data.shapes_tasks",
    }
    license_ = {"name": "generated", "url": ""}
    path = os.path.join(root, f"v2_OpenEnded_mscoco_{subtype}_questions.json")
    write_json(
        path,
        {
            "info": info,
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "license": license_,
            "data_subtype": subtype,
            "questions": questions,
        },
    )
    questions_files[subtype] = path
    if not subtype.startswith("test"):  # test answers are not released
      path = os.path.join(root, f"v2_mscoco_{subtype}_annotations.json")
      write_json(
          path,
          {
              "info": info,
              "license": license_,
              "data_subtype": subtype,
              "annotations": annotations,
              "data_type": "mscoco",
          },
      )
      annotations_files[subtype] = path
  return questions_files, annotations_files, image_dir, n_images, n_questions

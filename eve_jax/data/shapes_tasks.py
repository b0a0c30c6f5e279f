"""EVE-Shapes versions of EVE's downstream tasks, written in the official formats.

Three small tasks on images of the EVE-Shapes generator (`shapes.generate`),
written to disk exactly as VQAv2, NLVR2 and the Karpathy retrieval splits
are distributed, so that the loaders of `eve_jax.data.downstream` and the
fine-tuning code run on them unchanged (and are exercised for real):

  DIR/vqa/        v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json
                  v2_mscoco_{train2014,val2014}_annotations.json
                  images/COCO_{subtype}_{image_id:012d}.jpg
  DIR/nlvr2/      {train,dev,test1}.json (JSON lines)
                  images/train/{directory}/train-{set}-0-img{0,1}.png
                  images/{dev,test1}/{split}-{set}-0-img{0,1}.png
  DIR/retrieval/  dataset_shapes.json (Karpathy format, splits train/val/test)
                  images/{train,val,test}/shapes_{split}_{index:06d}.jpg

Command line:

  python -m eve_jax.data.shapes_tasks --out DIR [--image_size 64]
      [--train N --val N --test N] [--seed S] [--nlvr2_families more,total]

Where every image comes from (so a test can regenerate it): split `split`
of task `task` is the generator stream `stream_seed(seed, task, split)` =
10_000 + 16 * seed + a slot per (task, split), never a pretraining stream
(those are 2 * seed and 2 * seed + 1) for seeds below 5_000.
  * VQA: image_id = 1_000_000 * (1 + split position) + index, the image is
    `generate(stream, index)`; question_id = image_id * 1000 + k as in VQAv2.
  * NLVR2: identifier "{split}-{j}-0-0"; img0 / img1 are
    `generate(stream, 2 j)` / `generate(stream, 2 j + 1)`.
  * Retrieval: the file name holds the index.

The tiny model's tokenizer is trained on captions only, so questions and
statements are short and reuse the caption words (a, small, large, colors,
shapes, left, of); other words are spelled out in characters.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from eve_jax.data import shapes
from eve_jax.data.downstream import nlvr2_image_names, vqa_image_name

TASKS = ("vqa", "nlvr2", "retrieval")
SPLITS: dict[str, tuple[str, str, str]] = {
    "vqa": ("train2014", "val2014", "test2015"),
    "nlvr2": ("train", "dev", "test1"),
    "retrieval": ("train", "val", "test"),
}
# (train, val, test) per task: sized for a CPU fine-tuning run. VQA and
# retrieval count images, NLVR2 counts statements (2 images each).
DEFAULT_SIZES: dict[str, tuple[int, int, int]] = {
    "vqa": (3000, 300, 100),
    "nlvr2": (3000, 300, 300),
    "retrieval": (3000, 100, 100),
}
STREAM_BASE = 10_000
# Room for 3 tasks x 3 splits per seed.
_SEED_STRIDE = 16
VQA_ID_STRIDE = 1_000_000
# Official NLVR2 spreads train images over 100 numbered folders.
NLVR2_DIRECTORIES = 100
JPEG_QUALITY = 95
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
COLOR_NAMES: tuple[str, ...] = tuple(shapes.COLORS)
# Third entropy word of the per-image / per-split RNGs: independent of the
# generator's own default_rng([stream, index]).
_VQA_SALT = 1
_NLVR2_SALT = 2
# Candidate NLVR2 pairs that did not fit a statement wait here for a later
# one instead of being thrown away.
_NLVR2_POOL = 256


def stream_seed(seed: int, task: str, split: str) -> int:
  """The EVE-Shapes stream seed of one split of one task.

  Args:
    seed: the user's seed, >= 0.
    task: one of TASKS.
    split: one of SPLITS[task].

  Returns:
    STREAM_BASE + 16 * seed + 3 * task position + split position.
  """
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  return (STREAM_BASE + _SEED_STRIDE * seed + 3 * TASKS.index(task)
          + SPLITS[task].index(split))


@dataclasses.dataclass(frozen=True)
class TaskFiles:
  """What `write_all` wrote.

  Attributes:
    root: the output folder.
    vqa_questions: subtype ("train2014", "val2014", "test2015") -> questions
      JSON.
    vqa_annotations: subtype ("train2014", "val2014") -> annotations JSON.
    vqa_images: the folder of every VQA image (`image_dir` of `load_vqa`).
    nlvr2: split ("train", "dev", "test1") -> JSON lines file.
    nlvr2_images: split -> its image folder (`image_dir` of `load_nlvr2`).
    retrieval: the Karpathy file dataset_shapes.json.
    retrieval_images: its image root (`image_root` of `load_karpathy`).
    counts: {"vqa_images", "vqa_questions", "nlvr2_examples", "nlvr2_images",
      "retrieval_images", "retrieval_captions"} -> number written.
  """

  root: str
  vqa_questions: Mapping[str, str]
  vqa_annotations: Mapping[str, str]
  vqa_images: str
  nlvr2: Mapping[str, str]
  nlvr2_images: Mapping[str, str]
  retrieval: str
  retrieval_images: str
  counts: Mapping[str, int]


# --------------------------------------------------------------------------
# Shared helpers.


def _save_image(image: np.ndarray, path: str) -> None:
  """JPEG (quality 95) or PNG by extension; both encoders are deterministic."""
  pil = Image.fromarray(image)
  if path.endswith(".png"):
    pil.save(path, format="PNG")
  else:
    # 4:4:4 chroma: with 4:2:0 the 9 px small shapes at 64 px would bleed
    # their color into the background.
    pil.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def _write_json(path: str, obj) -> None:
  # json.dumps uses the C encoder; json.dump streams through the Python one
  # (4x slower on the 5 MB annotation file).
  text = json.dumps(obj, separators=(",", ":"))
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _has(objects: Sequence[shapes.ShapeObject], color: str | None,
         shape: str) -> bool:
  return any(o.shape == shape and (color is None or o.color == color)
             for o in objects)


def _scene(stream: int, index: int) -> tuple[shapes.ShapeObject, ...]:
  """The objects of `generate(stream, index)` without drawing the image.

  Read back from the caption ("a SIZE COLOR SHAPE" joined by " left of "):
  5x cheaper than drawing, which matters when NLVR2 tries many pairs.
  """
  objects = []
  for phrase in shapes.generate_caption(stream, index).split(" left of "):
    _, size, color, shape = phrase.split(" ")
    objects.append(shapes.ShapeObject(color, shape, size, float("nan"),
                                      float("nan")))
  return tuple(objects)


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


def vqa_questions(objects: Sequence[shapes.ShapeObject],
                  rng: np.random.Generator) -> list[VQAQuestion]:
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
    return VQAQuestion(f"what color is the {o.shape}", o.color, "other",
                       "what color is the",
                       tuple(c for c in COLOR_NAMES if c != o.color))

  def size_of_shape() -> VQAQuestion:
    o = lone_shape[rng.integers(len(lone_shape))]
    return VQAQuestion(f"what size is the {o.shape}", o.size, "other",
                       "what size is the",
                       tuple(s for s in shapes.SIZES if s != o.size))

  def shape_of_color() -> VQAQuestion:
    o = lone_color[rng.integers(len(lone_color))]
    return VQAQuestion(f"what shape is {o.color}", o.shape, "other",
                       "what shape is",
                       tuple(s for s in shapes.SHAPES if s != o.shape))

  def count() -> VQAQuestion:
    n = len(objects)
    # Digits, as VQAv2's annotations hold them: the official metric
    # compares unanimous answers unnormalized ("two" x10 never matches the
    # normalized prediction "2").
    return VQAQuestion("how many objects", str(n), "number", "how many",
                       tuple(str(k) for k in range(1, 4) if k != n))

  def presence() -> VQAQuestion:
    if rng.random() < 0.5:
      o = objects[rng.integers(len(objects))]
      color, shape, answer = o.color, o.shape, "yes"
    else:
      # Uniform over the absent pairs, so a pair's text says nothing of
      # the answer (present pairs are drawn ~uniformly too).
      absent = [(c, s) for c in COLOR_NAMES for s in shapes.SHAPES
                if not _has(objects, c, s)]
      color, shape = absent[rng.integers(len(absent))]
      answer = "no"
    return VQAQuestion(f"is there a {color} {shape}", answer, "yes/no",
                       "is there a", ("no",) if answer == "yes" else ("yes",))

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


def annotator_answers(q: VQAQuestion, rng: np.random.Generator
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
  for slot in slots[n_forms:n_forms + n_wrong]:
    answers[slot] = q.wrong[rng.integers(len(q.wrong))]
    confidence[slot] = "maybe"
  return [{"answer": answers[k], "answer_confidence": confidence[k],
           "answer_id": k + 1} for k in range(10)]


def _write_vqa(out_dir: str, image_size: int, sizes: Sequence[int], seed: int
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
      _save_image(example.image,
                  os.path.join(image_dir, vqa_image_name(subtype, image_id)))
      # Per-image RNG: an image's questions do not depend on the others.
      rng = np.random.default_rng([stream, index, _VQA_SALT])
      for k, q in enumerate(vqa_questions(example.objects, rng)):
        question_id = image_id * 1000 + k
        questions.append({"image_id": image_id, "question": q.question,
                          "question_id": question_id})
        answers = annotator_answers(q, rng)
        majority = collections.Counter(
            a["answer"] for a in answers).most_common(1)[0][0]
        assert majority == q.answer, (q, answers)
        annotations.append({
            "question_type": q.question_type,
            "multiple_choice_answer": majority,
            "answers": answers,
            "image_id": image_id,
            "answer_type": q.answer_type,
            "question_id": question_id,
        })
    n_images += n
    n_questions += len(questions)
    info = {"description": "EVE-Shapes VQA in the VQAv2 format",
            "version": "1.0", "contributor": "eve_jax.data.shapes_tasks"}
    license_ = {"name": "generated", "url": ""}
    path = os.path.join(root, f"v2_OpenEnded_mscoco_{subtype}_questions.json")
    _write_json(path, {"info": info, "task_type": "Open-Ended",
                       "data_type": "mscoco", "license": license_,
                       "data_subtype": subtype, "questions": questions})
    questions_files[subtype] = path
    if not subtype.startswith("test"):  # test answers are not released
      path = os.path.join(root, f"v2_mscoco_{subtype}_annotations.json")
      _write_json(path, {"info": info, "license": license_,
                         "data_subtype": subtype, "annotations": annotations,
                         "data_type": "mscoco"})
      annotations_files[subtype] = path
  return questions_files, annotations_files, image_dir, n_images, n_questions


# --------------------------------------------------------------------------
# NLVR2.

Pair = Sequence[shapes.ShapeObject]


# Statement families. Object counts compared across the pair are the
# default: the tiny pretrained model learns them (README, "Fine-tuning").
# Which objects are present ("one image has a red square") it does not:
# after VQA fine-tuning it answers "is there a red square" at chance, so
# those families are kept for larger models and `--nlvr2_families`.
COUNT_FAMILIES: tuple[str, ...] = ("more", "total", "both_count")
PRESENCE_FAMILIES: tuple[str, ...] = ("both_have", "one_has", "none_has")
NLVR2_FAMILIES: tuple[str, ...] = PRESENCE_FAMILIES + COUNT_FAMILIES


def check_families(families: Sequence[str]) -> tuple[str, ...]:
  """Validates statement family names: -> a non-empty tuple of them."""
  families = tuple(families)
  unknown = [f for f in families if f not in NLVR2_FAMILIES]
  if unknown or not families:
    raise ValueError(f"NLVR2 statement families must be some of "
                     f"{NLVR2_FAMILIES}, got {families}")
  return families


def nlvr2_statement(rng: np.random.Generator,
                    families: Sequence[str] = COUNT_FAMILIES
                    ) -> tuple[str, Callable[[Pair, Pair], bool]]:
  """A statement about two images ("left" = img0, "right" = img1).

  Every statement needs both images. Families:
    more        "the left image has more objects" (or right)
    total       "there are four objects in total" (2-6)
    both_count  "both images have two objects" (1-3)
    both_have   "both images have a circle"
    one_has     "one image has a red square" (exactly one)
    none_has    "no image has a cross"

  Args:
    rng: the split's generator.
    families: the families drawn from, uniformly.

  Returns:
    (sentence, holds) with holds(left_objects, right_objects) -> bool.
  """
  family = families[rng.integers(len(families))]
  if family == "more":
    if rng.random() < 0.5:
      return "the left image has more objects", lambda a, b: len(a) > len(b)
    return "the right image has more objects", lambda a, b: len(b) > len(a)
  if family == "total":
    n = int(rng.integers(2, 7))
    return (f"there are {NUMBER_WORDS[n]} objects in total",
            lambda a, b: len(a) + len(b) == n)
  if family == "both_count":
    n = int(rng.integers(1, 4))
    noun = "object" if n == 1 else "objects"
    return (f"both images have {NUMBER_WORDS[n]} {noun}",
            lambda a, b: len(a) == n and len(b) == n)
  shape = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
  if family == "both_have":
    return (f"both images have a {shape}",
            lambda a, b: _has(a, None, shape) and _has(b, None, shape))
  color = (COLOR_NAMES[rng.integers(len(COLOR_NAMES))] if rng.random() < 0.5
           else None)
  thing = f"{color} {shape}" if color else shape
  if family == "one_has":
    return (f"one image has a {thing}",
            lambda a, b: _has(a, color, shape) != _has(b, color, shape))
  if family == "none_has":
    return (f"no image has a {thing}",
            lambda a, b: not (_has(a, color, shape) or _has(b, color, shape)))
  raise ValueError(f"unknown NLVR2 statement family {family!r}")


def _write_nlvr2(out_dir: str, image_size: int, sizes: Sequence[int],
                 seed: int, families: Sequence[str]
                 ) -> tuple[dict[str, str], dict[str, str], int]:
  """Statements first, then a pair that gives the drawn label.

  The label of each statement is drawn (exactly half True per split) before
  its pair is searched, so the sentence alone says nothing about the label:
  text-only accuracy is 50%.
  """
  root = os.path.join(out_dir, "nlvr2")
  files, image_dirs = {}, {}
  n_examples = 0
  for split, n in zip(SPLITS["nlvr2"], sizes):
    stream = stream_seed(seed, "nlvr2", split)
    rng = np.random.default_rng([stream, _NLVR2_SALT])
    labels = rng.permutation(np.arange(n) < (n + 1) // 2)
    split_dir = os.path.join(root, "images", split)
    os.makedirs(split_dir, exist_ok=True)
    image_dirs[split] = split_dir
    made_dirs: set[str] = set()
    pool: list[tuple[int, Pair, Pair]] = []
    next_pair = 0
    lines = []
    for i in range(n):
      sentence, holds = nlvr2_statement(rng, families)
      want = bool(labels[i])
      found = next((p for p, (_, a, b) in enumerate(pool)
                    if holds(a, b) == want), None)
      if found is not None:
        j = pool.pop(found)[0]
      else:
        while True:
          j = next_pair
          next_pair += 1
          a, b = _scene(stream, 2 * j), _scene(stream, 2 * j + 1)
          if holds(a, b) == want:
            break
          pool.append((j, a, b))
          if len(pool) > _NLVR2_POOL:
            pool.pop(0)
      identifier = f"{split}-{j}-0-0"
      line = {"identifier": identifier, "sentence": sentence,
              "label": "True" if want else "False"}
      folder = split_dir
      if split == "train":
        line["directory"] = j % NLVR2_DIRECTORIES
        folder = os.path.join(split_dir, str(line["directory"]))
        if folder not in made_dirs:
          os.makedirs(folder, exist_ok=True)
          made_dirs.add(folder)
      for k, name in enumerate(nlvr2_image_names(identifier)):
        _save_image(shapes.generate(stream, 2 * j + k, image_size).image,
                    os.path.join(folder, name))
      # The official files hold crawl URLs; these say which generator
      # record each image is.
      line.update({"left_url": f"eve-shapes:{stream}/{2 * j}",
                   "right_url": f"eve-shapes:{stream}/{2 * j + 1}",
                   "writer": "eve_shapes", "synset": "shapes", "query": ""})
      lines.append(json.dumps(line))
    path = os.path.join(root, f"{split}.json")
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
    files[split] = path
    n_examples += n
  return files, image_dirs, n_examples


# --------------------------------------------------------------------------
# Retrieval (Karpathy format).


def _series(parts: Sequence[str]) -> str:
  """"x", "x and y", "x, y and z"."""
  if len(parts) <= 2:
    return " and ".join(parts)
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def retrieval_captions(objects: Sequence[shapes.ShapeObject]
                       ) -> tuple[str, str, str, str, str]:
  """The EVE-Shapes caption and 4 paraphrases of the same scene.

  Two or three objects: the caption ("a small red circle left of a large
  blue square"), the reverse order with "right of", colors and shapes only
  ("a red circle and a blue square"), positions named ("... on the left and
  ... on the right") and a count-led list ("two objects, a small red ...").
  One object: the caption, "... on a dark background", without size, "one
  large red circle", "the image shows ...".

  Args:
    objects: the scene's objects, left to right.

  Returns:
    5 captions; every one names every object's color and shape.
  """
  full = [f"a {o.size} {o.color} {o.shape}" for o in objects]
  bare = [f"a {o.color} {o.shape}" for o in objects]
  caption = " left of ".join(full)
  if len(objects) == 1:
    o = objects[0]
    return (caption, f"{full[0]} on a dark background", bare[0],
            f"one {o.size} {o.color} {o.shape}", f"the image shows {full[0]}")
  places = (("on the left", "on the right") if len(objects) == 2 else
            ("on the left", "in the middle", "on the right"))
  return (caption,
          " right of ".join(reversed(full)),
          _series(bare),
          _series([f"{p} {where}" for p, where in zip(full, places)]),
          f"{NUMBER_WORDS[len(objects)]} objects, {_series(full)}")


def _tokens(text: str) -> list[str]:
  # Karpathy's tokens: lowercased words without punctuation.
  return re.findall(r"[a-z0-9]+", text.lower())


def _write_retrieval(out_dir: str, image_size: int, sizes: Sequence[int],
                     seed: int) -> tuple[str, str, int]:
  root = os.path.join(out_dir, "retrieval")
  image_root = os.path.join(root, "images")
  images = []
  sentid = 0
  for split, n in zip(SPLITS["retrieval"], sizes):
    stream = stream_seed(seed, "retrieval", split)
    os.makedirs(os.path.join(image_root, split), exist_ok=True)
    seen: set[str] = set()
    index = written = 0
    while written < n:
      # Val / test scenes must be told apart by their captions: an index
      # whose caption the split already has is skipped. Train keeps the
      # generator's distribution (duplicates are harmless there).
      if index > 50 * n + 100_000:
        raise ValueError(f"retrieval {split}: only {written} distinct "
                         f"scenes in {index} images, {n} asked for")
      caption = shapes.generate_caption(stream, index)
      if split != "train" and caption in seen:
        index += 1
        continue
      seen.add(caption)
      written += 1
      example = shapes.generate(stream, index, image_size)
      filename = f"shapes_{split}_{index:06d}.jpg"
      _save_image(example.image, os.path.join(image_root, split, filename))
      imgid = len(images)
      captions = retrieval_captions(example.objects)
      sentids = list(range(sentid, sentid + len(captions)))
      sentid += len(captions)
      images.append({
          "filepath": split, "sentids": sentids, "filename": filename,
          "imgid": imgid, "split": split,
          "sentences": [{"tokens": _tokens(c), "raw": c, "imid": imgid,
                         "sentid": s} for c, s in zip(captions, sentids)],
      })
      index += 1
  path = os.path.join(root, "dataset_shapes.json")
  _write_json(path, {"images": images, "dataset": "shapes"})
  return path, image_root, len(images)


# --------------------------------------------------------------------------
# Everything.


def resolve_sizes(sizes: Mapping[str, Sequence[int]] | Sequence[int] | None
                  ) -> dict[str, tuple[int, int, int]]:
  """(train, val, test) per task.

  Args:
    sizes: None (DEFAULT_SIZES), one (train, val, test) for every task, or
      {task: (train, val, test)} overriding the defaults of those tasks.

  Returns:
    {task: (train, val, test)} for every task.
  """
  out = dict(DEFAULT_SIZES)
  if sizes is None:
    return out
  if isinstance(sizes, Mapping):
    unknown = set(sizes) - set(TASKS)
    if unknown:
      raise ValueError(f"unknown task(s) {sorted(unknown)} in sizes, "
                       f"expected some of {TASKS}")
    out.update({task: tuple(v) for task, v in sizes.items()})
  else:
    out = {task: tuple(sizes) for task in TASKS}
  for task, v in out.items():
    if len(v) != 3 or not all(isinstance(x, (int, np.integer)) and
                              0 <= x < VQA_ID_STRIDE for x in v):
      raise ValueError(f"sizes of {task} must be 3 integers in "
                       f"[0, {VQA_ID_STRIDE}), got {v}")
    out[task] = tuple(int(x) for x in v)
  return out


def write_all(out_dir: str, *, image_size: int = 64,
              sizes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
              seed: int = 0,
              nlvr2_families: Sequence[str] = COUNT_FAMILIES) -> TaskFiles:
  """Writes the three EVE-Shapes tasks under out_dir in the official formats.

  The files are a pure function of the arguments: the same
  arguments write byte-identical files. Files of an earlier, larger run in
  the same folder are overwritten or, if not rewritten, left in place
  (nothing refers to them).

  Args:
    out_dir: the output folder (created).
    image_size: H = W of every image in pixels.
    sizes: see `resolve_sizes`; None for DEFAULT_SIZES.
    seed: data seed, >= 0.
    nlvr2_families: the NLVR2 statement families (`nlvr2_statement`).

  Returns:
    The paths and counts (`TaskFiles`).
  """
  if image_size < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}")
  resolved = resolve_sizes(sizes)
  nlvr2_families = check_families(nlvr2_families)
  stream_seed(seed, "vqa", "train2014")  # validates the seed first
  vqa_q, vqa_a, vqa_images, n_vqa_images, n_vqa_questions = _write_vqa(
      out_dir, image_size, resolved["vqa"], seed)
  nlvr2, nlvr2_images, n_nlvr2 = _write_nlvr2(
      out_dir, image_size, resolved["nlvr2"], seed, nlvr2_families)
  retrieval, retrieval_images, n_retrieval = _write_retrieval(
      out_dir, image_size, resolved["retrieval"], seed)
  return TaskFiles(
      root=out_dir, vqa_questions=vqa_q, vqa_annotations=vqa_a,
      vqa_images=vqa_images, nlvr2=nlvr2, nlvr2_images=nlvr2_images,
      retrieval=retrieval, retrieval_images=retrieval_images,
      counts={"vqa_images": n_vqa_images, "vqa_questions": n_vqa_questions,
              "nlvr2_examples": n_nlvr2, "nlvr2_images": 2 * n_nlvr2,
              "retrieval_images": n_retrieval,
              "retrieval_captions": 5 * n_retrieval})


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m eve_jax.data.shapes_tasks",
      description="Writes EVE-Shapes VQA, NLVR2 and retrieval data in the "
      "official VQAv2 / NLVR2 / Karpathy formats.")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--train", type=int, default=None,
                      help="train size of every task (default: per task)")
  parser.add_argument("--val", type=int, default=None,
                      help="val / dev size of every task")
  parser.add_argument("--test", type=int, default=None,
                      help="test / test1 size of every task")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
      "--nlvr2_families", default=",".join(COUNT_FAMILIES),
      help=f"comma-separated NLVR2 statement families, some of "
      f"{','.join(NLVR2_FAMILIES)}")
  args = parser.parse_args(argv)
  sizes = {}
  for task in TASKS:
    default = DEFAULT_SIZES[task]
    sizes[task] = tuple(d if v is None else v for v, d in
                        zip((args.train, args.val, args.test), default))
  start = time.perf_counter()
  try:
    files = write_all(args.out, image_size=args.image_size, sizes=sizes,
                      seed=args.seed,
                      nlvr2_families=args.nlvr2_families.split(","))
  except ValueError as e:
    print(f"eve_jax: error: {e}", file=sys.stderr)
    return 2
  seconds = time.perf_counter() - start
  c = files.counts
  print(f"vqa: {c['vqa_images']} images, {c['vqa_questions']} questions "
        f"-> {os.path.join(args.out, 'vqa')}")
  print(f"nlvr2: {c['nlvr2_examples']} statements, {c['nlvr2_images']} "
        f"images -> {os.path.join(args.out, 'nlvr2')}")
  print(f"retrieval: {c['retrieval_images']} images, "
        f"{c['retrieval_captions']} captions -> {files.retrieval}")
  print(f"wrote in {seconds:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""What the EVE-Shapes fine-tuning tasks give without looking at an image.

A fine-tuned row is worth reading only where it beats these: a model that
learned the question's or the statement's prior and nothing of the picture
scores them too. Each is computed from the task files a seed's rows share
(eve_jax/ablate/schedule.py: `write_shapes_tasks`), with the metrics the
fine-tunings report:

  vqa          each val2014 question answered with the training answer most
               often given to the same question text (to its question type
               when the text was never asked in training); the official
               accuracy (eve_jax/tasks/vqa_metric.py).
  nlvr2_dev,   each statement labelled as it is most often in training
  nlvr2_test   (EVE-Shapes statements are templates, so many repeat; true
               for an unseen one).
  tr_r1, ir_r1 chance: a random ranking, so a text query finds one of the
               image's captions first with probability (its captions) /
               (all test captions) averaged over images, and a caption
               finds its image first with probability 1 / (test images).

All in [0, 1], keyed as `tables.COLUMNS`. NLVR2 and retrieval files are
read with the fine-tunings' own loaders (eve_jax/data/downstream.py); VQA
reads its files directly for the question type and the
multiple_choice_answer, which the loader does not keep.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from eve_jax.data import downstream
from eve_jax.tasks import vqa_metric


def _top(counter: collections.Counter) -> str:
  """The most frequent key; ties to the smallest, so the prior is stable."""
  best = max(counter.values())
  return min(k for k, v in counter.items() if v == best)


def _vqa_file(vqa_dir: str, kind: str, split: str) -> list[dict]:
  if kind == "questions":
    name = f"v2_OpenEnded_mscoco_{split}_questions.json"
  else:
    name = f"v2_mscoco_{split}_annotations.json"
  with open(os.path.join(vqa_dir, name)) as f:
    return json.load(f)[kind]


def vqa_prior(
    vqa_dir: str, *, train: str = "train2014", evaluate: str = "val2014"
) -> float:
  """Official VQA accuracy on `evaluate` of answering from the question
  alone (the training answer most given to the same text or type)."""
  by_text = collections.defaultdict(collections.Counter)
  by_type = collections.defaultdict(collections.Counter)
  text = {
      q["question_id"]: q["question"]
      for q in _vqa_file(vqa_dir, "questions", train)
  }
  for a in _vqa_file(vqa_dir, "annotations", train):
    by_text[text[a["question_id"]]][a["multiple_choice_answer"]] += 1
    by_type[a["question_type"]][a["multiple_choice_answer"]] += 1
  everything = sum(by_type.values(), collections.Counter())
  text = {
      q["question_id"]: q["question"]
      for q in _vqa_file(vqa_dir, "questions", evaluate)
  }
  scores = []
  for a in _vqa_file(vqa_dir, "annotations", evaluate):
    counts = (
        by_text.get(text[a["question_id"]])
        or by_type.get(a["question_type"])
        or everything
    )
    gts = [g["answer"] for g in a["answers"]]
    scores.append(vqa_metric.vqa_accuracy(_top(counts), gts))
  return float(np.mean(scores))


def nlvr2_prior(nlvr2_dir: str, split_file: str) -> float:
  """Accuracy on `split_file` of labelling each statement as training
  labels it most often."""
  load = lambda name: downstream.load_nlvr2(os.path.join(nlvr2_dir, name), "")
  seen = collections.defaultdict(collections.Counter)
  for ex in load("train.json"):
    seen[ex.sentence][ex.label] += 1
  rows = load(split_file)
  guess = [
      _top(seen[ex.sentence]) if ex.sentence in seen else True for ex in rows
  ]
  return float(np.mean([g == ex.label for g, ex in zip(guess, rows)]))


def retrieval_chance(dataset_json: str) -> tuple[float, float]:
  """(TR@1, IR@1) of a random ranking over the test split."""
  images = downstream.load_karpathy(dataset_json, "", "test")
  captions = [len(image.captions) for image in images]
  total = sum(captions)
  return float(np.mean([c / total for c in captions])), 1.0 / len(images)


def blind_numbers(shapes_dir: str) -> dict[str, float]:
  """The five columns without the image, for one seed's task files
  (shapes_dir/{vqa,nlvr2,retrieval}, as `write_shapes_tasks` lays out)."""
  nlvr2 = os.path.join(shapes_dir, "nlvr2")
  tr, ir = retrieval_chance(
      os.path.join(shapes_dir, "retrieval", "dataset_shapes.json")
  )
  return dict(
      nlvr2_dev=nlvr2_prior(nlvr2, "dev.json"),
      nlvr2_test=nlvr2_prior(nlvr2, "test1.json"),
      tr_r1=tr,
      ir_r1=ir,
      vqa=vqa_prior(os.path.join(shapes_dir, "vqa")),
  )

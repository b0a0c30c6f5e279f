"""EVE-Shapes NLVR2 in the official format: statements about a pair of
images, by family (eve_jax/data/shapes_tasks.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from eve_jax.data import shapes
from eve_jax.data.downstream import nlvr2_image_names
from eve_jax.data.shapes_tasks_common import (
    COLOR_NAMES,
    NLVR2_DIRECTORIES,
    NUMBER_WORDS,
    SPLITS,
    has,
    save_image,
    scene,
    stream_seed,
)

# Third entropy word of the per-image / per-split RNGs (shapes_tasks_common).
_NLVR2_SALT = 2
# Candidate NLVR2 pairs that did not fit a statement wait here for a later
# one instead of being thrown away.
_NLVR2_POOL = 256

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
    raise ValueError(
        f"NLVR2 statement families must be some of "
        f"{NLVR2_FAMILIES}, got {families}"
    )
  return families


def nlvr2_statement(
    rng: np.random.Generator, families: Sequence[str] = COUNT_FAMILIES
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
    return (
        f"there are {NUMBER_WORDS[n]} objects in total",
        lambda a, b: len(a) + len(b) == n,
    )
  if family == "both_count":
    n = int(rng.integers(1, 4))
    noun = "object" if n == 1 else "objects"
    return (
        f"both images have {NUMBER_WORDS[n]} {noun}",
        lambda a, b: len(a) == n and len(b) == n,
    )
  shape = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
  if family == "both_have":
    return (
        f"both images have a {shape}",
        lambda a, b: has(a, None, shape) and has(b, None, shape),
    )
  color = (
      COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
      if rng.random() < 0.5
      else None
  )
  thing = f"{color} {shape}" if color else shape
  if family == "one_has":
    return (
        f"one image has a {thing}",
        lambda a, b: has(a, color, shape) != has(b, color, shape),
    )
  if family == "none_has":
    return (
        f"no image has a {thing}",
        lambda a, b: not (has(a, color, shape) or has(b, color, shape)),
    )
  raise ValueError(f"unknown NLVR2 statement family {family!r}")


def write_nlvr2(
    out_dir: str,
    image_size: int,
    sizes: Sequence[int],
    seed: int,
    families: Sequence[str],
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
      found = next(
          (p for p, (_, a, b) in enumerate(pool) if holds(a, b) == want), None
      )
      if found is not None:
        j = pool.pop(found)[0]
      else:
        while True:
          j = next_pair
          next_pair += 1
          a, b = scene(stream, 2 * j), scene(stream, 2 * j + 1)
          if holds(a, b) == want:
            break
          pool.append((j, a, b))
          if len(pool) > _NLVR2_POOL:
            pool.pop(0)
      identifier = f"{split}-{j}-0-0"
      line = {
          "identifier": identifier,
          "sentence": sentence,
          "label": "True" if want else "False",
      }
      folder = split_dir
      if split == "train":
        line["directory"] = j % NLVR2_DIRECTORIES
        folder = os.path.join(split_dir, str(line["directory"]))
        if folder not in made_dirs:
          os.makedirs(folder, exist_ok=True)
          made_dirs.add(folder)
      for k, name in enumerate(nlvr2_image_names(identifier)):
        save_image(
            shapes.generate(stream, 2 * j + k, image_size).image,
            os.path.join(folder, name),
        )
      # The official files hold crawl URLs; these say which generator
      # record each image is.
      line.update(
          {
              "left_url": f"eve-shapes:{stream}/{2 * j}",
              "right_url": f"eve-shapes:{stream}/{2 * j + 1}",
              "writer": "eve_shapes",
              "synset": "shapes",
              "query": "",
          }
      )
      lines.append(json.dumps(line))
    path = os.path.join(root, f"{split}.json")
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
    files[split] = path
    n_examples += n
  return files, image_dirs, n_examples

"""What the EVE-Shapes downstream task writers share (eve_jax/data/
shapes_tasks.py has the layout and the command line): splits and sizes,
the generator stream of each (task, split), the image and JSON writers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from eve_jax.data import shapes

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
# The per-image / per-split RNGs of each task take a third entropy word (a
# salt, in its module): independent of the generator's own
# default_rng([stream, index]).


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
  return (
      STREAM_BASE
      + _SEED_STRIDE * seed
      + 3 * TASKS.index(task)
      + SPLITS[task].index(split)
  )


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


def save_image(image: np.ndarray, path: str) -> None:
  """JPEG (quality 95) or PNG by extension; both encoders are deterministic."""
  pil = Image.fromarray(image)
  if path.endswith(".png"):
    pil.save(path, format="PNG")
  else:
    # 4:4:4 chroma: with 4:2:0 the 9 px small shapes at 64 px would bleed
    # their color into the background.
    pil.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def write_json(path: str, obj) -> None:
  # json.dumps uses the C encoder; json.dump streams through the Python one
  # (4x slower on the 5 MB annotation file).
  text = json.dumps(obj, separators=(",", ":"))
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def has(
    objects: Sequence[shapes.ShapeObject], color: str | None, shape: str
) -> bool:
  return any(
      o.shape == shape and (color is None or o.color == color) for o in objects
  )


def scene(stream: int, index: int) -> tuple[shapes.ShapeObject, ...]:
  """The objects of `generate(stream, index)` without drawing the image.

  Read back from the caption ("a SIZE COLOR SHAPE" joined by " left of "):
  5x cheaper than drawing, which matters when NLVR2 tries many pairs.
  """
  objects = []
  for phrase in shapes.generate_caption(stream, index).split(" left of "):
    _, size, color, shape = phrase.split(" ")
    objects.append(
        shapes.ShapeObject(color, shape, size, float("nan"), float("nan"))
    )
  return tuple(objects)

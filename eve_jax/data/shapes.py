"""EVE-Shapes: a procedural image-caption world, random-access from (seed, index).

Each example holds 1-3 flat-colored objects on a plain dark canvas and a
caption from a tiny grammar:

  1 object:  "a large red circle"
  2 objects: "a small red circle left of a large blue square"
  3 objects: "a small red circle left of a large blue square left of a small
             white cross"

Objects are listed left to right. The canvas is a 4 x 4 board of cells;
the n objects take n distinct random columns of its second row, so objects
never overlap and "left of" is always true. At the tiny config's 64 px with
16 px patches every object lies inside one patch.
Colors and shape names (`VISUAL_WORDS`) cannot be guessed from the rest of
the caption, so masked-word accuracy on them measures real use of the image
(DESIGN.md section 4); the full caption tells MIM what the masked objects
look like and in which order they stand.

Everything is a pure function of (seed, index): no global RNG state, so any
record can be regenerated on any host in any order.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

# Well separated in RGB so that a 2x2 patch of any object is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
VISUAL_WORDS: tuple[str, ...] = tuple(COLORS) + SHAPES
BACKGROUND: tuple[int, int, int] = (16, 16, 16)
MAX_OBJECTS = 3

# P(1 object), P(2 objects), P(3 objects).
_COUNT_PROBS = (0.4, 0.4, 0.2)
# The canvas is a GRID x GRID board of cells (at 64 px and 16 px patches,
# one cell per patch); an object is centered in its cell column.
GRID = 4
# Bounding half-extent of a shape as a fraction of the cell: the large one
# nearly fills it, the small one has ~2.7x less area.
_RADIUS = {"small": 0.28, "large": 0.46}
# Objects stand in the second row of cells (center 1.5 cells from the top):
# inside one 16 px patch each at 64 px, so a patch sees a whole shape.
_ROW_CENTER = 1.5


class ShapeObject(NamedTuple):
  """One object; centers are in pixels, pixel (i, j) covers [j, j+1) x [i, i+1)."""

  color: str
  shape: str
  size: str
  x_center: float
  y_center: float


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One EVE-Shapes record.

  Attributes:
    image: uint8 [H, W, 3].
    caption: the caption, words separated by single spaces.
    objects: 1-3 objects, left to right (same order as in the caption).
    object_masks: bool [3, H, W], mask of object k in slot k, all False for
      absent slots (for Grad-CAM style localization metrics).
  """

  image: np.ndarray
  caption: str
  objects: tuple[ShapeObject, ...]
  object_masks: np.ndarray


def _sample_objects(
    rng: np.random.Generator, image_size: int
) -> tuple[ShapeObject, ...]:
  """Samples the scene; the caption depends only on this.

  n objects take n distinct random columns of the grid, listed left to
  right, each centered in its cell of the second row: no overlap, and
  "left of" always true.
  """
  n = int(rng.choice(3, p=_COUNT_PROBS)) + 1
  color_ids = rng.integers(len(COLORS), size=n)
  shape_ids = rng.integers(len(SHAPES), size=n)
  size_ids = rng.integers(len(SIZES), size=n)
  columns = np.sort(rng.choice(GRID, size=n, replace=False))
  colors = tuple(COLORS)
  cell = image_size / GRID
  return tuple(
      ShapeObject(
          colors[color_ids[k]],
          SHAPES[shape_ids[k]],
          SIZES[size_ids[k]],
          float((columns[k] + 0.5) * cell),
          _ROW_CENTER * cell,
      )
      for k in range(n)
  )


def _caption(objects: tuple[ShapeObject, ...]) -> str:
  # Chaining "left of" keeps one relation word and no punctuation, so every
  # word is a plain whitespace-separated token for the tokenizer.
  return " left of ".join(f"a {o.size} {o.color} {o.shape}" for o in objects)


def _shape_mask(obj: ShapeObject, image_size: int) -> np.ndarray:
  """Rasterizes one object (pixel centers inside the shape): bool [H, W]."""
  r = _RADIUS[obj.size] * image_size / GRID
  mask = np.zeros((image_size, image_size), dtype=bool)
  # Only the bounding box is evaluated: ~100 pixels instead of H * W.
  y0, y1 = max(int(obj.y_center - r), 0), min(
      int(obj.y_center + r) + 1, image_size
  )
  x0, x1 = max(int(obj.x_center - r), 0), min(
      int(obj.x_center + r) + 1, image_size
  )
  dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - obj.y_center
  dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - obj.x_center
  if obj.shape == "circle":
    inside = dx * dx + dy * dy <= r * r
  elif obj.shape == "square":
    # 0.85 r makes the square's area close to the circle's (pi r^2).
    h = 0.85 * r
    inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
  elif obj.shape == "triangle":
    # Apex up at -r, base of width 2r at +r.
    inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
  elif obj.shape == "cross":
    # Arms at least one pixel thick whatever the sub-pixel center.
    t = max(r / 3, 0.5)
    inside = ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | (
        (np.abs(dy) <= t) & (np.abs(dx) <= r)
    )
  else:
    raise ValueError(f"unknown shape {obj.shape!r}")
  mask[y0:y1, x0:x1] = inside
  return mask


def blank_image(image_size: int) -> np.ndarray:
  """The background alone: uint8 [image_size, image_size, 3]."""
  image = np.empty((image_size, image_size, 3), dtype=np.uint8)
  image[...] = BACKGROUND
  return image


def generate(seed: int, index: int, image_size: int = 32) -> Example:
  """Generates record `index` of the stream `seed` (both non-negative).

  Args:
    seed: stream seed; different seeds give independent streams.
    index: record index.
    image_size: H = W in pixels (24..224 keep all shapes recognizable).

  Returns:
    An `Example` with image uint8 [H, W, 3] and object_masks bool [3, H, W].
  """
  rng = np.random.default_rng([seed, index])
  objects = _sample_objects(rng, image_size)
  image = blank_image(image_size)
  masks = np.zeros((MAX_OBJECTS, image_size, image_size), dtype=bool)
  for k, obj in enumerate(objects):
    masks[k] = _shape_mask(obj, image_size)
    image[masks[k]] = COLORS[obj.color]
  return Example(
      image=image,
      caption=_caption(objects),
      objects=objects,
      object_masks=masks,
  )


def generate_caption(seed: int, index: int) -> str:
  """The caption of `generate(seed, index)` without drawing (tokenizer training)."""
  rng = np.random.default_rng([seed, index])
  # The caption does not depend on image_size; any size gives the same words.
  return _caption(_sample_objects(rng, 32))

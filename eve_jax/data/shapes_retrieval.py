"""EVE-Shapes image-text retrieval in the Karpathy-split format
(eve_jax/data/shapes_tasks.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence


from eve_jax.data import shapes
from eve_jax.data.shapes_tasks_common import (
    NUMBER_WORDS,
    SPLITS,
    save_image,
    stream_seed,
    write_json,
)

# --------------------------------------------------------------------------
# Retrieval (Karpathy format).


def _series(parts: Sequence[str]) -> str:
  """ "x", "x and y", "x, y and z"."""
  if len(parts) <= 2:
    return " and ".join(parts)
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def retrieval_captions(
    objects: Sequence[shapes.ShapeObject],
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
    return (
        caption,
        f"{full[0]} on a dark background",
        bare[0],
        f"one {o.size} {o.color} {o.shape}",
        f"the image shows {full[0]}",
    )
  places = (
      ("on the left", "on the right")
      if len(objects) == 2
      else ("on the left", "in the middle", "on the right")
  )
  return (
      caption,
      " right of ".join(reversed(full)),
      _series(bare),
      _series([f"{p} {where}" for p, where in zip(full, places)]),
      f"{NUMBER_WORDS[len(objects)]} objects, {_series(full)}",
  )


def _tokens(text: str) -> list[str]:
  # Karpathy's tokens: lowercased words without punctuation.
  return re.findall(r"[a-z0-9]+", text.lower())


def write_retrieval(
    out_dir: str, image_size: int, sizes: Sequence[int], seed: int
) -> tuple[str, str, int]:
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
        raise ValueError(
            f"retrieval {split}: only {written} distinct "
            f"scenes in {index} images, {n} asked for"
        )
      caption = shapes.generate_caption(stream, index)
      if split != "train" and caption in seen:
        index += 1
        continue
      seen.add(caption)
      written += 1
      example = shapes.generate(stream, index, image_size)
      filename = f"shapes_{split}_{index:06d}.jpg"
      save_image(example.image, os.path.join(image_root, split, filename))
      imgid = len(images)
      captions = retrieval_captions(example.objects)
      sentids = list(range(sentid, sentid + len(captions)))
      sentid += len(captions)
      images.append(
          {
              "filepath": split,
              "sentids": sentids,
              "filename": filename,
              "imgid": imgid,
              "split": split,
              "sentences": [
                  {"tokens": _tokens(c), "raw": c, "imid": imgid, "sentid": s}
                  for c, s in zip(captions, sentids)
              ],
          }
      )
      index += 1
  path = os.path.join(root, "dataset_shapes.json")
  write_json(path, {"images": images, "dataset": "shapes"})
  return path, image_root, len(images)

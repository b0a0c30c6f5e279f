"""Image decoding and augmentation for real photos (numpy/Pillow, per example).

Pretraining augmentation is the paper's: a random resized crop (area 0.5-1
of the image, aspect ratio 3/4-4/3, bicubic) and a horizontal flip with
probability 0.5; evaluation resizes the whole image. Pixels are then
normalized with mean = std = 0.5 (`normalize_image`, which every image
the model sees goes through: EVE-Shapes, corpora, downstream, inference).

JPEGs are decoded at a reduced scale when the crop is much larger than the
output (Pillow's `draft`, DCT scaling): a 640 px COCO photo cropped to 224
decodes at 320 px, about 3x less work, with the same crop geometry.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]: mean = std = 0.5 in [0, 1] units."""
  return image.astype(np.float32) / 127.5 - 1.0


def crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
  """A random (left, top, right, bottom) box covering `scale` of the area
  with aspect ratio in `ratio` (log-uniform); after 10 misses the largest
  central box within `ratio` (the usual RandomResizedCrop rule)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def decode(
    data: bytes, size: int, rng: np.random.Generator | None
) -> np.ndarray:
  """Encoded image -> uint8 [size, size, 3].

  Args:
    data: JPEG/PNG/... bytes.
    size: output height = width.
    rng: a generator for the random crop and flip (training); None for
      evaluation and inference: the whole image, decoded at full size and
      resized, so the pixels are exactly those of a plain PIL decode +
      bicubic resize (what the released EVE transform computes).

  Raises:
    OSError / ValueError (from Pillow) for bytes that do not decode.
  """
  img = Image.open(io.BytesIO(data))
  width, height = img.size
  if rng is None:
    box = (0, 0, width, height)
    flip = False
  else:
    box = crop_box(width, height, rng)
    flip = bool(rng.random() < 0.5)
    # Training only: the smallest JPEG DCT scale that keeps the crop >=
    # size on each side (several times faster on large photos; pixels
    # differ from a full decode by up to ~0.03 after normalization).
    cw, ch = box[2] - box[0], box[3] - box[1]
    img.draft(
        "RGB", (math.ceil(width * size / cw), math.ceil(height * size / ch))
    )
    sx, sy = img.size[0] / width, img.size[1] / height
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  img = img.convert("RGB").resize(
      (size, size), Image.Resampling.BICUBIC, box=box
  )
  if flip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(img, dtype=np.uint8)

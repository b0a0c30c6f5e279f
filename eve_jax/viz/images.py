"""Image arrays -> pictures: denormalizing, grids with titles, heat-map
overlays, PNG files.

Every picture here is a uint8 [H, W, 3] numpy array until `save_png`.
"""

from __future__ import annotations

import io
from typing import Sequence

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from eve_jax import storage

TEXT = (235, 235, 235)
BACKGROUND = (32, 32, 32)
FONT_SIZE = 12
TITLE_H = 18  # a line of text


@functools.cache
def font(size: int = FONT_SIZE):
  """Pillow's bundled font (no font files needed)."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # Pillow without FreeType
    return ImageFont.load_default()


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float [..., 3] in [-1, 1] (the pipeline's mean = std = 0.5) -> uint8."""
  x = (np.asarray(image, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def upscale(image: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize to size x size: patches stay sharp squares."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    *,
    col_titles: Sequence[str] = (),
    row_titles: Sequence[str] = (),
    cell: int = 128,
    pad: int = 4,
    title: str = "",
) -> np.ndarray:
  """Pictures in a table, each upscaled to cell x cell.

  Args:
    rows: rows of uint8 [h, w, 3] images.
    col_titles: one caption per column, drawn above the first row.
    row_titles: one line of text above each row.
    cell: side of each cell in pixels.
    pad: gap between cells.
    title: a line above everything.

  Returns:
    uint8 [H, W, 3].
  """
  n_cols = max(len(r) for r in rows)
  w = n_cols * (cell + pad) + pad
  title_lines = wrap(title, w - 2 * pad) if title else []
  row_h = cell + pad + (TITLE_H if row_titles else 0)
  top = len(title_lines) * TITLE_H + (TITLE_H if col_titles else 0)
  h = top + len(rows) * row_h + pad
  canvas = Image.new("RGB", (w, h), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  y = 0
  for line in title_lines:
    draw.text((pad, y + 2), line, fill=TEXT, font=font())
    y += TITLE_H
  if col_titles:
    for j, t in enumerate(col_titles):
      draw.text((pad + j * (cell + pad), y + 2), t, fill=TEXT, font=font())
    y += TITLE_H
  for i, row in enumerate(rows):
    if row_titles:
      draw.text((pad, y + pad), row_titles[i], fill=TEXT, font=font())
      y += TITLE_H
    for j, img in enumerate(row):
      canvas.paste(
          Image.fromarray(upscale(img, cell)), (pad + j * (cell + pad), y + pad)
      )
    y += cell + pad
  return np.asarray(canvas)


def wrap(text: str, width: int) -> list[str]:
  """Words of `text` in lines no wider than `width` pixels (a longer
  single word gets a line of its own)."""
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
  lines: list[str] = []
  for word in text.split():
    if lines and measure(lines[-1] + " " + word, font=font()) <= width:
      lines[-1] += " " + word
    else:
      lines.append(word)
  return lines or [""]


def vstack(pictures: Sequence[np.ndarray]) -> np.ndarray:
  """Pictures one under the other, left-aligned, on the background."""
  w = max(p.shape[1] for p in pictures)
  out = np.empty((sum(p.shape[0] for p in pictures), w, 3), np.uint8)
  out[...] = BACKGROUND
  y = 0
  for p in pictures:
    out[y : y + p.shape[0], : p.shape[1]] = p
    y += p.shape[0]
  return out


def colormap(x: np.ndarray) -> np.ndarray:
  """[...] values in [0, 1] -> uint8 [..., 3], dark blue -> red -> yellow
  (a perceptually ordered ramp; no plotting library needed)."""
  stops = np.array(
      [
          [0, 0, 80],
          [40, 40, 220],
          [220, 40, 40],
          [255, 220, 0],
          [255, 255, 200],
      ],
      np.float32,
  )
  x = np.clip(np.asarray(x, np.float32), 0, 1) * (len(stops) - 1)
  lo = np.minimum(np.floor(x).astype(int), len(stops) - 2)
  f = (x - lo)[..., None]
  return np.round(stops[lo] * (1 - f) + stops[lo + 1] * f).astype(np.uint8)


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    alpha: float = 0.6,
    size: int | None = None,
) -> np.ndarray:
  """A heat map over an image.

  Args:
    image: uint8 [H, W, 3].
    heat: [h, w] non-negative values (e.g. one per patch); scaled to
      [0, 1] by its max and resized to the picture: bilinearly, or as
      sharp cells when coarser than 8 x 8 (smoothing a 4 x 4 map would
      paint heat on cells that have none).
    alpha: weight of the heat map's colors.
    size: output side (default the image's).

  Returns:
    uint8 [size, size, 3].
  """
  size = size or image.shape[0]
  # A dimmed gray picture under the colors: a white object must not read
  # as a hot cell.
  base = upscale(image, size).astype(np.float32) @ np.float32(
      [0.299, 0.587, 0.114]
  )
  base = 0.5 * base[..., None]
  heat = np.asarray(heat, np.float32)
  heat = heat / heat.max() if heat.max() > 0 else np.zeros_like(heat)
  how = Image.BILINEAR if min(heat.shape) >= 8 else Image.NEAREST
  smooth = np.asarray(Image.fromarray(heat).resize((size, size), how))
  colors = colormap(smooth).astype(np.float32)
  return np.round((1 - alpha) * base + alpha * colors).astype(np.uint8)


def save_png(path: str, image: np.ndarray) -> str:
  """Writes uint8 [H, W, 3] to `path` (atomically: a reader never sees half
  a file); returns the path."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  storage.write_bytes(path, buf.getvalue())  # local or gs://
  return path

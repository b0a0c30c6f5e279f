"""Bar charts drawn with Pillow: expert routing (Figure 6) and per-word
Grad-CAM weights (Figure 8).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from eve_jax.viz.images import BACKGROUND, TEXT, font

# Image tokens blue, text tokens orange (as most VL papers color them).
SERIES_COLORS = ((70, 130, 230), (240, 150, 40), (120, 200, 120))
_GRID = (70, 70, 70)


def bar_chart(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    x_label: str = "",
    y_max: float | None = None,
    width: int | None = None,
    height: int = 260,
) -> np.ndarray:
  """Grouped vertical bars: one group per label, one bar per series.

  Args:
    labels: the groups' names along the x axis (experts, words).
    series: name -> one value per label (legend order = dict order).
    title: a line above the chart.
    x_label: the x axis' name, drawn at its right end.
    y_max: top of the y axis (default the largest value, rounded up).
    width: picture width (default grows with the number of bars).
    height: picture height.

  Returns:
    uint8 [height, width, 3].
  """
  names = list(series)
  values = np.asarray([series[n] for n in names], np.float64)  # [S, G]
  n_series, n_groups = values.shape
  if n_groups != len(labels):
    raise ValueError(
        f"{n_groups} values per series for {len(labels)} " "labels"
    )
  top = y_max or float(max(values.max(initial=0.0), 1e-9))
  if y_max is None:  # a round axis top: 1, 2, 5 x 10^k
    mag = 10 ** np.floor(np.log10(top))
    top = next(m * mag for m in (1, 2, 5, 10) if m * mag >= top - 1e-12)
  label_w = max(len(s) for s in labels) * 6 + 4
  group_w = max(n_series * 14 + 8, label_w)
  left, right, head, foot = 44, 10, 34, 30
  width = width or left + right + n_groups * group_w
  group_w = (width - left - right) / n_groups
  canvas = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  y0, y1 = head, height - foot  # axis top, axis bottom
  for k in range(5):  # horizontal grid lines with their values
    v = top * k / 4
    y = y1 - (y1 - y0) * k / 4
    draw.line([(left, y), (width - right, y)], fill=_GRID)
    draw.text((2, y - 7), f"{v:.2g}", fill=TEXT, font=font(11))
  bar_w = max((group_w - 8) / n_series, 2)
  for g in range(n_groups):
    x0 = left + g * group_w + 4
    for s in range(n_series):
      h = (y1 - y0) * min(values[s, g] / top, 1.0)
      xa = x0 + s * bar_w
      draw.rectangle(
          [xa, y1 - h, xa + bar_w - 2, y1],
          fill=SERIES_COLORS[s % len(SERIES_COLORS)],
      )
    draw.text(
        (left + g * group_w + 2, y1 + 4),
        str(labels[g]),
        fill=TEXT,
        font=font(11),
    )
  if x_label:
    draw.text(
        (width - right - draw.textlength(x_label, font=font(11)), height - 14),
        x_label,
        fill=TEXT,
        font=font(11),
    )
  if title:
    draw.text((4, 2), title, fill=TEXT, font=font())
  x = 4
  for s, name in enumerate(names):  # legend
    draw.rectangle(
        [x, 18, x + 10, 28], fill=SERIES_COLORS[s % len(SERIES_COLORS)]
    )
    draw.text((x + 14, 16), name, fill=TEXT, font=font(11))
    x += 14 + draw.textlength(name, font=font(11)) + 12
  return np.asarray(canvas)

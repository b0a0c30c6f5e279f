"""What a run writes for people: metrics.jsonl, eval.json, TensorBoard
(scalars and images), and a progress line on the terminal (or plain log
lines when not on one).

Only process 0 writes (multi-host runs construct these with `enabled=False`
elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np
from absl import logging


def _jsonable(v: Any) -> Any:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  if isinstance(v, (int, np.integer)):
    return int(v)
  return f if math.isfinite(f) else str(f)


def _drop_partial_line(path: str) -> None:
  """A run killed mid-write (kill -9, a dead node) can leave half a row at
  the end of a JSON-lines file; cut it so the resumed run appends whole rows
  after the complete ones."""
  try:
    with open(path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
        logging.warning(
            "%s ended in a partial row (a killed run); dropped " "it", path
        )
  except FileNotFoundError:
    pass


class MetricWriter:
  """Appends one JSON object per logged step to DIR/metrics.jsonl and the
  same scalars to TensorBoard (DIR/tensorboard)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if enabled:
      for name in ("metrics.jsonl", "eval.jsonl", "run.jsonl"):
        _drop_partial_line(os.path.join(workdir, name))
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(
      self, step: int, metrics: Mapping[str, Any], file: str = "metrics.jsonl"
  ) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(os.path.join(self.workdir, file), "a") as f:
      f.write(json.dumps(row) + "\n")
    prefix = "" if file == "metrics.jsonl" else "eval/"
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(prefix + k, v, step)
    self._tb.flush()

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """A uint8 [H, W, 3] picture to TensorBoard (its Images tab)."""
    if not self.enabled:
      return
    self._tb.add_image(
        tag, np.asarray(image, np.uint8), step, dataformats="HWC"
    )
    self._tb.flush()

  def write_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
    """DIR/eval.json (latest evaluation, replaced atomically) + history."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _jsonable(v) for k, v in metrics.items()})
    path = os.path.join(self.workdir, "eval.json")
    with open(path + ".tmp", "w") as f:
      json.dump(row, f, indent=1)
    os.replace(path + ".tmp", path)
    self.write(step, metrics, file="eval.jsonl")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
  """A live line: step, loss, samples/s, ETA. Plain log lines off a tty."""

  def __init__(
      self, total_steps: int, start_step: int, enabled: bool = True, stream=None
  ):
    self.total = total_steps
    self.start_step = start_step
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.t0 = time.perf_counter()

  def eta(self, step: int) -> float:
    done = step - self.start_step
    if done <= 0:
      return float("nan")
    return (time.perf_counter() - self.t0) / done * (self.total - step)

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    # The task's accuracy-like metric, when it logs one.
    acc = next(
        (
            k
            for k in ("mlm_acc", "vqa_score", "nlvr2_train_acc", "itm_acc")
            if k in metrics
        ),
        None,
    )
    acc = f"{acc} {float(metrics[acc]):.3f} " if acc else ""
    line = (
        f"step {step}/{self.total} loss {float(metrics['loss']):.4f} "
        f"{acc}{float(metrics['samples_per_s']):.1f} samples/s "
        f"ETA {_fmt_time(self.eta(step))}"
    )
    if self.tty:
      self.stream.write("\r" + line.ljust(100))
      self.stream.flush()
    else:
      logging.info("%s", line)

  def message(self, text: str) -> None:
    """A line that stays (evaluation results, checkpoints)."""
    if not self.enabled:
      return
    if self.tty:
      self.stream.write("\r" + " " * 100 + "\r")
    logging.info("%s", text)

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")

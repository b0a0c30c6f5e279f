"""What a run writes for people: metrics.jsonl, eval.json, TensorBoard
(scalars and images), and a progress line on the terminal (or plain log
lines when not on one).

Only process 0 writes (multi-host runs construct these with `enabled=False`
elsewhere).

In a `gs://` workdir the JSON-lines files (metrics.jsonl, eval.jsonl,
run.jsonl) are single objects with the same rows as a local run's, but an
object cannot be appended to in place: rows are kept in memory and added
at most every `GCS_FLUSH_S` seconds, before every checkpoint is saved and
at the end, each time with one server-side compose (`storage.append`: three
requests whatever the file's size, never a rewrite of the whole file). A
run killed in between loses only rows written after its last checkpoint,
which the resumed run logs again. TensorBoard events are written to a
local staging folder and uploaded at the same moments, one new events
object each time (TensorBoard reads every events file of a folder).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping

import numpy as np
from absl import logging

from eve_jax import storage

# On GCS: at most one append per object in this many seconds. Cloud Storage
# takes about one update per second to an object, and a run may log every
# step.
GCS_FLUSH_S = 10.0


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


class _StagedEvents:
  """TensorBoard events for a `gs://` folder: a SummaryWriter on a local
  staging folder whose file goes up as one new object at each `sync`
  (tensorboardX's own gs:// writer uploads the whole file at every flush)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._staging = tempfile.mkdtemp(prefix="eve_jax-tensorboard-")
    self._n = 0
    self._dirty = False  # events added since the last sync
    self._writer = self._open()

  def _open(self):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._n += 1
    # A suffix per file: two syncs in the same second get two names.
    return SummaryWriter(self._staging, filename_suffix=f".{self._n}")

  def add_scalar(self, *args, **kwargs):
    self._dirty = True
    self._writer.add_scalar(*args, **kwargs)

  def add_image(self, *args, **kwargs):
    self._dirty = True
    self._writer.add_image(*args, **kwargs)

  def flush(self) -> None:
    """Local only: the upload waits for `sync`."""
    self._writer.flush()

  def sync(self, reopen: bool = True) -> None:
    """Uploads the events added since the last sync as one new object."""
    if not self._dirty and reopen:
      return
    self._writer.close()
    for name in sorted(os.listdir(self._staging)):
      local = os.path.join(self._staging, name)
      if self._dirty:
        storage.upload(local, storage.join(self.directory, name))
      os.remove(local)
    self._dirty = False
    if reopen:
      self._writer = self._open()

  def close(self) -> None:
    self.sync(reopen=False)
    shutil.rmtree(self._staging, ignore_errors=True)


class MetricWriter:
  """Appends one JSON object per logged step to DIR/metrics.jsonl and the
  same scalars to TensorBoard (DIR/tensorboard); on GCS in batches (see
  the module docstring)."""

  def __init__(
      self, workdir: str, enabled: bool = True, flush_s: float = GCS_FLUSH_S
  ):
    self.enabled = enabled
    self.workdir = workdir
    self._gcs = storage.is_gcs(workdir)
    self._flush_s = flush_s
    self._rows: dict[str, list[str]] = {}  # GCS: file -> rows not yet sent
    self._flushed = time.monotonic()
    self._tb = None
    if enabled:
      for name in ("metrics.jsonl", "eval.jsonl", "run.jsonl"):
        if self._gcs:
          for part in storage.remove_parts(os.path.join(workdir, name)):
            logging.warning("removed %s, left by a killed run", part)
        else:
          _drop_partial_line(os.path.join(workdir, name))
      tb_dir = os.path.join(workdir, "tensorboard")
      if self._gcs:
        self._tb = _StagedEvents(tb_dir)
      else:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(tb_dir)

  def write(
      self, step: int, metrics: Mapping[str, Any], file: str = "metrics.jsonl"
  ) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _jsonable(v) for k, v in metrics.items()})
    if self._gcs:
      self._rows.setdefault(file, []).append(json.dumps(row) + "\n")
    else:
      with open(os.path.join(self.workdir, file), "a") as f:
        f.write(json.dumps(row) + "\n")
    prefix = "" if file == "metrics.jsonl" else "eval/"
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(prefix + k, v, step)
    self._tb.flush()
    if self._gcs and time.monotonic() - self._flushed >= self._flush_s:
      self.flush()

  def flush(self) -> None:
    """Sends the rows and events not yet in the bucket (GCS; locally every
    row is already in its file). The loop calls it before each checkpoint."""
    if not (self.enabled and self._gcs):
      return
    self._send_rows()
    self._tb.sync()
    self._flushed = time.monotonic()

  def _send_rows(self) -> None:
    for file, rows in self._rows.items():
      if rows:
        storage.append(
            os.path.join(self.workdir, file), "".join(rows).encode("utf-8")
        )
    self._rows = {}

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
    if self._gcs:  # one upload: atomic by itself
      storage.write_text(path, json.dumps(row, indent=1))
    else:
      with open(path + ".tmp", "w") as f:
        json.dump(row, f, indent=1)
      os.replace(path + ".tmp", path)
    self.write(step, metrics, file="eval.jsonl")

  def close(self) -> None:
    if self._tb is not None:
      if self._gcs:
        self._send_rows()
      self._tb.close()  # on GCS: the last events go up
      self._tb = None


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

"""The step watchdog: a hung step (a collective waiting on a host that is
gone, a wedged device) ends the process instead of the reservation.

A daemon thread watches the time since the last completed step. Steps are
counted where the host waits for the device (`beat` at each log line:
jitted steps are dispatched asynchronously, so only there is a step known
to be done). When nothing completes for the timeout, the thread writes every
Python thread's stack to DIR/stacks.process{i}.txt, prints one line naming
the step, the wait and the checkpoint a restart resumes from, and ends the
process with EXIT_HUNG, whatever the main thread is blocked in.

Timeout (`train.step_timeout_s`): > 0 seconds as given; < 0 (default)
automatic, max(10 x the median time between beats per step x steps per
beat, 600 s) once 3 beats were seen (until then the floor alone); 0 off.
Evaluation and checkpoint writes are not steps: `paused()` stops the clock.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator

from eve_jax import storage

# EX_TEMPFAIL: a restart with the same command may well succeed.
EXIT_HUNG = 75
AUTO_FLOOR_S = 600.0
AUTO_FACTOR = 10.0


COMMIT_FILE = "commit_success.txt"  # orbax's marker on GCS


def committed_steps(workdir: str) -> list[int]:
  """The checkpoint steps under DIR/checkpoints that are committed.

  Locally orbax writes a step into a temporary directory and renames it to
  the bare step number only when every process has finished writing
  (process 0 renames after a barrier), so a numeric name is a complete
  checkpoint and anything else (a `.orbax-checkpoint-tmp` directory a dead
  process left) is not one. On GCS the step's objects are written under
  their final name and the step counts only once its `commit_success.txt`
  marker exists (eve_jax/checkpoint.py).
  """
  return committed_in(os.path.join(workdir, "checkpoints"))


def committed_in(directory: str) -> list[int]:
  """`committed_steps` of a checkpoints folder itself."""
  if storage.is_gcs(directory):
    try:
      names = storage.listdir(directory)
      return sorted(
          int(n)
          for n in names
          if n.isdigit()
          and storage.exists(os.path.join(directory, n, COMMIT_FILE))
      )
    except (OSError, ValueError):
      return []
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(
      int(n)
      for n in names
      if n.isdigit() and os.path.isdir(os.path.join(directory, n))
  )


def resume_note(workdir: str, timeout_s: float | None = None) -> str:
  """'resumes from step N' / 'starts over' for a restart of this run.

  Args:
    timeout_s: give up listing the checkpoints after this long (a hung
      process may have a hung network too) and say where they are instead.
  """
  if timeout_s is None:
    steps = committed_steps(workdir)
  else:
    found: list[list[int]] = []
    t = threading.Thread(
        target=lambda: found.append(committed_steps(workdir)), daemon=True
    )
    t.start()
    t.join(timeout_s)
    if not found:
      return (
          "the same command resumes from the last committed checkpoint "
          f"in {os.path.join(workdir, 'checkpoints')}"
      )
    steps = found[0]
  return (
      f"the same command resumes from step {steps[-1]}"
      if steps
      else "no checkpoint is committed yet: the same command starts over"
  )


class Watchdog:
  """See the module docstring. Use as a context manager around the loop."""

  def __init__(
      self,
      timeout_s: float,
      workdir: str,
      process_index: int = 0,
      *,
      exit_fn: Callable[[int], None] = os._exit,
      stream=None,
  ):
    self.timeout_s = float(timeout_s)
    self.workdir = workdir
    self.process_index = process_index
    self.stacks_path = os.path.join(
        workdir, f"stacks.process{process_index}.txt"
    )
    self._exit = exit_fn
    self._stream = stream
    self._lock = threading.Lock()
    self._last = time.monotonic()
    self._step = 0
    self._paused = 0
    self._per_step: list[float] = []
    self._done = threading.Event()
    self._thread: threading.Thread | None = None
    self.fired = False

  @property
  def enabled(self) -> bool:
    return self.timeout_s != 0

  def limit(self) -> float:
    """The current timeout in seconds."""
    if self.timeout_s > 0:
      return self.timeout_s
    with self._lock:
      per = list(self._per_step)
    if len(per) < 3:
      return AUTO_FLOOR_S
    return max(
        AUTO_FACTOR * statistics.median(per) * self._steps_per_beat,
        AUTO_FLOOR_S,
    )

  def beat(self, step: int) -> None:
    """`step` is complete (its metrics were read back from the device)."""
    now = time.monotonic()
    with self._lock:
      if step > self._step and not self._paused:
        n = step - self._step
        self._per_step.append((now - self._last) / n)
        self._per_step = self._per_step[-50:]
        self._steps_per_beat = n
      self._step, self._last = step, now

  _steps_per_beat = 1

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Not a step: evaluation, a checkpoint write. The clock restarts after."""
    with self._lock:
      self._paused += 1
    try:
      yield
    finally:
      with self._lock:
        self._paused -= 1
        self._last = time.monotonic()

  def __enter__(self) -> "Watchdog":
    if self.enabled:
      self._last = time.monotonic()
      self._thread = threading.Thread(
          target=self._watch, daemon=True, name="eve_jax-watchdog"
      )
      self._thread.start()
    return self

  def __exit__(self, *_) -> None:
    self._done.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def _watch(self) -> None:
    while not self._done.wait(self._poll_s()):
      with self._lock:
        paused = self._paused > 0
        waited = time.monotonic() - self._last
        step = self._step
      limit = self.limit()
      if not paused and waited > limit:
        self._fire(step, waited, limit)
        return

  def _poll_s(self) -> float:
    return max(0.05, min(5.0, self.limit() / 20))

  def _fire(self, step: int, waited: float, limit: float) -> None:
    self.fired = True
    try:
      if storage.is_gcs(self.stacks_path):
        with tempfile.TemporaryFile("w+") as f:
          faulthandler.dump_traceback(f, all_threads=True)
          f.seek(0)
          text = f.read()
        # Bounded: the exit must come even when the network hangs too.
        up = threading.Thread(
            target=storage.write_text,
            args=(self.stacks_path, text),
            daemon=True,
        )
        up.start()
        up.join(30)
      else:
        with open(self.stacks_path, "w") as f:
          faulthandler.dump_traceback(f, all_threads=True)
      stacks = f"Python stacks in {self.stacks_path}"
    except (OSError, ValueError) as e:
      stacks = f"cannot write the stacks ({e})"
    how = (
        f"train.step_timeout_s={self.timeout_s:g}"
        if self.timeout_s > 0
        else f"automatic limit {limit:.0f} s"
    )
    stream = self._stream or sys.stderr
    print(
        f"eve_jax: error: process {self.process_index}: no training step "
        f"finished for {waited:.0f} s after step {step} ({how}): a step is "
        f"hung, e.g. a collective waiting on a lost host; {stacks}; "
        f"restart every process: {resume_note(self.workdir, 30)}",
        file=stream,
        flush=True,
    )
    self._exit(EXIT_HUNG)

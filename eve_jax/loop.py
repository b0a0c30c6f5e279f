"""The step loop pretraining and fine-tuning share: step, log, evaluate,
checkpoint.

Everything task-specific comes in as arguments: the compiled step, the
batch source, the evaluation, and extra numbers for the log lines.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from eve_jax.checkpoint import Checkpointer
from eve_jax.watchdog import Watchdog
from eve_jax.writers import MetricWriter, Progress

# Test hook: "PROCESS:STEP" makes that process block forever before that
# step (a hung host, for tests/test_faults.py). Unset in real runs.
HANG_ENV = "EVE_JAX_TEST_HANG_BEFORE_STEP"


def _hang_step() -> int | None:
  """The step `HANG_ENV` asks this process to block before, if any."""
  process, _, step = os.environ.get(HANG_ENV, "").partition(":")
  return int(step) if step and process == str(jax.process_index()) else None


def _hang(step: int) -> None:
  logging.warning("%s: blocking before step %d", HANG_ENV, step)
  while True:
    time.sleep(3600)


class StopRequest:
  """SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, save a
  checkpoint, return normally (exit code 0). A second signal interrupts at
  once (KeyboardInterrupt).

  With several processes all must stop at the same step (the checkpoint is
  written by all): they agree every `sync_every` steps with one tiny
  all-gather, so a signal to any process stops all of them there.
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:
      raise KeyboardInterrupt(f"signal {signum} again")
    self.signal = signum
    logging.warning(
        "received %s: stopping after this step with a " "checkpoint",
        signal.Signals(signum).name,
    )

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *_):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def requested(self, step: int, sync_every: int) -> bool:
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    if step % max(sync_every, 1):
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def run_steps(
    state: Any,
    compiled: Callable,
    first_batch: Any,
    batches: Iterator[Any],
    *,
    start: int,
    total_steps: int,
    batch_size: int,
    log_every: int,
    eval_every: int,
    evaluate: Callable[[Any], dict[str, float]],
    data_state: Callable[[], Any],
    writer: MetricWriter,
    ckpt: Checkpointer,
    is_main: bool,
    log_extra: Callable[[], dict[str, float]] | None = None,
    max_bad_steps: int = 0,
    step_timeout_s: float = 0,
    workdir: str = "",
) -> tuple[Any, dict[str, float]]:
  """Steps from `start` to `total_steps`.

  Args:
    state: the train state (donated to `compiled` each step).
    compiled: (state, batch) -> (state, metrics of scalars, incl. loss, lr).
    first_batch: the batch `compiled` was lowered with (step start + 1).
    batches: the global batches after it.
    log_every, eval_every: in steps (eval_every 0: only at the end).
    evaluate: state -> eval.json numbers ({} to write nothing).
    data_state: the iterator state saved with each checkpoint.
    log_extra: more numbers for each log line (e.g. images skipped).
    max_bad_steps: stop with `NonFiniteError` after this many steps in a row
      whose loss or gradient was not finite (each one skipped by the step
      function, which reports it as metrics["nonfinite"]); 0: never stop.
      Counted at log steps, so the stop comes at the first log step after.
    step_timeout_s: the step watchdog's timeout (`eve_jax.watchdog`: > 0
      seconds, < 0 automatic, 0 off); it writes its stacks file into
      `workdir`.

  Returns:
    (final state, the last evaluation).
  """
  watchdog = Watchdog(
      step_timeout_s if workdir else 0, workdir, jax.process_index()
  )
  with StopRequest() as stop, watchdog:
    try:
      return _steps(
          state,
          compiled,
          first_batch,
          batches,
          stop,
          start=start,
          total_steps=total_steps,
          batch_size=batch_size,
          log_every=log_every,
          eval_every=eval_every,
          evaluate=evaluate,
          data_state=data_state,
          writer=writer,
          ckpt=ckpt,
          is_main=is_main,
          log_extra=log_extra,
          max_bad_steps=max_bad_steps,
          watchdog=watchdog,
      )
    except Exception:
      # A checkpoint still being written finishes before the error leaves:
      # what was saved is not lost to a later failure.
      ckpt.wait()
      raise


class NonFiniteError(ValueError):
  """Too many non-finite steps in a row; the message is one line."""


def log_means(pending: list[dict[str, Any]]) -> dict[str, float]:
  """The log line of the steps since the last one: the means over the
  steps that were applied, `skipped_steps` = how many were not (non-finite
  loss or gradient), the lr of the last step."""
  rows = [{k: float(v) for k, v in m.items()} for m in pending]
  good = [r for r in rows if not r.get("nonfinite", 0.0)] or rows
  means = {
      k: float(np.mean([r[k] for r in good]))
      for k in rows[0]
      if k != "nonfinite"
  }
  means["skipped_steps"] = int(sum(r.get("nonfinite", 0.0) for r in rows))
  means["lr"] = rows[-1]["lr"]
  return means


def _steps(
    state,
    compiled,
    first_batch,
    batches,
    stop: StopRequest,
    *,
    start,
    total_steps,
    batch_size,
    log_every,
    eval_every,
    evaluate,
    data_state,
    writer,
    ckpt,
    is_main,
    log_extra,
    max_bad_steps,
    watchdog: Watchdog,
):
  progress = Progress(total_steps, start, enabled=is_main)
  pending: list[dict[str, Any]] = []
  t_log, n_log = time.perf_counter(), 0
  last_eval: dict[str, float] = {}
  bad_in_row = 0

  def flush(step):
    """One log line; raises NonFiniteError after too many bad steps."""
    nonlocal pending, t_log, n_log, bad_in_row
    first = step - len(pending) + 1
    flags = [int(m.get("nonfinite", 0)) for m in pending]
    means = log_means(pending)
    means["samples_per_s"] = n_log / max(time.perf_counter() - t_log, 1e-9)
    means.update(log_extra() if log_extra else {})
    writer.write(step, means)
    watchdog.beat(step)  # the means were read back: these steps are done
    progress.update(step, means)
    pending, t_log, n_log = [], time.perf_counter(), 0
    for i, bad in enumerate(flags):
      bad_in_row = bad_in_row + 1 if bad else 0
      if max_bad_steps and bad_in_row >= max_bad_steps:
        last = ckpt.latest_step()
        raise NonFiniteError(
            f"loss or gradient not finite for {bad_in_row} steps in a row "
            f"(steps {first + i - bad_in_row + 1}-{first + i}, none applied; "
            f"train.max_bad_steps={max_bad_steps}); the last checkpoint "
            f"(step {last}) is intact: check the data or lower optim.lr"
        )
    if any(flags):
      logging.warning(
          "step %d: %d of the last %d steps had a non-finite "
          "loss or gradient and were skipped",
          step,
          sum(flags),
          len(flags),
      )

  step = start
  hang_at = _hang_step()
  while step < total_steps:
    batch = first_batch if step == start else next(batches)
    if step + 1 == hang_at:
      _hang(hang_at)
    state, metrics = compiled(state, batch)
    step += 1
    pending.append(metrics)
    n_log += batch_size
    if step % log_every == 0 or step == total_steps:
      flush(step)
    if stop.requested(step, log_every):
      if pending:
        flush(step)
      with watchdog.paused():
        writer.flush()
        ckpt.save(step, state, data_state())
      progress.message(
          f"stopped at step {step} by "
          f"{signal.Signals(stop.signal or 15).name}; "
          "checkpoint saved, the same command resumes"
      )
      break
    if (eval_every and step % eval_every == 0) or step == total_steps:
      t_eval = time.perf_counter()
      with watchdog.paused():
        last_eval = evaluate(state)
      if last_eval:
        writer.write_eval(step, last_eval)
        # The per-expert routing fractions go to eval.json, not the log.
        progress.message(
            f"eval at step {step}: "
            + json.dumps(
                {
                    k: round(v, 4) if isinstance(v, float) else v
                    for k, v in last_eval.items()
                    if not k.startswith("routing/")
                }
            )
        )
      # Evaluation time is not training throughput.
      t_log += time.perf_counter() - t_eval
    if ckpt.should_save(step, total_steps):
      with watchdog.paused():
        # The rows up to this checkpoint are in the bucket before it can
        # commit: a killed run loses only rows its resume logs again.
        writer.flush()
        ckpt.save(step, state, data_state())
  progress.close()
  return state, last_eval

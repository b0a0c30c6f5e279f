"""The step loop pretraining and fine-tuning share: step, log, evaluate,
checkpoint.

Everything task-specific comes in as arguments: the compiled step, the
batch source, the evaluation, and extra numbers for the log lines.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

import numpy as np

from eve_jax.checkpoint import Checkpointer
from eve_jax.writers import MetricWriter, Progress


def run_steps(state: Any, compiled: Callable, first_batch: Any,
              batches: Iterator[Any], *, start: int, total_steps: int,
              batch_size: int, log_every: int, eval_every: int,
              evaluate: Callable[[Any], dict[str, float]],
              data_state: Callable[[], Any], writer: MetricWriter,
              ckpt: Checkpointer, is_main: bool,
              log_extra: Callable[[], dict[str, float]] | None = None
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

  Returns:
    (final state, the last evaluation).
  """
  progress = Progress(total_steps, start, enabled=is_main)
  pending: list[dict[str, Any]] = []
  t_log, n_log = time.perf_counter(), 0
  last_eval: dict[str, float] = {}
  step = start
  while step < total_steps:
    batch = first_batch if step == start else next(batches)
    state, metrics = compiled(state, batch)
    step += 1
    pending.append(metrics)
    n_log += batch_size
    if step % log_every == 0 or step == total_steps:
      means = {k: float(np.mean([float(m[k]) for m in pending]))
               for k in pending[0]}
      means["samples_per_s"] = n_log / max(time.perf_counter() - t_log, 1e-9)
      means["lr"] = float(pending[-1]["lr"])
      means.update(log_extra() if log_extra else {})
      writer.write(step, means)
      progress.update(step, means)
      pending, t_log, n_log = [], time.perf_counter(), 0
    if (eval_every and step % eval_every == 0) or step == total_steps:
      t_eval = time.perf_counter()
      last_eval = evaluate(state)
      if last_eval:
        writer.write_eval(step, last_eval)
        progress.message(f"eval at step {step}: " + json.dumps(
            {k: round(v, 4) for k, v in last_eval.items()}))
      # Evaluation time is not training throughput.
      t_log += time.perf_counter() - t_eval
    if ckpt.should_save(step, total_steps):
      ckpt.save(step, state, data_state())
  progress.close()
  return state, last_eval

"""One compile: the report of a config's training step on a target."""

from __future__ import annotations

import time

from eve_jax import storage
from eve_jax.aot import build, extrapolate, report


def compile_one(
    config,
    target,
    depth: str | None = None,
    hlo_out: str | None = None,
    vocab_size: int | None = None,
    num_answers: int = 3129,
) -> dict:
  """The report of `config`'s step on `target` (depth-extrapolated when
  `depth` is "A,B")."""
  if depth:
    return extrapolate.compile_extrapolated(
        config, target, depth, vocab_size=vocab_size, num_answers=num_answers
    )
  return _compile(config, target, hlo_out, vocab_size, num_answers)


def _compile(config, target, hlo_out, vocab_size, num_answers) -> dict:
  built = build.lower_step(
      config, target.devices, vocab_size=vocab_size, num_answers=num_answers
  )
  t0 = time.perf_counter()
  try:
    compiled = built.lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if report.is_out_of_memory(e):
      return report.does_not_fit(
          target, built, report.oom_line(e), time.perf_counter() - t0
      )
    raise
  compile_s = time.perf_counter() - t0
  if hlo_out:  # a local path or gs://
    storage.write_text(hlo_out, compiled.as_text())
  return report.report(target, built, compiled, compile_s)
